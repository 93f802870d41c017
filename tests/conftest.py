from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.guarded import Guarded, start_guarded
from tests.support import RawClient, RedisServer, TetherUp
from tests.topology import Topology

# A small body limit so the 413 test need not send megabytes.
BODY_LIMIT = 65536


@pytest.fixture(scope="session")
def tether(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TetherUp]:
    """One `tether up` (2 nodes, the demo upstream) shared by the tests that do not end it."""
    log = tmp_path_factory.mktemp("tether") / "up.log"
    up = TetherUp(["--max-body-bytes", str(BODY_LIMIT)], log).start()
    yield up
    assert up.stop() == 0, up.log()[-3000:]


@pytest.fixture(scope="session")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guarded]:
    """One `tether up` as a public edge runs it: authentication, tagged ids, tight limits."""
    g = start_guarded(tmp_path_factory.mktemp("guarded"))
    yield g
    assert g.up.stop() == 0, g.up.log()[-3000:]


def start_tether(tmp_path: Path, *args: str) -> TetherUp:
    return TetherUp(list(args), tmp_path / "up.log").start()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def raw(http: aiohttp.ClientSession, tether: TetherUp) -> RawClient:
    return RawClient(http, tether.mcp_url)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server for the whole run; tests that need it clean flush it themselves."""
    server = RedisServer().start()
    yield server
    server.stop()


# Distributed tests: a lease short enough to watch expire, keep-alives every second.
TTL = 3.0
FAST = {"heartbeat_ttl": str(TTL), "membership_refresh": "0.2", "keepalive_interval": "1", "kill_grace": "1"}

MakeTopology = Callable[..., Awaitable[Topology]]


@pytest.fixture
async def make_topology(redis_server: RedisServer, tmp_path: Path,
                        http: aiohttp.ClientSession) -> AsyncIterator[MakeTopology]:
    """Start a distributed Tether (gateways and nodes as processes on a clean Redis); after the
    test, every process must stop on Ctrl-C and the ownership oracle must find nothing."""
    made: list[Topology] = []

    async def make(nodes: int = 3, gateways: int = 2, redis: RedisServer | None = None,
                   **settings: str) -> Topology:
        redis = redis or redis_server
        flush = aioredis.Redis.from_url(redis.url)
        await flush.flushall()
        await flush.aclose()
        topo = Topology(redis, tmp_path, {**FAST, **settings})
        made.append(topo)
        for i in range(nodes):
            topo.add_node(f"node-{i + 1}")
        for _ in range(gateways):
            topo.add_gateway()
        await topo.wait_ring(http, set(topo.nodes))
        return topo

    yield make
    for topo in made:
        assert topo.stop() == []  # every process stopped on Ctrl-C, none had to be killed
        assert topo.ownership_violations() == []
