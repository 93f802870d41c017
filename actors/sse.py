"""Server-sent events: framing what Tether sends, and parsing what it reads. Sans-IO.

The parser is incremental (bytes in as they arrive, whole events out) and is
used wherever Tether reads a stream: a node's stream at the gateway, and an
HTTP upstream's streams at the node.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

PING = b": ping\n\n"
HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache, no-transform",
           "X-Accel-Buffering": "no"}


def event(message: Mapping[str, Any], name: str = "message", event_id: object = None) -> bytes:
    """One SSE event carrying one JSON-RPC message, with its id if it has one."""
    head = b"id: " + str(event_id).encode() + b"\n" if event_id is not None else b""
    return head + b"event: " + name.encode() + b"\ndata: " + orjson.dumps(message) + b"\n\n"


def priming(event_id: object, retry_ms: int) -> bytes:
    """The 2025-11-25 priming event: an id and no data, so a client can resume from the very start."""
    return b"id: " + str(event_id).encode() + b"\nretry: " + str(retry_ms).encode() + b"\ndata: \n\n"


def endpoint(uri: str) -> bytes:
    """The HTTP+SSE (2024-11-05) `endpoint` event: where the client POSTs its messages."""
    return b"event: endpoint\ndata: " + uri.encode() + b"\n\n"


@dataclass(frozen=True)
class Event:
    data: str
    name: str = "message"
    id: str | None = None
    retry: int | None = None


class Parser:
    """Turns a byte stream into `Event`s. Comments (pings) and events with neither data nor id are skipped.

    `max_event_bytes` bounds one event, so a peer that never ends a line cannot
    grow it without limit; `feed` raises `ValueError` past it.
    """

    def __init__(self, max_event_bytes: int = 4 * 1024 * 1024) -> None:
        self._buffer = b""
        self._max = max_event_bytes
        self._data: list[str] = []
        self._name = ""
        self._id: str | None = None
        self._retry: int | None = None
        self._size = 0
        self.last_id: str | None = None  # the stream's last event id, for `Last-Event-ID`
        self.dispatched = 0  # events parsed so far

    def feed(self, chunk: bytes) -> list[Event]:
        self._buffer += chunk
        events: list[Event] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) + self._size > self._max:
                    raise ValueError(f"an SSE event is over {self._max} bytes")
                return events
            line = self._buffer[:end].rstrip(b"\r").decode(errors="replace")
            self._buffer = self._buffer[end + 1:]
            self._size += len(line)
            if self._size > self._max:
                raise ValueError(f"an SSE event is over {self._max} bytes")
            if not line:
                if (found := self._dispatch()) is not None:
                    events.append(found)
                continue
            self._field(line)

    def _field(self, line: str) -> None:
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._name = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)

    def _dispatch(self) -> Event | None:
        found = None
        if self._id is not None:
            self.last_id = self._id
        if self._data or self._id is not None:
            self.dispatched += 1
            found = Event("\n".join(self._data), self._name or "message", self._id, self._retry)
        self._data, self._name, self._id, self._retry, self._size = [], "", None, None, 0
        return found
