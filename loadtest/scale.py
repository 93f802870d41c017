"""`scale`: the `tools` checks while the ring changes under load, on a topology started here.

Redis, two gateways and three nodes run as processes on loopback (sessions alternate
between the gateways). A quarter into the run a fourth node joins; at half a node is
drained (its `drain_timeout` is short, so its sessions end within the run); at three
quarters a node is SIGKILLed. For each event the report gives the sessions broken (found
gone after it), the misroutes (answers from another session's state: there must be none),
how long until the first client saw a 404, and throughput in the seconds before and after.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.recipes import LIGHT_STDIO, SECRET, LocalTopology
from loadtest.run import Options, Run, Worker, apply_load
from loadtest.tools import CounterSession
from tether.tasks import TaskSet

DRAIN_TIMEOUT = 1.5  # seconds a drained node keeps its sessions
HEARTBEAT_TTL = 2.0  # seconds before a killed node's lease lapses
WINDOW = 2.0  # seconds of throughput compared before and after each event


async def ring_size(http: aiohttp.ClientSession, topology: LocalTopology) -> int:
    async with http.get(topology.gateways[0].removesuffix("/mcp") + "/metrics") as response:
        text = await response.text()
    match = re.search(r"^tether_ring_members (\S+)$", text, re.M)
    return int(float(match[1])) if match else 0


async def events(run: Run, topology: LocalTopology) -> None:
    """Add a node, drain one, SIGKILL one, at a quarter, a half and three quarters of the run."""
    d = run.options.duration
    await run.sleep_until(d * 0.25)
    await asyncio.to_thread(topology.add_node, "node-4")
    run.recorder.mark(run.now(), "node added", node="node-4")
    await run.sleep_until(d * 0.5)
    async with run.http.post(topology.nodes["node-1"][1] + "/admin/drain",
                             headers={"X-Tether-Secret": SECRET}) as response:
        await response.read()
    run.recorder.mark(run.now(), "node drained", node="node-1", drain_timeout=DRAIN_TIMEOUT)
    await run.sleep_until(d * 0.75)
    os.kill(topology.nodes["node-2"][0].pid, signal.SIGKILL)
    run.recorder.mark(run.now(), "node killed", node="node-2", heartbeat_ttl=HEARTBEAT_TTL)


def per_event(run: Run) -> list[dict[str, Any]]:
    timeline = {row["second"]: row for row in run.recorder.timeline()}
    marks = run.recorder.events
    out = []
    for i, mark in enumerate(marks):
        start, end = mark["at"], marks[i + 1]["at"] if i + 1 < len(marks) else float("inf")
        lost = [t for t in run.recorder.losses if start <= t < end]
        misroutes = [t for t, kind in run.recorder.violation_times if kind == "misrouted" and start <= t < end]

        def rate(a: float, b: float) -> float:
            rows = [timeline[s] for s in range(int(a), int(b)) if s in timeline]
            return float(sum(r["requests"] - r["errors"] for r in rows) / max(1, len(rows)))

        errors = sum(row["errors"] for second, row in timeline.items() if start <= second < end)
        out.append({**mark, "sessions_broken": len(lost), "misroutes": len(misroutes), "errors": errors,
                    "first_404_after_seconds": round(min(lost) - start, 3) if lost else None,
                    "throughput_before_rps": rate(start - WINDOW, start),
                    "throughput_after_rps": rate(start + 1, start + 1 + WINDOW)})
    return out


async def scale(options: Options, progress: bool = False) -> dict[str, Any]:
    from loadtest.cli import Progress, result_of

    workdir = Path(tempfile.mkdtemp(prefix="tether-scale-"))
    topology = LocalTopology(workdir, ["--upstream-command", shlex.join(LIGHT_STDIO)], {
        "TETHER_HEARTBEAT_TTL": str(HEARTBEAT_TTL), "TETHER_MEMBERSHIP_REFRESH": "0.2",
        "TETHER_DRAIN_TIMEOUT": str(DRAIN_TIMEOUT), "TETHER_KILL_GRACE": "1"})
    try:
        await asyncio.to_thread(topology.start, 3, 2)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            run = Run(Options(**{**options.__dict__, "target": ",".join(topology.gateways)}), http)
            async with asyncio.timeout(30):
                while await ring_size(http, topology) < 3:
                    await asyncio.sleep(0.1)  # the gateways read membership every 0.2 s
            run.started = time.monotonic()  # the run's clock starts with the load, not with the topology
            tasks = TaskSet("scale")
            try:
                tasks.spawn(events(run, topology), "events")
                workers: list[Worker] = [CounterSession(run, i, False) for i in range(options.sessions)]
                with Progress(run, enabled=progress) as bar:
                    await apply_load(run, workers, bar.tick)
            finally:
                await tasks.close()
            seconds = run.now()
        result = result_of("scale", run.options, run, seconds, {"events": per_event(run)})
    finally:
        await asyncio.to_thread(topology.stop)
        shutil.rmtree(workdir, ignore_errors=True)
    return result
