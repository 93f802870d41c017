"""One contract for every Store: the memory store, and the same store over the internal link."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from actors.store.base import NodeRecord, OwnershipRecord, Store
from actors.store.link import StoreLink, store_routes
from actors.store.memory import MemoryStore
from tether.errors import OwnershipConflict, StoreError


class FakeClock:
    """Time advanced by hand: the store's TTLs are checked without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "link"])
async def store(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Store]:
    memory = MemoryStore(clock=clock)
    if request.param == "memory":
        yield memory
        return
    app = web.Application()
    app.add_routes(store_routes(memory, "s3cret"))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    link = StoreLink(f"http://127.0.0.1:{port}/_tether/store", "s3cret")
    yield link
    await link.close()
    await runner.cleanup()


A = NodeRecord("node-a", "http://127.0.0.1:1")
B = NodeRecord("node-b", "http://127.0.0.1:2")


async def test_membership_lives_while_heartbeats_renew_it(store: Store, clock: FakeClock) -> None:
    await store.heartbeat(A, ttl=10)
    await store.heartbeat(B, ttl=10)
    first = await store.membership()
    assert [n.node_id for n in first.nodes] == ["node-a", "node-b"]
    clock.now += 6
    await store.heartbeat(A, ttl=10)
    clock.now += 6  # B's lease lapsed, A's was renewed
    second = await store.membership()
    assert [n.node_id for n in second.nodes] == ["node-a"]
    assert second.generation > first.generation


async def test_generation_moves_on_join_leave_and_acceptance_only(store: Store) -> None:
    await store.heartbeat(A, ttl=10)
    g1 = (await store.membership()).generation
    await store.heartbeat(NodeRecord("node-a", A.url, sessions=5), ttl=10)
    assert (await store.membership()).generation == g1  # load changes do not rebuild rings
    await store.heartbeat(NodeRecord("node-a", A.url, accepting=False), ttl=10)
    g2 = (await store.membership()).generation
    assert g2 > g1
    await store.leave("node-a")
    assert (await store.membership()).nodes == ()
    assert (await store.membership()).generation > g2


async def test_grant_lookup_release_with_epochs(store: Store) -> None:
    await store.heartbeat(A, ttl=10)
    record = await store.grant("sid-1", "node-a")
    assert record == OwnershipRecord("sid-1", "node-a", record.epoch)
    assert await store.lookup("sid-1") == record
    assert await store.release(OwnershipRecord("sid-1", "node-a", record.epoch - 1)) is False
    assert await store.lookup("sid-1") == record  # a stale epoch releases nothing
    assert await store.release(record) is True
    assert await store.lookup("sid-1") is None
    again = await store.grant("sid-1", "node-a")
    assert again.epoch > record.epoch  # epochs never go back


async def test_a_live_owner_cannot_be_displaced(store: Store, clock: FakeClock) -> None:
    await store.heartbeat(A, ttl=10)
    await store.heartbeat(B, ttl=10)
    first = await store.grant("sid-2", "node-a")
    with pytest.raises(OwnershipConflict):
        await store.grant("sid-2", "node-b")
    clock.now += 11
    await store.heartbeat(B, ttl=10)  # A is dead now: its key may be granted again, fenced higher
    second = await store.grant("sid-2", "node-b")
    assert second.node_id == "node-b" and second.epoch > first.epoch
    assert await store.release(first) is False


async def test_link_refuses_a_wrong_secret(clock: FakeClock) -> None:
    app = web.Application()
    app.add_routes(store_routes(MemoryStore(clock=clock), "right"))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    link = StoreLink(f"http://127.0.0.1:{runner.addresses[0][1]}/_tether/store", "wrong")
    try:
        with pytest.raises(StoreError, match="401"):
            await link.membership()
    finally:
        await link.close()
        await runner.cleanup()


async def test_unreachable_store_is_a_store_error() -> None:
    link = StoreLink("http://127.0.0.1:9/_tether/store", "s", timeout=2)
    try:
        with pytest.raises(StoreError, match="Cannot reach the store"):
            await link.membership()
    finally:
        await link.close()


async def test_a_node_that_goes_takes_its_records_with_it(store: Store, clock: FakeClock) -> None:
    await store.heartbeat(A, ttl=10)
    await store.heartbeat(B, ttl=30)
    await store.grant("of-a", "node-a")
    kept = await store.grant("of-b", "node-b")
    clock.now += 11  # A's lease lapses: it crashed
    await store.membership()
    assert await store.lookup("of-a") is None
    assert await store.lookup("of-b") == kept
    await store.leave("node-b")  # B leaves cleanly
    assert await store.lookup("of-b") is None
