"""Distributed Tether on a real Redis: 2 gateways, 2 or 3 nodes, all separate processes.

After every test the ownership oracle reads every node's log: no two activations
of one session overlap and epochs only grow.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from mcp.client.client import Client

from tests.conftest import TTL, MakeTopology, start_tether
from tests.support import RawClient, RedisServer, call_tool, initialize_message, wait_until
from tests.topology import LIGHT, SECRET
from tether.logs import sid_tag

LIST = {"jsonrpc": "2.0", "id": 5, "method": "tools/list"}


async def session_keys(redis_url: str) -> list[str]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return sorted(k for k in await client.keys("tether:*"))
    finally:
        await client.aclose()


async def counter(raw: RawClient, sid: str, request_id: int = 1) -> int:
    answer = await raw.call(sid, call_tool(request_id, "increment"))
    return int(answer["result"]["content"][0]["text"])


async def session_on(raw: RawClient, node_id: str, tries: int = 60) -> str:
    """A new session that the ring placed on `node_id`."""
    for _ in range(tries):
        sid = await raw.initialize()
        if (await raw.whoami(sid))["node"] == node_id:
            return sid
    raise AssertionError(f"no session landed on {node_id} in {tries} tries")


async def test_a_session_works_through_any_gateway(make_topology: MakeTopology,
                                                   http: aiohttp.ClientSession) -> None:
    topo = await make_topology()
    a, b = RawClient(http, topo.mcp_url(0)), RawClient(http, topo.mcp_url(1))
    sid = await a.initialize()
    assert [await counter(a, sid), await counter(b, sid), await counter(a, sid)] == [1, 2, 3]
    async with http.get(b.url, headers={"Mcp-Session-Id": sid, "Accept": "text/event-stream"}) as stream:
        assert stream.status == 200
    async with http.delete(b.url, headers={"Mcp-Session-Id": sid}) as resp:
        assert resp.status == 200
    assert (await a.post(LIST, sid=sid))[0] == 404
    assert (await b.post(LIST, sid=sid))[0] == 404


async def test_scale_out_takes_new_sessions_and_moves_none(make_topology: MakeTopology,
                                                           http: aiohttp.ClientSession) -> None:
    topo = await make_topology(2)
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(Client(topo.mcp_url(i % 2), mode="legacy"))
                   for i in range(8)]

        async def step(client: Client) -> int:
            return int((await client.call_tool("increment", {})).content[0].text)  # type: ignore[union-attr]

        async def owner(client: Client) -> str:
            text = (await client.call_tool("whoami", {})).content[0].text  # type: ignore[union-attr]
            return str(orjson.loads(text)["node"])

        assert [[await step(c) for _ in range(3)] for c in clients] == [[1, 2, 3]] * 8
        owners = [await owner(c) for c in clients]

        topo.add_node("node-3")  # joins under traffic
        await topo.wait_ring(http, {"node-1", "node-2", "node-3"})
        raw = RawClient(http, topo.mcp_url(1))
        placed = [(await raw.whoami(await raw.initialize()))["node"] for _ in range(30)]
        assert 3 <= placed.count("node-3") <= 20, placed  # about a third of new sessions

        assert [await step(c) for c in clients] == [4] * 8  # no live session broke or reset...
        assert [await owner(c) for c in clients] == owners  # ...or moved


async def test_sigterm_drains_a_node(make_topology: MakeTopology, http: aiohttp.ClientSession) -> None:
    topo = await make_topology()
    raw = RawClient(http, topo.mcp_url(0))
    async with AsyncExitStack() as stack:
        client = None
        for _ in range(30):  # an official-client session that the ring placed on node-1
            candidate = await stack.enter_async_context(Client(topo.mcp_url(0), mode="legacy"))
            if orjson.loads((await candidate.call_tool("whoami", {})).content[0].text)["node"] == "node-1":  # type: ignore[union-attr]
                client = candidate
                break
        assert client is not None
        assert (await client.call_tool("increment", {})).content[0].text == "1"  # type: ignore[union-attr]
        draining = topo.nodes["node-1"]
        draining.signal(signal.SIGTERM)

        async def not_ready() -> bool:
            async with http.get(draining.url + "/readyz") as resp:
                return resp.status == 503

        await wait_until(not_ready, timeout=5, what="the draining node to report not ready")
        await topo.wait_ring(http, {"node-2", "node-3"})
        placed = [(await raw.whoami(await raw.initialize()))["node"] for _ in range(15)]
        assert "node-1" not in placed  # off the ring for new sessions...
        # ...while its own session carries on, state intact
        assert [(await client.call_tool("increment", {})).content[0].text for _ in range(3)] == [  # type: ignore[union-attr]
            "2", "3", "4"]
    # every client closed (DELETE): the draining node's last session ended, so it exits 0
    assert await asyncio.to_thread(draining.wait, 15) == 0
    topo.remove("node-1")


async def test_admin_drain_ends_what_is_left_at_the_deadline(make_topology: MakeTopology,
                                                             http: aiohttp.ClientSession) -> None:
    topo = await make_topology(drain_timeout="1")
    raw = RawClient(http, topo.mcp_url(0))
    sid = await session_on(raw, "node-2")
    node = topo.nodes["node-2"]
    async with http.post(node.url + "/admin/drain") as resp:
        assert resp.status == 401  # not without the internal secret
    async with http.post(node.url + "/admin/drain", headers={"X-Tether-Secret": SECRET}) as resp:
        assert resp.status == 202
    assert await asyncio.to_thread(node.wait, 15) == 0
    topo.remove("node-2")
    assert (await raw.post(LIST, sid=sid))[0] == 404  # ended cleanly when the drain deadline passed


async def test_a_killed_node_is_503_then_404_and_leaves_no_records(make_topology: MakeTopology,
                                                                   http: aiohttp.ClientSession,
                                                                   redis_server: RedisServer) -> None:
    topo = await make_topology()
    raw = RawClient(http, topo.mcp_url(0))
    sid = await session_on(raw, "node-3")
    assert any(sid in key for key in await session_keys(redis_server.url))
    victim = topo.remove("node-3")
    victim.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    async with asyncio.timeout(5):  # never a hang
        status, headers, body = await raw.post(LIST, sid=sid)
    if status == 503:
        assert int(headers["Retry-After"]) >= 1
    else:
        assert status == 404, body

    async def gone() -> bool:
        return (await raw.post(LIST, sid=sid))[0] == 404

    await wait_until(gone, timeout=TTL + 1 - (time.monotonic() - killed_at), what="404 within TTL + 1 s")

    async def no_records() -> bool:
        return not [k for k in await session_keys(redis_server.url) if sid in k or "node-3" in k]

    await wait_until(no_records, timeout=5, what="the dead node's records removed")


async def test_a_paused_node_never_serves_its_old_sessions_again(make_topology: MakeTopology,
                                                                 http: aiohttp.ClientSession) -> None:
    topo = await make_topology()
    raw = RawClient(http, topo.mcp_url(0))
    sid = await session_on(raw, "node-2")
    assert await counter(raw, sid) == 1
    paused = topo.nodes["node-2"]
    paused.signal(signal.SIGSTOP)
    try:
        await topo.wait_ring(http, {"node-1", "node-3"})  # its lease lapsed
        stall = 2 * TTL  # the scenario: stopped for twice the lease TTL
        await asyncio.sleep(stall)
    finally:
        paused.signal(signal.SIGCONT)
    for gateway in (0, 1):
        assert (await RawClient(http, topo.mcp_url(gateway)).post(LIST, sid=sid))[0] in (404, 503)
    await topo.wait_ring(http, {"node-1", "node-2", "node-3"})  # it rejoins, as a new incarnation
    for gateway in (0, 1):
        assert (await RawClient(http, topo.mcp_url(gateway)).post(LIST, sid=sid))[0] == 404
    fresh = await session_on(raw, "node-2")
    assert await counter(raw, fresh) == 1


async def test_abandoned_sessions_leave_no_keys(make_topology: MakeTopology, http: aiohttp.ClientSession,
                                                redis_server: RedisServer) -> None:
    idle, scan = 1.0, 0.2
    topo = await make_topology(idle_timeout=str(idle), scan_interval=str(scan))
    raws = [RawClient(http, topo.mcp_url(i)) for i in (0, 1)]
    for batch in range(10):
        await asyncio.gather(*(raws[(batch + i) % 2].initialize() for i in range(20)))

    async def none_left() -> bool:
        return await session_keys(redis_server.url) == []

    await wait_until(none_left, timeout=idle + scan + 1 + 10, what="every abandoned session's keys removed")
    events = [ev for proc in topo.nodes.values() for ev in proc.log_events()]
    assert sum(ev["event"] == "session.started" for ev in events) == 200
    assert [ev["reason"] for ev in events if ev["event"] == "session.ended"] == ["idle"] * 200


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server this test may stop and restart (on the same port, empty, as without persistence)."""
    server = RedisServer().start()
    yield server
    server.stop()


async def status_of(raw: RawClient, sid: str) -> int:
    return (await raw.post(LIST, sid=sid, accept="application/json"))[0]


async def test_redis_restart_within_the_lease_loses_no_session(make_topology: MakeTopology,
                                                               http: aiohttp.ClientSession,
                                                               own_redis: RedisServer) -> None:
    topo = await make_topology(redis=own_redis)
    a = RawClient(http, topo.mcp_url(0))
    sids = [await a.initialize() for _ in range(6)]
    assert [await counter(a, sid) for sid in sids] == [1] * 6
    own_redis.stop()
    own_redis.start()  # back at once, with nothing in it

    async def all_served() -> bool:
        return all([await status_of(a, sid) == 200 for sid in sids])

    await wait_until(all_served, timeout=TTL + 5, what="every session served again after the restart")
    assert [await counter(a, sid) for sid in sids] == [2] * 6  # state intact, nothing reset
    topo.add_gateway()  # a gateway with no cache finds them through the re-asserted records
    await topo.wait_ring(http, set(topo.nodes))
    fresh = RawClient(http, topo.mcp_url(2))
    assert [await counter(fresh, sid) for sid in sids] == [3] * 6


async def test_redis_unreachable_within_the_lease_loses_no_session(make_topology: MakeTopology,
                                                                  http: aiohttp.ClientSession,
                                                                  own_redis: RedisServer) -> None:
    topo = await make_topology(redis=own_redis)
    a, b = RawClient(http, topo.mcp_url(0)), RawClient(http, topo.mcp_url(1))
    sids = [await a.initialize() for _ in range(3)]
    assert [await counter(a, sid) for sid in sids] == [1] * 3
    assert own_redis.process is not None
    own_redis.process.send_signal(signal.SIGSTOP)  # unreachable: connections hang, nothing answers
    try:
        outage = TTL / 2  # the scenario: away for half the lease
        await asyncio.sleep(outage)
    finally:
        own_redis.process.send_signal(signal.SIGCONT)
    assert [await counter(b, sid) for sid in sids] == [2] * 3  # every session lives, state intact
    assert not any(ev["event"] == "lease.lost" for node in topo.nodes.values() for ev in node.log_events())


async def test_redis_down_past_the_lease_fences_nodes_then_recovers(make_topology: MakeTopology,
                                                                   http: aiohttp.ClientSession,
                                                                   own_redis: RedisServer) -> None:
    topo = await make_topology(redis=own_redis)
    a, b = RawClient(http, topo.mcp_url(0)), RawClient(http, topo.mcp_url(1))
    sid = await a.initialize()
    assert await counter(a, sid) == 1
    own_redis.stop()

    async def unavailable() -> bool:
        status, headers, _ = await b.post(LIST, sid=sid, accept="application/json")
        return status == 503 and int(headers.get("Retry-After", "0")) >= 1

    await wait_until(unavailable, timeout=TTL + 5, what="503 with Retry-After while Redis is away")

    async def all_fenced() -> bool:
        return all(any(ev["event"] == "lease.lost" for ev in node.log_events()) for node in topo.nodes.values())

    await wait_until(all_fenced, timeout=TTL + 5, what="every node to fence itself")
    own_redis.start()

    async def recovered() -> bool:
        status, _, _ = await b.post(initialize_message(), accept="application/json")
        return status == 200

    await wait_until(recovered, timeout=TTL + 10, what="new sessions accepted once Redis is back")

    async def old_session_gone() -> bool:
        return await status_of(a, sid) == 404

    await wait_until(old_session_gone, timeout=TTL + 5, what="the fenced session to answer 404")


async def test_tether_up_runs_the_distributed_form_on_one_host(tmp_path: Path, redis_server: RedisServer,
                                                                http: aiohttp.ClientSession) -> None:
    flush = aioredis.Redis.from_url(redis_server.url)
    await flush.flushall()
    await flush.aclose()
    up = start_tether(tmp_path, "--redis", redis_server.url, "--upstream-command", LIGHT)
    try:
        async with Client(up.mcp_url, mode="legacy") as client:
            values = [(await client.call_tool("increment", {})).content[0].text for _ in range(3)]  # type: ignore[union-attr]
            assert values == ["1", "2", "3"]
            assert any(key.endswith(":owner") for key in await session_keys(redis_server.url))
    finally:
        assert up.stop() == 0
    assert await session_keys(redis_server.url) == []  # Ctrl-C ended the session and its records


async def test_200_concurrent_first_requests_for_one_name_activate_one_actor(
        make_topology: MakeTopology, http: aiohttp.ClientSession) -> None:
    topo = await make_topology(affinity_key="header:X-Workspace")
    raws = [RawClient(http, topo.mcp_url(i)) for i in (0, 1)]
    named = {"X-Workspace": "workspace-42"}

    async def named_sessions_open() -> bool:  # a fresh store settles for a lease before names activate
        status, _, _ = await raws[0].post(initialize_message(), accept="application/json",
                                          headers={"X-Workspace": "warm-up"})
        return status == 200

    await wait_until(named_sessions_open, timeout=TTL + 5, what="named sessions accepted")
    answers = await asyncio.gather(*(raws[i % 2].post(initialize_message(i), accept="application/json",
                                                      headers=named) for i in range(200)))
    assert [status for status, _, _ in answers] == [200] * 200
    sids = {headers["Mcp-Session-Id"] for _, headers, _ in answers}
    assert len(sids) == 1  # one session, whichever gateway each request went through
    assert [orjson.loads(body)["id"] for _, _, body in answers] == list(range(200))  # each its own answer
    sid = answers[0][1]["Mcp-Session-Id"]
    started = [ev for proc in topo.nodes.values() for ev in proc.log_events()
               if ev["event"] == "session.started" and ev["sid"] == sid_tag(sid)]
    assert len(started) == 1  # exactly one actor, one upstream process
    # The name alone reaches the session, through either gateway: the counter is shared and in order.
    values = []
    for i in range(10):
        status, _, body = await raws[i % 2].post(call_tool(i, "increment"), accept="application/json",
                                                 headers=named)
        assert status == 200
        values.append(int(orjson.loads(body)["result"]["content"][0]["text"]))
    assert values == list(range(1, 11))
    async with http.delete(raws[1].url, headers=named) as resp:  # ended by name
        assert resp.status == 200
    assert (await raws[0].post(LIST, sid=sid))[0] == 404
    status, headers, _ = await raws[0].post(initialize_message(), accept="application/json", headers=named)
    assert (status, headers["Mcp-Session-Id"]) == (200, sid)  # activated again: a new epoch, fresh state
    assert await counter(raws[0], sid) == 1
