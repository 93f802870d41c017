"""`--compare`: the same scenario against several targets, interleaved over repetitions.

This machine is shared and noisy, so one run per target proves little: each repetition
runs every target once, in turn, and the table gives medians over repetitions and, per
repetition, each target's throughput as a ratio of the first target's. Each target is
started fresh (see recipes.py) and stopped after its run. CPU and memory are read from
/proc for the proxy's own processes: CPU time per answered request, and resident memory
at its peak during the run above where it started, per session (for `tether-distributed` that
includes Redis); for idle streams, the share of a core used while they are idle. A process that
exits during a run counts with the CPU it had used when last read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtest.recipes import RECIPES, Target
from loadtest.run import Options
from tether.tasks import TaskSet

HTTP_ONLY = {"direct", "nginx"}
STDIO_ONLY = {"supergateway", "mcp-proxy"}
SAMPLE_EVERY = 0.5  # seconds between memory samples
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


class Usage:
    """CPU and resident memory of the proxy's processes over one run."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.cpu_start = self._cpu()
        self.cpu_last = dict(self.cpu_start)  # each process's latest reading, kept once it has exited
        self.rss_start = self._rss()
        self.rss_peak = self.rss_start

    def _cpu(self) -> dict[int, float]:
        return {pid: cpu for pid in self.target.proxy_pids() if (cpu := cpu_seconds(pid)) is not None}

    def _rss(self) -> int:
        return sum(rss_bytes(pid) for pid in self.target.proxy_pids())

    async def sample_until_cancelled(self) -> None:
        while True:
            self.rss_peak = max(self.rss_peak, self._rss())
            await asyncio.sleep(SAMPLE_EVERY)

    def cpu_used(self) -> float:
        """CPU seconds used since the start, never less than at an earlier call: a process that
        exited counts as at its last reading."""
        self.cpu_last.update(self._cpu())
        return sum(cpu - self.cpu_start.get(pid, 0.0) for pid, cpu in self.cpu_last.items())


def check(recipes: list[str], upstream: str) -> None:
    for name in recipes:
        if name not in RECIPES:
            raise ValueError(f"no recipe {name!r}; known: {', '.join(RECIPES)}")
        if (upstream == "stdio" and name in HTTP_ONLY) or (upstream == "http" and name in STDIO_ONLY):
            raise ValueError(f"{name} cannot front a {upstream} upstream")


async def compare(scenario: str, options: Options, recipes: list[str], upstream: str, repetitions: int,
                  progress: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run `scenario` against each recipe, `repetitions` times round-robin: every run, and the table rows."""
    check(recipes, upstream)
    if repetitions < 1:
        raise ValueError("--repetitions must be at least 1")
    results: list[dict[str, Any]] = []
    for repetition in range(repetitions):
        turn = repetition % len(recipes)  # each round starts with the next target: no fixed order bias
        for name in recipes[turn:] + recipes[:turn]:
            results.append(await _one(scenario, options, name, upstream, repetition, progress))
    return results, rows(results, recipes, repetitions)


async def _one(scenario: str, options: Options, name: str, upstream: str, repetition: int,
               progress: bool) -> dict[str, Any]:
    from loadtest.cli import run_scenario

    workdir = Path(tempfile.mkdtemp(prefix=f"tether-compare-{name}-"))
    sampler = TaskSet("usage")
    target: Target | None = None
    try:
        target = await asyncio.to_thread(RECIPES[name], upstream, workdir)
        usage = Usage(target)
        sampler.spawn(usage.sample_until_cancelled(), "rss")
        measured = bool(target.proxy_pids())
        result = await run_scenario(scenario, dataclasses.replace(options, target=",".join(target.urls)), progress,
                                    usage.cpu_used if measured else None)
        cpu = usage.cpu_used()
        answered = result["requests"] - result["errors"]  # right or wrong, the proxy did the work
        result |= {"target": name, "repetition": repetition, "upstream": upstream, "proxy": {
            "cpu_seconds": round(cpu, 3),
            "cpu_ms_per_request": cpu * 1000 / answered if answered and measured else None,
            "rss_start_mb": usage.rss_start / 2**20, "rss_peak_mb": usage.rss_peak / 2**20,
            "mb_per_session": (usage.rss_peak - usage.rss_start) / 2**20 / options.sessions if measured else None}}
        return result
    finally:
        await sampler.close()
        if target is not None:
            await asyncio.to_thread(target.stop)
        shutil.rmtree(workdir, ignore_errors=True)


def rows(results: list[dict[str, Any]], recipes: list[str], repetitions: int) -> list[dict[str, Any]]:
    def median(values: list[Any]) -> Any:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    first = {r["repetition"]: r["throughput_rps"] for r in results if r["target"] == recipes[0]}
    # The reference: the first target whose proxy CPU was measured (nginx, in `direct,nginx,tether`).
    # Each target is read against it in the same repetition: a machine's speed moves between runs, and
    # a ratio within one repetition moves less (the reference's own cost still varies).
    reference = next((name for name in recipes if any(
        r["target"] == name and r["proxy"]["cpu_ms_per_request"] for r in results)), None)
    ref = {r["repetition"]: r for r in results if r["target"] == reference}

    def against(run: dict[str, Any], value: Callable[[dict[str, Any]], float | None]) -> float | None:
        other = ref.get(run["repetition"])
        mine, theirs = value(run), value(other) if other is not None else None
        return mine / theirs if mine is not None and theirs else None

    results = sorted(results, key=lambda r: r["repetition"])
    table = []
    for name in recipes:
        runs = [r for r in results if r["target"] == name]
        table.append({
            "target": name,
            "throughput_rps": median([r["throughput_rps"] for r in runs]),
            "answered_rps": median([r["answered_rps"] for r in runs]),
            "p50": median([r["latency_seconds"]["p50"] for r in runs]),
            "p99": median([r["latency_seconds"]["p99"] for r in runs]),
            "cpu_ms_per_request": median([r["proxy"]["cpu_ms_per_request"] for r in runs]),
            "mb_per_session": median([r["proxy"]["mb_per_session"] for r in runs]),
            "idle_cpu_percent": median([r["extra"].get("idle", {}).get("cpu_percent") for r in runs]),
            "keepalives_per_second": median([r["extra"].get("idle", {}).get("keepalives_per_second") for r in runs]),
            "errors": sum(r["errors"] for r in runs),
            "violations": sum(r["violations"] for r in runs),
            "ratios": [r["throughput_rps"] / first[r["repetition"]] if first.get(r["repetition"]) else 0.0
                       for r in runs],
            "repetitions": repetitions,
            "reference": reference,
            "vs_reference": None if reference is None else {  # medians of each repetition's ratio
                "throughput": median([against(r, lambda x: x["throughput_rps"]) for r in runs]),
                "p99": median([against(r, lambda x: x["latency_seconds"]["p99"]) for r in runs]),
                "cpu": median([against(r, lambda x: x["proxy"]["cpu_ms_per_request"]) for r in runs]),
            },
        })
    return table
