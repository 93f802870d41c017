"""`SessionActor`: the single owner of one session on its node.

It holds the upstream, a bounded mailbox of client messages (written to the
upstream by one task, in order), the session's event log with its client
streams, the requests waiting for answers, and the idle lease. Where an
upstream message goes is decided by `actors.mcp.route_upstream`; which events a
reader gets is decided by `actors.events`; this module only moves messages.

Streams outlive their readers: a client that drops a stream does not cancel
its requests (2025-06-18 and later say so). Their answers go on into the log,
where a reader that comes back with `Last-Event-ID` finds them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass

from actors.events import EventId, EventLog, StreamLog
from actors.lease import IdleLease
from actors.mcp import (
    Message,
    RequestId,
    error_response,
    progress_token,
    route_upstream,
)
from actors.store.base import OwnershipRecord
from actors.upstream import Inbound, Upstream
from actors.waiting import Broadcast, Inbox, Latch
from actors.wheel import Deadlines
from tether.errors import CONNECTION_CLOSED, REQUEST_TIMEOUT, BadRequest, Conflict, Overloaded, UpstreamError
from tether.logs import sid_tag
from tether.tasks import TaskSet

log = logging.getLogger("tether.node")

# How a client takes its answers: a JSON body, an SSE stream per POST, either (AUTO: JSON when the
# answer is all there is, else SSE), or one channel (a WebSocket or an HTTP+SSE client) that carries
# every message of the session.
JSON, SSE, AUTO, CHANNEL = "json", "sse", "auto", "channel"
MODES = (JSON, SSE, AUTO, CHANNEL)


@dataclass(frozen=True)
class ActorLimits:
    idle_timeout: float
    mailbox_depth: int
    event_log_size: int
    kill_grace: float
    request_timeout: float
    start_timeout: float  # an `initialize` request's, in place of request_timeout


class SessionActor:
    """Owns one session: its upstream, mailbox, event log and streams, and idle lease."""

    def __init__(self, sid: str, record: OwnershipRecord, upstream: Upstream, limits: ActorLimits,
                 *, on_exit: Callable[[SessionActor, str], None],
                 on_dropped: Callable[[int], None] = lambda n: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sid = sid
        self.tag = sid_tag(sid)
        self.record = record
        self.upstream = upstream
        self.limits = limits
        self.lease = IdleLease(limits.idle_timeout, clock())
        self._clock = clock
        self.mailbox: Inbox[Message] = Inbox(limits.mailbox_depth)
        self.log = EventLog(limits.event_log_size)
        self.pending: dict[RequestId, StreamLog] = {}
        self.tokens: dict[object, RequestId] = {}  # progress token -> the request that gave it
        self._token_of: dict[RequestId, object] = {}
        self.owed: dict[int, int] = {}  # answers each stream still owes, by stream number
        self.channel = False  # a WebSocket or HTTP+SSE session: every message goes on stream 0
        self.principal = ""  # the tag of the principal that created it; "" without authentication
        self.ended: str | None = None  # the reason, once ending has begun
        self.initialize_answer: Message | None = None  # a named session's: clients that join it get it too
        self._deadlines: Deadlines[RequestId] = Deadlines(limits.request_timeout, self._expire)
        self._starting: Deadlines[RequestId] = Deadlines(limits.start_timeout, self._expire_initialize)
        self._changed = Broadcast()  # notified whenever any stream gets an event
        self._initialized_sent = False
        self._writer_idle = False  # the writer waits on an empty mailbox: a message may go straight out
        self._closing = False
        self._done = Latch()
        self._on_exit = on_exit
        self._on_dropped = on_dropped
        self._tasks = TaskSet(f"actor-{self.tag}")

    def __repr__(self) -> str:
        return (f"SessionActor({self.tag}, node={self.record.node_id}, epoch={self.record.epoch}, "
                f"upstream={self.upstream.describe()}, pending={len(self.pending)}, ended={self.ended})")

    @property
    def busy(self) -> bool:
        """True while the upstream owes an answer or a client holds a stream open: a session in use is
        never idle. A stream stays attached only while its gateway gets keep-alives through to the
        client; when the client goes, the gateway cancels it, and the idle clock starts then."""
        return bool(self.pending) or any(s.reader is not None for s in self.log.streams.values())

    def start(self) -> None:
        self.upstream.deliver_to(self._take)
        self._tasks.spawn(self._read_upstream(), "read")
        self._tasks.spawn(self._write_upstream(), "write")
        self._tasks.spawn(self.upstream.background(), "upstream")

    # -- client side -------------------------------------------------------------

    def submit(self, messages: Iterable[Message], mode: str) -> StreamLog | None:
        """Queue client messages for the upstream.

        Returns the stream that will carry the answers, or None when nothing is
        owed one (notifications and responses only, or a channel session,
        whose answers go on its channel). Raises `Overloaded` when the mailbox
        is full, `BadRequest` for a request id already in flight.
        """
        kept: list[Message] = []
        requests: list[Message] = []
        ids: set[RequestId] = set()
        initialized = False
        for m in messages:  # one pass: a POST is nearly always one message
            method = m.get("method")
            if method == "notifications/initialized" and "id" not in m:
                if self._initialized_sent:
                    continue  # the upstream hears it once, however many clients share a named session
                initialized = True
            elif method is not None and "id" in m:
                request_id = m["id"]
                if request_id in ids or request_id in self.pending:
                    raise BadRequest("Invalid Request: a request with this id is already in flight in this session")
                ids.add(request_id)
                requests.append(m)
            kept.append(m)
        messages = kept
        if (self.mailbox.room or 0) < len(messages):
            raise Overloaded(f"Session busy: {self.mailbox.maxsize} messages already queued for the server",
                             retry_after=1.0)
        stream = self._stream_for(mode) if requests else None
        for request in requests:
            self._expect(request, stream or self.log.get_stream())
        for message in messages:
            # With nothing queued before it, a message the upstream takes at once skips the writer.
            if not (self._writer_idle and not self.mailbox and self.upstream.send_now(message)):
                self.mailbox.put(message)
        self._initialized_sent = self._initialized_sent or initialized  # only once it is really queued
        return None if mode == CHANNEL else stream

    def _stream_for(self, mode: str) -> StreamLog:
        if mode == CHANNEL:
            self.channel = True
            return self.log.get_stream()
        # A JSON answer is never replayed, so never logged; an AUTO one is logged once it is a stream.
        return self.log.open(logged=mode == SSE, undecided=mode == AUTO)

    def untimed(self, request_id: RequestId) -> None:
        """Lift the deadline from a request the caller bounds itself: the node waits for the
        initialize of a session it creates, and answers its client when it runs out."""
        self._deadlines.discard(request_id)
        self._starting.discard(request_id)

    def _expect(self, request: Message, stream: StreamLog) -> None:
        request_id = request["id"]
        self.pending[request_id] = stream
        self.owed[stream.stream] = self.owed.get(stream.stream, 0) + 1
        token = progress_token(request)
        if isinstance(token, str | int):
            self.tokens[token] = request_id
            self._token_of[request_id] = token
        # `initialize` is bounded by upstream_start_timeout: a server may take longer to start than
        # to answer any later request (a WebSocket or HTTP+SSE client sends it once the server runs).
        (self._starting if request.get("method") == "initialize" else self._deadlines).add(request_id)

    def _expire(self, request_id: RequestId) -> None:
        self._time_out(request_id, f"Upstream did not answer within {self.limits.request_timeout:g}s")

    def _expire_initialize(self, request_id: RequestId) -> None:
        self._time_out(request_id, f"Upstream did not answer initialize within {self.limits.start_timeout:g}s")

    def _time_out(self, request_id: RequestId, reason: str) -> None:
        """The upstream took too long: answer the client with an error and tell the upstream to stop."""
        if request_id not in self.pending:
            return
        self.deliver(error_response(request_id, REQUEST_TIMEOUT, reason))
        self._cancel_upstream(request_id, reason)

    def _cancel_upstream(self, request_id: RequestId, reason: str) -> None:
        """Tell the upstream a request is no longer wanted (best effort: never blocks, never overfills)."""
        note = {"jsonrpc": "2.0", "method": "notifications/cancelled",
                "params": {"requestId": request_id, "reason": reason}}
        if self.mailbox.room and self.ended is None:
            self.mailbox.put(note)

    def report(self, message: Message) -> None:
        """Put a message of Tether's own (an error for a message the session refused) on the channel."""
        self._append(self.log.get_stream(), message)

    def stream_to_read(self, cursor: EventId | None) -> tuple[StreamLog, int]:
        """The stream a GET reads and the seq it starts after.

        With a cursor: the stream it names, from there (a resumption takes the
        stream over from a reader that may still hang on). Without: the GET
        stream, from what no reader has had yet; one reader at a time, except
        on a channel, where a client that comes back replaces the old one.
        Raises `CursorExpired`, `BadRequest` or `Conflict`.
        """
        if cursor is not None:
            stream, _ = self.log.resume(cursor)
            return stream, cursor.seq
        stream = self.log.get_stream()
        if stream.reader is not None and not self.channel:
            raise Conflict("Conflict: this session already has an open GET stream")
        return stream, stream.delivered

    async def read(self, stream: StreamLog, after: int, keepalive: float | None = None, *,
                   ping_first: bool = False) -> AsyncGenerator[tuple[EventId, Message] | None, None]:
        """`stream`'s events after seq `after`, live until the stream finishes, the session ends, or
        another reader takes the stream over; with `keepalive`, None after each `keepalive` of silence
        (a ping is due; with `ping_first`, also at once if nothing has come). Without, an idle reader
        costs no timer and no wake-up.
        Raises `CursorExpired` if this reader falls so far behind that the log drops what it has not read."""
        me = object()
        if stream.reader is not None:
            self._notify()  # wake the reader we replace, so it sees it is gone
        stream.reader = me
        seq = after
        try:
            while stream.reader is me:
                for number, message in stream.after(seq):
                    seq = number
                    yield EventId(stream.stream, seq), message
                    stream.delivered = max(stream.delivered, seq)  # the reader came back: it was written
                if (stream.finished or self._closing) and seq >= stream.last_seq:
                    return
                if ping_first:
                    ping_first = False
                    yield None
                elif not await self._changed.wait(keepalive):
                    yield None
        finally:
            if stream.reader is me:
                stream.reader = None
            self.lease.touch(self._clock())  # the idle clock starts when the last reader leaves

    def forget(self, stream: StreamLog) -> None:
        """A JSON answer has been read, or its client has gone: nothing will resume it. Requests it
        still waits on are cancelled upstream, since their answers could reach no one."""
        for request_id in [r for r, s in self.pending.items() if s is stream]:
            self._release(request_id)
            self._cancel_upstream(request_id, "Client went away")
        self.owed.pop(stream.stream, None)
        self.log.discard(stream)

    # -- upstream side -----------------------------------------------------------

    async def _write_upstream(self) -> None:
        while True:
            self._writer_idle = True
            message = await self.mailbox.get()
            self._writer_idle = False
            try:
                await self.upstream.send(message)
            except Exception as exc:  # whatever it was, nothing more can reach the server: end the session
                detail = exc.message if isinstance(exc, UpstreamError) else repr(exc)
                log.warning("upstream.send_failed", extra={"sid": self.tag, "detail": detail})
                self._exit("upstream_exit")
                return

    async def _read_upstream(self) -> None:
        while True:
            try:
                inbound = await self.upstream.receive()
            except UpstreamError as exc:
                log.warning("upstream.bad_output", extra={"sid": self.tag, "detail": exc.message})
                inbound = None
            if inbound is None:
                self._exit("upstream_exit")
                return
            self._take(inbound)

    def _take(self, inbound: Inbound) -> None:
        message, related = inbound
        for item in message if isinstance(message, list) else [message]:
            if isinstance(item, dict):
                self.deliver(item, related)

    def deliver(self, message: Message, related: RequestId | None = None) -> None:
        """Put one upstream message on exactly one client stream."""
        sole = self._sole() if "method" in message else None  # only a server's own message may need it
        destination = route_upstream(message, self.pending, self.tokens, related=related, sole=sole)
        stream = self.pending.get(destination.request_id) if destination.request_id is not None else None
        if stream is None or (not stream.logged and not stream.undecided and not destination.final):
            stream = self.log.get_stream()  # a JSON answer carries responses only
        self._append(stream, message)
        if destination.final:
            self._settle(destination.request_id, stream)  # type: ignore[arg-type]
        if stream.listener is not None:
            stream.listener()

    def _sole(self) -> RequestId | None:
        """The one request running with an SSE stream of its own, if exactly one is."""
        found = None
        for request_id, stream in self.pending.items():
            if stream.stream != 0 and (stream.logged or stream.undecided):
                if found is not None:
                    return None
                found = request_id
        return found

    def _append(self, stream: StreamLog, message: Message) -> None:
        lost = self.log.lost
        self.log.append(stream, message)
        if self.log.lost > lost:
            self._on_dropped(self.log.lost - lost)
            log.warning("event_log.full", extra={"sid": self.tag, "count": self.log.limit})
        self._changed.notify()  # `_notify`, one call fewer for every event

    def _notify(self) -> None:
        """Wake every reader; each looks for what is new to it, and waits again."""
        self._changed.notify()

    def _release(self, request_id: RequestId) -> None:
        """Forget a request: it is answered, or nobody waits for it any more."""
        del self.pending[request_id]
        self._deadlines.discard(request_id)
        self._starting.discard(request_id)
        if (token := self._token_of.pop(request_id, None)) is not None:
            self.tokens.pop(token, None)

    def _settle(self, request_id: RequestId, stream: StreamLog) -> None:
        self._release(request_id)
        owed = self.owed.get(stream.stream, 0) - 1
        if owed > 0:
            self.owed[stream.stream] = owed
            return
        self.owed.pop(stream.stream, None)
        if stream.stream != 0:
            self.log.finish(stream)

    # -- ending ------------------------------------------------------------------

    def _exit(self, reason: str) -> None:
        if self.ended is None:
            self._on_exit(self, reason)

    async def end(self, reason: str) -> None:
        """End the session: answer what is pending, finish streams, stop the upstream. Idempotent."""
        if self._closing:
            await self._done.wait()
            return
        self.ended = self.ended or reason
        for request_id in list(self.pending):
            self.deliver(error_response(request_id, CONNECTION_CLOSED, f"Session ended: {self.ended}"))
        self._closing = True
        self._writer_idle = False  # nothing more goes to the upstream
        self._notify()  # readers see the session is over once they have what is left
        self._deadlines.close()
        self._starting.close()
        await self._tasks.close()
        detail = await self.upstream.stop(self.limits.kill_grace)
        log.info("session.ended", extra={"node": self.record.node_id, "sid": self.tag, "reason": self.ended,
                                         "pid": self.upstream.pid, "epoch": self.record.epoch, "detail": detail})
        self._done.set()


__all__ = ["AUTO", "CHANNEL", "JSON", "MODES", "SSE", "ActorLimits", "SessionActor"]
