"""The gateway-node link's frames: many exchanges multiplexed on one connection.

A gateway keeps a few long-lived connections to each node, on the node's own
port (an HTTP/1.1 upgrade of `LINK_PATH` to `UPGRADE`, with the internal
secret: see `actors.wire`), and runs every client request as an exchange on
one of them. An idle client stream costs an entry in a table, not a
connection. After the upgrade, each side sends frames back to back (those of
one turn of its event loop leave in one write), each:

    kind (1 byte) | exchange id (4 bytes) | head length (4) | body length (4) | head (JSON) | body

    REQUEST   gateway -> node   head [method, sid, headers]   body: the request body
    RESPONSE  node -> gateway   head [status, headers]        body: the first bytes of the answer
    DATA      node -> gateway   -                             body: more of the answer
    CANCEL    either way        -                             gateway: the client left, abandon it;
                                                              node: the exchange failed midway
    PING      either way        exchange id 0                 are you there? (sent on a quiet link)
    PONG      either way        exchange id 0                 the answer to a PING

`FIN` on a RESPONSE or DATA frame says the answer ends with it, so a short
answer is a single frame. This module only encodes and decodes; the gateway
(`gateway.link`) and the node (`actors.node_api`) do the I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final

import orjson

from actors.internal import INTERNAL_PREFIX

LINK_PATH: Final[str] = INTERNAL_PREFIX + "link"  # internal: it needs the secret
UPGRADE: Final = "tether-link/1"  # the protocol the link's HTTP/1.1 upgrade switches to
# Final, one a line: a compiled module reads them as constants (see setup.py)
REQUEST: Final = 1
RESPONSE: Final = 2
DATA: Final = 3
CANCEL: Final = 4
PING: Final = 5
PONG: Final = 6
FIN = 0x80
_KINDS = frozenset({REQUEST, RESPONSE, DATA, CANCEL, PING, PONG})
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
    """The frames of `data`, which ends where a frame ends. Raises `FrameError`."""
    frames, used = decode_some(data)
    if used != len(data):
        left = len(data) - used
        if left < _PREFIX.size:
            raise FrameError(f"a frame of {left} bytes is shorter than its {_PREFIX.size}-byte prefix")
        raise FrameError(f"a frame overruns the {len(data)} bytes it came in")
    return frames


def decode_some(data: bytes | bytearray | memoryview) -> tuple[list[Frame], int]:
    """The whole frames at the start of a byte stream, in order, and how many bytes they took (what
    follows is the start of a frame still coming). Raises `FrameError`."""
    frames = []
    at, total = 0, len(data)
    while total - at >= _PREFIX.size:
        kind, xid, size, length = _PREFIX.unpack_from(data, at)
        fin, kind = bool(kind & FIN), kind & ~FIN
        if kind not in _KINDS:
            raise FrameError(f"unknown frame kind {kind}")
        start = at + _PREFIX.size
        end = start + size + length
        if end > total:
            break
        try:
            head = orjson.loads(data[start:start + size]) if size else None
        except orjson.JSONDecodeError as exc:
            raise FrameError(f"a frame head is not JSON ({exc})") from exc
        if kind in (REQUEST, RESPONSE) and not _valid_head(kind, head):
            raise FrameError(f"a {'request' if kind == REQUEST else 'response'} frame has a malformed head")
        frames.append(Frame(kind, xid, fin, head, bytes(data[start + size:end])))
        at = end
    return frames, at


def _valid_head(kind: int, head: Any) -> bool:
    if not (isinstance(head, list) and len(head) == (3 if kind == REQUEST else 2) and isinstance(head[-1], dict)):
        return False
    if kind == REQUEST:
        return isinstance(head[0], str) and isinstance(head[1], str)
    return isinstance(head[0], int)
