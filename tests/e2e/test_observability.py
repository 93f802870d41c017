"""/metrics, /healthz and /readyz on the gateway and on every node."""

from __future__ import annotations

import aiohttp

from tests.support import RawClient, TetherUp


async def fetch(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url) as resp:
        return resp.status, await resp.text()


async def test_health_and_readiness_everywhere(tether: TetherUp, http: aiohttp.ClientSession) -> None:
    for base in [tether.base_url, *(url for url, _ in tether.nodes.values())]:
        assert await fetch(http, base + "/healthz") == (200, "ok\n")
        assert await fetch(http, base + "/readyz") == (200, "ready\n")


async def test_gateway_metrics_count_requests_and_ring(tether: TetherUp, raw: RawClient,
                                                       http: aiohttp.ClientSession) -> None:
    sid = await raw.initialize()
    await raw.whoami(sid)
    status, text = await fetch(http, tether.base_url + "/metrics")
    assert status == 200
    assert 'tether_gateway_requests_total{method="post",status="200",transport="streamable_http"}' in text
    assert 'tether_gateway_requests_total{method="post",status="202",transport="streamable_http"}' in text
    assert "tether_gateway_request_seconds_bucket" in text
    assert "tether_ring_members 2.0" in text
    assert 'tether_gateway_route_cache_total{result="hit"}' in text


async def test_node_metrics_show_sessions_per_node(tether: TetherUp, raw: RawClient,
                                                   http: aiohttp.ClientSession) -> None:
    sid = await raw.initialize()
    owner = (await raw.whoami(sid))["node"]
    status, text = await fetch(http, tether.nodes[owner][0] + "/metrics")
    assert status == 200
    active = [line for line in text.splitlines()
              if line.startswith(f'tether_node_sessions_active{{node="{owner}"}}')]
    assert active and float(active[0].rsplit(" ", 1)[1]) >= 1
    assert "tether_actor_request_seconds_bucket" in text
    assert "tether_upstream_start_seconds_bucket" in text


async def test_node_internal_api_needs_the_secret(tether: TetherUp, raw: RawClient,
                                                  http: aiohttp.ClientSession) -> None:
    sid = await raw.initialize()
    owner = (await raw.whoami(sid))["node"]
    async with http.get(f"{tether.nodes[owner][0]}/_tether/link") as resp:  # the link's WebSocket upgrade
        assert resp.status == 401
    async with http.post(f"{tether.base_url}/_tether/store/membership", json={}) as resp:
        assert resp.status == 401


async def test_other_http_methods_share_one_metric_label(tether: TetherUp, http: aiohttp.ClientSession) -> None:
    for method in ("PUT", "PATCH", "OPTIONS", "PROPFIND", "MKCOL"):
        async with http.request(method, tether.mcp_url) as resp:
            assert resp.status == 405
    _, text = await fetch(http, tether.base_url + "/metrics")
    assert 'tether_gateway_requests_total{method="other",status="405",transport="streamable_http"}' in text
    assert not any(f'method="{m}"' in text for m in ("put", "patch", "options", "propfind", "mkcol"))
