"""The link's connections over real loopback sockets: the upgrade, frames in order and split across
reads, back-pressure from a peer that stops reading, a broken link reported to writers, the heartbeat."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from actors import mux
from actors.wire import LinkRefused, Upgrades, Wire, connect
from tests.support import wait_until
from tether.tasks import TaskSet

SECRET = "wire-test-secret"
HOST = "127.0.0.1"


class Recorder(Wire):
    """Keeps every frame with the read it came in, and why the link ended."""

    def __init__(self, heartbeat: float = 5.0) -> None:
        super().__init__()
        self.heartbeat = heartbeat
        self.frames: list[tuple[int, mux.Frame]] = []
        self.lost: str | None = None

    def frame_received(self, frame: mux.Frame) -> None:
        self.frames.append((self.reads, frame))

    def link_lost(self, why: str) -> None:
        self.lost = why


class Silent(asyncio.Protocol):
    """A peer that took the upgrade and then reads without ever answering: a node that hangs."""

    def data_received(self, data: bytes) -> None:
        pass


@asynccontextmanager
async def node_side(make: Callable[[], asyncio.Protocol]) -> AsyncIterator[tuple[int, list[asyncio.Protocol]]]:
    """A listener that upgrades with the secret and answers anything else from aiohttp (GET /healthz)."""
    accepted: list[asyncio.Protocol] = []

    def wire() -> asyncio.Protocol:
        accepted.append(make())
        return accepted[-1]

    app = web.Application()
    app.router.add_get("/healthz", _ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    assert runner.server is not None
    fallback = runner.server
    server = await asyncio.get_running_loop().create_server(
        lambda: Upgrades(SECRET, wire, fallback, head_timeout=10), HOST, 0)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        server.close()
        for protocol in accepted:
            if isinstance(protocol, Wire):
                protocol.close()
        await runner.cleanup()


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def test_posted_frames_leave_at_the_end_of_the_turn_in_order() -> None:
    async with node_side(Recorder) as (port, accepted):
        client = await connect(Recorder, HOST, port, SECRET, timeout=5)
        for xid in (1, 2, 3):
            client.post(mux.encode(mux.DATA, xid, body=b"x" * xid))
        [server] = accepted
        assert isinstance(server, Recorder)
        await wait_until(lambda: _count(server, 3), timeout=5, what="three frames")
        client.post(mux.encode(mux.DATA, 4, body=b"later"))
        await wait_until(lambda: _count(server, 4), timeout=5, what="the fourth frame")
        assert [(f.xid, f.body) for _, f in server.frames] == [(1, b"x"), (2, b"xx"), (3, b"xxx"), (4, b"later")]
        client.close()


async def _count(wire: Recorder, n: int) -> bool:
    return len(wire.frames) >= n


async def test_a_writer_waits_while_the_peer_does_not_read_and_goes_on_when_it_does() -> None:
    async with node_side(Recorder) as (port, accepted):
        client = await connect(Recorder, HOST, port, SECRET, timeout=5)
        [server] = accepted
        assert isinstance(server, Recorder) and server.transport is not None
        server.transport.pause_reading()
        frame = mux.encode(mux.DATA, 1, body=b"y" * 65536)
        limit = 1000  # 64 MB: more than loopback's socket buffers hold

        async def write_all() -> int:
            for _ in range(limit):
                await client.put(frame)
            return limit

        tasks = TaskSet("test")
        writer = tasks.spawn(write_all(), "writer")
        await wait_until(lambda: _held(client), timeout=10, what="the writer to be held")
        assert not writer.done()
        server.transport.resume_reading()
        async with asyncio.timeout(30):
            assert await writer == limit
        await wait_until(lambda: _count(server, limit), timeout=30, what="every frame to arrive")
        client.close()
        await tasks.close()


async def _held(wire: Wire) -> bool:
    return wire._drained is not None


async def test_a_closed_link_is_reported_once_and_refuses_later_frames() -> None:
    async with node_side(Recorder) as (port, accepted):
        client = await connect(Recorder, HOST, port, SECRET, timeout=5)
        [server] = accepted
        assert isinstance(server, Wire)
        server.close()
        await wait_until(lambda: _lost(client), timeout=5, what="the client to see the link end")
        assert client.lost == "the peer closed the link"
        with pytest.raises(ConnectionError, match="the peer closed the link"):
            client.post(mux.encode(mux.CANCEL, 1))
        with pytest.raises(ConnectionError):
            await client.put(mux.encode(mux.CANCEL, 2))


async def _lost(wire: Recorder) -> bool:
    return wire.lost is not None


async def test_a_quiet_link_is_pinged_and_kept_while_the_peer_answers() -> None:
    async with node_side(lambda: Recorder(heartbeat=0.02)) as (port, accepted):
        client = await connect(lambda: Recorder(heartbeat=0.02), HOST, port, SECRET, timeout=5)
        [server] = accepted
        assert isinstance(server, Recorder)
        await wait_until(lambda: _read_bytes(client, 5), timeout=10, what="five answered pings")
        assert client.lost is None and server.lost is None
        assert client.frames == [] and server.frames == []  # pings and pongs are the wire's own
        client.close()


async def test_a_peer_that_answers_no_ping_is_given_up() -> None:
    async with node_side(Silent) as (port, _):
        client = await connect(lambda: Recorder(heartbeat=0.02), HOST, port, SECRET, timeout=5)
        await wait_until(lambda: _lost(client), timeout=10, what="the client to give the link up")
        assert client.lost == "the peer answered no ping for 0.02s"


async def test_the_upgrade_needs_the_secret_and_other_requests_reach_aiohttp() -> None:
    async with node_side(Recorder) as (port, accepted):
        with pytest.raises(LinkRefused, match="HTTP 401") as refused:
            await connect(Recorder, HOST, port, "wrong", timeout=5)
        assert refused.value.status == 401
        assert accepted == []
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(5):
            answer = await reader.read()
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok")
        writer.close()


async def test_a_node_that_never_answers_the_upgrade_times_out() -> None:
    server = await asyncio.get_running_loop().create_server(Silent, HOST, 0)
    try:
        with pytest.raises(TimeoutError):
            await connect(Recorder, HOST, server.sockets[0].getsockname()[1], SECRET, timeout=0.2)
    finally:
        server.close()


async def test_frames_split_across_reads_are_put_back_together() -> None:
    async with node_side(Recorder) as (port, accepted):
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(f"GET {mux.LINK_PATH} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                     f"Upgrade: {mux.UPGRADE}\r\nX-Tether-Secret: {SECRET}\r\n\r\n".encode())
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        data = mux.encode(mux.DATA, 7, body=b"split") + mux.encode(mux.DATA, 8, body=b"frames", fin=True)
        [server] = accepted
        assert isinstance(server, Recorder)
        for i in range(len(data)):  # a byte a write
            writer.write(data[i:i + 1])
            await writer.drain()
            await wait_until(lambda: _read_bytes(server, i + 1), timeout=5, what="the byte to be read")  # noqa: B023
        assert [(f.xid, f.fin, f.body) for _, f in server.frames] == [(7, False, b"split"), (8, True, b"frames")]
        writer.close()


async def _read_bytes(wire: Recorder, n: int) -> bool:
    return wire.reads >= n
