"""A node's internal HTTP API: what gateways call over the authenticated link.

POST creates a session (with the create header) or delivers client messages,
answered as JSON or as an SSE stream; GET opens the session's stream; DELETE
ends it. `serve_node` runs a node with this API until its context ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from actors.http import bind_socket, error_answer, health_routes, internal_only, tether_errors
from actors.internal import (
    BATCH_HEADER,
    CREATE_HEADER,
    DECLINED_HEADER,
    EPOCH_HEADER,
    INCARNATION_HEADER,
    NODE_HEADER,
    RESPONSE_HEADER,
    SESSIONS_PATH,
)
from actors.mcp import Kind, Message, check_message, kind_of
from actors.node import Declined, Node
from actors.session import Outbox, SessionActor
from actors.sse import HEADERS as SSE_HEADERS
from actors.sse import PING, event
from actors.store.base import Store
from tether.config import Config
from tether.errors import BadRequest, OwnershipConflict
from tether.tasks import TaskSet

log = logging.getLogger("tether.node")

NODE_KEY = web.AppKey("node", Node)
TASKS_KEY = web.AppKey("tasks", TaskSet)


def _parse(body: bytes) -> list[Message]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"Parse error: {exc}") from exc
    return [check_message(m) for m in (data if isinstance(data, list) else [data])]


async def post_message(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE_KEY]
    sid = request.match_info["sid"]
    messages = _parse(await request.read())
    wants_sse = request.headers.get(RESPONSE_HEADER) == "sse"
    if request.headers.get(CREATE_HEADER):
        return await _create(request, node, sid, messages[0], wants_sse)
    actor = node.live(sid)
    actor.lease.touch(node.clock())
    outbox = actor.submit(messages, json_only=not wants_sse)
    for message in messages:
        node.metrics.messages[kind_of(message).value].inc()
    if outbox is None:
        return web.Response(status=202)
    started = node.clock()
    try:
        if wants_sse:
            return await _stream_answers(request, node, actor, outbox)
        answers = await _collect_answers(node, actor, outbox)
        body: Any = answers if request.headers.get(BATCH_HEADER) else answers[0]
        return web.Response(body=orjson.dumps(body), content_type="application/json")
    finally:
        if not outbox.closed:
            actor.abandon(outbox, "Client went away")
        node.metrics.request_seconds.observe(node.clock() - started)
        actor.lease.touch(node.clock())


async def _create(request: web.Request, node: Node, sid: str, message: Message,
                  wants_sse: bool) -> web.StreamResponse:
    if kind_of(message) is not Kind.REQUEST or message.get("method") != "initialize":
        raise BadRequest("Invalid Request: a new session starts with an initialize request")
    try:
        # Shielded: a client that leaves mid-start must not leave a half-made actor behind; the
        # session it would have had is reaped by idle expiry.
        actor, answer = await asyncio.shield(node.create(sid, message))
    except Declined as exc:
        response = error_answer(exc)
        response.headers[DECLINED_HEADER] = "1"
        return response
    except OwnershipConflict as exc:  # a named session another node owns: the gateway goes there
        return error_answer(exc)
    headers = {NODE_HEADER: node.node_id}
    if actor is not None:
        headers[EPOCH_HEADER] = str(actor.record.epoch)
        headers[INCARNATION_HEADER] = actor.record.incarnation
    if wants_sse:
        return web.Response(body=event(answer), headers={**SSE_HEADERS, **headers})
    return web.Response(body=orjson.dumps(answer), content_type="application/json", headers=headers)


async def _collect_answers(node: Node, actor: SessionActor, outbox: Outbox) -> list[Message]:
    answers: list[Message] = []
    try:
        async with asyncio.timeout(node.config.upstream_request_timeout):
            while (message := await outbox.queue.get()) is not None:
                answers.append(message)
    except TimeoutError:
        answers += actor.abandon(outbox, _timeout_reason(node))
    return answers


async def _stream_answers(request: web.Request, node: Node, actor: SessionActor,
                          outbox: Outbox) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    try:
        async with asyncio.timeout(node.config.upstream_request_timeout) as whole:
            async for message in _with_pings(outbox, node.config.keepalive_interval):
                await response.write(PING if message is None else event(message))
    except TimeoutError:
        if not whole.expired():
            raise
        for owed in actor.abandon(outbox, _timeout_reason(node)):
            await response.write(event(owed))
    except ConnectionError:
        pass  # the gateway (or the client behind it) went away; the caller abandons the outbox
    return response


async def _with_pings(outbox: Outbox, interval: float) -> AsyncIterator[Message | None]:
    """The outbox's messages until it closes, with None each `interval` of silence (a ping is due)."""
    while True:
        try:
            async with asyncio.timeout(interval):
                message = await outbox.queue.get()
        except TimeoutError:
            yield None
            continue
        if message is None:
            return
        yield message


def _timeout_reason(node: Node) -> str:
    return f"Upstream did not answer within {node.config.upstream_request_timeout:g}s"


async def open_stream(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE_KEY]
    actor = node.live(request.match_info["sid"])
    stream = actor.open_stream()
    node.metrics.streams_open.inc()
    response = web.StreamResponse(headers=SSE_HEADERS)
    try:
        await response.prepare(request)
        async for message in _with_pings(stream, node.config.keepalive_interval):
            await response.write(PING if message is None else event(message))
            actor.lease.touch(node.clock())  # it got through: the client is still there
    except ConnectionError:
        pass
    finally:
        actor.close_stream(stream)
        node.metrics.streams_open.dec()
    return response


async def delete_session(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    sid = request.match_info["sid"]
    node.live(sid)
    await node.end(sid, "deleted")
    return web.Response(status=200)


async def admin_drain(request: web.Request) -> web.Response:
    """Start draining (as SIGTERM does); the node exits once the drain is done. Needs the secret."""
    node = request.app[NODE_KEY]
    if not node.draining:
        request.app[TASKS_KEY].spawn(node.drain(node.config.drain_timeout), "drain")
    return web.json_response({"draining": True, "sessions": len(node.actors),
                              "drain_timeout": node.config.drain_timeout}, status=202)


def build_node_app(node: Node) -> web.Application:
    app = web.Application(middlewares=[internal_only(node.config.internal_secret, ("/_tether/", "/admin/")),
                                       tether_errors],
                          client_max_size=node.config.max_body_bytes)
    app[TASKS_KEY] = TaskSet(f"node-{node.node_id}-admin")
    app.router.add_post("/admin/drain", admin_drain)
    app[NODE_KEY] = node
    path = SESSIONS_PATH + "/{sid}"
    app.add_routes([web.post(path, post_message), web.get(path, open_stream),
                    web.delete(path, delete_session)])
    app.add_routes(health_routes(node.metrics.registry, node.ready))
    return app


@contextlib.asynccontextmanager
async def serve_node(config: Config, store: Store, argv: list[str],
                     node_id: str | None = None) -> AsyncIterator[Node]:
    """Run a node on `config.host:config.port` (0: any free port) until the context ends."""
    sock = bind_socket(config.host, config.port)
    port = sock.getsockname()[1]
    node_id = node_id or config.node_id or f"node-{config.host}-{port}"
    node = Node(config, store, node_id, argv)
    node.url = config.advertise or f"http://{_url_host(config.host)}:{port}"
    # handler_cancellation: when the gateway drops a link request (its client left), the handler's
    # cleanup runs at once: the request is abandoned upstream, the GET stream slot freed.
    runner = web.AppRunner(build_node_app(node), access_log=None, handle_signals=False,
                           shutdown_timeout=1.0, handler_cancellation=True)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    node.start_loops()
    log.info("node.started", extra={"node": node.node_id, "url": node.url})
    try:
        yield node
    finally:
        await node.shutdown()
        await runner.cleanup()
        log.info("node.stopped", extra={"node": node.node_id})


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
