"""One contract for every Store: memory, the memory store over the internal link, and Redis.

Lease lapses are driven through `Harness.lapse`: the memory stores move a hand clock; Redis,
whose clock is its own, is watched until its sweep shows the lapse (a deadline, never a sleep).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from actors.store.base import NodeRecord, OwnershipRecord, Quota, Store
from actors.store.link import StoreLink, store_routes
from actors.store.memory import MemoryStore
from actors.store.redis import RedisStore
from tests.support import RedisServer, wait_until
from tether.errors import LeaseLost, OwnershipConflict, QuotaExceeded, StoreError

LONG = 30.0  # a lease that does not lapse during a test


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    store: Store
    clock: FakeClock | None
    short: float  # a lease that the test will let lapse

    async def lapse(self, *node_ids: str) -> None:
        """Let every short lease lapse, and wait until membership no longer lists `node_ids`."""
        if self.clock is not None:
            self.clock.now += self.short + 0.001

        async def gone() -> bool:
            live = {n.node_id for n in (await self.store.membership()).nodes}
            return not live & set(node_ids)

        await wait_until(gone, timeout=10, what=f"{node_ids} to lapse")


async def served(memory: MemoryStore, secret: str) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.add_routes(store_routes(memory, secret))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/_tether/store"


@pytest.fixture(params=["memory", "link", "redis"])
async def h(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    clock = FakeClock()
    memory = MemoryStore(clock=clock)
    if request.param == "memory":
        yield Harness(memory, clock, short=5.0)
    elif request.param == "link":
        runner, url = await served(memory, "s3cret")
        link = StoreLink(url, "s3cret")
        yield Harness(link, clock, short=5.0)
        await link.close()
        await runner.cleanup()
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        flush = aioredis.Redis.from_url(server.url)
        await flush.flushall()
        await flush.aclose()
        store = RedisStore(server.url)
        yield Harness(store, None, short=0.3)
        await store.close()


def node(name: str, incarnation: str = "", **kw: object) -> NodeRecord:
    return NodeRecord(name, f"http://127.0.0.1/{name}", incarnation=incarnation or f"{name}-1", **kw)  # type: ignore[arg-type]


A, B = node("node-a"), node("node-b")


async def test_membership_lives_while_heartbeats_renew_it(h: Harness) -> None:
    await h.store.heartbeat(A, ttl=LONG)
    await h.store.heartbeat(B, ttl=h.short)
    first = await h.store.membership()
    assert [n.node_id for n in first.nodes] == ["node-a", "node-b"]
    assert first.nodes[0] == A
    await h.lapse("node-b")
    second = await h.store.membership()
    assert [n.node_id for n in second.nodes] == ["node-a"]
    assert second.generation > first.generation


async def test_generation_moves_on_join_leave_and_acceptance_only(h: Harness) -> None:
    await h.store.heartbeat(A, ttl=LONG)
    g1 = (await h.store.membership()).generation
    await h.store.heartbeat(node("node-a", sessions=5), ttl=LONG)
    assert (await h.store.membership()).generation == g1  # load changes do not rebuild rings
    await h.store.heartbeat(node("node-a", accepting=False), ttl=LONG)
    g2 = (await h.store.membership()).generation
    assert g2 > g1
    await h.store.leave("node-a", A.incarnation)
    assert (await h.store.membership()).nodes == ()
    assert (await h.store.membership()).generation > g2


async def test_grant_lookup_release_with_epochs(h: Harness) -> None:
    await h.store.heartbeat(A, ttl=LONG)
    record = await h.store.grant("sid-1", "node-a", A.incarnation)
    assert record == OwnershipRecord("sid-1", "node-a", record.epoch, A.incarnation)
    assert await h.store.lookup("sid-1") == record
    stale = OwnershipRecord("sid-1", "node-a", record.epoch - 1, A.incarnation)
    assert await h.store.release(stale) is False
    assert await h.store.lookup("sid-1") == record  # a stale epoch releases nothing
    assert await h.store.release(record) is True
    assert await h.store.lookup("sid-1") is None


async def test_a_live_owner_cannot_be_displaced(h: Harness) -> None:
    await h.store.heartbeat(A, ttl=h.short)
    await h.store.heartbeat(B, ttl=LONG)
    first = await h.store.grant("sid-2", "node-a", A.incarnation)
    with pytest.raises(OwnershipConflict):
        await h.store.grant("sid-2", "node-b", B.incarnation)
    await h.lapse("node-a")  # A is dead now: nothing of it survives, and the key may be granted again
    second = await h.store.grant("sid-2", "node-b", B.incarnation)
    assert second.node_id == "node-b" and second.epoch >= 1
    assert await h.store.release(first) is False  # the dead owner's word no longer counts
    assert await h.store.lookup("sid-2") == second


async def test_a_node_that_goes_takes_its_records_with_it(h: Harness) -> None:
    await h.store.heartbeat(A, ttl=h.short)
    await h.store.heartbeat(B, ttl=LONG)
    await h.store.grant("of-a", "node-a", A.incarnation)
    kept = await h.store.grant("of-b", "node-b", B.incarnation)
    await h.lapse("node-a")  # A crashed
    assert await h.store.lookup("of-a") is None
    assert await h.store.lookup("of-b") == kept
    await h.store.leave("node-b", B.incarnation)  # B leaves cleanly
    assert await h.store.lookup("of-b") is None


async def test_a_lapsed_incarnation_never_renews(h: Harness) -> None:
    await h.store.heartbeat(A, ttl=h.short)
    await h.lapse("node-a")
    with pytest.raises(LeaseLost):
        await h.store.heartbeat(A, ttl=LONG)  # a paused node waking up is not taken as current
    await h.store.heartbeat(node("node-a", incarnation="node-a-2"), ttl=LONG)  # it may rejoin anew
    assert [n.incarnation for n in (await h.store.membership()).nodes] == ["node-a-2"]


async def test_a_live_node_id_cannot_be_taken_by_another_process(h: Harness) -> None:
    await h.store.heartbeat(A, ttl=LONG)
    with pytest.raises(LeaseLost):
        await h.store.heartbeat(node("node-a", incarnation="impostor"), ttl=LONG)
    await h.store.leave("node-a", "impostor")  # nor can it make the live one leave
    assert [n.incarnation for n in (await h.store.membership()).nodes] == [A.incarnation]


async def test_wait_for_change_returns(h: Harness) -> None:
    await h.store.wait_for_change(0.05)  # nothing happened: it returns at the timeout
    await h.store.heartbeat(A, ttl=LONG)
    await h.store.wait_for_change(0.05)


async def test_link_refuses_a_wrong_secret() -> None:
    runner, url = await served(MemoryStore(), "right")
    link = StoreLink(url, "wrong")
    try:
        with pytest.raises(StoreError, match="401"):
            await link.membership()
    finally:
        await link.close()
        await runner.cleanup()


@pytest.mark.parametrize("make", [lambda: StoreLink("http://127.0.0.1:9/_tether/store", "s", timeout=2),
                                  lambda: RedisStore("redis://127.0.0.1:9/0", timeout=2)])
async def test_unreachable_store_is_a_store_error(make: object) -> None:
    store = make()  # type: ignore[operator]
    try:
        with pytest.raises(StoreError, match="unreachable|Cannot reach"):
            await store.membership()
    finally:
        await store.close()


async def test_redis_keys_share_a_hash_tag_per_session(redis_server: RedisServer) -> None:
    raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    await raw.flushall()
    store = RedisStore(redis_server.url)
    try:
        await store.heartbeat(A, ttl=LONG)
        record = await store.grant("abc", "node-a", A.incarnation)
        session_keys = sorted(k for k in await raw.keys("*") if "abc" in k)
        assert session_keys == ["tether:{abc}:epoch", "tether:{abc}:owner"]
        assert await raw.ttl("tether:{abc}:epoch") == -1  # the epoch key never expires while it lives
        await store.release(record)
        assert [k for k in await raw.keys("*") if "abc" in k] == []  # nothing of the session is left
    finally:
        await store.close()
        await raw.aclose()


async def test_heartbeat_tells_a_renewal_from_a_new_registration(h: Harness) -> None:
    assert await h.store.heartbeat(A, ttl=LONG) is False  # the store did not know it
    assert await h.store.heartbeat(A, ttl=LONG) is True
    assert (await h.store.membership()).store_id  # a store names its data set


async def test_reassert_puts_back_a_lost_record_and_never_steals_one(h: Harness) -> None:
    await h.store.heartbeat(A, ttl=LONG)
    await h.store.heartbeat(B, ttl=LONG)
    record = await h.store.grant("kept", "node-a", A.incarnation)
    await h.store.release(record)  # as if the store had lost it
    assert await h.store.reassert(record) is True
    assert await h.store.lookup("kept") == record
    assert await h.store.reassert(record) is True  # idempotent
    taken = await h.store.grant("taken", "node-b", B.incarnation)
    claim = OwnershipRecord("taken", "node-a", taken.epoch + 5, A.incarnation)
    assert await h.store.reassert(claim) is False
    assert await h.store.lookup("taken") == taken


async def test_a_principal_holds_at_most_its_quota_of_live_keys(h: Harness) -> None:
    await h.store.heartbeat(A, ttl=h.short)
    await h.store.heartbeat(B, ttl=LONG)
    quota = Quota("tenant-1", 2)
    first = await h.store.grant("q-1", "node-a", A.incarnation, quota)
    assert first.principal == "tenant-1" and await h.store.lookup("q-1") == first
    await h.store.grant("q-2", "node-b", B.incarnation, quota)  # the count spans nodes
    with pytest.raises(QuotaExceeded) as refused:
        await h.store.grant("q-3", "node-b", B.incarnation, quota)
    assert refused.value.status == 429 and refused.value.retry_after
    assert await h.store.lookup("q-3") is None  # a refused grant leaves nothing behind
    await h.store.grant("other-1", "node-b", B.incarnation, Quota("tenant-2", 2))  # others are not counted
    await h.store.grant("free", "node-b", B.incarnation)  # nor are keys granted without a quota
    await h.store.release(first)  # an ended session frees its slot
    third = await h.store.grant("q-3", "node-b", B.incarnation, quota)
    with pytest.raises(QuotaExceeded):
        await h.store.grant("q-4", "node-b", B.incarnation, quota)
    await h.store.release(third)
    await h.store.heartbeat(A, ttl=h.short)
    await h.store.grant("q-5", "node-a", A.incarnation, quota)
    await h.lapse("node-a")  # a dead node's sessions are not counted against anyone
    await h.store.grant("q-6", "node-b", B.incarnation, quota)


async def test_a_key_counts_only_against_the_principal_that_holds_it_now(h: Harness) -> None:
    await h.store.heartbeat(A, ttl=h.short)
    await h.store.heartbeat(B, ttl=LONG)
    await h.store.grant("named", "node-a", A.incarnation, Quota("tenant-1", 1))
    await h.lapse("node-a")  # swept with its node; then another principal activates the same name
    await h.store.grant("named", "node-b", B.incarnation, Quota("tenant-2", 1))
    assert (await h.store.grant("own", "node-b", B.incarnation, Quota("tenant-1", 1))).principal == "tenant-1"


@pytest.mark.parametrize("record", [
    NodeRecord("node-1", "http://127.0.0.1:9001", accepting=False, sessions=3, incarnation="i-1"),
    OwnershipRecord("sid-1", "node-1", 7, incarnation="i-1", principal="p-1"),
])
def test_records_cross_the_link_and_redis_whole(record: NodeRecord | OwnershipRecord) -> None:
    # Written out field by field for speed: every field must be there, and come back the same.
    assert record.to_dict() == dataclasses.asdict(record)
    assert type(record).from_dict(record.to_dict()) == record
