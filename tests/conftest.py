from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support import RawClient, RedisServer, TetherUp

# A small body limit so the 413 test need not send megabytes.
BODY_LIMIT = 65536


@pytest.fixture(scope="session")
def tether(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TetherUp]:
    """One `tether up` (2 nodes, the demo upstream) shared by the tests that do not end it."""
    log = tmp_path_factory.mktemp("tether") / "up.log"
    up = TetherUp(["--max-body-bytes", str(BODY_LIMIT)], log).start()
    yield up
    assert up.stop() == 0, up.log()[-3000:]


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
