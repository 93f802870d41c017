"""The gateway's link to actor nodes: every client request an exchange on a shared connection.

Each node gets a small pool of long-lived, authenticated link connections
(`link_connections`, `actors.wire`), opened on first use and shared by all
requests: an idle client stream costs the gateway a table entry, not a
connection or a file. The frames are `actors.mux`'s. Each connection hands
each frame to its exchange's `LinkResponse` as it is read, without ever
waiting on a client, so a slow client
cannot hold up the others on its connection: its stream is buffered up to
`stream_buffer_bytes`, then cut (it resumes from the node's event log).

Failures to reach a node map to `Overloaded` (503 with Retry-After) here; a
link lost midway surfaces as `LinkLost` from the response's reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping
from urllib.parse import urlsplit

from actors import mux
from actors.store.base import NodeRecord
from actors.waiting import Arrivals
from actors.wire import LinkRefused, Wire, connect
from tether.errors import Overloaded, TetherError, UpstreamTimeout
from tether.tasks import TaskSet

log = logging.getLogger("tether.gateway")


IDLE_SLOTS = 16  # an idle stream's keep-alive is due on one of this many steps of its interval


class LinkLost(Exception):
    """An exchange ended before its answer did: the link to its node broke, the node gave it up, or its
    client read so slowly that the gateway stopped buffering for it."""


class LinkResponse(Arrivals):
    """A node's answer to one exchange: its status and headers, then its body as it arrives.

    Reads wait at most `read_timeout` for each piece (None: as long as the
    link lives; its heartbeat finds a node that died). `close` (or leaving
    `async with`) tells the node to abandon an answer that has not ended.
    """

    status: int
    headers: dict[str, str]
    __slots__ = ("status", "headers", "listener", "_conn", "_xid", "_read_timeout", "_message")

    def __init__(self, conn: _Connection, xid: int, read_timeout: float | None) -> None:
        super().__init__()
        self.status = 0
        self.headers = {}
        # Called, in place of waking a reader, when the head, a piece or the end comes, or a failure.
        self.listener: Callable[[], None] | None = None
        self._conn = conn
        self._xid = xid
        self._read_timeout = read_timeout
        self._message = -1  # the link message its last frame came in

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "application/octet-stream").partition(";")[0].strip()

    @property
    def complete(self) -> bool:
        """True once the whole answer has arrived (it may not have been read yet)."""
        return self._done

    @property
    def at_eof(self) -> bool:
        """True once the whole answer has arrived and been read."""
        return self._done and not self._chunks

    def chunks(self, idle: float | None = None) -> AsyncIterator[bytes]:
        """The body as it comes: whatever has arrived since the last piece, joined. With `idle`, an empty
        piece after each `idle` seconds of silence: time for a keep-alive. Raises `LinkLost`, or
        `TimeoutError` when the node sends nothing for `read_timeout`."""
        return _Chunks(self, idle)

    async def read(self) -> bytes:
        if self._done:  # the usual answer: whole, in the frame that brought its head
            return self.take()
        return b"".join([chunk async for chunk in _Chunks(self, None)])

    def close(self) -> None:
        """Done with this answer; if the node is still sending it, it is told to stop."""
        if self._conn.exchanges.pop(self._xid, None) is not None:
            self._conn.cancel(self._xid)
        self._chunks.clear()

    async def __aenter__(self) -> LinkResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def _wake(self) -> None:
        if self.listener is not None:
            self.listener()
        else:
            super()._wake()

    def _feed(self, frame: mux.Frame, limit: int, message: int) -> None:
        """Take one frame. At the first of its frames in a link message, what its reader has left
        untaken from earlier messages is held against `limit`; a message's own frames all land (the
        node sends what it has in one message, and the reader has not had a turn in between)."""
        if message != self._message:
            self._message = message
            if self._size > limit:
                self.close()
                self._fail(LinkLost(f"the client read slower than its stream came: {self._size} bytes were "
                                    f"waiting, over stream_buffer_bytes ({limit})"))
                return
        if frame.kind == mux.RESPONSE:
            self.status, self.headers = frame.head
        if frame.fin:
            self._conn.exchanges.pop(self._xid, None)
            if frame.body:
                self._chunks.append(frame.body)
            self._done = True  # `_finish`, in place: every answer ends here
            self._wake()
            return
        if frame.body:
            self._add(frame.body)
        else:
            self._wake()  # a head without a body yet



class _Chunks:
    """`LinkResponse.chunks`: an iterator, where an async generator would do, because mypyc compiles
    no async generators (setup.py)."""

    __slots__ = ("_resp", "_idle", "_loop", "_silent_until")

    def __init__(self, resp: LinkResponse, idle: float | None) -> None:
        self._resp = resp
        self._idle = idle
        self._loop = resp._conn.loop or asyncio.get_running_loop()
        self._silent_until: float | None = None  # when the node's silence becomes a timeout

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        resp, idle, loop = self._resp, self._idle, self._loop
        while True:
            if resp._chunks:
                self._silent_until = None
                return resp.take()
            if resp._done:
                raise StopAsyncIteration
            if self._silent_until is None and resp._read_timeout is not None:
                self._silent_until = loop.time() + resp._read_timeout
            left = None if self._silent_until is None else self._silent_until - loop.time()
            if idle is not None and (left is None or idle < left):
                # Due on a grid of IDLE_SLOTS steps an interval: the pings of every stream that
                # falls due in the same step go out on one wake-up of the loop, not one each.
                now, step = loop.time(), idle / IDLE_SLOTS
                if not await resp._wait(math.ceil((now + idle) / step) * step - now):
                    return b""
            elif not await resp._wait(left):
                raise TimeoutError

class _Connection(Wire):
    """One link connection to a node and the exchanges running on it. Each frame is handed to its
    exchange as it is read; nothing here waits on a client."""

    def __init__(self, node: NodeRecord, buffer_limit: int, on_lost: Callable[[_Connection], None]) -> None:
        super().__init__()
        self.node = node
        self.exchanges: dict[int, LinkResponse] = {}
        self._buffer_limit = buffer_limit
        self._on_lost = on_lost
        self._ids = itertools.count(1)

    def begin(self, method: str, sid: str, headers: Mapping[str, str], body: bytes,
              read_timeout: float | None) -> LinkResponse:
        """Send a request; its answer comes to the returned response. Raises ConnectionError."""
        xid = next(self._ids) & 0xFFFFFFFF
        while xid in self.exchanges or xid == 0:  # after 2**32 exchanges the ids wrap; a stream may hold one
            xid = next(self._ids) & 0xFFFFFFFF
        resp = LinkResponse(self, xid, read_timeout)
        self.exchanges[xid] = resp  # before the send: its answer may come while the sender waits
        try:
            self.post(mux.encode(mux.REQUEST, xid, [method, sid, headers], body))
        except ConnectionError:
            resp.close()
            raise
        return resp

    async def start(self, method: str, sid: str, headers: Mapping[str, str], body: bytes,
                    read_timeout: float | None) -> LinkResponse:
        """`begin`, then wait while the link's socket is full."""
        resp = self.begin(method, sid, headers, body, read_timeout)
        try:
            await self.writable()
        except BaseException:
            resp.close()  # sent, and its caller gone while it waited: the node is told to drop it
            raise
        return resp

    def cancel(self, xid: int) -> None:
        with contextlib.suppress(ConnectionError):  # a link that is going cancels everything on it anyway
            self.post(mux.encode(mux.CANCEL, xid))

    def frame_received(self, frame: mux.Frame) -> None:
        resp = self.exchanges.get(frame.xid)
        if resp is None:
            return  # closed on this side: frames already on their way are dropped
        if frame.kind == mux.CANCEL:
            self.exchanges.pop(frame.xid, None)
            resp._fail(LinkLost(f"node {self.node.node_id} gave up the exchange"))
        else:
            resp._feed(frame, self._buffer_limit, self.reads)

    def link_lost(self, why: str) -> None:
        lost = LinkLost(f"lost the link to node {self.node.node_id}: {why}")
        exchanges, self.exchanges = self.exchanges, {}
        for resp in exchanges.values():
            resp._fail(lost)
        self._on_lost(self)


class NodeLink:
    def __init__(self, secret: str, *, connections: int = 2, buffer_limit: int = 1 << 20,
                 connect_timeout: float = 2.0) -> None:
        self._secret = secret
        self._size = connections
        self._buffer_limit = buffer_limit
        self._connect_timeout = connect_timeout
        self._pools: dict[str, list[_Connection]] = {}
        self._opening: dict[str, asyncio.Task[_Connection | Overloaded]] = {}
        self._tasks = TaskSet("link")
        self._turn = 0

    async def call(self, node: NodeRecord, method: str, sid: str, *, read_timeout: float | None,
                   body: bytes | None = None, headers: Mapping[str, str] | None = None) -> LinkResponse:
        """Send one request to `node` for session `sid`; returns once the answer's head has come. The
        caller reads the answer and closes it.

        `read_timeout` bounds every wait for bytes from the node, so a node that
        stalls is given up on. Raises `Overloaded` when the node cannot be
        reached, `UpstreamTimeout` when it stops answering.
        """
        conn = await self._connection(node)
        try:
            resp = await conn.start(method, sid, headers or {}, body or b"", read_timeout)
        except ConnectionError as lost:
            raise unreachable(node, lost) from lost
        try:
            while resp.status == 0:  # the head (here, not in a method: one coroutine fewer to wake)
                if not await resp._wait(read_timeout):
                    raise TimeoutError
        except (TimeoutError, LinkLost) as exc:
            resp.close()
            raise no_head(node, exc, read_timeout) from exc
        except BaseException:
            resp.close()
            raise
        return resp

    def send_now(self, node: NodeRecord, method: str, sid: str, *, read_timeout: float | None, body: bytes,
                 headers: Mapping[str, str]) -> LinkResponse | None:
        """`call`'s sending, when it needs no wait: on an open link connection whose socket is not full.
        Its caller learns of the answer through the response's `listener`, and times its head itself.
        None when a connection must open or drain first (`call` waits for that). Raises `Overloaded`."""
        pool = self._pools.get(node.url)
        if pool is None or len(pool) < self._size:
            return None
        self._turn += 1
        conn = pool[self._turn % len(pool)]
        if conn.congested:
            return None
        try:
            return conn.begin(method, sid, headers, body, read_timeout)
        except ConnectionError as lost:
            raise unreachable(node, lost) from lost

    async def _connection(self, node: NodeRecord) -> _Connection:
        """A connection to `node` from its pool, opening one while the pool is short."""
        pool = self._pools.setdefault(node.url, [])
        if len(pool) < self._size:
            opening = self._opening.get(node.url)
            if opening is None:
                opening = self._opening[node.url] = self._tasks.spawn(self._open(node, pool), f"open-{node.node_id}")
                opening.add_done_callback(lambda _: self._opening.pop(node.url, None))
            if not pool:  # nothing to use meanwhile
                opened = await asyncio.shield(opening)
                if isinstance(opened, Overloaded):
                    raise Overloaded(opened.message, retry_after=1.0)
                return opened
        self._turn += 1
        return pool[self._turn % len(pool)]

    async def _open(self, node: NodeRecord, pool: list[_Connection]) -> _Connection | Overloaded:
        """A new connection in `pool`, or why there is none. The refusal is returned, not raised: it is
        the answer of every request waiting on this attempt, not a crash of the task making it."""
        url = urlsplit(node.url)
        try:
            conn = await connect(lambda: _Connection(node, self._buffer_limit, lambda c: self._lost(c, pool)),
                                 url.hostname or "", url.port or 80, self._secret, self._connect_timeout)
        except LinkRefused as refusal:
            return self._refused(node, f"refused the link ({refusal}"
                                       f"{': check internal_secret' if refusal.status == 401 else ''})")
        except (OSError, TimeoutError) as exc:
            return self._refused(node, f"cannot be reached ({exc!r})")
        pool.append(conn)
        log.info("link.opened", extra={"node": node.node_id, "count": len(pool)})
        return conn

    @staticmethod
    def _refused(node: NodeRecord, why: str) -> Overloaded:
        log.info("link.open_failed", extra={"node": node.node_id, "detail": why})
        return Overloaded(f"Service Unavailable: node {node.node_id} {why}", retry_after=1.0)

    @staticmethod
    def _lost(conn: _Connection, pool: list[_Connection]) -> None:
        with contextlib.suppress(ValueError):
            pool.remove(conn)
        log.info("link.closed", extra={"node": conn.node.node_id, "count": len(pool)})

    async def close(self) -> None:
        for pool in self._pools.values():
            for conn in list(pool):
                conn.close()
        await self._tasks.close(timeout=2.0)


def unreachable(node: NodeRecord, exc: ConnectionError) -> Overloaded:
    return Overloaded(f"Service Unavailable: node {node.node_id} cannot be reached ({exc!r})", retry_after=1.0)


def no_head(node: NodeRecord, exc: Exception, read_timeout: float | None) -> TetherError:
    """Why the head of a node's answer never came, for the client: the link failed (503), or the node
    said nothing for `read_timeout` seconds (504)."""
    if isinstance(exc, LinkLost):
        return Overloaded(f"Service Unavailable: {exc}", retry_after=1.0)
    return UpstreamTimeout(f"Gateway Timeout: node {node.node_id} did not answer within {read_timeout:g}s")
