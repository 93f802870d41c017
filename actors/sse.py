"""Server-sent events framing. Sans-IO."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

PING = b": ping\n\n"
HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache, no-transform",
           "X-Accel-Buffering": "no"}


def event(message: Mapping[str, Any], name: str = "message") -> bytes:
    """One SSE event carrying one JSON-RPC message."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(message) + b"\n\n"
