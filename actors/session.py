"""`SessionActor`: the single owner of one session on its node.

It holds the upstream, a bounded mailbox of client messages (written to the
upstream by one task, in order), the client streams waiting for answers, the
GET stream, a bounded log of server messages that arrived while no GET stream
was open, and the idle lease. Where an upstream message goes is decided by
`actors.mcp.route_upstream`; this module only moves it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from actors.lease import IdleLease
from actors.mcp import (
    Destination,
    Kind,
    Message,
    RequestId,
    error_response,
    kind_of,
    progress_token,
    route_upstream,
)
from actors.store.base import OwnershipRecord
from actors.upstream import StdioUpstream
from tether.errors import CONNECTION_CLOSED, BadRequest, Conflict, Overloaded, UpstreamError
from tether.logs import sid_tag
from tether.tasks import TaskSet

log = logging.getLogger("tether.node")

_END = None  # the sentinel that closes an Outbox


@dataclass(frozen=True)
class ActorLimits:
    idle_timeout: float
    mailbox_depth: int
    event_log_size: int
    kill_grace: float


class Outbox:
    """One client-facing stream: the answers to one POST, or the session's GET stream.

    Bounded: past `limit` queued messages (a client that does not read), further
    notifications are dropped and counted; responses are always kept, and there
    are never more of them than the requests that asked.
    """

    def __init__(self, limit: int, expected: int = 0, *, json_only: bool = False,
                 on_dropped: Callable[[int], None] = lambda n: None) -> None:
        self.queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self.limit = limit
        self.expected = expected  # responses still owed; 0 for the GET stream
        self.json_only = json_only  # a JSON answer carries responses only
        self.request_ids: list[RequestId] = []
        self.tokens: list[object] = []  # progress tokens of its requests
        self.closed = False
        self._on_dropped = on_dropped

    def put(self, message: Message) -> None:
        if self.closed:
            return
        if self.queue.qsize() >= self.limit and "method" in message:
            self._on_dropped(1)
            log.warning("stream.full", extra={"count": self.limit, "method": message["method"]})
            return
        self.queue.put_nowait(message)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.queue.put_nowait(_END)


class SessionActor:
    """Owns one session: its upstream, mailbox, streams, event log and idle lease."""

    def __init__(self, sid: str, record: OwnershipRecord, upstream: StdioUpstream, limits: ActorLimits,
                 *, on_exit: Callable[[SessionActor, str], None],
                 on_dropped: Callable[[int], None] = lambda n: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sid = sid
        self.tag = sid_tag(sid)
        self.record = record
        self.upstream = upstream
        self.limits = limits
        self.lease = IdleLease(limits.idle_timeout, clock())
        self.mailbox: asyncio.Queue[Message] = asyncio.Queue(maxsize=limits.mailbox_depth)
        self.pending: dict[RequestId, Outbox] = {}
        self.tokens: dict[object, RequestId] = {}
        self.get_stream: Outbox | None = None
        self.event_log: deque[Message] = deque()
        self.ended: str | None = None  # the reason, once ending has begun
        self.initialize_answer: Message | None = None  # what the upstream answered; named sessions reuse it
        self._initialized_sent = False
        self._closing = False
        self._done = asyncio.Event()
        self._on_exit = on_exit
        self._on_dropped = on_dropped
        self._tasks = TaskSet(f"actor-{self.tag}")

    def __repr__(self) -> str:
        return (f"SessionActor({self.tag}, node={self.record.node_id}, epoch={self.record.epoch}, "
                f"pid={self.upstream.pid}, pending={len(self.pending)}, ended={self.ended})")

    @property
    def busy(self) -> bool:
        """True while a client waits on an answer: a session in use is never idle."""
        return bool(self.pending)

    def start(self) -> None:
        self._tasks.spawn(self._read_upstream(), "read")
        self._tasks.spawn(self._write_upstream(), "write")
        self._tasks.spawn(self.upstream.stderr_lines(), "stderr")

    # -- client side -------------------------------------------------------------

    def submit(self, messages: Iterable[Message], *, json_only: bool = False) -> Outbox | None:
        """Queue client messages for the upstream.

        Returns the Outbox that will carry the answers, or None when nothing is
        owed one (notifications and responses only). Raises `Overloaded` when
        the mailbox is full, `BadRequest` for a request id already in flight.
        """
        messages = [m for m in messages if not self._repeated_initialized(m)]
        requests = [m for m in messages if kind_of(m) is Kind.REQUEST]
        ids = [m["id"] for m in requests]
        if len(set(ids)) != len(ids) or any(i in self.pending for i in ids):
            raise BadRequest("Invalid Request: a request with this id is already in flight in this session")
        if self.mailbox.maxsize - self.mailbox.qsize() < len(messages):
            raise Overloaded(f"Session busy: {self.mailbox.maxsize} messages already queued for the server",
                             retry_after=1.0)
        outbox = self._outbox(len(requests), json_only=json_only) if requests else None
        for message in messages:
            if outbox is not None and kind_of(message) is Kind.REQUEST:
                request_id = message["id"]
                self.pending[request_id] = outbox
                outbox.request_ids.append(request_id)
                token = progress_token(message)
                if isinstance(token, str | int):
                    self.tokens[token] = request_id
                    outbox.tokens.append(token)
            self.mailbox.put_nowait(message)
        return outbox

    def _repeated_initialized(self, message: Message) -> bool:
        """The upstream hears notifications/initialized once, however many clients share a named session."""
        if message.get("method") != "notifications/initialized" or "id" in message:
            return False
        seen, self._initialized_sent = self._initialized_sent, True
        return seen

    def abandon(self, outbox: Outbox, reason: str) -> list[Message]:
        """Stop waiting on `outbox` (timeout or client gone); returns the errors owed for its requests."""
        owed = []
        for request_id in outbox.request_ids:
            if self.pending.get(request_id) is outbox:
                del self.pending[request_id]
                owed.append(error_response(request_id, CONNECTION_CLOSED, reason))
                self.mailbox_cancel(request_id, reason)
        self._forget_tokens(outbox)
        outbox.close()
        return owed

    def mailbox_cancel(self, request_id: RequestId, reason: str) -> None:
        """Tell the upstream a request is no longer wanted (best effort)."""
        note = {"jsonrpc": "2.0", "method": "notifications/cancelled",
                "params": {"requestId": request_id, "reason": reason}}
        if not self.mailbox.full() and self.ended is None:
            self.mailbox.put_nowait(note)

    def open_stream(self) -> Outbox:
        """Open the session's GET stream, first replaying what the event log holds. One at a time."""
        if self.get_stream is not None and not self.get_stream.closed:
            raise Conflict("Conflict: this session already has an open GET stream")
        stream = self._outbox(0)
        while self.event_log:
            stream.put(self.event_log.popleft())
        self.get_stream = stream
        return stream

    def _outbox(self, expected: int, *, json_only: bool = False) -> Outbox:
        return Outbox(self.limits.event_log_size, expected, json_only=json_only, on_dropped=self._on_dropped)

    def close_stream(self, stream: Outbox) -> None:
        stream.close()
        if self.get_stream is stream:
            self.get_stream = None

    # -- upstream side -----------------------------------------------------------

    async def _write_upstream(self) -> None:
        while True:
            message = await self.mailbox.get()
            try:
                await self.upstream.send(message)
            except UpstreamError:
                self._exit("upstream_exit")
                return

    async def _read_upstream(self) -> None:
        while True:
            try:
                message = await self.upstream.receive()
            except UpstreamError as exc:
                log.warning("upstream.bad_output", extra={"sid": self.tag, "detail": exc.message})
                message = None
            if message is None:
                self._exit("upstream_exit")
                return
            for item in message if isinstance(message, list) else [message]:
                if isinstance(item, dict):
                    self.deliver(item)

    def deliver(self, message: Message) -> None:
        """Put one upstream message on exactly one client stream (or the event log)."""
        destination = route_upstream(message, self.pending, self.tokens)
        outbox = self.pending.get(destination.request_id) if destination.request_id is not None else None
        if outbox is None or (outbox.json_only and not destination.final):
            self._to_get_stream(message)
            return
        outbox.put(message)
        if destination.final:
            self._settle(destination)

    def _settle(self, destination: Destination) -> None:
        outbox = self.pending.pop(destination.request_id)  # type: ignore[arg-type]
        outbox.expected -= 1
        if outbox.expected <= 0:
            self._forget_tokens(outbox)
            outbox.close()

    def _forget_tokens(self, outbox: Outbox) -> None:
        for token in outbox.tokens:
            self.tokens.pop(token, None)

    def _to_get_stream(self, message: Message) -> None:
        if self.get_stream is not None and not self.get_stream.closed:
            self.get_stream.put(message)
            return
        self.event_log.append(message)
        if len(self.event_log) > self.limits.event_log_size:
            self.event_log.popleft()
            self._on_dropped(1)
            log.warning("event_log.full", extra={"sid": self.tag, "count": self.limits.event_log_size})

    # -- ending ------------------------------------------------------------------

    def _exit(self, reason: str) -> None:
        if self.ended is None:
            self._on_exit(self, reason)

    async def end(self, reason: str) -> None:
        """End the session: answer what is pending, close streams, reap the upstream. Idempotent."""
        if self._closing:
            await self._done.wait()
            return
        self._closing = True
        self.ended = self.ended or reason
        for request_id, outbox in list(self.pending.items()):
            outbox.put(error_response(request_id, CONNECTION_CLOSED, f"Session ended: {reason}"))
            outbox.close()
        self.pending.clear()
        self.tokens.clear()
        if self.get_stream is not None:
            self.get_stream.close()
        await self._tasks.close()
        code = await self.upstream.stop(self.limits.kill_grace)
        log.info("session.ended", extra={"node": self.record.node_id, "sid": self.tag, "reason": self.ended,
                                         "pid": self.upstream.pid, "epoch": self.record.epoch,
                                         "detail": f"upstream exit code {code}"})
        self._done.set()


__all__ = ["ActorLimits", "Outbox", "SessionActor"]
