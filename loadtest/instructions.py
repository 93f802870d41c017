"""Instructions a request: Tether's gateway and node counted by callgrind, a meter that does not drift.

CPU time on a shared two-core machine moves by up to 2x within minutes, so an A/B
of wall-clock CPU cannot resolve a change of a few percent. callgrind (valgrind)
counts the instructions each process runs in user space: the same count, to
about 0.2 %, for the same code under the same load, whatever else the machine
does. It does not count the kernel's work (the socket calls), which the
harness's CPU column (`--compare`) does; and under valgrind the processes run
some 50 times slower, so read instructions, never the times or rates.

    python -m loadtest.instructions --requests 2000 --sessions 16 --json -

This starts the light HTTP upstream and `tether up --nodes 1` with the gateway
and its node under callgrind, counting nothing; runs `--warmup` requests of the
`tools` scenario; counts `--requests` more; and reports the instructions a
request of each process. Run it on two trees (PYTHONPATH) to compare them.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from loadtest.cli import run_scenario
from loadtest.recipes import START_TIMEOUT, light_http, stop_all
from loadtest.run import Options

ENDPOINT = re.compile(r"MCP endpoint +(http://\S+)")
NODE_PID = re.compile(r"node-1 +http://\S+ +pid (\d+)")
DUMP_TIMEOUT = 60.0


def _callgrind(*args: str) -> None:
    done = subprocess.run(["callgrind_control", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"callgrind_control {' '.join(args)} failed: {(done.stdout + done.stderr)[-500:]}")


def _wait_for(log: Path, process: subprocess.Popen[bytes]) -> tuple[str, int]:
    """The MCP endpoint and the node's pid, from `tether up`'s banner."""
    deadline = time.monotonic() + START_TIMEOUT * 4  # everything starts slower under valgrind
    while time.monotonic() < deadline and process.poll() is None:
        text = log.read_text(errors="replace")
        endpoint, node = ENDPOINT.search(text), NODE_PID.search(text)
        if endpoint and node:
            return endpoint.group(1), int(node.group(1))
        time.sleep(0.1)  # a process we cannot await: read its log until it says it is up
    raise RuntimeError(f"tether up did not start under valgrind: {log.read_text(errors='replace')[-1500:]}")


def _counted(out: Path, pid: int) -> int:
    """The instructions of every dump `pid` wrote (each dump starts its count afresh)."""
    total = 0
    for dump in out.glob(f"cg.{pid}.*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total


def _dumped(out: Path, pid: int) -> None:
    deadline = time.monotonic() + DUMP_TIMEOUT
    while time.monotonic() < deadline:
        if any(out.glob(f"cg.{pid}.*")):
            return
        time.sleep(0.1)  # callgrind writes the dump itself; its file appearing is the only signal
    raise RuntimeError(f"callgrind wrote no dump for pid {pid} within {DUMP_TIMEOUT:g}s")


def measure(requests: int, sessions: int, warmup: int, workdir: Path) -> dict[str, Any]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        upstream, url = light_http(workdir)
        started.append(upstream)
        out = workdir / "callgrind"
        out.mkdir()
        log = workdir / "tether.log"
        tether_bin = str(Path(sys.executable).with_name("tether"))
        with log.open("wb") as sink:
            gateway = subprocess.Popen(
                ["valgrind", "--tool=callgrind", "--trace-children=yes", "--instr-atstart=no",
                 f"--callgrind-out-file={out}/cg.%p", sys.executable, tether_bin, "up", "--nodes", "1",
                 "--port", "0", "--upstream-url", url, "--max-sessions", "50000", "--log-level", "warning"],
                stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir)
        started.append(gateway)
        target, node = _wait_for(log, gateway)
        pids = {"gateway": gateway.pid, "node": node}

        def load(count: int) -> dict[str, Any]:
            options = Options(target=target, sessions=sessions, duration=3600.0, max_requests=count, timeout=120.0)
            return asyncio.run(run_scenario("tools", options))

        load(warmup)
        for pid in pids.values():
            _callgrind("-i", "on", str(pid))
        result = load(requests)
        for pid in pids.values():
            _callgrind("-i", "off", str(pid))
            _callgrind("-d", str(pid))
        for pid in pids.values():
            _dumped(out, pid)
        counted = {name: _counted(out, pid) for name, pid in pids.items()}
    finally:
        stop_all(started)
    answered = result["requests"]
    return {"requests": answered, "errors": result["errors"], "violations": result["violations"],
            "sessions": sessions,
            "instructions_per_request": {**{k: round(v / answered) for k, v in counted.items()},
                                         "total": round(sum(counted.values()) / answered)}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests counted")
    parser.add_argument("--sessions", type=int, default=16, help="concurrent sessions")
    parser.add_argument("--warmup", type=int, default=300, help="requests run first, not counted")
    parser.add_argument("--json", metavar="FILE", help="write the result here ('-': standard output)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.sessions < 1 or args.warmup < 1:
        parser.error("--requests, --sessions and --warmup must be at least 1")
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        parser.error(f"{' and '.join(missing)} not found: install valgrind (Debian: apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="tether-instructions-") as workdir:
        result = measure(args.requests, args.sessions, args.warmup, Path(workdir))
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    if args.json == "-":
        print(text)
    else:
        if args.json:
            Path(args.json).write_text(text + "\n")
        per = result["instructions_per_request"]
        print(f"{result['requests']} requests, {result['errors']} errors, {result['violations']} violations; "
              f"instructions a request: gateway {per['gateway']:,}, node {per['node']:,}, total {per['total']:,}")
    return 0 if result["errors"] == 0 and result["violations"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
