"""The edge's keep-alive check on a real loopback connection: a stream whose client is not reading
gets no ping on top, and once it has not read for `client_write_timeout`, its connection is closed.

Filling a real client's socket with pings alone takes days, so the transport's own signal that its
buffer is full (`pause_writing`) is given directly; the check is driven with the clock it is given.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from actors.store.memory import MemoryStore
from gateway.app import Gateway
from gateway.edge import Edge, EdgeConnection, EdgeStream
from tests.support import wait_until
from tether.config import Config

INTERVAL = 15.0
WRITE_TIMEOUT = 30.0
DEADLINE = 10.0


class _Refused(asyncio.Protocol):
    """The edge's fallback (aiohttp's server in production); nothing here is handed to it."""


@pytest.fixture
async def held() -> AsyncIterator[tuple[Edge, EdgeConnection, asyncio.StreamReader]]:
    """An edge on loopback, a client connected to it, and the edge's side of that connection."""
    gateway = Gateway(Config(host="127.0.0.1", port=0, keepalive_interval=INTERVAL,
                             client_write_timeout=WRITE_TIMEOUT), MemoryStore())
    edge = Edge(gateway, _Refused)
    server = await asyncio.get_running_loop().create_server(edge, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await wait_until(lambda: _connected(edge), timeout=DEADLINE, what="the edge to take the connection")
        yield edge, next(iter(edge.connections)), reader
    finally:
        writer.close()
        server.close()
        await edge.close(0)
        await gateway.close()


async def _connected(edge: Edge) -> bool:
    return bool(edge.connections)


async def test_a_client_that_reads_is_pinged_each_interval(
        held: tuple[Edge, EdgeConnection, asyncio.StreamReader]) -> None:
    edge, conn, reader = held
    stream = EdgeStream(conn, chunked=True)
    stream.sent_at = 100.0
    assert edge.keepalive(stream, 100.0 + INTERVAL / 2) == 100.0 + INTERVAL  # not silent long enough
    assert edge.keepalive(stream, 100.0 + INTERVAL) == 100.0 + 2 * INTERVAL
    async with asyncio.timeout(DEADLINE):
        assert await reader.readexactly(13) == b"8\r\n: ping\n\n\r\n"  # one chunk of the open body


async def test_a_client_that_stops_reading_is_not_pinged_and_then_cut_off(
        held: tuple[Edge, EdgeConnection, asyncio.StreamReader]) -> None:
    edge, conn, reader = held
    stream = EdgeStream(conn, chunked=True)
    stream.sent_at = 100.0
    conn.pause_writing()  # the transport's buffer is over its high-water mark: the client is behind
    due = edge.keepalive(stream, 100.0 + INTERVAL)
    assert due == 100.0 + 2 * INTERVAL  # looked at again within the write timeout, not pinged
    assert edge.keepalive(stream, due) == 100.0 + INTERVAL + WRITE_TIMEOUT
    assert not conn.lost
    assert edge.keepalive(stream, 100.0 + INTERVAL + WRITE_TIMEOUT) is None  # off the wheel
    async with asyncio.timeout(DEADLINE):
        assert await reader.read() == b""  # closed, with no ping ever written


async def test_a_client_that_catches_up_is_pinged_again(
        held: tuple[Edge, EdgeConnection, asyncio.StreamReader]) -> None:
    edge, conn, reader = held
    stream = EdgeStream(conn, chunked=False)
    stream.sent_at = 100.0
    conn.pause_writing()
    assert edge.keepalive(stream, 100.0 + INTERVAL) == 100.0 + 2 * INTERVAL
    conn.resume_writing()
    assert edge.keepalive(stream, 100.0 + 2 * INTERVAL) == 100.0 + 3 * INTERVAL
    assert stream.stuck_since == 0.0  # its write timeout starts afresh if it falls behind again
    async with asyncio.timeout(DEADLINE):
        assert await reader.readexactly(8) == b": ping\n\n"  # HTTP/1.0: the body is not chunked
