"""One link connection between a gateway and a node: `actors.mux` frames over a plain socket.

The link opens as an HTTP/1.1 request on the node's own port, `GET LINK_PATH`
with `Upgrade: tether-link/1` and the internal secret; the node answers 101
and from then on both sides write frames back to back. It was a WebSocket;
this is the same frames without WebSocket framing and masking, a reader task
per connection and a writer task per connection. A `Wire` is an
`asyncio.Protocol`: the frames in each read are handed on in `data_received`
itself, and the frames put in one turn of the loop leave in one write at the
end of the turn (one system call here and one wake-up on the other side for
many exchanges).

A quiet link is checked every `HEARTBEAT` seconds: a side that has heard
nothing since the last check sends a PING, and closes the link if the next
check finds that unanswered too, so a peer that died without closing its socket
is given up within two or three `HEARTBEAT`s.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from http import HTTPStatus
from typing import TypeVar, cast

import orjson
from mypy_extensions import mypyc_attr

from actors import mux
from actors.internal import SECRET_HEADER, authorized

log = logging.getLogger("tether.link")

HEARTBEAT = 5.0  # seconds between checks that a quiet link's peer still answers
HIGH_WATER = 256 * 1024  # bytes waiting to be sent before `put` waits for them to leave
_PING = mux.encode(mux.PING, 0)
_PONG = mux.encode(mux.PONG, 0)
W = TypeVar("W", bound="Wire")


@mypyc_attr(allow_interpreted_subclasses=True)  # each side's link builds on it
class Wire(asyncio.Protocol):
    """Frames in and out of one link connection, once its upgrade is done. Subclasses take the frames
    (`frame_received`) and learn of the end (`link_lost`)."""

    heartbeat = HEARTBEAT

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # kept: asking asyncio costs a getpid() call
        self.reads = 0  # reads so far: the frames of one read arrived together
        self._buffer = bytearray()  # the start of a frame still coming
        self._frames: list[bytes] = []  # to leave at the end of this turn
        self._size = 0
        self._flushing = False
        self._drained: asyncio.Future[None] | None = None  # set while the socket's buffer is full
        self._broken: ConnectionError | None = None
        self._heard = True
        self._pinged = False
        self._timer: asyncio.TimerHandle | None = None

    # -- for subclasses --------------------------------------------------------------

    def frame_received(self, frame: mux.Frame) -> None:
        raise NotImplementedError

    def link_lost(self, why: str) -> None:
        """The connection is gone; `post` and `put` raise from now on."""

    # -- sending ------------------------------------------------------------------------

    def post(self, frame: bytes) -> None:
        """Queue `frame` to leave with the others of this turn (at once, past `HIGH_WATER` bytes: a writer
        that never yields still leaves its frames to the socket's buffer). Raises ConnectionError once
        the link has failed."""
        if self._broken is not None:
            raise self._broken
        self._frames.append(frame)
        self._size += len(frame)
        if self._size > HIGH_WATER:
            self._flush()
        elif not self._flushing:
            self._flushing = True
            (self.loop or asyncio.get_running_loop()).call_soon(self._flush)

    @property
    def congested(self) -> bool:
        """The socket's buffer is full: a writer should wait (`put`) before it adds more."""
        return self._drained is not None

    async def put(self, frame: bytes) -> None:
        """`post`, then wait while the socket's buffer is full: a peer that reads slowly slows the
        writers down rather than growing the buffer. Raises ConnectionError once the link has failed."""
        self.post(frame)
        await self.writable()

    async def writable(self) -> None:
        """Wait while the socket's buffer is full. Raises ConnectionError once the link has failed."""
        if self._drained is not None:
            await asyncio.shield(self._drained)  # shared by every waiting writer
            if self._broken is not None:
                raise self._broken

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _flush(self) -> None:
        self._flushing = False
        frames, self._frames, self._size = self._frames, [], 0
        if frames and self._broken is None and self.transport is not None:
            self.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        self.loop = asyncio.get_running_loop()
        self.transport.set_write_buffer_limits(high=HIGH_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a frame leaves when written
        self._timer = asyncio.get_running_loop().call_later(self.heartbeat, self._check)

    def data_received(self, data: bytes) -> None:
        self._heard = True
        self.reads += 1
        if self._buffer:
            self._buffer += data
            source: bytes | bytearray = self._buffer
        else:
            source = data
        try:
            frames, used = mux.decode_some(source)
        except mux.FrameError as exc:
            log.error("link.bad_frame", extra={"detail": str(exc)})
            self._fail(f"the peer sent a bad frame ({exc})")
            return
        if source is self._buffer:
            del self._buffer[:used]
        elif used < len(data):
            self._buffer += data[used:]
        for frame in frames:
            if frame.kind == mux.PING:
                self.post(_PONG)
            elif frame.kind != mux.PONG:
                self.frame_received(frame)

    def pause_writing(self) -> None:
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._release()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"the connection ended ({exc!r})" if exc else "the peer closed the link")

    # -- internals ----------------------------------------------------------------------

    def _check(self) -> None:
        """The heartbeat: ping a quiet peer; give up on one that let a ping go unanswered."""
        if self._heard:
            self._heard, self._pinged = False, False
        elif not self._pinged:
            self._pinged = True
            self.post(_PING)
        else:
            self._fail(f"the peer answered no ping for {self.heartbeat:g}s")
            return
        self._timer = asyncio.get_running_loop().call_later(self.heartbeat, self._check)

    def _fail(self, why: str) -> None:
        if self._broken is not None:
            return
        self._broken = ConnectionResetError(f"the link is closed: {why}")
        if self._timer is not None:
            self._timer.cancel()
        self._frames.clear()
        if self.transport is not None:
            self.transport.abort()
        self._release()  # waiting writers go on, and fail
        self.link_lost(why)

    def _release(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)


# -- opening a link -------------------------------------------------------------------------

MAX_HEAD = 16 * 1024  # bytes of an upgrade request's or answer's head
_SWITCHED = (f"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {mux.UPGRADE}\r\n\r\n"
             ).encode()
_LINK_LINE = f"GET {mux.LINK_PATH} ".encode()


@mypyc_attr(native_class=False)  # compiled classes cannot extend ConnectionError
class LinkRefused(ConnectionError):
    """The node answered the upgrade with something other than 101."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status


def hand_over(transport: asyncio.BaseTransport, protocol: asyncio.Protocol, data: bytes, reading: bool) -> None:
    """Give a connection, with the bytes already read from it, to another protocol."""
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if not reading:
        cast(asyncio.Transport, transport).resume_reading()
    if data:
        protocol.data_received(data)


class _Upgrading(asyncio.Protocol):
    """A gateway's side of the upgrade: sends the request, reads the answer, hands the socket on."""

    def __init__(self, request: bytes, make: Callable[[], Wire], opened: asyncio.Future[Wire]) -> None:
        self._request = request
        self._make = make
        self._opened = opened
        self._head = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD:
                self._refused(0, f"the answer's head is longer than {MAX_HEAD} bytes")
            return
        line = bytes(self._head[:self._head.find(b"\r\n")]).decode("latin-1")
        parts = line.split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        if status != 101 or not parts[0].startswith("HTTP/1."):
            self._refused(status, line[:200])
            return
        wire = self._make()
        hand_over(self._transport, wire, bytes(self._head[end + 4:]), reading=True)
        if not self._opened.done():
            self._opened.set_result(wire)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._opened.done():
            self._opened.set_exception(ConnectionResetError(f"the node closed the connection during the upgrade"
                                                            f"{f' ({exc!r})' if exc else ''}"))

    def _refused(self, status: int, detail: str) -> None:
        if not self._opened.done():
            self._opened.set_exception(LinkRefused(status, detail))
        self._transport.close()


async def connect(make: Callable[[], W], host: str, port: int, secret: str, timeout: float) -> W:
    """Open a link to the node at `host:port`; raises `LinkRefused`, OSError or TimeoutError."""
    loop = asyncio.get_running_loop()
    opened: asyncio.Future[Wire] = loop.create_future()
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = (f"GET {mux.LINK_PATH} HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade\r\n"
               f"Upgrade: {mux.UPGRADE}\r\n{SECRET_HEADER}: {secret}\r\n\r\n").encode("latin-1")
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(lambda: _Upgrading(request, make, opened), host, port)
            try:
                return cast(W, await opened)
            except BaseException:
                transport.close()
                raise
    finally:
        opened.cancel()  # given up on: a late answer or close has nowhere to go


class Upgrades(asyncio.Protocol):
    """A node's connections: an upgrade to the link, with the secret, is handed to `make`'s protocol (a
    `Wire`); anything else to aiohttp's server (`fallback`) with its bytes unread. Only a connection's first request
    is looked at, and only its request line until it is plainly not the link's."""

    def __init__(self, secret: str, make: Callable[[], asyncio.Protocol], fallback: Callable[[], asyncio.Protocol],
                 head_timeout: float) -> None:
        self._secret = secret
        self._make = make
        self._fallback = fallback
        self._head = bytearray()
        self._timeout = head_timeout
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        self._head += data
        known = min(len(self._head), len(_LINK_LINE))
        if self._head[:known] != _LINK_LINE[:known]:
            return self._switch(self._fallback())
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD:
                self._answer(431, f"the upgrade's head is longer than {MAX_HEAD} bytes")
            return None
        headers = _headers(bytes(self._head[:end]))
        if headers.get("upgrade", "").lower() != mux.UPGRADE:
            return self._switch(self._fallback())  # the path without the upgrade: aiohttp answers it
        if not authorized({SECRET_HEADER: headers.get(SECRET_HEADER.lower(), "")}, self._secret):
            return self._answer(401, "internal secret missing or wrong")
        assert self._transport is not None
        self._transport.write(_SWITCHED)
        del self._head[:end + 4]
        return self._switch(self._make())

    def _switch(self, protocol: asyncio.Protocol) -> None:
        if self._timer is not None:
            self._timer.cancel()
        data, self._head = bytes(self._head), bytearray()
        assert self._transport is not None
        hand_over(self._transport, protocol, data, reading=True)

    def _answer(self, status: int, why: str) -> None:
        assert self._transport is not None
        body = orjson.dumps({"error": why})
        self._transport.write(f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
                              f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        self._transport.close()


def _headers(head: bytes) -> dict[str, str]:
    """The header fields of a request head, by lower-cased name (the link's own request: no repeats)."""
    fields = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return fields
