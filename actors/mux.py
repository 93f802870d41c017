"""The gateway-node link's frames: many exchanges multiplexed on one WebSocket.

A gateway keeps a few long-lived WebSocket connections to each node, on the
node's own port at `LINK_PATH` (with the internal secret), and runs every
client request as an exchange on one of them. An idle client stream costs an
entry in a table, not a connection. A binary message carries one or more frames
(those a side sent in one turn of its event loop leave together: one write, one
read for many exchanges), each:

    kind (1 byte) | exchange id (4 bytes) | head length (4) | body length (4) | head (JSON) | body

    REQUEST   gateway -> node   head [method, sid, headers]   body: the request body
    RESPONSE  node -> gateway   head [status, headers]        body: the first bytes of the answer
    DATA      node -> gateway   -                             body: more of the answer
    CANCEL    either way        -                             gateway: the client left, abandon it;
                                                              node: the exchange failed midway

`FIN` on a RESPONSE or DATA frame says the answer ends with it, so a short
answer is a single frame. This module only encodes and decodes; the gateway
(`gateway.link`) and the node (`actors.node_api`) do the I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import orjson

from actors.internal import INTERNAL_PREFIX

LINK_PATH = INTERNAL_PREFIX + "link"  # internal: it needs the secret
HEARTBEAT = 10.0  # seconds between WebSocket pings on an idle link; no pong within half of it: the link is dead
REQUEST, RESPONSE, DATA, CANCEL = 1, 2, 3, 4
FIN = 0x80
_KINDS = frozenset({REQUEST, RESPONSE, DATA, CANCEL})
_PREFIX = struct.Struct("!BIII")


class FrameError(ValueError):
    """A frame that does not follow this module's format: the peer is broken, the connection is dropped."""


@dataclass(slots=True)
class Frame:
    kind: int
    xid: int
    fin: bool
    head: Any
    body: bytes


def encode(kind: int, xid: int, head: Any = None, body: bytes = b"", fin: bool = False) -> bytes:
    encoded = b"" if head is None else orjson.dumps(head)
    return _PREFIX.pack(kind | (FIN if fin else 0), xid, len(encoded), len(body)) + encoded + body


def decode(data: bytes) -> list[Frame]:
    """The frames of one binary message, in order. Raises `FrameError`."""
    frames = []
    at, total = 0, len(data)
    while True:
        if total - at < _PREFIX.size:
            raise FrameError(f"a frame of {total - at} bytes is shorter than its {_PREFIX.size}-byte prefix")
        kind, xid, size, length = _PREFIX.unpack_from(data, at)
        fin, kind = bool(kind & FIN), kind & ~FIN
        if kind not in _KINDS:
            raise FrameError(f"unknown frame kind {kind}")
        start = at + _PREFIX.size
        end = start + size + length
        if end > total:
            raise FrameError(f"a frame of {size + length} bytes overruns its {total}-byte message")
        try:
            head = orjson.loads(data[start:start + size]) if size else None
        except orjson.JSONDecodeError as exc:
            raise FrameError(f"a frame head is not JSON ({exc})") from exc
        if kind in (REQUEST, RESPONSE) and not _valid_head(kind, head):
            raise FrameError(f"a {'request' if kind == REQUEST else 'response'} frame has a malformed head")
        frames.append(Frame(kind, xid, fin, head, data[start + size:end]))
        if end == total:
            return frames
        at = end


def _valid_head(kind: int, head: Any) -> bool:
    if not (isinstance(head, list) and len(head) == (3 if kind == REQUEST else 2) and isinstance(head[-1], dict)):
        return False
    if kind == REQUEST:
        return isinstance(head[0], str) and isinstance(head[1], str)
    return isinstance(head[0], int)
