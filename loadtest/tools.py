"""The `tools` scenario, closed loop: N sessions call a stateful tool and check every answer.

Each session calls `increment` (the demo server's counter) as fast as it is
answered; the counter must read 1, 2, 3... in that session, so one request
that reached another session's state is counted as a violation. Bounded by
`--duration` seconds and `--max-requests`; it stops by itself.

    python -m loadtest --target http://127.0.0.1:8080/mcp --sessions 16 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
INIT = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "tether-loadtest", "version": "0"}}}


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    violations: int = 0
    session_seconds: list[float] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.latencies) + self.errors


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def one_session(http: aiohttp.ClientSession, target: str, deadline: float, budget: list[int],
                      tally: Tally) -> None:
    started = time.perf_counter()
    async with http.post(target, data=orjson.dumps(INIT), headers=HEADERS) as resp:
        await resp.read()
        if resp.status != 200:
            tally.errors += 1
            return
        sid = resp.headers["Mcp-Session-Id"]
    headers = {**HEADERS, "Mcp-Session-Id": sid}
    note = orjson.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"})
    async with http.post(target, data=note, headers=headers) as resp:
        await resp.read()
    tally.session_seconds.append(time.perf_counter() - started)
    expected = 0
    while time.monotonic() < deadline and budget[0] > 0:
        budget[0] -= 1
        expected += 1
        body = orjson.dumps({"jsonrpc": "2.0", "id": expected, "method": "tools/call",
                             "params": {"name": "increment", "arguments": {"by": 1}}})
        t0 = time.perf_counter()
        async with http.post(target, data=body, headers=headers) as resp:
            payload = await resp.read()
            status = resp.status
        elapsed = time.perf_counter() - t0
        if status != 200:
            tally.errors += 1
            continue
        tally.latencies.append(elapsed)
        if _counter(orjson.loads(payload)) != expected:
            tally.violations += 1
    async with http.delete(target, headers={"Mcp-Session-Id": sid}) as resp:
        await resp.read()


def _counter(answer: dict[str, Any]) -> int | None:
    try:
        return int(answer["result"]["content"][0]["text"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


async def run(target: str, sessions: int, duration: float, max_requests: int) -> dict[str, Any]:
    tally = Tally()
    budget = [max_requests]
    connector = aiohttp.TCPConnector(limit=sessions)
    async with aiohttp.ClientSession(connector=connector) as http:
        began = time.monotonic()
        deadline = began + duration
        await asyncio.gather(*(one_session(http, target, deadline, budget, tally) for _ in range(sessions)))
        wall = time.monotonic() - began
    lat = sorted(tally.latencies)
    return {
        "scenario": "tools", "target": target, "sessions": sessions, "seconds": round(wall, 2),
        "requests": tally.requests, "errors": tally.errors, "violations": tally.violations,
        "throughput_rps": round(len(lat) / wall, 1) if wall else 0.0,
        "latency_seconds": {f"p{int(q * 1000) / 10:g}": percentile(lat, q) for q in (0.5, 0.9, 0.99, 0.999)},
        "session_setup_seconds_p50": percentile(sorted(tally.session_seconds), 0.5),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="MCP endpoint URL (loopback only)")
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (the run stops by itself)")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many calls")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.target, args.sessions, args.duration, args.max_requests))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return 1 if result["violations"] or result["errors"] else 0
