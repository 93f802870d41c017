"""The gateway's link to actor nodes: every client request an exchange on a shared WebSocket.

Each node gets a small pool of long-lived, authenticated WebSocket connections
(`link_connections`), opened on first use and shared by all requests: an idle
client stream costs the gateway a table entry, not a connection or a file. The
frames are `actors.mux`'s. A reader task per connection hands each frame to its
exchange's `LinkResponse`, without ever waiting on a client, so a slow client
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
from collections.abc import AsyncIterator, Mapping

import aiohttp
from aiohttp import WSMsgType

from actors import mux
from actors.internal import SECRET_HEADER
from actors.outbox import Outbox
from actors.store.base import NodeRecord
from actors.waiting import Arrivals
from tether.errors import Overloaded, UpstreamTimeout
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
    __slots__ = ("status", "headers", "_conn", "_xid", "_read_timeout", "_message")

    def __init__(self, conn: _Connection, xid: int, read_timeout: float | None) -> None:
        super().__init__()
        self.status = 0
        self.headers = {}
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

    async def chunks(self, idle: float | None = None) -> AsyncIterator[bytes]:
        """The body as it comes: whatever has arrived since the last piece, joined. With `idle`, an empty
        piece after each `idle` seconds of silence: time for a keep-alive. Raises `LinkLost`, or
        `TimeoutError` when the node sends nothing for `read_timeout`."""
        loop = asyncio.get_running_loop()
        silent_until: float | None = None  # when the node's silence becomes a timeout
        while True:
            if self._chunks:
                silent_until = None
                yield self.take()
            elif self._done:
                return
            else:
                if silent_until is None and self._read_timeout is not None:
                    silent_until = loop.time() + self._read_timeout
                left = None if silent_until is None else silent_until - loop.time()
                if idle is not None and (left is None or idle < left):
                    # Due on a grid of IDLE_SLOTS steps an interval: the pings of every stream that
                    # falls due in the same step go out on one wake-up of the loop, not one each.
                    now, step = loop.time(), idle / IDLE_SLOTS
                    if not await self._wait(math.ceil((now + idle) / step) * step - now):
                        yield b""
                elif not await self._wait(left):
                    raise TimeoutError

    async def read(self) -> bytes:
        if self._done:  # the usual answer: whole, in the frame that brought its head
            return self.take()
        return b"".join([chunk async for chunk in self.chunks()])

    def close(self) -> None:
        """Done with this answer; if the node is still sending it, it is told to stop."""
        if self._conn.exchanges.pop(self._xid, None) is not None:
            self._conn.cancel(self._xid)
        self._chunks.clear()

    async def __aenter__(self) -> LinkResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def _head(self) -> None:
        while self.status == 0:
            if not await self._wait(self._read_timeout):
                raise TimeoutError

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
            self._finish()
            return
        if frame.body:
            self._add(frame.body)
        else:
            self._wake()  # a head without a body yet


class _Connection:
    """One WebSocket to a node and the exchanges running on it."""

    def __init__(self, node: NodeRecord, ws: aiohttp.ClientWebSocketResponse, buffer_limit: int,
                 tasks: TaskSet) -> None:
        self.node = node
        self.ws = ws
        self.exchanges: dict[int, LinkResponse] = {}
        self.outbox = Outbox(ws.send_bytes)
        self._buffer_limit = buffer_limit
        self._ids = itertools.count(1)
        self._writer = tasks.spawn(self._write(), f"write-{node.node_id}")

    async def start(self, method: str, sid: str, headers: Mapping[str, str], body: bytes,
                    read_timeout: float | None) -> LinkResponse:
        xid = next(self._ids) & 0xFFFFFFFF
        while xid in self.exchanges:  # after 2**32 exchanges the ids wrap; a stream may still hold one
            xid = next(self._ids) & 0xFFFFFFFF
        resp = LinkResponse(self, xid, read_timeout)
        self.exchanges[xid] = resp
        await self.outbox.put(mux.encode(mux.REQUEST, xid, [method, sid, headers], body))
        return resp

    def cancel(self, xid: int) -> None:
        with contextlib.suppress(ConnectionError):  # a link that is going cancels everything on it anyway
            self.outbox.post(mux.encode(mux.CANCEL, xid))

    async def _write(self) -> None:
        """Send the outbox until the link fails; a link that cannot be written to is closed, which
        ends `run` and fails the exchanges on it."""
        try:
            await self.outbox.run()
        except ConnectionError as exc:
            log.info("link.write_failed", extra={"node": self.node.node_id, "detail": repr(exc)})
        finally:
            await self.ws.close()

    async def run(self) -> None:
        """Hand each frame to its exchange until the connection ends; then fail what is left on it."""
        why = "the node closed the link"
        count = 0  # messages read
        try:
            async for message in self.ws:
                if message.type != WSMsgType.BINARY:
                    continue
                count += 1
                for frame in mux.decode(message.data):
                    resp = self.exchanges.get(frame.xid)
                    if resp is None:
                        continue  # closed on this side: frames already on their way are dropped
                    if frame.kind == mux.CANCEL:
                        self.exchanges.pop(frame.xid, None)
                        resp._fail(LinkLost(f"node {self.node.node_id} gave up the exchange"))
                    else:
                        resp._feed(frame, self._buffer_limit, count)
            if self.ws.exception() is not None:
                why = repr(self.ws.exception())
        except mux.FrameError as exc:
            why = f"the node sent a bad frame ({exc})"
            log.error("link.bad_frame", extra={"node": self.node.node_id, "detail": str(exc)})
        finally:
            self._writer.cancel()
            await self.ws.close()
            lost = LinkLost(f"lost the link to node {self.node.node_id}: {why}")
            for resp in list(self.exchanges.values()):
                resp._fail(lost)
            self.exchanges.clear()


class NodeLink:
    def __init__(self, secret: str, *, connections: int = 2, buffer_limit: int = 1 << 20,
                 connect_timeout: float = 2.0) -> None:
        self._secret = secret
        self._size = connections
        self._buffer_limit = buffer_limit
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None
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
        except ConnectionError as exc:
            raise Overloaded(f"Service Unavailable: node {node.node_id} cannot be reached ({exc!r})",
                             retry_after=1.0) from exc
        try:
            await resp._head()
        except TimeoutError as exc:
            resp.close()
            raise UpstreamTimeout(f"Gateway Timeout: node {node.node_id} did not answer within "
                                  f"{read_timeout:g}s") from exc
        except LinkLost as exc:
            resp.close()
            raise Overloaded(f"Service Unavailable: {exc}", retry_after=1.0) from exc
        except BaseException:
            resp.close()
            raise
        return resp

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
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout))
        try:
            # No size limit: a node's answers are as large as its upstream's; the node is trusted.
            ws = await self._session.ws_connect(node.url + mux.LINK_PATH, headers={SECRET_HEADER: self._secret},
                                                heartbeat=mux.HEARTBEAT, max_msg_size=0, autoclose=True)
        except aiohttp.WSServerHandshakeError as exc:
            return self._refused(node, f"refused the link (HTTP {exc.status}"
                                       f"{': check internal_secret' if exc.status == 401 else ''})")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return self._refused(node, f"cannot be reached ({exc!r})")
        conn = _Connection(node, ws, self._buffer_limit, self._tasks)
        pool.append(conn)
        self._tasks.spawn(self._serve(conn, pool), f"read-{node.node_id}")
        log.info("link.opened", extra={"node": node.node_id, "count": len(pool)})
        return conn

    @staticmethod
    def _refused(node: NodeRecord, why: str) -> Overloaded:
        log.info("link.open_failed", extra={"node": node.node_id, "detail": why})
        return Overloaded(f"Service Unavailable: node {node.node_id} {why}", retry_after=1.0)

    async def _serve(self, conn: _Connection, pool: list[_Connection]) -> None:
        try:
            await conn.run()
        finally:
            with contextlib.suppress(ValueError):
                pool.remove(conn)
            log.info("link.closed", extra={"node": conn.node.node_id, "count": len(pool)})

    async def close(self) -> None:
        for pool in self._pools.values():
            for conn in list(pool):
                await conn.ws.close()
        await self._tasks.close(timeout=2.0)
        if self._session is not None:
            await self._session.close()
            self._session = None
