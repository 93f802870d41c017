"""A node's internal HTTP API: what gateways call over the authenticated link.

POST creates a session (with the create header) or delivers client messages,
answered as JSON, as an SSE stream, or (for a channel client: WebSocket or
HTTP+SSE) with 202 and the answers on the channel; GET opens the session's
stream, or resumes the stream a `Last-Event-ID` names; DELETE ends it.
`serve_node` runs a node with this API until its context ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator

import orjson
from aiohttp import web

from actors.events import EventId, StreamLog
from actors.http import bind_socket, error_answer, health_routes, internal_only, tether_errors
from actors.internal import (
    BATCH_HEADER,
    CREATE_HEADER,
    DECLINED_HEADER,
    EPOCH_HEADER,
    INCARNATION_HEADER,
    NODE_HEADER,
    PRINCIPAL_HEADER,
    QUOTA_HEADER,
    RESPONSE_HEADER,
    SESSIONS_PATH,
)
from actors.mcp import (
    DEFAULT_HTTP_VERSION,
    PRIMING_SINCE,
    VERSION_HEADER,
    Kind,
    Message,
    check_depth,
    check_message,
    error_response,
    kind_of,
)
from actors.node import Declined, Node
from actors.session import CHANNEL, JSON, MODES, SSE, SessionActor
from actors.sse import HEADERS as SSE_HEADERS
from actors.sse import PING, event, priming
from actors.store.base import Store
from tether.config import Config
from tether.errors import INVALID_REQUEST, BadRequest, CursorExpired, Overloaded, OwnershipConflict, ParseError
from tether.tasks import TaskSet

log = logging.getLogger("tether.node")

NODE_KEY = web.AppKey("node", Node)
TASKS_KEY = web.AppKey("tasks", TaskSet)


def _parse(body: bytes, max_depth: int | None = None) -> list[Message]:
    """Client messages from a body. Only channel frames need `max_depth`: the gateway checked every
    other body before it crossed the link, but passes a WebSocket's frames on as they came."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ParseError(f"Parse error: the message is not valid JSON ({exc})") from exc
    if max_depth is not None:
        check_depth(body, max_depth)
    return [check_message(m) for m in (data if isinstance(data, list) else [data])]


async def post_message(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE_KEY]
    sid = request.match_info["sid"]
    body = await request.read()
    mode = request.headers.get(RESPONSE_HEADER, JSON)
    if mode not in MODES:
        raise BadRequest(f"Bad Request: {RESPONSE_HEADER} must be one of {', '.join(MODES)}")
    if request.headers.get(CREATE_HEADER):
        return await _create(request, node, sid, _parse(body) if body else [], mode)
    actor = node.live(sid, request.headers.get(PRINCIPAL_HEADER, ""))
    actor.lease.touch(node.clock())
    if mode == CHANNEL:
        return _to_channel(node, actor, body)
    messages = _parse(body)
    stream = actor.submit(messages, mode)
    for message in messages:
        node.metrics.messages[kind_of(message).value].inc()
    if stream is None:
        return web.Response(status=202)
    started = node.clock()
    try:
        if mode == SSE:
            return await _stream(request, node, actor, stream, 0)
        answers = await _collect(node, actor, stream)
        return web.Response(body=orjson.dumps(answers if request.headers.get(BATCH_HEADER) else answers[0]),
                            content_type="application/json")
    finally:
        node.metrics.request_seconds.observe(node.clock() - started)
        actor.lease.touch(node.clock())


def _to_channel(node: Node, actor: SessionActor, body: bytes) -> web.Response:
    """A channel client's message: 202, and everything it is owed, errors too, on its channel, so
    that a WebSocket client's message count stays the channel's event count."""
    messages: list[Message] = []
    try:
        messages = _parse(body, node.config.max_json_depth)
        actor.submit(messages, CHANNEL)
    except (BadRequest, Overloaded) as exc:
        first = messages[0].get("id") if len(messages) == 1 else None
        actor.report(error_response(first if isinstance(first, str | int) else None,
                                    exc.rpc_code or INVALID_REQUEST, exc.message, exc.data))
    for message in messages:
        node.metrics.messages[kind_of(message).value].inc()
    return web.Response(status=202)


async def _create(request: web.Request, node: Node, sid: str, messages: list[Message],
                  mode: str) -> web.StreamResponse:
    initialize = messages[0] if messages else None
    if mode != CHANNEL and (initialize is None or kind_of(initialize) is not Kind.REQUEST
                            or initialize.get("method") != "initialize"):
        raise BadRequest("Invalid Request: a new session starts with an initialize request")
    try:
        # Shielded: a client that leaves mid-start must not leave a half-made actor behind; the
        # session it would have had is reaped by idle expiry.
        actor, answer = await asyncio.shield(node.create(
            sid, initialize if mode != CHANNEL else None, principal=request.headers.get(PRINCIPAL_HEADER, ""),
            quota=request.headers.get(QUOTA_HEADER, "")))
    except Declined as exc:
        response = error_answer(exc)
        response.headers[DECLINED_HEADER] = "1"
        return response
    except OwnershipConflict as exc:  # a named session another node owns: the gateway goes there
        return error_answer(exc)
    headers = {NODE_HEADER: node.node_id}
    if actor is not None:
        actor.channel = actor.channel or mode == CHANNEL
        headers[EPOCH_HEADER] = str(actor.record.epoch)
        headers[INCARNATION_HEADER] = actor.record.incarnation
    if answer is None:
        return web.Response(status=201, headers=headers)
    if mode == SSE:
        return web.Response(body=event(answer), headers={**SSE_HEADERS, **headers})
    return web.Response(body=orjson.dumps(answer), content_type="application/json", headers=headers)


async def _collect(node: Node, actor: SessionActor, stream: StreamLog) -> list[Message]:
    """The answers of a JSON POST. The actor answers a request the upstream sits on with a timeout error."""
    try:
        return [item[1] async for item in actor.read(stream, 0, node.config.keepalive_interval)
                if item is not None]
    finally:
        actor.forget(stream)


async def _stream(request: web.Request, node: Node, actor: SessionActor, stream: StreamLog,
                  after: int) -> web.StreamResponse:
    """Serve `stream` as SSE from seq `after`: replay, then live, with event ids and keep-alive pings.

    A client that goes away only detaches: the stream's events go on into the
    log for a reader that comes back with Last-Event-ID.
    """
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)  # the headers go out with the first write
    # The priming event leaves with the first event, and the last event with the end of the body:
    # a POST's whole answer is one write (one system call, one TCP segment), not three.
    pending = b""
    if request.headers.get(VERSION_HEADER, DEFAULT_HTTP_VERSION) >= PRIMING_SINCE:
        pending = priming(EventId(stream.stream, after), round(node.config.stream_retry * 1000))
    node.metrics.streams_open.inc()
    try:
        async with contextlib.aclosing(actor.read(stream, after, node.config.keepalive_interval)) as items:
            async for item in items:
                chunk = pending + (PING if item is None else event(item[1], event_id=item[0]))
                pending = b""
                if item is not None and stream.finished and item[0].seq >= stream.last_seq:
                    await response.write_eof(chunk)
                    stream.delivered = max(stream.delivered, item[0].seq)  # read() is closed before it can
                    return response
                await response.write(chunk)
                actor.lease.touch(node.clock())  # it got through: the client is still there
        if pending:
            await response.write(pending)
    except CursorExpired:
        log.warning("stream.fell_behind", extra={"sid": actor.tag, "count": actor.log.limit})
    except ConnectionError:
        pass  # the client went away; the stream waits in the log for it to come back
    finally:
        node.metrics.streams_open.dec()
    return response


async def open_stream(request: web.Request) -> web.StreamResponse:
    """GET: the session's stream, or with Last-Event-ID the stream it names, resumed after it."""
    node = request.app[NODE_KEY]
    actor = node.live(request.match_info["sid"], request.headers.get(PRINCIPAL_HEADER, ""))
    last = request.headers.get("Last-Event-ID")
    cursor = EventId.parse(last, default_stream=0) if last else None
    stream, after = actor.stream_to_read(cursor)
    if cursor is not None:
        node.metrics.events_replayed.inc(max(0, stream.last_seq - after))
    actor.lease.touch(node.clock())
    return await _stream(request, node, actor, stream, after)


async def delete_session(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    sid = request.match_info["sid"]
    node.live(sid, request.headers.get(PRINCIPAL_HEADER, ""))
    await node.end(sid, "deleted")
    return web.Response(status=200)


MAX_DRAIN_WAIT = 60.0


async def admin_drain(request: web.Request) -> web.Response:
    """Start draining (as SIGTERM does); the node exits once the drain is done. Needs the secret."""
    node = request.app[NODE_KEY]
    if not node.draining:
        request.app[TASKS_KEY].spawn(node.drain(node.config.drain_timeout), "drain")
    return _drain_status(node, status=202)


async def drain_status(request: web.Request) -> web.Response:
    """Where the drain is; with `?wait=SECONDS` (at most 60) answer once it is done or the wait ends."""
    node = request.app[NODE_KEY]
    raw = request.query.get("wait", "0")
    try:
        wait = float(raw)
    except ValueError:
        wait = math.nan
    if not wait >= 0:
        raise BadRequest(f"Bad Request: wait must be a number of seconds, got {raw!r}")
    if node.draining and wait > 0:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(wait, MAX_DRAIN_WAIT)):
                await node.drained.wait()
    return _drain_status(node)


def _drain_status(node: Node, status: int = 200) -> web.Response:
    return web.json_response({"draining": node.draining, "drained": node.drained.is_set(),
                              "sessions": len(node.actors), "drain_timeout": node.config.drain_timeout},
                             status=status)


def build_node_app(node: Node) -> web.Application:
    app = web.Application(middlewares=[internal_only(node.config.internal_secret, ("/_tether/", "/admin/")),
                                       tether_errors],
                          client_max_size=node.config.max_body_bytes)
    app[TASKS_KEY] = TaskSet(f"node-{node.node_id}-admin")
    app.router.add_post("/admin/drain", admin_drain)
    app.router.add_get("/admin/drain", drain_status)
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
