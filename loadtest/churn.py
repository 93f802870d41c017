"""`churn`: sessions are opened, used once and abandoned without DELETE, as vanished clients do.

The target must reap each within its idle timeout plus one reaper scan. After that time
the scenario asks each abandoned session for a `ping`: an answer means the session is
still held (`session_leaked`, a violation); 404 means it was reaped. With `--metrics`
(the /metrics URLs of the target's nodes) it also follows the target's own count of live
sessions and requires it back at its starting level (`metrics_leak`).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp

from loadtest.client import Failed, HttpSession
from loadtest.run import Run
from tether.tasks import TaskSet

REAP_SLACK = 1.0  # seconds allowed past idle timeout + scan interval, for clocks and scheduling
LIVE_METRIC = "tether_node_sessions_active"
POLL = 0.5  # seconds between reads of the target's metrics


async def live_sessions(run: Run) -> int | None:
    """The target's live sessions, summed over its /metrics pages; None without --metrics, or when
    a page could not be read (a missing page must not look like sessions reaped)."""
    if not run.options.metrics:
        return None
    total = 0.0
    for url in run.options.metrics:
        try:
            async with run.http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError):
            run.recorder.error(run.now(), "metrics_unreachable")
            return None
        total += sum(float(m[1]) for m in re.finditer(rf"^{LIVE_METRIC}(?:{{[^}}]*}})? (\S+)$", text, re.M))
    return int(total)


async def abandon_one(run: Run, index: int, abandoned: list[tuple[HttpSession, float]]) -> None:
    o, rec = run.options, run.recorder
    client = HttpSession(run.http, run.target_for(index), o.headers, o.timeout)
    started = run.now()
    try:
        await client.initialize()
        value = await client.call("increment", {"by": 1})
    except Failed as failed:
        rec.error(run.now(), failed.kind)
        return
    now = run.now()
    if value != "1":
        rec.wrong_answer(now, "misrouted", f"session {index}: a new session's counter read {value}")
    else:
        rec.ok(now, now - started)
    abandoned.append((client, now))  # no DELETE: the client vanished


async def probe(run: Run, client: HttpSession, due: float, index: int) -> None:
    await run.sleep_until(due)
    try:
        await client.post({"jsonrpc": "2.0", "id": "churn-probe", "method": "ping"})
    except Failed as failed:
        if failed.kind == "http_404":
            run.recorder.count("sessions_reaped")
        else:
            run.recorder.error(run.now(), failed.kind)
        return
    run.recorder.violation(run.now(), "session_leaked",
                           f"session {index} still answers at {run.now():.1f}s, past its idle timeout plus one scan")


async def churn(run: Run, progress: Any = None) -> dict[str, Any]:
    o, rec = run.options, run.recorder
    if o.idle_timeout <= 0:
        raise ValueError("churn needs the target's idle timeout: --idle-timeout SECONDS (and --scan-interval)")
    baseline = await live_sessions(run)
    if run.options.metrics and baseline is None:
        raise ValueError(f"Cannot read the target's live sessions from {', '.join(run.options.metrics)}")
    abandoned: list[tuple[HttpSession, float]] = []
    tasks = TaskSet("churn")
    probes: list[asyncio.Task[None]] = []
    try:
        opened = []
        for i in range(o.sessions):  # spread over the run
            if run.over:
                break
            await run.sleep_until(i * o.duration / o.sessions)
            run.budget -= 1
            opened.append(tasks.spawn(abandon_one(run, i, abandoned), "open"))
            if progress:
                progress()
        if opened:
            await asyncio.wait(opened, timeout=o.timeout + 5)
        reap_by = o.idle_timeout + o.scan_interval + REAP_SLACK
        probes = [tasks.spawn(probe(run, client, last + reap_by, i), "probe")
                  for i, (client, last) in enumerate(abandoned)]
        last_due = max((last + reap_by for _, last in abandoned), default=run.now())
        back_at = await follow_metrics(run, baseline, last_due) if baseline is not None else None
        if probes:
            await asyncio.wait(probes, timeout=max(0.0, last_due - run.now()) + o.timeout + 5)
    finally:
        await tasks.close()
    rec.count("sessions_abandoned", len(probes))
    extra: dict[str, Any] = {"idle_timeout": o.idle_timeout, "scan_interval": o.scan_interval,
                             "reap_deadline_seconds": o.idle_timeout + o.scan_interval + REAP_SLACK}
    if baseline is not None:
        extra |= {"live_sessions_before": baseline, "live_sessions_back_at": back_at}
    return extra


async def follow_metrics(run: Run, baseline: int, until: float) -> float | None:
    """Sample the target's live sessions into the timeline until `until`; when they returned to
    `baseline` (run time), or None (then a `metrics_leak` violation)."""
    back_at: float | None = None
    while True:
        live = await live_sessions(run)
        if live is not None:
            run.recorder.sessions_seen(run.now(), max(0, live - baseline))
            if live > baseline:
                back_at = None
            elif back_at is None:
                back_at = run.now()
        if run.now() >= until:
            break
        await asyncio.sleep(POLL)
    if back_at is None:
        run.recorder.violation(run.now(), "metrics_leak", f"{live if live is not None else '?'} sessions live on "
                               f"the target (from {baseline}) past every abandoned session's reap deadline")
    return back_at
