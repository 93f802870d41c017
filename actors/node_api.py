"""A node's internal API: what gateways call over the authenticated, multiplexed link.

Each exchange on the link (`actors.mux`, `actors.wire`) is a call on one session. POST
creates a session (with the create header) or delivers client messages,
answered as JSON, as an SSE stream, or (for a channel client: WebSocket or
HTTP+SSE) with 202 and the answers on the channel; GET opens the session's
stream, or resumes the stream a `Last-Event-ID` names; DELETE ends it.
`actors.server.serve_node` runs a node with this API until its context ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from actors import mux
from actors.events import EventId, StreamLog
from actors.http import error_parts, health_routes, internal_only, tether_errors
from actors.internal import (
    BATCH_HEADER,
    CREATE_HEADER,
    DECLINED_HEADER,
    EPOCH_HEADER,
    INCARNATION_HEADER,
    INTERNAL_PREFIX,
    NODE_HEADER,
    PRINCIPAL_HEADER,
    QUOTA_HEADER,
    RESPONSE_HEADER,
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
from actors.session import AUTO, CHANNEL, JSON, MODES, SSE, SessionActor
from actors.sse import HEADERS as SSE_HEADERS
from actors.sse import PING, event, priming
from actors.wheel import Deadlines
from actors.wire import Wire
from tether.errors import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    BadRequest,
    CursorExpired,
    Overloaded,
    ParseError,
    TetherError,
)
from tether.logs import sid_tag
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


@dataclass(slots=True)
class Call:
    """One exchange's request: what a gateway asks of the session `sid`."""

    method: str
    sid: str
    headers: dict[str, str]
    body: bytes


class Reply:
    """One exchange's answer, sent as frames on the link it came from.

    `answer` sends a whole answer. A stream starts with `stream`, whose head
    leaves with the first `write`; `end` sends its last bytes with FIN, so
    a short stream is one frame.
    """

    __slots__ = ("_wire", "xid", "_head", "started", "ended")

    def __init__(self, wire: Wire, xid: int) -> None:
        self._wire = wire
        self.xid = xid
        self._head: list[Any] | None = None
        self.started = False
        self.ended = False

    async def answer(self, status: int, headers: Mapping[str, str] | None = None, body: bytes = b"") -> None:
        self.stream(status, headers)
        await self.end(body)

    def stream(self, status: int, headers: Mapping[str, str] | None = None) -> None:
        self._head = [status, dict(headers or {})]

    async def write(self, chunk: bytes, fin: bool = False) -> None:
        if self._head is not None:
            frame = mux.encode(mux.RESPONSE, self.xid, self._head, chunk, fin)
            self._head, self.started = None, True
        else:
            frame = mux.encode(mux.DATA, self.xid, None, chunk, fin)
        self.ended = fin
        await self._wire.put(frame)

    async def end(self, chunk: bytes = b"") -> None:
        await self.write(chunk, fin=True)

    async def cancel(self) -> None:
        self.ended = True
        self._wire.post(mux.encode(mux.CANCEL, self.xid))

    def answer_now(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        """A whole answer from a callback: queued for this loop turn's write, not waiting for the socket
        to drain (an answer is bounded by `max_message_bytes`)."""
        self.started = self.ended = True
        self._wire.post(mux.encode(mux.RESPONSE, self.xid, [status, dict(headers)], body, True))


_INTERNAL = (500, {"Content-Type": "application/json"},
             orjson.dumps(error_response(None, INTERNAL_ERROR, "Internal error in the actor node")))


def _json(answer: object, headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return 200, {"Content-Type": "application/json", **(headers or {})}, orjson.dumps(answer)


async def post_message(node: Node, call: Call, reply: Reply) -> None:
    mode = call.headers.get(RESPONSE_HEADER, JSON)
    if mode not in MODES:
        raise BadRequest(f"Bad Request: {RESPONSE_HEADER} must be one of {', '.join(MODES)}")
    if call.headers.get(CREATE_HEADER):
        return await _create(node, call, _parse(call.body) if call.body else [], mode, reply)
    actor = node.live(call.sid, call.headers.get(PRINCIPAL_HEADER, ""))
    actor.lease.touch(node.clock())
    if mode == CHANNEL:
        _to_channel(node, actor, call.body)
        return await reply.answer(202)
    messages = _parse(call.body)
    stream = actor.submit(messages, mode)
    for message in messages:
        node.metrics.messages[kind_of(message)].inc()
    if stream is None:
        return await reply.answer(202)
    started = node.clock()
    try:
        if mode != JSON:
            return await _stream(node, call, actor, stream, 0, reply,
                                 whole=mode == AUTO and not call.headers.get(BATCH_HEADER))
        answers = await _collect(node, actor, stream)
        await reply.answer(*_json(answers if call.headers.get(BATCH_HEADER) else answers[0]))
    finally:
        node.metrics.request_seconds.observe(node.clock() - started)
        actor.lease.touch(node.clock())


def _to_channel(node: Node, actor: SessionActor, body: bytes) -> None:
    """A channel client's message: everything it is owed, errors too, goes on its channel, so that
    a WebSocket client's message count stays the channel's event count."""
    messages: list[Message] = []
    try:
        messages = _parse(body, node.config.max_json_depth)
        actor.submit(messages, CHANNEL)
    except (BadRequest, Overloaded) as exc:
        first = messages[0].get("id") if len(messages) == 1 else None
        actor.report(error_response(first if isinstance(first, str | int) else None,
                                    exc.rpc_code or INVALID_REQUEST, exc.message, exc.data))
    for message in messages:
        node.metrics.messages[kind_of(message)].inc()


async def _create(node: Node, call: Call, messages: list[Message], mode: str, reply: Reply) -> None:
    initialize = messages[0] if messages else None
    if mode != CHANNEL and (initialize is None or kind_of(initialize) is not Kind.REQUEST
                            or initialize.get("method") != "initialize"):
        raise BadRequest("Invalid Request: a new session starts with an initialize request")
    try:
        # Shielded: a client that leaves mid-start must not leave a half-made actor behind; the
        # session it would have had is reaped by idle expiry.
        actor, answer = await asyncio.shield(node.create(
            call.sid, initialize if mode != CHANNEL else None, principal=call.headers.get(PRINCIPAL_HEADER, ""),
            quota=call.headers.get(QUOTA_HEADER, "")))
    except Declined as exc:
        status, headers, body = error_parts(exc)
        return await reply.answer(status, {**headers, DECLINED_HEADER: "1"}, body)
    headers = {NODE_HEADER: node.node_id}
    if actor is not None:
        actor.channel = actor.channel or mode == CHANNEL
        headers[EPOCH_HEADER] = str(actor.record.epoch)
        headers[INCARNATION_HEADER] = actor.record.incarnation
    if answer is None:
        return await reply.answer(201, headers)
    if mode == SSE:
        return await reply.answer(200, {**SSE_HEADERS, **headers}, event(answer))
    await reply.answer(*_json(answer, headers))


async def _collect(node: Node, actor: SessionActor, stream: StreamLog) -> list[Message]:
    """The answers of a JSON POST. The actor answers a request the upstream sits on with a timeout error."""
    try:
        return [item[1] async for item in actor.read(stream, 0) if item is not None]
    finally:
        actor.forget(stream)


async def _stream(node: Node, call: Call, actor: SessionActor, stream: StreamLog, after: int,
                  reply: Reply, whole: bool = False, ping_first: bool = False) -> None:
    """Serve `stream` as SSE from seq `after`: replay, then live, with event ids. With `whole`, an answer
    that comes first and ends the stream is sent as a JSON body instead: there is nothing to resume.

    The gateway pings its client when a stream is quiet, so an idle GET stream
    costs the node nothing. A POST's stream is pinged here too, every
    `keepalive_interval`: its head waits for its first bytes, and a slow tool
    must not leave the client without headers until it answers.
    A client that goes away only detaches: the stream's events go on into the
    log for a reader that comes back with Last-Event-ID.
    """
    reply.stream(200, SSE_HEADERS)  # the head goes out with the first write
    # A POST's priming event leaves with its first event, and its last event with the end of the
    # answer: its whole answer is one frame, not three. A GET stream starts at once: its client waits.
    primed = call.headers.get(VERSION_HEADER, DEFAULT_HTTP_VERSION) >= PRIMING_SINCE  # a priming event is owed
    if not whole:
        _begin_stream(node, actor, stream)
    try:
        if call.method == "GET":
            await reply.write(_priming(node, stream, after) if primed else b"")
            primed = False
        keepalive = None if call.method == "GET" else node.config.keepalive_interval
        items = actor.read(stream, after, keepalive, ping_first=ping_first)
        try:  # what contextlib.aclosing does, without its two coroutines a request
            async for item in items:
                last = item is not None and stream.finished and item[0].seq >= stream.last_seq
                if whole and last and item is not None:
                    await reply.answer(*_json(item[1]))
                    return
                if whole:  # something came before the answer, or a ping: it is a stream now
                    whole = False
                    _begin_stream(node, actor, stream)
                chunk = PING if item is None else event(item[1], event_id=item[0])
                if primed:
                    chunk, primed = _priming(node, stream, after) + chunk, False
                if last and item is not None:
                    await reply.end(chunk)
                    stream.delivered = max(stream.delivered, item[0].seq)  # read() is closed before it can
                    return
                await reply.write(chunk)
        finally:
            await items.aclose()
        await reply.end(_priming(node, stream, after) if primed else b"")
    except CursorExpired:
        log.warning("stream.fell_behind", extra={"sid": actor.tag, "count": actor.log.limit})
    finally:
        if whole:  # answered as JSON, or its client left before it began: nothing will resume it
            actor.forget(stream)
        else:
            node.metrics.streams_open.dec()


def _begin_stream(node: Node, actor: SessionActor, stream: StreamLog) -> None:
    """It is a stream: resumable from here on (an undecided answer's events go into the log), and
    counted in the streams-open gauge (a whole answer never is)."""
    actor.log.log_stream(stream)
    node.metrics.streams_open.inc()


def _priming(node: Node, stream: StreamLog, after: int) -> bytes:
    return priming(EventId(stream.stream, after), round(node.config.stream_retry * 1000))


async def open_stream(node: Node, call: Call, reply: Reply) -> None:
    """GET: the session's stream, or with Last-Event-ID the stream it names, resumed after it."""
    actor = node.live(call.sid, call.headers.get(PRINCIPAL_HEADER, ""))
    last = call.headers.get("Last-Event-ID")
    cursor = EventId.parse(last, default_stream=0) if last else None
    stream, after = actor.stream_to_read(cursor)
    if cursor is not None:
        node.metrics.events_replayed.inc(max(0, stream.last_seq - after))
    actor.lease.touch(node.clock())
    await _stream(node, call, actor, stream, after, reply)


async def delete_session(node: Node, call: Call, reply: Reply) -> None:
    node.live(call.sid, call.headers.get(PRINCIPAL_HEADER, ""))
    await node.end(call.sid, "deleted")
    await reply.answer(200)


Handler = Callable[[Node, Call, Reply], Awaitable[None]]
_HANDLERS: dict[str, Handler] = {"POST": post_message, "GET": open_stream, "DELETE": delete_session}


def _post_now(node: Node, call: Call, reply: Reply, wire: NodeWire) -> _Pending | bool:
    """The usual POST, one request to answer as JSON (`json`, or `auto` while the answer comes
    first), served with no task: its answer goes out from the actor's delivery (`_Pending`). True
    when nothing is left for the caller to hold (answered at once, or already handed to a task);
    False for anything else, which the exchange's task serves."""
    headers = call.headers
    mode = headers.get(RESPONSE_HEADER, JSON)
    if (mode != AUTO and mode != JSON) or CREATE_HEADER in headers or BATCH_HEADER in headers:
        return False
    try:
        actor = node.live(call.sid, headers.get(PRINCIPAL_HEADER, ""))
        messages = _parse(call.body)
        if len(messages) != 1 or "method" not in messages[0] or "id" not in messages[0]:
            return False  # a notification or a response (202), served by the task as before
        actor.lease.touch(node.clock())
        stream = actor.submit(messages, mode)
    except TetherError as exc:
        reply.answer_now(*error_parts(exc))
        return True
    node.metrics.messages[Kind.REQUEST].inc()
    assert stream is not None  # a request is owed an answer
    pending = _Pending(node, call, actor, stream, reply, wire, mode == AUTO)
    stream.listener = pending.arrived
    if mode == AUTO:
        wire.keepalives.add(pending)  # still unanswered at the keep-alive: it becomes a stream
    if stream.last_seq:  # delivered already (an error the actor gave at once)
        pending.arrived()
        return True  # answered, or handed to a task that `running` now holds
    return pending


class _Pending:
    """A POST waiting for its answer with no task: the actor calls `arrived` when it delivers to the
    request's stream. The answer, if it comes first and alone, leaves as JSON from there. Anything
    else (progress first, or the keep-alive passing in `auto` mode) hands the stream to a task,
    as `_stream` would have served it. `cancel` is the gateway's client leaving."""

    __slots__ = ("node", "call", "actor", "stream", "reply", "wire", "auto", "started")

    def __init__(self, node: Node, call: Call, actor: SessionActor, stream: StreamLog, reply: Reply,
                 wire: NodeWire, auto: bool) -> None:
        self.node, self.call, self.actor, self.stream, self.reply, self.wire = node, call, actor, stream, reply, wire
        self.auto = auto
        self.started = node.clock()

    def arrived(self) -> None:
        stream = self.stream
        try:
            if stream.finished and stream.last_seq == 1:  # the answer, first and alone
                message = stream.events[0][1]
                self._done()
                self.actor.forget(stream)
                self.reply.answer_now(*_json(message))
            elif self.auto:  # something came before the answer: it is a stream now
                self._to_task(ping_first=False)
        except ConnectionError:
            pass  # the link went: its end cancels what is left
        except Exception:  # called from the actor's delivery, which must go on for every other stream
            log.exception("link.exchange_failed", extra={"sid": self.actor.tag})
            self.cancel()
            with contextlib.suppress(ConnectionError):
                self.reply.answer_now(*_INTERNAL)

    def due(self) -> None:
        """`keepalive_interval` passed with no answer: a stream, pinged at once, as `_stream` does."""
        if self.stream.listener is not None:
            self._to_task(ping_first=True)

    def cancel(self) -> None:
        """The gateway's client left, or the link went: nothing will read the answer."""
        if self.stream.listener is not None:
            self._done()
            self.actor.forget(self.stream)

    def _done(self) -> None:
        self.stream.listener = None
        self.wire.keepalives.discard(self)
        self.wire.running.pop(self.reply.xid, None)
        self._ended()

    def _ended(self) -> None:
        node = self.node
        node.metrics.request_seconds.observe(node.clock() - self.started)
        self.actor.lease.touch(node.clock())

    def _to_task(self, *, ping_first: bool) -> None:
        self.stream.listener = None
        self.wire.keepalives.discard(self)

        async def serve(node: Node, call: Call, reply: Reply) -> None:
            try:
                await _stream(node, call, self.actor, self.stream, 0, reply, whole=True, ping_first=ping_first)
            finally:
                self._ended()

        self.wire.running[self.reply.xid] = self.wire.exchanges.spawn(
            _exchange(self.node, self.call, self.reply, self.wire.running, serve), self.actor.tag)


class NodeWire(Wire):
    """One gateway's link connection. The usual POST (one request, a JSON answer) waits with no task
    (`_Pending`); every other REQUEST runs as its own task until it is answered. A CANCEL from the
    gateway (its client left) cancels either, as does the connection's end."""

    def __init__(self, node: Node, links: set[NodeWire]) -> None:
        super().__init__()
        self.node = node
        self.running: dict[int, asyncio.Task[None] | _Pending] = {}
        self._links = links
        self.exchanges = TaskSet("link")
        self.keepalives: Deadlines[_Pending] = Deadlines(node.config.keepalive_interval, _Pending.due)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._links.add(self)

    def frame_received(self, frame: mux.Frame) -> None:
        if frame.kind == mux.REQUEST:
            method, sid, headers = frame.head
            call, reply = Call(method, sid, headers, frame.body), Reply(self, frame.xid)
            if method == "POST" and (pending := _post_now(self.node, call, reply, self)) is not False:
                if pending is not True:
                    self.running[frame.xid] = pending
                return
            actor = self.node.actors.get(sid)  # its tag names the task; hashing the id costs more than a lookup
            self.running[frame.xid] = self.exchanges.spawn(_exchange(self.node, call, reply, self.running),
                                                           actor.tag if actor is not None else sid_tag(sid))
        elif frame.kind == mux.CANCEL and frame.xid in self.running:
            self.running.pop(frame.xid).cancel()

    def link_lost(self, why: str) -> None:
        log.info("link.closed", extra={"detail": why})
        self._links.discard(self)
        for exchange in list(self.running.values()):
            exchange.cancel()
        self.running.clear()
        self.keepalives.close()


async def _exchange(node: Node, call: Call, reply: Reply, running: dict[int, asyncio.Task[None] | _Pending],
                    handler: Handler | None = None) -> None:
    """Run one exchange to its end (by `handler`, or the one for its method); whatever goes wrong is
    answered, or, midway, cancelled."""
    try:
        handler = handler or _HANDLERS.get(call.method)
        if handler is None:
            raise BadRequest(f"Bad Request: the link carries POST, GET and DELETE, not {call.method}")
        await handler(node, call, reply)
        if not reply.ended:  # a stream that stopped short: its session ended, or its reader fell behind
            await reply.end()
    except TetherError as exc:
        await _refuse(reply, *error_parts(exc))
    except (ConnectionError, asyncio.CancelledError):
        pass  # the link went, or the gateway's client left
    except Exception:
        log.exception("link.exchange_failed", extra={"sid": sid_tag(call.sid)})
        await _refuse(reply, *_INTERNAL)
    finally:
        running.pop(reply.xid, None)


async def _refuse(reply: Reply, status: int, headers: Mapping[str, str], body: bytes) -> None:
    with contextlib.suppress(ConnectionError):
        if reply.started:
            await reply.cancel()
        elif not reply.ended:
            await reply.answer(status, headers, body)


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
    app = web.Application(middlewares=[internal_only(node.config.internal_secret, (INTERNAL_PREFIX, "/admin/")),
                                       tether_errors],
                          client_max_size=node.config.max_body_bytes)
    app[TASKS_KEY] = TaskSet(f"node-{node.node_id}-admin")
    app.router.add_post("/admin/drain", admin_drain)
    app.router.add_get("/admin/drain", drain_status)
    app[NODE_KEY] = node
    app.add_routes(health_routes(node.metrics.registry, node.ready))
    return app
