"""A session's event log: SSE event ids, and bounded replay for `Last-Event-ID`. Sans-IO.

Every message a session sends on an SSE stream (or a WebSocket) is an event
with an id `"{stream}-{seq}"`: `stream` names the stream within the session
(0 is the GET stream, or the one channel of a WebSocket or HTTP+SSE client;
each POST answered as SSE gets the next number) and `seq` counts that stream's
events from 1, without gaps. So an id is unique in its session, names the
stream it belongs to, and a WebSocket client's cursor is simply how many
messages it has received.

The log keeps the newest `limit` events of all a session's streams together.
A cursor whose stream has lost a later event to that bound gets
`CursorExpired`, never a silently shorter replay.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

from tether.errors import BadRequest, CursorExpired

Event = tuple[int, dict[str, Any]]  # (seq, message)
# Shared by every stream and log that has held nothing yet (a deque allocates a block at once, and
# most streams of idle sessions never get an event); never appended to: `_push` replaces it first.
_EMPTY: deque[Any] = deque(maxlen=0)


def _push(queue: deque[Any], item: Any) -> deque[Any]:
    """`queue` with `item` appended: a new deque in place of the shared empty one."""
    if queue is _EMPTY:
        queue = deque()
    queue.append(item)
    return queue


class EventId(NamedTuple):
    """An SSE event's id: its stream and its place in it. (A tuple: every event a reader reads makes one.)"""

    stream: int
    seq: int

    def __str__(self) -> str:
        return f"{self.stream}-{self.seq}"

    @classmethod
    def parse(cls, text: str, *, default_stream: int | None = None) -> EventId:
        """Parse "STREAM-SEQ" (or a bare SEQ when `default_stream` is given). Raises `BadRequest`."""
        stream_text, dash, seq_text = text.strip().partition("-")
        if not dash and default_stream is not None:
            stream_text, seq_text = str(default_stream), stream_text
        if not (stream_text.isdigit() and seq_text.isdigit() and len(text) <= 40):
            raise BadRequest(f"Bad Request: Last-Event-ID {text[:60]!r} is not an event id of this server "
                             "(expected STREAM-SEQ)")
        return cls(int(stream_text), int(seq_text))


class StreamLog:
    """One stream's events that are still in the log, and how far it has got."""

    __slots__ = ("stream", "logged", "undecided", "events", "last_seq", "evicted_through", "delivered", "finished",
                 "reader", "listener")

    def __init__(self, stream: int, *, logged: bool, undecided: bool = False) -> None:
        self.stream = stream
        self.logged = logged  # False for a JSON answer: never replayed, so never counted against the bound
        # An answer that may yet be JSON (response_mode "auto"): not logged until it becomes a stream
        # (`EventLog.log_stream`), but it takes its requests' other messages as a stream does.
        self.undecided = undecided
        self.events: deque[Event] = _EMPTY
        self.last_seq = 0  # the newest event's seq
        self.evicted_through = 0  # the newest seq the bound pushed out
        self.delivered = 0  # the newest seq handed to a reader (what a plain GET resumes after)
        self.finished = False  # no more events will come: its requests are all answered
        self.reader: object | None = None  # whoever reads it live now (a token the reader owns)
        self.listener: Callable[[], None] | None = None  # told when the actor delivers to it, in place of a reader

    def __repr__(self) -> str:
        return (f"StreamLog({self.stream}, last={self.last_seq}, kept={len(self.events)}, "
                f"evicted_through={self.evicted_through}, finished={self.finished})")

    def after(self, seq: int) -> list[Event]:
        """The events after `seq`, in order. Raises `CursorExpired` if some of them were pushed out."""
        if seq < self.evicted_through:
            raise CursorExpired(
                f"Gone: events after {self.stream}-{seq} are no longer in the session's event log "
                f"(it was replayed through {self.stream}-{self.evicted_through} and has moved on); "
                "this stream cannot be resumed without a gap",
                data={"lastEventId": f"{self.stream}-{seq}", "oldest": f"{self.stream}-{self.evicted_through + 1}"})
        if seq >= self.last_seq:
            return []
        first = self.events[0][0] if self.events else self.last_seq + 1
        return list(itertools.islice(self.events, max(0, seq + 1 - first), None))


class EventLog:
    """The streams of one session and the newest `limit` events across them."""

    __slots__ = ("limit", "streams", "_next_stream", "_order", "size", "lost")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"an event log holds at least 1 event, got {limit}")
        self.limit = limit
        self.streams: dict[int, StreamLog] = {}
        self._next_stream = 1  # 0 is the GET stream, opened on demand
        self._order: deque[StreamLog] = _EMPTY  # which stream each kept event belongs to, oldest first
        self.size = 0
        self.lost = 0  # events the bound pushed out before any reader had them

    def __repr__(self) -> str:
        return f"EventLog(size={self.size}/{self.limit}, streams={sorted(self.streams)})"

    def open(self, *, logged: bool = True, undecided: bool = False) -> StreamLog:
        """A new stream with the next number."""
        stream = StreamLog(self._next_stream, logged=logged and not undecided, undecided=undecided)
        self._next_stream += 1
        self.streams[stream.stream] = stream
        return stream

    def get_stream(self) -> StreamLog:
        """Stream 0: the GET stream (or a WebSocket's or HTTP+SSE client's only channel)."""
        stream = self.streams.get(0)
        if stream is None:
            stream = self.streams[0] = StreamLog(0, logged=True)
        return stream

    def append(self, stream: StreamLog, message: dict[str, Any]) -> int:
        """Add an event to `stream` and return its number there (its id: `EventId(stream.stream, number)`);
        the oldest logged events go past the bound."""
        stream.last_seq += 1
        stream.events = _push(stream.events, (stream.last_seq, message))
        if stream.logged:
            self._order = _push(self._order, stream)
            self.size += 1
            while self.size > self.limit:
                self._evict()
        return stream.last_seq

    def log_stream(self, stream: StreamLog) -> None:
        """An undecided answer became a stream: from now on it is resumable, and its events, those it
        already has too, count against the bound."""
        if stream.logged:
            return
        stream.logged, stream.undecided = True, False
        for _ in stream.events:
            self._order = _push(self._order, stream)
            self.size += 1
        while self.size > self.limit:
            self._evict()

    def _evict(self) -> None:
        oldest = self._order.popleft()
        seq, _ = oldest.events.popleft()
        oldest.evicted_through = seq
        self.size -= 1
        if seq > oldest.delivered:
            self.lost += 1
        self._prune(oldest)

    def finish(self, stream: StreamLog) -> None:
        """`stream` gets no more events; it is forgotten once none of its events are left."""
        stream.finished = True
        if not stream.events and stream.stream != 0:  # `_prune`, in place: every answer ends here
            self.streams.pop(stream.stream, None)

    def discard(self, stream: StreamLog) -> None:
        """Forget an unlogged stream (a JSON answer, or an undecided one) once it has been read."""
        if not stream.logged:
            stream.events.clear()
            self.finish(stream)

    def _prune(self, stream: StreamLog) -> None:
        if stream.finished and not stream.events and stream.stream != 0:
            self.streams.pop(stream.stream, None)

    def resume(self, cursor: EventId) -> tuple[StreamLog, list[Event]]:
        """The stream `cursor` names and its events after it. Raises `CursorExpired` or `BadRequest`."""
        stream = self.streams.get(cursor.stream)
        if stream is None and cursor.stream == 0:
            stream = self.get_stream()
        if stream is None:
            if 0 < cursor.stream < self._next_stream:
                raise CursorExpired(f"Gone: stream {cursor.stream} of this session has ended and its events "
                                    "are no longer in the event log", data={"lastEventId": str(cursor)})
            raise BadRequest(f"Bad Request: Last-Event-ID {cursor} names no stream of this session")
        if cursor.seq > stream.last_seq:
            raise BadRequest(f"Bad Request: Last-Event-ID {cursor} is ahead of the stream "
                             f"(its newest event is {stream.stream}-{stream.last_seq})")
        if not stream.logged:
            raise BadRequest(f"Bad Request: stream {cursor.stream} was a JSON answer and cannot be resumed")
        return stream, stream.after(cursor.seq)


__all__ = ["Event", "EventId", "EventLog", "StreamLog"]
