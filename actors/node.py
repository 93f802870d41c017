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
        self._tasks = TaskSet(f"node-{node_id}")  # session ends
        self._loops = TaskSet(f"node-{node_id}-loops")  # heartbeat and reaper
        self._ending: dict[str, asyncio.Task[None]] = {}
        self._heartbeat_ok = False
        self._starting = 0  # creates in flight, counted against max_sessions
        self._idle_creates = asyncio.Event()
        self._idle_creates.set()

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
        if self.draining or len(self.actors) + self._starting >= self.config.max_sessions:
            self.metrics.sessions_declined.inc()
            raise Declined(f"Node {self.node_id} is full ({len(self.actors)} sessions) or draining")
        self._starting += 1  # hold the slot across the awaits below, so parallel creates cannot overfill
        try:
            return await self._create(sid, initialize)
        finally:
            self._starting -= 1
            if not self._starting:
                self._idle_creates.set()

    async def _create(self, sid: str, initialize: Message) -> tuple[SessionActor | None, Message]:
        self._idle_creates.clear()
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
            async with asyncio.timeout(self.config.upstream_start_timeout):
                answer = await _next_answer(outbox)
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
        await asyncio.shield(self._begin_end(actor, reason))

    def _begin_end(self, actor: SessionActor, reason: str) -> asyncio.Task[None]:
        """Mark the session ended now (its next request is 404) and start tearing it down once."""
        task = self._ending.get(actor.sid)
        if task is None:
            actor.ended = actor.ended or reason
            task = self._tasks.spawn(self._end(actor, actor.ended), f"end-{actor.tag}")
            self._ending[actor.sid] = task
        return task

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
        self._begin_end(actor, reason)

    async def end_all(self, reason: str) -> None:
        await asyncio.gather(*(self.end(sid, reason) for sid in list(self.actors)))

    # -- loops ---------------------------------------------------------------------

    async def heartbeat_loop(self) -> None:
        ttl = self.config.heartbeat_ttl
        ok, failed = (self.metrics.lease_renewals.labels(self.node_id, r) for r in ("ok", "failed"))
        while True:
            try:
                async with asyncio.timeout(ttl / 3):
                    await self.store.heartbeat(self.record(), ttl)
                self._heartbeat_ok = True
                ok.inc()
            except (StoreError, TimeoutError) as exc:
                self._heartbeat_ok = False  # not ready while membership cannot be renewed
                failed.inc()
                log.warning("heartbeat.failed", extra={"detail": getattr(exc, "message", repr(exc))})
            await asyncio.sleep(ttl / 3)

    async def reaper_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.scan_interval)
            self.reap(self.clock())

    def reap(self, now: float) -> list[str]:
        """End every session idle at `now` (none that a client is waiting on)."""
        idle = list(reap_idle(((sid, a.lease) for sid, a in self.actors.items()
                               if not a.busy and a.ended is None), now))
        for sid in idle:
            self._begin_end(self.actors[sid], "idle")  # marked before any request can slip in
        return idle

    def start_loops(self) -> None:
        self._loops.spawn(self.heartbeat_loop(), "heartbeat")
        self._loops.spawn(self.reaper_loop(), "reaper")

    async def shutdown(self) -> None:
        """Stop taking sessions, leave the ring, let creates in flight finish, end every session."""
        self.draining = True
        await self._loops.close()  # no heartbeat may re-add us after we leave
        with contextlib.suppress(StoreError):
            await self.store.leave(self.node_id)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.upstream_start_timeout):
                await self._idle_creates.wait()
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
    headers = {NODE_HEADER: node.node_id}
    if actor is not None:
        headers[EPOCH_HEADER] = str(actor.record.epoch)
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
