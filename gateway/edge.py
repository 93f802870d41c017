"""The gateway's lean HTTP/1.1 edge: `/mcp` served on llhttp, every other path handed to aiohttp.

aiohttp's server cost two thirds of the gateway's CPU a request and about 12 KB
an open stream. The edge parses with llhttp (`httptools`), answers a whole body
in one write and streams SSE as HTTP chunks, and keeps every edge rule aiohttp
kept: request-line and header-line length, header count, body size, the header
timeout (a slowloris is cut off), the body timeout, the client write timeout,
and cancelling the request's work when its client leaves.

A request for any other path (the channel transports, health, metrics, the
embedded store, OAuth metadata), or one that asks for an upgrade, hands its
connection to aiohttp with its bytes unparsed. The edge frames messages itself
(the head to its blank line, then Content-Length bytes), so it always knows
where the next request starts. A chunked request body is read, answered, and
its connection closed. A refused request is answered with `Connection: close`
and the rest of what the client sends is read and dropped until it hangs up or
`client_body_timeout` passes, so the client reads the answer, not a reset.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qsl

import httptools

from actors.sse import PING
from actors.wheel import Wheel
from actors.wire import hand_over
from gateway.app import (
    MCP_PATH,
    TRANSPORT,
    Answer,
    Gateway,
    Sent,
    answer_mcp,
    answered,
    body_late,
    post_now,
    too_large,
)
from gateway.link import LinkResponse
from tether.errors import BadRequest, PayloadTooLarge, RequestTimeout, TetherError
from tether.tasks import TaskSet

log = logging.getLogger("tether.gateway")

MAX_HEADERS = 128  # header lines a request may carry
BACKLOG_BYTES = 64 * 1024  # bytes of later (pipelined) requests read ahead while one is answered
KEEPALIVE_SLOTS = 16  # steps a keep-alive interval is cut into: one wake-up pings every stream due in a step
_MCP = MCP_PATH.encode()
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_PING_CHUNK = b"%x\r\n%b\r\n" % (len(PING), PING)
_ANSWERED = Answer(0, {})  # what `_answer` holds once it has its answer (a compiled coroutine cannot `del` an argument)


class Headers(dict[str, str]):
    """Request headers by lower-cased name; a repeated header's values joined by ", " (RFC 9110 5.3).
    The edge itself reads them with `_get` and a lower-case name: the C lookup, not a Python call."""

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return dict.get(self, key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return dict.__getitem__(self, key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and dict.__contains__(self, key.lower())


_get = dict.get  # for names already in lower case


class EdgeRequest:
    """One request the edge read whole: what `gateway.app.ClientRequest` asks of it."""

    __slots__ = ("method", "target", "headers", "remote", "host", "_query", "_cookies")
    scheme = "http"

    def __init__(self, method: str, target: str, headers: Headers, remote: str | None, host: str) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.remote = remote
        self.host = host
        self._query: dict[str, str] | None = None
        self._cookies: dict[str, str] | None = None

    @property
    def query(self) -> Mapping[str, str]:
        if self._query is None:  # the first value of a repeated parameter wins, as in aiohttp
            pairs = parse_qsl(self.target.partition("?")[2], keep_blank_values=True)
            self._query = {k: v for k, v in reversed(pairs)}
        return self._query

    @property
    def cookies(self) -> Mapping[str, str]:
        if self._cookies is None:
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(self.headers.get("Cookie") or "")
            except CookieError:
                pass  # an unparsable Cookie header names no cookie
            self._cookies = {name: morsel.value for name, morsel in jar.items()}
        return self._cookies


class _Message:
    """The request being read: its parts, read from its head and as llhttp reports them."""

    __slots__ = ("url", "headers", "body", "size", "length", "chunked", "complete", "refusal",
                 "method", "keep_alive", "legacy")

    def __init__(self) -> None:
        self.url = b""
        self.headers = Headers()
        self.body: list[bytes] = []
        self.size = 0
        self.length = 0  # Content-Length, 0 when absent
        self.chunked = False
        self.complete = False
        self.refusal: TetherError | None = None
        self.method = ""  # known once the head is parsed
        self.keep_alive = True
        self.legacy = False  # HTTP/1.0: no chunked answers


class EdgeConnection(asyncio.Protocol):
    """One client connection: reads requests one at a time and answers each: a refusal at once, the
    usual POST when its node's answer comes (`_Forwarded`), anything else in a task it owns."""

    __slots__ = ("edge", "limit", "parser", "buffer", "transport", "remote", "message", "remaining", "task",
                 "loop", "timer", "due", "then", "drained", "keep_alive", "legacy", "dropping", "reading", "lost")

    def __init__(self, edge: Edge) -> None:
        self.edge = edge
        self.limit = edge.gateway.config.max_header_bytes
        self.parser = httptools.HttpRequestParser(self)
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.message: _Message | None = None  # the request being read
        self.remaining = 0  # its Content-Length bytes still to come; -1 for a chunked body
        self.task: asyncio.Task[None] | _Forwarded | None = None  # the request being answered
        self.loop: asyncio.AbstractEventLoop | None = None
        self.timer: asyncio.TimerHandle | None = None  # wakes the connection at or before `due`
        self.due: float | None = None  # when the header or body deadline runs out, by the loop's clock
        self.then: Callable[[], None] | None = None  # what happens then
        self.drained: asyncio.Future[None] | None = None  # set while the client's socket is full
        self.keep_alive = True
        self.legacy = False  # the request being answered is HTTP/1.0 (its stream is not chunked, its keep-alive said)
        self.dropping = False  # refused: what the client still sends is read and dropped
        self.reading = True
        self.lost = False

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if peer else None
        self.edge.connections.add(self)
        self._deadline(self.edge.gateway.config.client_header_timeout, self._close)

    def data_received(self, data: bytes) -> None:
        if self.dropping:
            return
        self.buffer += data
        self._advance()

    def eof_received(self) -> bool | None:
        return None  # the client is done sending: close, as aiohttp does; any work is cancelled

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.edge.connections.discard(self)
        self._disarm()
        if self.task is not None:
            self.task.cancel()  # the client left: stop its work (closing a link response tells the node)
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)  # a writer waiting on it finds the connection lost

    def pause_writing(self) -> None:
        if self.drained is None or self.drained.done():
            self.drained = self.loop.create_future()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    # -- llhttp callbacks ---------------------------------------------------------------

    # After a chunked body the parser reads on into whatever follows; that is never answered (the
    # connection closes), so the callbacks ignore it.

    def on_body(self, body: bytes) -> None:
        m = self.message
        if m is None or m.complete:
            return
        m.size += len(body)
        if m.size <= self.edge.gateway.config.max_body_bytes:
            m.body.append(body)

    def on_message_complete(self) -> None:
        if self.message is not None:
            self.message.complete = True

    # -- reading --------------------------------------------------------------------------

    def _advance(self) -> None:
        """Read what the buffer holds: the next head, its body, and when a request is whole, answer it."""
        while not self.lost and not self.dropping:
            if self.task is not None:  # a request is being answered; later ones wait, within a bound
                if len(self.buffer) > BACKLOG_BYTES and self.reading:
                    self._reading(False)
                return
            if self.message is None and not self._begin():
                return
            if not self._read_body():
                return
            self._dispatch()

    def _begin(self) -> bool:
        """Start on the next request once its head is all here; False while it is not (or it was
        refused, or handed to aiohttp)."""
        buf = self.buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            line = len(buf) - buf.rfind(b"\n") - 1
            if line > self.limit or len(buf) > self.limit * (MAX_HEADERS + 2):
                self._refuse(BadRequest(f"Bad Request: Got more than {self.limit} bytes in a request line "
                                        "or header line"))
            return False
        first = buf.find(b"\r\n")
        parts = bytes(buf[:first]).split(b" ")
        path = parts[1].partition(b"?")[0] if len(parts) == 3 else b""
        if path != _MCP:
            self._hand_off()
            return False
        # The header deadline stays until what follows replaces it: the body's, a refusal's, or none
        # once the request is dispatched (all in this turn).
        head = bytes(buf[:end + 4])
        del buf[:end + 4]
        self.message = m = _Message()
        m.url = parts[1]
        self._read_fields(m, head.decode("latin-1"), first, end)
        try:
            if not self._feed(head):
                return False
        except httptools.HttpParserUpgrade:  # llhttp's own verdict (Connection: upgrade, or CONNECT)
            self.message = None
            buf[:0] = head
            self._hand_off()
            return False
        # llhttp has judged the head: what it says of the method, version and framing is read from
        # the request line and the fields here, not asked of the parser in a callback.
        headers = m.headers
        m.method = parts[0].decode("latin-1")
        m.legacy = parts[2] == b"HTTP/1.0"
        if (connection := _get(headers, "connection")) is None:
            m.keep_alive = not m.legacy
        else:
            tokens = [token.strip() for token in connection.lower().split(",")]
            m.keep_alive = "keep-alive" in tokens if m.legacy else "close" not in tokens
        m.chunked = "chunked" in (_get(headers, "transfer-encoding") or "").lower()
        if (length := _get(headers, "content-length")) is not None:
            m.length = int(length)  # llhttp has checked it is digits, and not repeated
        limit = self.edge.gateway.config.max_body_bytes
        if m.refusal is not None:
            self._refuse(m.refusal)
        elif m.length > limit:
            self._refuse(PayloadTooLarge(too_large(m.length, limit)))
        elif not m.complete:
            self.remaining = -1 if m.chunked else m.length
            if (_get(m.headers, "expect") or "").lower() == "100-continue":
                self._write(_CONTINUE)
            self._deadline(self.edge.gateway.config.client_body_timeout, self._body_late)
        return not self.dropping

    def _read_fields(self, m: _Message, head: str, first: int, end: int) -> None:
        """Read the header fields of a head, all at once, and hold them to the edge's limits.
        llhttp then judges the same head, and what is read here counts only if it passes."""
        limit = self.limit
        if len(m.url) > limit:
            m.refusal = BadRequest(f"Bad Request: Got more than {limit} bytes in the request line")
        lines = head[first + 2:end].split("\r\n") if end > first else []
        if end > limit and m.refusal is None:  # a line may be longer than the limit
            for line in lines:
                if len(line) + 2 > limit:
                    m.refusal = BadRequest(f"Bad Request: Got more than {limit} bytes in the header line "
                                           f"{line.partition(':')[0]}")
                    break
        if len(lines) > MAX_HEADERS and m.refusal is None:
            m.refusal = BadRequest(f"Bad Request: Too many headers (more than {MAX_HEADERS})")
        m.headers = _fields(lines)

    def _read_body(self) -> bool:
        """Feed the parser what the buffer holds of the body; True once the request is whole."""
        m = self.message
        assert m is not None
        if m.complete:
            return True
        buf = self.buffer
        if not buf:
            return False
        n = len(buf) if self.remaining < 0 else min(self.remaining, len(buf))
        data = bytes(buf[:n])
        del buf[:n]
        if self.remaining > 0:
            self.remaining -= n
        if not self._feed(data):
            return False
        if m.size > self.edge.gateway.config.max_body_bytes:
            self._refuse(PayloadTooLarge(too_large(None, self.edge.gateway.config.max_body_bytes)))
            return False
        return m.complete

    def _feed(self, data: bytes) -> bool:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.message is not None and self.message.complete and self.message.chunked:
                return True  # whatever follows a chunked body is never read: its connection closes
            detail = exc.args[0] if exc.args else type(exc).__name__
            self._refuse(BadRequest(f"Bad Request: malformed HTTP request ({detail})"))
            return False
        return True

    def _dispatch(self) -> None:
        """Answer the request just read. The usual POST is sent to its node here and answered when its
        node's answer comes (`_Forwarded`), and a refusal at once; anything that must wait on the way
        (a new session, a route or credential to look up, a stream) is answered by a task."""
        m = self.message
        assert m is not None
        self.due = self.then = None  # `_deadline(None)`, in place: no deadline while it is answered
        self.message = None
        # After a chunked body the parser may have read into the next request: the connection ends.
        self.keep_alive = m.keep_alive and not m.chunked and not self.edge.closing
        self.legacy = m.legacy
        request = EdgeRequest(m.method, m.url.decode("latin-1"), m.headers, self.remote,
                              _get(m.headers, "host") or self.edge.host)
        body = m.body[0] if len(m.body) == 1 else b"".join(m.body)
        started = time.monotonic()
        gw = self.edge.gateway
        now: Answer | Sent | None = None
        try:
            principal = gw.admit_now(request)
            if principal is not None and m.method == "POST":
                now = post_now(gw, request, principal, body)
        except TetherError as exc:
            now = Answer.error(exc)
        except Exception:
            log.exception("request.failed")
            self.keep_alive = False
            now = _failed()
        if isinstance(now, Answer):
            self._respond(now, m.method, started)
            self._ready_for_next()  # the loop in `_advance` reads on
        elif now is not None:
            self.task = _Forwarded(self, now, started)
        else:
            answering = (answer_mcp(gw, request, principal, body) if principal is not None
                         else _admit_and_answer(gw, request, body))
            self.task = self.edge.tasks.spawn(self._answer(answering, m.method, started), "request")

    # -- answering -------------------------------------------------------------------------

    async def _answer(self, answering: Awaitable[Answer] | Answer, method: str, started: float) -> None:
        sent = False
        try:
            # each layer of coroutines here is entered again when the answer wakes the request
            answer = answering if isinstance(answering, Answer) else await answering
            answering = _ANSWERED  # a stream may go on for hours: it keeps only what it needs
            sent = True
            if answer.stream is None:
                self._respond(answer, method, started)
            else:
                if self.legacy:
                    self.keep_alive = False
                status, stream, head = answer.status, answer.stream, self._head(answer, -1 if self.legacy else None)
                del answer
                await self._stream(head, stream)
                self.edge.gateway.metrics.observe(TRANSPORT, method, status, time.monotonic() - started)
        except Exception:
            log.exception("request.failed")
            self.keep_alive = False
            if not sent:
                self._respond(_failed(), method, started)
        finally:
            self.task = None
            self._next()

    def _respond(self, answer: Answer, method: str, started: float) -> None:
        """Write a whole answer, and count it."""
        if self.transport is not None and not self.lost:  # `_write`, in place: every answer passes here
            self.transport.write(self._head(answer, len(answer.body)) + (b"" if method == "HEAD" else answer.body))
        self.edge.gateway.metrics.observe(TRANSPORT, method, answer.status, time.monotonic() - started)

    async def _stream(self, head: bytes, stream: LinkResponse) -> None:
        """Pipe a node's SSE stream to the client, in chunks (to the close, for an HTTP/1.0 client)."""
        out = EdgeStream(self, chunked=not self.legacy)
        keepalives = self.edge.keepalives
        try:
            self._write(head)
            out.sent_at = time.monotonic()
            keepalives.add(out, out.sent_at + self.edge.interval)
            await self.edge.gateway.pipe(stream, out, TRANSPORT, edge=True)
        finally:
            keepalives.discard(out)
            stream.close()
        if not out.ended and not self.lost:
            if self.drained is not None and not self.drained.done():
                self.keep_alive = False  # a client that stopped reading is not written to again
            elif not self.legacy:
                self._write(_LAST_CHUNK)  # the node's side ended early: end the body, the client resumes

    def _head(self, answer: Answer, length: int | None) -> bytes:
        """The status line and headers; `length` None for a chunked body, -1 for one that ends at the close."""
        lines = [_STATUS.get(answer.status) or _status_line(answer.status)]
        for name, value in answer.headers.items():
            if "\r" not in value and "\n" not in value:
                lines.append(f"{name}: {value}\r\n")
        if length is None:
            lines.append("Transfer-Encoding: chunked\r\n")
        elif length >= 0:
            lines.append(f"Content-Length: {length}\r\n")
        lines.append(f"Date: {_date()}\r\n")
        # HTTP/1.0 closes unless the answer says otherwise (RFC 9112 9.3, and 1.0's own Keep-Alive).
        lines.append(("Connection: keep-alive\r\n\r\n" if self.legacy else "\r\n") if self.keep_alive
                     else "Connection: close\r\n\r\n")
        return "".join(lines).encode("latin-1", "replace")

    def _next(self) -> None:
        """After an answer: read the next request on a kept-alive connection, or close."""
        if self._ready_for_next() and self.buffer:  # else nothing has come yet: data_received reads it
            self._advance()

    def _ready_for_next(self) -> bool:
        """After an answer: wait for the next request on a kept-alive connection (True), or close."""
        if self.lost:
            return False
        if not self.keep_alive:
            self._close()
            return False
        if not self.reading:
            self._reading(True)
        self._deadline(self.edge.gateway.config.client_header_timeout, self._close)
        return True

    def _refuse(self, exc: TetherError) -> None:
        """Answer a request that cannot be read (400, 408, 413) and end the connection, reading and
        dropping what the client still sends so that it reads the answer rather than a reset."""
        m = self.message
        self.message = None
        self.buffer.clear()
        self.keep_alive = False
        self.dropping = True
        answer = Answer.error(exc)
        self._write(self._head(answer, len(answer.body)) + answer.body)
        if m is not None and m.method:
            self.edge.gateway.metrics.observe(TRANSPORT, m.method, exc.status, 0.0)
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()
        self._deadline(self.edge.gateway.config.client_body_timeout, self._close)
        if not self.reading:
            self._reading(True)

    def _body_late(self) -> None:
        self._refuse(RequestTimeout(body_late(self.edge.gateway.config)))

    def _hand_off(self) -> None:
        """Give the connection, and the bytes of its next request, to aiohttp's server."""
        transport = self.transport
        assert transport is not None
        self._disarm()
        self.edge.connections.discard(self)
        data = bytes(self.buffer)
        self.buffer.clear()
        self.lost = True  # to this protocol, the connection is gone
        hand_over(transport, self.edge.fallback(), data, self.reading)

    # -- I/O helpers ------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    def _reading(self, on: bool) -> None:
        self.reading = on
        if self.transport is not None and not self.lost:
            (self.transport.resume_reading if on else self.transport.pause_reading)()

    def _deadline(self, seconds: float | None, then: Callable[[], None] | None = None) -> None:
        """Call `then` once `seconds` have passed, unless another deadline (or None) replaces it first.
        A request moves the deadline twice; that moves a number, not a timer: the connection's one
        timer, when it fires for a deadline that has since moved later, sleeps again until the new one."""
        if seconds is None or then is None:
            self.due = self.then = None  # the timer, if it fires, finds nothing due
            return
        loop = self.loop
        assert loop is not None
        self.due, self.then = loop.time() + seconds, then
        if self.timer is None or self.timer.when() > self.due:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = loop.call_at(self.due, self._expire)

    def _expire(self) -> None:
        self.timer = None
        if self.due is None or self.loop is None or self.then is None:
            return
        if self.loop.time() < self.due:
            self.timer = self.loop.call_at(self.due, self._expire)
        else:
            then, self.due, self.then = self.then, None, None
            then()

    def _disarm(self) -> None:
        """No deadline, and no timer or callback left holding the connection."""
        self.due = self.then = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _close(self) -> None:
        self._disarm()
        self.dropping = True  # nothing more is read
        if self.transport is not None:
            self.transport.close()

    def answering(self) -> asyncio.Future[Any] | None:
        """What finishes when the request being answered has been (None while there is none)."""
        task = self.task
        return task if task is None or isinstance(task, asyncio.Task) else task.ended()

    async def drain(self) -> None:
        """Wait while the client's socket is full, at most `client_write_timeout` (then TimeoutError: the
        client stopped reading, and `drained` stays unset to say so). Raises ConnectionResetError once
        the client has gone. A write that finds room waits for nothing and arms no timer."""
        if self.drained is not None and not self.drained.done():
            async with asyncio.timeout(self.edge.gateway.config.client_write_timeout):
                await asyncio.shield(self.drained)
        if self.lost:
            raise ConnectionResetError("the client closed the connection")


class EdgeStream:
    """An answer's body written as it comes: what `Gateway.pipe` writes a stream to. Its keep-alive
    comments come from the edge (`Edge.keepalive`)."""

    __slots__ = ("conn", "chunked", "ended", "sent_at", "stuck_since")

    def __init__(self, conn: EdgeConnection, *, chunked: bool) -> None:
        self.conn = conn
        self.chunked = chunked
        self.ended = False
        self.sent_at = 0.0  # time.monotonic() of its last write or ping (or skipped ping): the next is due after
        self.stuck_since = 0.0  # when a ping was first skipped because the client was not reading; 0: it reads

    def ping(self) -> None:
        self.conn._write(_PING_CHUNK if self.chunked else PING)

    async def write(self, data: bytes) -> None:
        await self._send(data, last=False)

    async def write_eof(self, data: bytes = b"") -> None:
        """The last bytes and the end of the body, in one write."""
        await self._send(data, last=True)
        self.ended = True

    async def _send(self, data: bytes, *, last: bool) -> None:
        if self.conn.lost:
            raise ConnectionResetError("the client closed the connection")
        if last:  # no keep-alive may follow the end of the body, while it drains or after
            self.conn.edge.keepalives.discard(self)
        if self.chunked:
            data = (b"%x\r\n%b\r\n" % (len(data), data) if data else b"") + (_LAST_CHUNK if last else b"")
        if data:
            self.conn._write(data)
            self.sent_at = time.monotonic()
        await self.conn.drain()


class _Forwarded:
    """A POST sent to its node by `_dispatch`, waiting with no task for the head of the answer: the link
    calls `_answer` when it comes (or the link fails), the timer `expired` if `read_timeout` passes
    first, and the client leaving `cancel`s it. A whole answer is written from there; a stream, or a
    whole answer still arriving, is handed to a task, as `_answer` serves any other request."""

    __slots__ = ("conn", "sent", "started", "timer", "waiter")

    def __init__(self, conn: EdgeConnection, sent: Sent, started: float) -> None:
        self.conn, self.sent, self.started = conn, sent, started
        self.waiter: asyncio.Future[None] | None = None  # for `Edge.close`, made when it asks
        sent.resp.listener = self._answer
        assert conn.loop is not None and sent.read_timeout is not None  # a POST's wait is always bounded
        self.timer: asyncio.TimerHandle | None = conn.loop.call_later(sent.read_timeout, self.expired)

    def expired(self) -> None:
        self.timer = None
        self._answer(late=True)

    def cancel(self) -> None:
        """The client left: the node is told to stop."""
        self._end()
        self.sent.resp.close()

    def ended(self) -> asyncio.Future[None]:
        """Set once the answer has been written or handed to a task."""
        if self.waiter is None:
            assert self.conn.loop is not None
            self.waiter = self.conn.loop.create_future()
        return self.waiter

    def _answer(self, late: bool = False) -> None:
        """The head of the node's answer came, or the link failed (or, `late`, the timer ran out)."""
        self._end()
        conn, resp = self.conn, self.sent.resp
        try:
            answer = answered(conn.edge.gateway, self.sent, late=late)
            if answer is None or answer.stream is not None:  # a whole answer still arriving, or a stream
                answering = answer or conn.edge.gateway.relay(resp, {})
                conn.task = task = conn.edge.tasks.spawn(conn._answer(answering, "POST", self.started), "request")
                task.add_done_callback(lambda _: resp.close())  # a task cancelled before it ran closes nothing
                return
            conn._respond(answer, "POST", self.started)
        except Exception:  # called from the link's reading, which must go on for every other exchange
            log.exception("request.failed")
            resp.close()
            conn.keep_alive = False
            conn._respond(_failed(), "POST", self.started)
        conn._next()

    def _end(self) -> None:
        self.sent.resp.listener = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.conn.task is self:
            self.conn.task = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class Edge:
    """The protocol factory `loop.create_server` calls: one `EdgeConnection` per client connection.

    The edge pings its streams itself. A timer per stream kept a heap of timers as large as the
    number of open streams, and each ping was a timer callback and a task switch before its write:
    10,000 idle streams at the default 15 s made 667 of each a second. On a timing wheel, a stream
    waits in the slot of the step its keep-alive falls due in (`KEEPALIVE_SLOTS` steps an
    interval), and each step wakes the loop once to ping every stream due then, straight to its
    socket; a stream that has written since is moved on, not pinged. A stream is pinged after
    between half a step less than `keepalive_interval` of silence and two steps more.
    """

    def __init__(self, gateway: Gateway, fallback: Callable[[], asyncio.Protocol]) -> None:
        self.gateway = gateway
        self.fallback = fallback  # aiohttp's server: a new RequestHandler for a connection handed over
        self.connections: set[EdgeConnection] = set()
        self.tasks = TaskSet("edge")
        self.interval = gateway.config.keepalive_interval
        self.step = self.interval / KEEPALIVE_SLOTS
        self.write_timeout = gateway.config.client_write_timeout
        self.keepalives: Wheel[EdgeStream] = Wheel(self.step, self.keepalive)
        self.closing = False
        self.host = ""  # this server's host:port, for a request without a Host header

    def __call__(self) -> EdgeConnection:
        return EdgeConnection(self)

    def keepalive(self, stream: EdgeStream, now: float) -> float | None:
        """The wheel's look at a stream whose keep-alive fell due: ping it, unless it wrote since it was
        placed; when it is due to be looked at next (None: off the wheel).

        A client that has not read what it was sent gets no ping on top (its socket is not idle),
        and once it has not for `client_write_timeout`, its connection is closed, as a write that
        waits that long is cut: an idle stream must not hold its session for a client that is gone.
        """
        due = stream.sent_at + self.interval
        if due - now >= self.step / 2:
            return due
        stream.sent_at = now
        drained = stream.conn.drained
        if drained is None or drained.done():
            stream.stuck_since = 0.0
            stream.ping()
            return now + self.interval
        if not stream.stuck_since:
            stream.stuck_since = now
        elif now - stream.stuck_since >= self.write_timeout:
            stream.conn._close()  # its task is cancelled, its stream closed: it resumes from the event log
            return None
        return min(now + self.interval, stream.stuck_since + self.write_timeout)

    async def close(self, grace: float) -> None:
        """Close idle connections now, give requests in flight `grace` seconds, then cut the rest."""
        self.closing = True
        for conn in list(self.connections):
            if conn.task is None:
                conn._close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while (busy := [w for conn in self.connections if (w := conn.answering()) is not None and not w.done()]) \
                and loop.time() < deadline:
            await asyncio.wait(busy, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED)
        await self.tasks.close()
        for conn in list(self.connections):
            conn._close()
        self.keepalives.close()


def _failed() -> Answer:
    return Answer.error(TetherError("Internal Server Error: the gateway failed on this request"))


async def _admit_and_answer(gw: Gateway, request: EdgeRequest, body: bytes) -> Answer:
    """`answer_mcp` for a request whose admission had to wait (a JWT to verify): the rest of it."""
    try:
        principal = await gw.admit_jwt(request)
    except TetherError as exc:
        return Answer.error(exc)
    return await answer_mcp(gw, request, principal, body)


def _fields(lines: list[str]) -> Headers:
    """The fields of `name: value` lines llhttp accepts (no folding, no space before the colon). A
    value loses the whitespace around it (RFC 9110 5.5); a repeated field's values are joined (5.3)."""
    found = Headers()
    for line in lines:
        name, _, value = line.partition(":")
        key, value = name.lower(), value.strip(" \t")
        old = _get(found, key)
        found[key] = value if old is None else f"{old}, {value}"  # Headers keeps dict's own __setitem__
    return found


_STATUS: dict[int, str] = {}
_date_cache: tuple[int, str] = (0, "")


def _status_line(status: int) -> str:
    line = _STATUS.get(status)
    if line is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        line = _STATUS[status] = f"HTTP/1.1 {status} {reason}\r\n"
    return line


def _date() -> str:
    """The Date header's value, formatted once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True))
    return _date_cache[1]
