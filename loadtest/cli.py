"""`tether loadtest` / `python -m loadtest`: run a scenario against an MCP endpoint, and report.

    python -m loadtest run tools --target http://127.0.0.1:8080/mcp --sessions 16 --duration 10
    python -m loadtest run tools --compare direct,nginx,tether --upstream http --json out.json
    python -m loadtest run scale --duration 30          # starts its own local topology

Every run stops by itself (--duration, --max-requests). The exit status is 1 when the
scenario found violations, 2 on bad arguments. Keep targets on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from loadtest import churn, report, sessions, streams, tools
from loadtest.run import Options, Run

Scenario = Callable[..., Awaitable[dict[str, Any]]]
SCENARIOS: dict[str, Scenario] = {
    "tools": tools.tools,
    "websocket": tools.websocket,
    "idle-streams": streams.idle_streams,
    "resume": streams.resume,
    "churn": churn.churn,
    "sessions": sessions.sessions,
}
LOCAL_ONLY = ("scale",)  # scenarios that start their own target


async def run_scenario(name: str, options: Options, progress: bool = False,
                       cpu: Callable[[], float] | None = None) -> dict[str, Any]:
    """Run one scenario to its end; the result as the JSON report holds it. `cpu` reads the CPU
    seconds the target has used so far, for a scenario that measures it over part of its run."""
    if name == "scale":
        from loadtest.scale import scale

        return await scale(options, progress)
    scenario = SCENARIOS[name]
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as http:
        run = Run(options, http, cpu)
        with Progress(run, enabled=progress) as bar:
            extra = await scenario(run, bar.tick)
        seconds = run.now()
    return result_of(name, options, run, seconds, extra)


def result_of(name: str, options: Options, run: Run, seconds: float, extra: dict[str, Any]) -> dict[str, Any]:
    paced = options.rate and name in ("tools", "websocket", "scale", "sessions")  # the others ignore --rate
    return {"scenario": name, "target": options.target, "mode": "open" if paced else "closed",
            "rate": options.rate, "sessions": options.sessions, "duration": options.duration,
            "seconds": round(seconds, 3), **run.recorder.summary(seconds), "extra": extra}


class Progress:
    """A live line on stderr (tqdm): time elapsed, requests, errors, violations, rate."""

    def __init__(self, run: Run, enabled: bool) -> None:
        self.run = run
        self.bar: Any = None
        self.last = 0.0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=round(run.options.duration), unit="s", file=sys.stderr, leave=False,
                            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s {postfix}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def tick(self) -> None:
        if self.bar is None:
            return
        now = time.monotonic()
        if now - self.last < 0.25:
            return
        self.last = now
        rec = self.run.recorder
        elapsed = self.run.now()
        self.bar.n = min(elapsed, self.run.options.duration)
        self.bar.set_postfix_str(f"req {rec.requests} err {sum(rec.errors.values())} "
                                 f"viol {sum(rec.violations.values())} live {rec.sessions_active} "
                                 f"{rec.requests / max(elapsed, 1e-9):.0f}/s", refresh=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tether loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a scenario", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("scenario", choices=[*SCENARIOS, *LOCAL_ONLY])
    run.add_argument("--target", help="MCP endpoint URL, e.g. http://127.0.0.1:8080/mcp")
    run.add_argument("--sessions", type=int, default=16,
                     help="concurrent sessions (churn: sessions opened; sessions: workers opening them)")
    run.add_argument("--duration", type=float, default=10.0, help="seconds; the run stops by itself")
    run.add_argument("--rate", type=float, default=0.0, help="open loop: requests per second (0: closed loop)")
    run.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many requests")
    run.add_argument("--timeout", type=float, default=30.0, help="seconds one request may take")
    run.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                     help="send this header on every request (repeatable)")
    run.add_argument("--token", help="send Authorization: Bearer TOKEN (also TETHER_LOADTEST_TOKEN)")
    run.add_argument("--tick-interval", type=float, default=1.0,
                     help="idle-streams, resume: seconds per event; past --duration, idle-streams sends none")
    run.add_argument("--ramp", type=float, default=0.0,
                     help="idle-streams, resume: seconds over which sessions start, evenly (0: all at once)")
    run.add_argument("--idle-timeout", type=float, default=0.0, help="churn: the target's idle timeout")
    run.add_argument("--scan-interval", type=float, default=0.0, help="churn: the target's reaper interval")
    run.add_argument("--metrics", action="append", default=[], metavar="URL",
                     help="churn: a /metrics URL counting the target's live sessions (repeatable)")
    run.add_argument("--seed", type=int, default=0, help="seed for the random choices (resume cut points)")
    run.add_argument("--json", metavar="FILE", help="write the JSON result here ('-': standard output)")
    run.add_argument("--html", metavar="FILE", help="write a self-contained HTML report here")
    run.add_argument("--no-progress", action="store_true", help="no live progress line")
    run.add_argument("--compare", metavar="RECIPES",
                     help="run against each recipe in turn, interleaved: " + ", ".join(_recipe_names()))
    run.add_argument("--upstream", choices=("stdio", "http"), default="http",
                     help="--compare: the light upstream over stdio or Streamable HTTP")
    run.add_argument("--repetitions", type=int, default=3, help="--compare: rounds over all recipes")
    return parser


def _recipe_names() -> list[str]:
    from loadtest.recipes import RECIPES

    return list(RECIPES)


def options_from(args: argparse.Namespace, target: str) -> Options:
    import os

    headers = {}
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"--header {header!r}: expected 'NAME: VALUE'")
        headers[name.strip()] = value.strip()
    if token := args.token or os.environ.get("TETHER_LOADTEST_TOKEN"):
        headers["Authorization"] = f"Bearer {token}"
    return Options(target=target, sessions=args.sessions, duration=args.duration, rate=args.rate,
                   max_requests=args.max_requests, headers=headers, timeout=args.timeout,
                   tick_interval=args.tick_interval, ramp=args.ramp, idle_timeout=args.idle_timeout,
                   scan_interval=args.scan_interval, metrics=tuple(args.metrics), seed=args.seed)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.compare:
            from loadtest.compare import compare

            options = options_from(args, "")
            live = not args.no_progress and sys.stderr.isatty()
            results, rows = asyncio.run(compare(args.scenario, options, args.compare.split(","), args.upstream,
                                                args.repetitions, progress=live))
            print(report.compare_table(rows))
            _write(args, {"scenario": args.scenario, "upstream": args.upstream, "comparison": rows, "runs": results},
                   report.html_page(results, rows))
            return 1 if any(r["violations"] for r in results) else 0
        if not args.target and args.scenario not in LOCAL_ONLY:
            raise ValueError(f"{args.scenario} needs --target URL (or --compare RECIPES)")
        options = options_from(args, args.target or "")
        live = not args.no_progress and sys.stderr.isatty()
        result = asyncio.run(run_scenario(args.scenario, options, progress=live))
    except ValueError as exc:
        print(f"tether loadtest: {exc}", file=sys.stderr)
        return 2
    print(report.table(result))
    _write(args, result, report.html_page([result]))
    return 1 if result["violations"] else 0


def _write(args: argparse.Namespace, data: dict[str, Any], page: str) -> None:
    if args.json:
        text = orjson.dumps(data, option=orjson.OPT_INDENT_2).decode()
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    if args.html:
        Path(args.html).write_text(page)
