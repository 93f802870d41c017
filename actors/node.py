"""An actor node: a ring member that hosts many `SessionActor`s.

It creates actors when a gateway places a new session here, serves their
requests and streams over the internal link, heartbeats its membership, and
reaps idle sessions. `serve_node` runs one until its context ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from aiohttp import web

from actors.http import error_answer, health_routes, internal_only, tether_errors
from actors.internal import (
    BATCH_HEADER,
    CREATE_HEADER,
    DECLINED_HEADER,
    EPOCH_HEADER,
    NODE_HEADER,
    RESPONSE_HEADER,
    SESSIONS_PATH,
)
from actors.lease import reap_idle
from actors.mcp import Kind, Message, check_message, kind_of
from actors.metrics import NodeMetrics
from actors.session import ActorLimits, Outbox, SessionActor
from actors.sse import HEADERS as SSE_HEADERS
from actors.sse import PING, event
from actors.store.base import NodeRecord, Store
from actors.upstream import StdioUpstream, scrubbed_env
from tether.config import Config
from tether.errors import (
    BadRequest,
    ConfigError,
    Overloaded,
    SessionNotFound,
    StoreError,
    TetherError,
    UpstreamError,
    UpstreamTimeout,
)
from tether.logs import sid_tag
from tether.tasks import TaskSet

log = logging.getLogger("tether.node")



class Declined(Overloaded):
    """This node takes no new sessions now; the gateway tries the next one on the ring."""


class Node:
    """The sessions one node owns, and the loops that keep them honest."""

    def __init__(self, config: Config, store: Store, node_id: str, argv: list[str],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.store = store
        self.node_id = node_id
        self.url = ""
        self.argv = argv
        self.clock = clock
        self.actors: dict[str, SessionActor] = {}
        self.metrics = NodeMetrics(node_id)
        self.draining = False
        self.limits = ActorLimits(config.idle_timeout, config.mailbox_depth, config.event_log_size,
                                  config.kill_grace)
        self._tasks = TaskSet(f"node-{node_id}")
        self._ending: dict[str, asyncio.Task[None]] = {}
        self._heartbeat_ok = False

    def __repr__(self) -> str:
        return f"Node({self.node_id!r}, url={self.url!r}, sessions={len(self.actors)}, draining={self.draining})"

    def record(self) -> NodeRecord:
        return NodeRecord(self.node_id, self.url, accepting=not self.draining, sessions=len(self.actors))

    def ready(self) -> bool:
        return self._heartbeat_ok and not self.draining

    def live(self, sid: str) -> SessionActor:
        """The actor of a live session here. Raises `SessionNotFound`."""
        actor = self.actors.get(sid)
        if actor is None or actor.ended is not None:
            raise SessionNotFound("Session not found")
        return actor

    # -- lifecycle of sessions ----------------------------------------------------

    async def create(self, sid: str, initialize: Message) -> tuple[SessionActor | None, Message]:
        """Start a session: grant ownership, spawn the upstream, forward `initialize`.

        Returns the actor (None if the upstream refused to initialize) and the
        upstream's answer. Raises `Declined` when full, `UpstreamError` or
        `UpstreamTimeout` when the upstream cannot start.
        """
        if self.draining or len(self.actors) >= self.config.max_sessions:
            self.metrics.sessions_declined.inc()
            raise Declined(f"Node {self.node_id} is full ({len(self.actors)} sessions) or draining")
        record = await self.store.grant(sid, self.node_id)
        started = self.clock()
        env = scrubbed_env({"TETHER_NODE_ID": self.node_id, "TETHER_SESSION_TAG": sid_tag(sid)})
        try:
            upstream = await StdioUpstream.start(self.argv, env=env,
                                                 max_message_bytes=self.config.max_message_bytes)
        except UpstreamError:
            await self.store.release(record)
            raise
        actor = SessionActor(sid, record, upstream, self.limits, on_exit=self._on_actor_exit,
                             on_dropped=self.metrics.events_dropped.inc, clock=self.clock)
        self.actors[sid] = actor
        self.metrics.sessions_active.inc()
        actor.start()
        log.info("session.started", extra={"sid": actor.tag, "pid": upstream.pid})
        outbox = actor.submit([initialize])
        assert outbox is not None
        try:
            answer = await asyncio.wait_for(_next_answer(outbox), self.config.upstream_start_timeout)
        except TimeoutError:
            await self.end(sid, "start_failed")
            raise UpstreamTimeout(f"Upstream did not answer initialize within "
                                  f"{self.config.upstream_start_timeout:g}s") from None
        if answer is None or actor.ended is not None:  # the server died before it answered
            await self.end(sid, "start_failed")
            raise UpstreamError(f"Upstream exited (code {actor.upstream.returncode}) before answering "
                                "initialize; its stderr is in the node log")
        if "error" in answer:  # the server answered, and refused
            await self.end(sid, "start_failed")
            return None, answer
        self.metrics.upstream_start_seconds.observe(self.clock() - started)
        self.metrics.sessions_started.inc()
        return actor, answer

    async def end(self, sid: str, reason: str) -> None:
        """End a session for `reason` and wait until it is gone. Safe to call twice."""
        actor = self.actors.get(sid)
        if actor is None:
            return
        task = self._ending.get(sid)
        if task is None:
            task = self._tasks.spawn(self._end(actor, reason), f"end-{actor.tag}")
            self._ending[sid] = task
        await asyncio.shield(task)

    async def _end(self, actor: SessionActor, reason: str) -> None:
        try:
            await actor.end(reason)
        finally:
            self.actors.pop(actor.sid, None)
            self._ending.pop(actor.sid, None)
            self.metrics.sessions_active.dec()
            self.metrics.sessions_ended[reason].inc()
            try:
                await self.store.release(actor.record)
            except StoreError as exc:
                log.warning("store.release_failed", extra={"sid": actor.tag, "detail": exc.message})

    def _on_actor_exit(self, actor: SessionActor, reason: str) -> None:
        if actor.sid not in self._ending:
            self._ending[actor.sid] = self._tasks.spawn(self._end(actor, reason), f"end-{actor.tag}")

    async def end_all(self, reason: str) -> None:
        await asyncio.gather(*(self.end(sid, reason) for sid in list(self.actors)))

    # -- loops ---------------------------------------------------------------------

    async def heartbeat_loop(self) -> None:
        ttl = self.config.heartbeat_ttl
        while True:
            try:
                await self.store.heartbeat(self.record(), ttl)
                self._heartbeat_ok = True
                self.metrics.lease_renewals.labels(self.node_id, "ok").inc()
            except StoreError as exc:
                self.metrics.lease_renewals.labels(self.node_id, "failed").inc()
                log.warning("heartbeat.failed", extra={"detail": exc.message})
            await asyncio.sleep(ttl / 3)

    async def reaper_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.scan_interval)
            self.reap(self.clock())

    def reap(self, now: float) -> list[str]:
        """End every session idle at `now` (none that a client is waiting on)."""
        idle = list(reap_idle(((sid, a.lease) for sid, a in self.actors.items() if not a.busy), now))
        for sid in idle:
            self._tasks.spawn(self.end(sid, "idle"), f"reap-{sid_tag(sid)}")
        return idle

    def start_loops(self) -> None:
        self._tasks.spawn(self.heartbeat_loop(), "heartbeat")
        self._tasks.spawn(self.reaper_loop(), "reaper")

    async def shutdown(self) -> None:
        """Leave the ring, end every session, stop the loops."""
        self.draining = True
        with contextlib.suppress(StoreError):
            await self.store.leave(self.node_id)
        await self.end_all("drained")
        await self._tasks.close()


NODE_KEY = web.AppKey("node", Node)


async def _next_answer(outbox: Outbox) -> Message | None:
    while (message := await outbox.queue.get()) is not None:
        if "method" not in message:
            return message
    return None


# -- the internal HTTP API -------------------------------------------------------------


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
        node.metrics.messages.labels(node.node_id, kind_of(message).value).inc()
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
        actor, answer = await node.create(sid, message)
    except Declined as exc:
        response = error_answer(exc)
        response.headers[DECLINED_HEADER] = "1"
        return response
    headers = {NODE_HEADER: node.node_id}
    if actor is not None:
        headers[EPOCH_HEADER] = str(actor.record.epoch)
    if wants_sse:
        return web.Response(body=event(answer), headers={**SSE_HEADERS, **headers})
    return web.Response(body=orjson.dumps(answer), content_type="application/json", headers=headers)


async def _collect_answers(node: Node, actor: SessionActor, outbox: Outbox) -> list[Message]:
    answers: list[Message] = []
    deadline = node.clock() + node.config.upstream_request_timeout
    while True:
        try:
            message = await asyncio.wait_for(outbox.queue.get(), max(0.0, deadline - node.clock()))
        except TimeoutError:
            return answers + actor.abandon(outbox, _timeout_reason(node))
        if message is None:
            return answers
        answers.append(message)


async def _stream_answers(request: web.Request, node: Node, actor: SessionActor,
                          outbox: Outbox) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    deadline = node.clock() + node.config.upstream_request_timeout
    try:
        while True:
            wait = min(node.config.keepalive_interval, max(0.0, deadline - node.clock()))
            try:
                message = await asyncio.wait_for(outbox.queue.get(), wait)
            except TimeoutError:
                if node.clock() < deadline:
                    await response.write(PING)
                    continue
                for owed in actor.abandon(outbox, _timeout_reason(node)):
                    await response.write(event(owed))
                break
            if message is None:
                break
            await response.write(event(message))
    except ConnectionError:
        pass  # the gateway (or the client behind it) went away; the caller abandons the outbox
    return response


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
        while True:
            try:
                message = await asyncio.wait_for(stream.queue.get(), node.config.keepalive_interval)
            except TimeoutError:
                await response.write(PING)
                actor.lease.touch(node.clock())  # the ping got through: the client is still there
                continue
            if message is None:
                break
            await response.write(event(message))
            actor.lease.touch(node.clock())
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


def build_node_app(node: Node) -> web.Application:
    app = web.Application(middlewares=[internal_only(node.config.internal_secret), tether_errors],
                          client_max_size=node.config.max_body_bytes)
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
    runner = web.AppRunner(build_node_app(node), access_log=None, handle_signals=False,
                           shutdown_timeout=1.0)
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


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, so the real port is known before the app is built."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


__all__ = ["Declined", "Node", "TetherError", "build_node_app", "serve_node"]
