"""The load scenario's own checks: every answer is compared with the session's expected counter."""

from __future__ import annotations

from loadtest.tools import run
from tests.support import TetherUp


async def test_tools_scenario_counts_every_request_and_finds_no_violation(tether: TetherUp) -> None:
    result = await run(tether.mcp_url, sessions=3, duration=60, max_requests=60)
    assert result["requests"] == 60  # bounded by count, it stopped by itself
    assert (result["errors"], result["violations"]) == (0, 0)
    assert 0 < result["latency_seconds"]["p50"] <= result["latency_seconds"]["p99"]


async def test_tools_scenario_counts_a_target_that_refuses_sessions(tether: TetherUp) -> None:
    # Against a URL with no MCP server every session fails to start: counted, never hidden.
    result = await run(tether.base_url + "/not-mcp", sessions=2, duration=5, max_requests=10)
    assert result["errors"] == 2 and result["requests"] == 2
