"""The prod overlay's exact topology, run locally: 2 gateways, 3 nodes and Redis as processes on
loopback, their commands, arguments, environment and config taken from the rendered manifests.
A real MCP client works through it, and a node drains as its preStop hook drives it."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import httpx2
import pytest
import redis.asyncio as aioredis
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from gateway.auth import token_hash
from tests.k8s import kustomize
from tests.k8s.cluster import LocalCluster, Pod
from tests.k8s.manifests import K8S, render
from tests.support import RawClient, RedisServer, call_tool, wait_until

pytestmark = pytest.mark.e2e
START = 60.0  # seconds for every pod to turn ready: each node starts a Python interpreter or three


async def metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(url + "/metrics") as response:
        text = await response.text()
    values = [float(m[1]) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    return sum(values)


def base_url(cluster: LocalCluster, pod: Pod) -> str:
    return f"http://127.0.0.1:{pod.ports[pod.spec['containers'][0]['ports'][0]['containerPort']]}"


@pytest.fixture
async def prod(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[tuple[LocalCluster, str]]:
    """The prod overlay running, with the Secret an operator would make from secret.example.yaml."""
    flush = aioredis.Redis.from_url(redis_server.url)
    await flush.flushall()
    await flush.aclose()
    (example,) = kustomize._documents(K8S / "overlays" / "prod" / "secret.example.yaml")
    token = "tt_" + secrets.token_urlsafe(24)
    secret = {"internal-secret": secrets.token_hex(32), "session-id-key": secrets.token_hex(32),
              "redis-url": redis_server.url, "auth-tokens": f"alice {token_hash(token)}\n"}
    assert set(secret) == set(example["stringData"])
    cluster = LocalCluster(render("prod"), {example["metadata"]["name"]: secret}, tmp_path / "cluster")
    cluster.start()
    try:
        yield cluster, token
    finally:
        assert cluster.stop() == []  # every process stopped when asked


async def test_prod_topology_serves_sessions_and_drains_a_node_by_its_prestop_hook(prod, http):
    cluster, token = prod
    gateways, nodes = cluster.pods_of("gateway"), cluster.pods_of("node")
    assert [p.name for p in gateways] == ["tether-gateway-0", "tether-gateway-1"]
    assert [p.name for p in nodes] == ["tether-node-0", "tether-node-1", "tether-node-2"]

    # Every pod turns ready and stays live by its own probes; each gateway sees the three nodes.
    for pod in cluster.pods:
        component = pod.spec["containers"][0]["name"]

        async def ready(pod: Pod = pod, component: str = component) -> bool:
            return await cluster.probe(http, pod, component, "readinessProbe") == 200

        await wait_until(ready, START, f"{pod.name} ready")
        assert await cluster.probe(http, pod, component, "livenessProbe") == 200
    async def full_ring() -> bool:  # a gateway reads membership every membership_refresh
        return all([await metric(http, base_url(cluster, g), "tether_ring_members") == 3 for g in gateways])

    await wait_until(full_ring, 10, "every gateway's ring to hold the three nodes")

    # A real MCP client, with the token the Secret holds, through the first gateway.
    mcp_urls = [base_url(cluster, g) + "/mcp" for g in gateways]
    sids: set[str] = set()

    async def note_session(response: httpx2.Response) -> None:
        if sid := response.headers.get("mcp-session-id"):
            sids.add(sid)

    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"},
                                  event_hooks={"response": [note_session]}, timeout=30) as client, \
            streamable_http_client(mcp_urls[0], http_client=client) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        counts = [(await session.call_tool("increment", {})).content[0].text for _ in range(3)]
        assert counts == ["1", "2", "3"]
        (sid,) = sids
        # The same session through the other gateway: one state, wherever the request lands.
        other = RawClient(http, mcp_urls[1], headers={"Authorization": f"Bearer {token}"})
        assert (await other.call(sid, call_tool(7, "increment")))["result"]["structuredContent"]["result"] == 4
        assert (await RawClient(http, mcp_urls[1]).post(call_tool(8, "increment"), sid=sid))[0] == 401

        # Drain the node that owns it, as the kubelet's preStop hook does.
        actives = [await metric(http, base_url(cluster, n), "tether_node_sessions_active") for n in nodes]
        assert sorted(actives) == [0, 0, 1]
        owner = nodes[actives.index(1)]
        hook = cluster.pre_stop(owner, "node")

        async def not_ready() -> bool:
            return await cluster.probe(http, owner, "node", "readinessProbe") == 503

        async def ring_without_owner() -> bool:
            return all([await metric(http, base_url(cluster, g), "tether_ring_members") == 2 for g in gateways])

        await wait_until(not_ready, 10, "the draining node turns not ready")
        await wait_until(ring_without_owner, 10, "gateways take the draining node off the ring")
        # The client sees nothing: its session goes on where it was; new sessions start elsewhere.
        assert (await session.call_tool("increment", {})).content[0].text == "5"
        raw = RawClient(http, mcp_urls[1], headers={"Authorization": f"Bearer {token}"})
        fresh = await raw.initialize()
        assert (await raw.call(fresh, call_tool(10, "increment")))["result"]["structuredContent"]["result"] == 1
        assert await metric(http, base_url(cluster, owner), "tether_node_sessions_active") == 1
        assert hook.poll() is None  # still draining: a session is open

    # The client closed its session (DELETE): the drain is done and the hook returns 0, while the
    # node waits, not ready, for the SIGTERM the kubelet sends next; then it exits 0.
    output, _ = await asyncio.to_thread(hook.communicate, timeout=30)
    assert hook.returncode == 0, output
    assert b"drained" in output
    assert owner.processes["node"].poll() is None
    assert await cluster.probe(http, owner, "node", "readinessProbe") == 503
    cluster.terminate(owner)
    assert await asyncio.to_thread(owner.processes["node"].wait, 30) == 0
    assert (await raw.call(fresh, call_tool(11, "increment")))["result"]["structuredContent"]["result"] == 2
