"""The load harness: every scenario runs clean against a local Tether, and each oracle catches the
fault it is for (a balancer without affinity, a target that never reaps, a stream that loses events)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from loadtest import report
from loadtest.cli import run_scenario
from loadtest.run import Options
from tests.oracles import faulty_stream, light_http_servers, non_sticky, one_session, serving
from tests.support import TetherUp

pytestmark = pytest.mark.e2e
LIGHT = f"{sys.executable} -m tether_demo.light"
IDLE, SCAN = 1.5, 0.25


@pytest.fixture(scope="module")
def light_tether(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TetherUp]:
    """`tether up` over the light upstream, with a short idle timeout for churn."""
    # Keep-alives well inside the idle timeout: an open stream keeps its session alive.
    up = TetherUp(["--upstream-command", LIGHT, "--idle-timeout", str(IDLE), "--scan-interval", str(SCAN),
                   "--keepalive-interval", "0.3"],
                  tmp_path_factory.mktemp("light") / "up.log").start()
    yield up
    assert up.stop() == 0, up.log()[-3000:]


def clean(result: dict) -> None:
    assert (result["errors"], result["violations"]) == (0, 0), (result["errors_by_kind"], result["violation_examples"])


@pytest.mark.parametrize("rate", [0.0, 150.0], ids=["closed-loop", "open-loop"])
async def test_tools_checks_every_answer_and_finds_none_wrong(light_tether: TetherUp, rate: float) -> None:
    result = await run_scenario("tools", Options(light_tether.mcp_url, sessions=4, duration=2, rate=rate))
    clean(result)
    assert result["mode"] == ("open" if rate else "closed")
    assert result["requests"] > 50 and result["sessions_peak"] == 4
    if rate:  # requests fall due at the rate, whatever the target does
        assert result["requests"] == int(rate * 2)
    lat = result["latency_seconds"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    assert sum(row["requests"] for row in result["timeline"]) == result["requests"]


async def test_tools_stops_at_its_request_budget(light_tether: TetherUp) -> None:
    result = await run_scenario("tools", Options(light_tether.mcp_url, sessions=3, duration=60, max_requests=45))
    clean(result)
    assert result["requests"] == 45 and result["seconds"] < 60


async def test_websocket_runs_the_tools_checks_over_websocket(light_tether: TetherUp) -> None:
    clean(result := await run_scenario("websocket", Options(light_tether.mcp_url, sessions=3, duration=2)))
    assert result["requests"] > 50


@pytest.mark.parametrize("scenario", ["idle-streams", "resume"])
async def test_stream_scenarios_receive_every_event_once(light_tether: TetherUp, scenario: str) -> None:
    options = Options(light_tether.mcp_url, sessions=3, duration=2.5, tick_interval=0.05)
    clean(result := await run_scenario(scenario, options))
    expected = 3 * int(2.5 / 0.05)
    assert result["counters"]["events_expected"] == expected
    assert result["counters"]["events_received"] == expected  # none lost, none twice
    if scenario == "resume":
        assert result["counters"]["streams_cut"] >= 3 and result["counters"]["streams_resumed"] >= 3


async def test_churn_finds_every_abandoned_session_reaped(light_tether: TetherUp) -> None:
    metrics = tuple(f"{url}/metrics" for url, _ in light_tether.nodes.values())
    options = Options(light_tether.mcp_url, sessions=6, duration=1, idle_timeout=IDLE, scan_interval=SCAN,
                      metrics=metrics)
    clean(result := await run_scenario("churn", options))
    assert result["counters"]["sessions_abandoned"] == 6 == result["counters"]["sessions_reaped"]
    assert result["sessions_peak"] == 6  # seen live on the target's own metrics, then gone
    assert result["extra"]["live_sessions_back_at"] is not None


async def test_scale_reports_each_ring_event_and_no_misroute() -> None:
    result = await run_scenario("scale", Options("", sessions=16, duration=10))
    assert result["violations"] == 0, result["violation_examples"]
    events = {e["event"]: e for e in result["extra"]["events"]}
    assert list(events) == ["node added", "node drained", "node killed"]
    assert events["node added"]["sessions_broken"] == 0  # joining moves no live session
    for event in ("node drained", "node killed"):  # their sessions end, and their clients are told 404
        assert events[event]["sessions_broken"] > 0
        assert events[event]["first_404_after_seconds"] is not None
    assert all(e["throughput_before_rps"] > 0 for e in events.values())


# --- the oracles catch what they are for --------------------------------------------------------

async def test_tools_reports_a_target_without_affinity_as_misrouting(http) -> None:
    with light_http_servers(2) as upstreams:
        async with serving(non_sticky(upstreams, http)) as url:
            result = await run_scenario("tools", Options(url, sessions=2, duration=1, max_requests=40))
    assert result["violations_by_kind"]["misrouted"] >= 10
    assert result["violation_examples"][0]["kind"] == "misrouted"


async def test_churn_reports_a_target_that_never_reaps(tmp_path: Path) -> None:
    keeper = TetherUp(["--upstream-command", LIGHT, "--idle-timeout", "3600"], tmp_path / "up.log").start()
    try:
        options = Options(keeper.mcp_url, sessions=4, duration=0.5, idle_timeout=0.5, scan_interval=0.1)
        result = await run_scenario("churn", options)
    finally:
        assert keeper.stop() == 0
    assert result["violations_by_kind"] == {"session_leaked": 4}


async def test_idle_streams_ramps_its_sessions_in(light_tether: TetherUp) -> None:
    result = await run_scenario("idle-streams", Options(light_tether.mcp_url, sessions=4, duration=0.5,
                                                        tick_interval=0.1, ramp=2.0))
    assert result["errors"] == 0 and result["violations"] == 0, result["violation_examples"]
    assert result["counters"]["events_received"] == 4 * 5
    assert result["extra"]["ramp"] == 2.0
    assert result["seconds"] >= 1.5 + 0.5  # the last session starts 3/4 into the ramp, then runs its duration
    assert "idle" not in result["extra"]  # events were due: not idle


async def test_idle_streams_with_an_interval_past_the_duration_holds_silent_streams(light_tether: TetherUp) -> None:
    result = await run_scenario("idle-streams", Options(light_tether.mcp_url, sessions=3, duration=1.0,
                                                        tick_interval=1000.0))
    assert result["errors"] == 0 and result["violations"] == 0, result["violation_examples"]
    assert result["counters"].get("events_received", 0) == 0 and result["counters"]["events_expected"] == 0
    assert result["sessions_peak"] == 3
    assert 1.0 <= result["seconds"] < 1000  # held for the duration, not until an event 1,000 s away


async def test_idle_streams_counts_the_keepalives_its_silent_streams_receive(light_tether: TetherUp) -> None:
    result = await run_scenario("idle-streams", Options(light_tether.mcp_url, sessions=3, duration=3.0,
                                                        tick_interval=1000.0))
    clean(result)
    idle = result["extra"]["idle"]
    assert idle["from"] >= 1.5  # the second half of the held time (its arithmetic: test_loadtest_core)
    assert idle["streams"] == 3
    # Each stream is pinged after each 0.3 s of silence: 10 a second for the three, give or take the
    # edge's step and where the window cuts the pings.
    assert 6 <= idle["keepalives_per_second"] <= 15, idle
    assert "cpu_percent" not in idle  # no --compare: the target's processes are not known
    assert "keep-alives/s" in report.table(result)


async def test_sessions_counts_each_new_session_once(light_tether: TetherUp) -> None:
    result = await run_scenario("sessions", Options(light_tether.mcp_url, sessions=4, duration=1))
    assert result["errors"] == 0 and result["violations"] == 0, result["violation_examples"]
    assert result["requests"] == result["extra"]["sessions_opened"] >= 8  # each one a new session


async def test_sessions_reports_a_target_that_hands_out_one_session_twice(http) -> None:
    with light_http_servers(1) as (upstream,):
        async with serving(one_session(upstream, http)) as url:
            result = await run_scenario("sessions", Options(url, sessions=2, duration=0.5))
    assert result["violations_by_kind"]["session_reused"] == result["violations"] >= 1
    assert result["extra"]["sessions_opened"] == 1


async def test_idle_streams_reports_a_stream_that_loses_events(http) -> None:
    with light_http_servers(1) as (upstream,):
        async with serving(faulty_stream(upstream, http, drop_every=4)) as url:
            result = await run_scenario("idle-streams", Options(url, sessions=2, duration=1, tick_interval=0.05))
    assert result["violations_by_kind"]["event_lost"] == 2 * 5  # 20 events each, every 4th lost
    assert "never arrived" in result["violation_examples"][0]["detail"]


async def test_idle_streams_reports_a_stream_that_repeats_events(http) -> None:
    with light_http_servers(1) as (upstream,):
        async with serving(faulty_stream(upstream, http, repeat_every=5)) as url:
            result = await run_scenario("idle-streams", Options(url, sessions=2, duration=1, tick_interval=0.05))
    assert result["violations_by_kind"] == {"event_duplicated": 2 * 4}  # 20 events each, every 5th twice


async def test_resume_reports_a_target_that_cannot_resume(http) -> None:
    # The light HTTP server gives no event ids: a cut stream comes back without what it missed.
    with light_http_servers(1) as (url,):
        result = await run_scenario("resume", Options(url, sessions=2, duration=2, tick_interval=0.05))
    assert result["violations_by_kind"].get("event_lost", 0) > 0
    assert result["counters"]["streams_resumed"] >= 2


async def test_resume_reports_events_a_stream_lost_that_resumption_cannot_bring_back(light_tether, http) -> None:
    # Tether's events carry ids; a hop that drops some hands the client later ids, so a resume
    # with Last-Event-ID starts past what was dropped: those events are gone for good.
    async with serving(faulty_stream(light_tether.mcp_url, http, drop_every=5)) as url:
        result = await run_scenario("resume", Options(url, sessions=2, duration=2, tick_interval=0.05))
    assert result["errors"] == 0, result["errors_by_kind"]
    assert result["violations_by_kind"].get("event_lost", 0) >= 4
    assert result["counters"]["streams_resumed"] >= 2
    assert "event_duplicated" not in result["violations_by_kind"]


# --- the command line ---------------------------------------------------------------------------

async def test_the_command_writes_json_and_html_and_fails_on_violations(light_tether: TetherUp, tmp_path: Path,
                                                                         http) -> None:
    out_json, out_html = tmp_path / "r.json", tmp_path / "r.html"
    ok = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "tether", "loadtest", "run", "tools", "--target", light_tether.mcp_url,
        "--sessions", "2", "--duration", "1", "--json", str(out_json), "--html", str(out_html)],
        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "violations  0" in ok.stdout and "throughput" in ok.stdout
    result = orjson.loads(out_json.read_bytes())
    assert {"requests", "errors", "violations", "latency_seconds", "timeline"} <= set(result)
    page = out_html.read_text()
    assert page.count("<svg") == 5 and "Latency over time" in page and "<script" not in page

    with light_http_servers(2) as upstreams:
        async with serving(non_sticky(upstreams, http)) as url:
            bad = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "loadtest", "run", "tools", "--target", url, "--sessions", "2",
                "--duration", "1", "--no-progress", stdout=asyncio.subprocess.PIPE)
            out, _ = await bad.communicate()
    assert bad.returncode == 1 and b"misrouted" in out

    usage = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "loadtest", "run", "tools"],
                                    capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "needs --target URL" in usage.stderr


async def test_compare_interleaves_recipes_and_measures_the_proxy_alone() -> None:
    from loadtest.compare import compare

    results, rows = await compare("tools", Options("", sessions=2, duration=1), ["direct", "tether"], "http", 2)
    # Interleaved, and each round starts with the next target, so neither always goes first.
    assert [(r["target"], r["repetition"]) for r in results] == [("direct", 0), ("tether", 0), ("tether", 1),
                                                                ("direct", 1)]
    assert all(r["violations"] == 0 and r["errors"] == 0 for r in results)
    direct, tether = rows
    assert direct["ratios"] == [1.0, 1.0] and len(tether["ratios"]) == 2
    assert direct["cpu_ms_per_request"] is None  # no proxy: nothing to measure
    assert tether["cpu_ms_per_request"] > 0 and tether["throughput_rps"] > 0
    assert tether["reference"] == "tether" and tether["vs_reference"]["cpu"] == 1.0  # the only one measured
    with pytest.raises(ValueError, match="supergateway cannot front a http upstream"):
        await compare("tools", Options(""), ["supergateway"], "http", 1)


async def test_compare_reads_the_cpu_of_idle_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    from loadtest.compare import compare

    monkeypatch.setenv("TETHER_KEEPALIVE_INTERVAL", "0.25")  # `tether up` reads it: four pings a second a stream
    results, rows = await compare("idle-streams", Options("", sessions=3, duration=3.0, tick_interval=1000.0),
                                  ["tether"], "http", 1)
    idle = results[0]["extra"]["idle"]
    assert idle["streams"] == 3 and idle["cpu_seconds"] >= 0 and idle["cpu_percent"] >= 0
    assert 7 <= idle["keepalives_per_second"] <= 18, idle
    assert rows[0]["idle_cpu_percent"] == idle["cpu_percent"]
    assert rows[0]["keepalives_per_second"] == idle["keepalives_per_second"]
    assert "idle CPU" in report.compare_table(rows)


def test_instructions_counts_each_process_of_tether_under_callgrind(tmp_path: Path) -> None:
    out = tmp_path / "instructions.json"
    done = subprocess.run([sys.executable, "-m", "loadtest.instructions", "--requests", "60", "--warmup", "20",
                           "--sessions", "4", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    result = orjson.loads(out.read_bytes())
    per = result["instructions_per_request"]
    assert (result["requests"], result["errors"], result["violations"]) == (60, 0, 0)
    # Python answering a request runs tens of thousands of instructions at the least, in each process.
    assert per["gateway"] > 20_000 and per["node"] > 20_000
    assert abs(per["total"] - per["gateway"] - per["node"]) <= 1  # each rounded on its own
    assert "gateway" in done.stdout and "node" in done.stdout


def test_instructions_refuses_a_bad_count() -> None:
    done = subprocess.run([sys.executable, "-m", "loadtest.instructions", "--requests", "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "must be at least 1" in done.stderr
