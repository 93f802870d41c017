"""The load harness's bookkeeping and its counter oracle, without a network: fake clients answer."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest

from loadtest.client import Failed
from loadtest.recorder import Recorder
from loadtest.run import Options, Run
from loadtest.tools import BASE, CounterSession


def test_recorder_counts_requests_errors_and_wrong_answers_per_second() -> None:
    rec = Recorder()
    rec.session_opened(0.1)
    for i in range(100):
        rec.ok(0.2 + i / 100, (i + 1) / 1000)  # 1 ms .. 100 ms
    rec.error(1.5, "timeout")
    rec.wrong_answer(1.6, "misrouted", "session 0: expected 5, got 7")
    summary = rec.summary(seconds=2.0)
    assert (summary["requests"], summary["errors"], summary["violations"]) == (102, 1, 1)
    assert summary["throughput_rps"] == 50.0 and summary["answered_rps"] == 50.5
    lat = summary["latency_seconds"]
    assert lat["p50"] == pytest.approx(0.050, rel=0.01) and lat["p99"] == pytest.approx(0.099, rel=0.01)
    assert lat["max"] == pytest.approx(0.100, rel=0.01)
    assert [row["requests"] for row in summary["timeline"]] == [80, 22]
    assert [row["sessions"] for row in summary["timeline"]] == [1, 1]
    assert summary["violation_examples"] == [{"at": 1.6, "kind": "misrouted",
                                              "detail": "session 0: expected 5, got 7"}]


def test_an_empty_run_has_no_percentiles_rather_than_zeros() -> None:
    summary = Recorder().summary(seconds=1.0)
    assert summary["requests"] == 0 and math.isnan(summary["latency_seconds"]["p99"])


class FakeClient:
    """Answers `call` from a script: an int is the counter it reads, an exception is raised."""

    def __init__(self, script: Iterator[Any]) -> None:
        self.script = script
        self.calls: list[dict[str, Any]] = []

    async def initialize(self) -> None:
        pass

    async def call(self, name: str, arguments: dict[str, Any]) -> str:
        self.calls.append(arguments)
        answer = next(self.script)
        if isinstance(answer, Exception):
            raise answer
        return str(answer)

    async def close(self) -> None:
        pass


class Scripted(CounterSession):
    def __init__(self, run: Run, index: int, *scripts: list[Any]) -> None:
        super().__init__(run, index, websocket=False)
        self.scripts = iter(scripts)
        self.clients: list[FakeClient] = []

    def _new_client(self) -> Any:
        self.clients.append(FakeClient(iter(next(self.scripts))))
        return self.clients[-1]


async def play(index: int, *scripts: list[Any]) -> tuple[Recorder, Scripted]:
    run = Run(Options("http://unused"), None)  # type: ignore[arg-type]
    session = Scripted(run, index, *scripts)
    for _ in range(sum(len(s) for s in scripts)):
        await session.step(run.now())
    return run.recorder, session


async def test_a_session_reads_its_own_base_then_counts_by_one() -> None:
    base = 3 * BASE + 1
    rec, session = await play(3, [base, base + 1, base + 2])
    assert (rec.requests, sum(rec.violations.values())) == (3, 0)
    assert [c["by"] for c in session.clients[0].calls] == [base, 1, 1]


async def test_another_sessions_counter_is_caught_even_when_it_is_one_further() -> None:
    # Sessions 1 and 2 in step: a swapped answer would read "the next number" without the bases.
    rec, _ = await play(1, [BASE + 1, 2 * BASE + 2, BASE + 2])
    assert rec.violations == {"misrouted": 1}
    assert "expected 1000000002, got 2000000002" in rec.examples[0]["detail"]


async def test_each_failed_call_may_have_counted() -> None:
    timeout = Failed("timeout")
    rec, _ = await play(0, [1, timeout, timeout, 4, 5])  # both timed-out calls counted after all
    assert (rec.errors["timeout"], sum(rec.violations.values())) == (2, 0)
    rec, _ = await play(0, [1, timeout, 2, 3])  # or did not
    assert sum(rec.violations.values()) == 0
    rec, _ = await play(0, [1, timeout, 5])  # but never three for one failure
    assert rec.violations == {"misrouted": 1}


async def test_a_first_call_that_failed_may_have_added_its_base() -> None:
    base = 2 * BASE + 1
    rec, session = await play(2, [Failed("timeout"), 2 * base, 2 * base + 1])
    assert sum(rec.violations.values()) == 0
    assert [c["by"] for c in session.clients[0].calls] == [base, base, 1]


async def test_a_404_means_the_session_is_gone_and_a_new_one_starts() -> None:
    rec, session = await play(0, [1, 2, Failed("http_404")], [1, 2])
    assert rec.counters["sessions_lost"] == 1 and len(rec.losses) == 1
    assert len(session.clients) == 2 and sum(rec.violations.values()) == 0


@pytest.mark.parametrize(("field", "value"), [("ramp", -1.0), ("tick_interval", 0.0), ("sessions", 0)])
def test_options_refuse_a_value_out_of_range_by_name(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"Cannot use {field} "):
        Options("http://unused", **{field: value})  # type: ignore[arg-type]


def _run(target: str, repetition: int, rps: float, p99: float, cpu: float | None) -> dict[str, Any]:
    return {"target": target, "repetition": repetition, "throughput_rps": rps, "answered_rps": rps,
            "latency_seconds": {"p50": p99 / 2, "p99": p99}, "errors": 0, "violations": 0,
            "proxy": {"cpu_ms_per_request": cpu, "mb_per_session": None if cpu is None else 0.01}, "extra": {}}


def test_compare_reads_each_target_against_the_first_measured_proxy_in_the_same_repetition() -> None:
    """The machine's speed moves between repetitions; a ratio within one does not. `direct` has no
    proxy CPU, so nginx is the reference; each ratio is taken within a repetition, then the median."""
    from loadtest.compare import rows
    from loadtest.report import compare_table

    results = [
        _run("direct", 0, 1000, 0.010, None), _run("nginx", 0, 800, 0.020, 0.040), _run("tether", 0, 600, 0.030, 0.200),
        _run("direct", 1, 500, 0.020, None), _run("nginx", 1, 400, 0.040, 0.080), _run("tether", 1, 320, 0.050, 0.480),
        _run("direct", 2, 900, 0.012, None), _run("nginx", 2, 700, 0.025, 0.050), _run("tether", 2, 490, 0.040, 0.300),
    ]
    direct, nginx, tether = rows(results, ["direct", "nginx", "tether"], 3)
    assert {r["reference"] for r in (direct, nginx, tether)} == {"nginx"}
    assert nginx["vs_reference"] == {"throughput": 1.0, "p99": 1.0, "cpu": 1.0}
    # Per repetition: throughput 0.75, 0.8, 0.7; p99 1.5, 1.25, 1.6; CPU 5, 6, 6. Medians:
    assert tether["vs_reference"] == pytest.approx({"throughput": 0.75, "p99": 1.5, "cpu": 6.0})
    assert direct["vs_reference"]["cpu"] is None  # no proxy of its own
    table = compare_table([direct, nginx, tether])
    assert "vs nginx: req/s p99 CPU" in table.splitlines()[0]
    assert table.splitlines()[3].rstrip().endswith("0.75 1.50x 6.00x")


@pytest.mark.parametrize(("ramp", "duration", "window"), [
    (30.0, 150.0, (90.0, 149.0)),  # a minute after the last arrival, to a second before the first leaves
    (0.0, 3.0, (1.5, 2.7)),  # a short run keeps a tenth of its held time as the margin
    (10.0, 10.0, None),  # no moment when every stream is held
    (20.0, 10.0, None),
])
def test_idle_streams_measure_the_second_half_of_the_time_all_streams_are_held(
        ramp: float, duration: float, window: tuple[float, float] | None) -> None:
    from loadtest.streams import idle_window

    got = idle_window(Options("http://unused", duration=duration, ramp=ramp))
    assert got == (pytest.approx(window) if window else None)


def test_compare_counts_a_process_that_exits_at_its_last_reading() -> None:
    """Idle CPU is the difference of two readings: one must never be less than the one before."""
    import os

    from loadtest.compare import Usage
    from loadtest.recipes import Target

    pids = [os.getpid(), 2**22 + 1]  # this process, and one /proc does not have (as if it had exited)
    usage = Usage(Target([], lambda: pids))
    usage.cpu_start[2**22 + 1] = 5.0  # read at the start
    usage.cpu_last[2**22 + 1] = 7.0  # read again later, 2 s on, before it exited
    first = usage.cpu_used()
    assert first >= 2.0
    assert usage.cpu_used() >= first
