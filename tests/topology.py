"""A distributed Tether as separate real processes: Redis, gateways and nodes on loopback."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.support import RedisServer, read_until, wait_until

LIGHT = f"{sys.executable} -m tether_demo.light"
SECRET = "topology-test-secret"


@dataclass
class Proc:
    """One tether process, the URL it printed, and its log."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, sig: signal.Signals) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.stdout is not None and self.process.returncode is not None:
                self.process.stdout.close()

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                events.append(orjson.loads(line))
        return events


def _spawn(name: str, args: list[str], log_path: Path, marker: bytes, settings: dict[str, str],
           timeout: float = 30.0) -> Proc:
    env = {**os.environ, "TETHER_INTERNAL_SECRET": SECRET,
           **{f"TETHER_{key.upper()}": value for key, value in settings.items()}}
    with log_path.open("ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "tether", *args], stdout=subprocess.PIPE,
                                   stderr=log, stdin=subprocess.DEVNULL, env=env)
    out = read_until(process, marker, timeout)
    if out is None:
        process.kill()
        process.wait()
        raise RuntimeError(f"{name} did not start\n{log_path.read_text()[-2000:]}")
    url = re.search(rb"(http://\S+)", out.split(marker, 1)[1])
    assert url is not None
    return Proc(name, process, url.group(1).decode().removesuffix("/mcp"), log_path)


@dataclass
class Topology:
    redis: RedisServer
    log_dir: Path
    settings: dict[str, str] = field(default_factory=dict)  # any setting, given to every process
    gateways: list[Proc] = field(default_factory=list)
    nodes: dict[str, Proc] = field(default_factory=dict)
    stopped: list[Proc] = field(default_factory=list)

    def common(self) -> list[str]:
        return ["--redis", self.redis.url, "--host", "127.0.0.1", "--port", "0"]

    def add_gateway(self) -> Proc:
        name = f"gateway-{len(self.gateways) + 1}"
        proc = _spawn(name, ["gateway", *self.common()], self.log_dir / f"{name}.log", b"tether gateway:",
                      self.settings)
        self.gateways.append(proc)
        return proc

    def add_node(self, node_id: str) -> Proc:
        upstream = self.settings.get("upstream_command", LIGHT)
        args = ["node", *self.common(), "--node-id", node_id, "--upstream-command", upstream]
        proc = _spawn(node_id, args, self.log_dir / f"{node_id}.log", b"tether node:", self.settings)
        self.nodes[node_id] = proc
        return proc

    def mcp_url(self, gateway: int = 0) -> str:
        return self.gateways[gateway].url + "/mcp"

    async def wait_ring(self, http: aiohttp.ClientSession, members: set[str], timeout: float = 15) -> None:
        """Wait until every gateway's ring holds exactly `members`."""

        async def agreed() -> bool:
            for gateway in self.gateways:
                async with http.get(gateway.url + "/metrics") as resp:
                    text = await resp.text()
                line = next((ln for ln in text.splitlines() if ln.startswith("tether_ring_members ")), "")
                if not line or int(float(line.split()[1])) != len(members):
                    return False
            return True

        await wait_until(agreed, timeout, f"every gateway's ring to hold {sorted(members)}")

    def remove(self, node_id: str) -> Proc:
        proc = self.nodes.pop(node_id)
        self.stopped.append(proc)
        return proc

    def stop(self, timeout: float = 15.0) -> list[str]:
        """Ctrl-C every process; returns the names of any that did not exit in time (then killed)."""
        for proc in [*self.nodes.values(), *self.gateways]:
            proc.signal(signal.SIGINT)
        hung = []
        for proc in [*self.nodes.values(), *self.gateways, *self.stopped]:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                hung.append(proc.name)
                proc.process.kill()
                proc.wait(10)
        return hung

    def ownership_violations(self) -> list[str]:
        """The ownership oracle: per session, activations never overlap and epochs only grow."""
        intervals: dict[str, list[tuple[float, float, int]]] = {}
        for proc in [*self.nodes.values(), *self.stopped]:
            started: dict[tuple[str, int], float] = {}
            for ev in proc.log_events():
                if ev.get("event") == "session.started":
                    started[(ev["sid"], ev["epoch"])] = ev["ts"]
                elif ev.get("event") == "session.ended" and (ev["sid"], ev["epoch"]) in started:
                    begin = started.pop((ev["sid"], ev["epoch"]))
                    intervals.setdefault(ev["sid"], []).append((begin, ev["ts"], ev["epoch"]))
            for (sid, epoch), begin in started.items():  # still live (or its node was killed)
                intervals.setdefault(sid, []).append((begin, float("inf"), epoch))
        problems = []
        for sid, spans in intervals.items():
            spans.sort()
            for (b1, e1, ep1), (b2, _, ep2) in zip(spans, spans[1:], strict=False):
                if b2 < e1:
                    problems.append(f"{sid}: activations overlap ({b1}-{e1} and from {b2})")
                if ep2 <= ep1:
                    problems.append(f"{sid}: epoch went from {ep1} to {ep2}")
        return problems
