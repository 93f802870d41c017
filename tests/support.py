"""Helpers the tests share: a real `tether up` process, raw MCP requests, process checks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from loadtest.recipes import free_port

LATEST = "2025-11-25"
ACCEPT_BOTH = "application/json, text/event-stream"


def initialize_message(request_id: int = 1, version: str = LATEST) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "initialize",
            "params": {"protocolVersion": version, "capabilities": {},
                       "clientInfo": {"name": "tether-tests", "version": "0"}}}


def call_tool(request_id: int, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
            "params": {"name": name, "arguments": arguments or {}}}


def read_until(process: subprocess.Popen[bytes], marker: bytes, timeout: float) -> bytes | None:
    """Read a child's stdout until a whole line holding `marker` arrived; None if it ended or timed out."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout
    out = b""
    while marker not in out or not out.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 65536) if ready else b""
        if not chunk:
            return None
        out += chunk
    return out


@dataclass
class TetherUp:
    """A real `tether up` child process, its URL and its nodes, read from the banner it prints."""

    args: list[str]
    log_path: Path
    env: dict[str, str] | None = None  # the environment it starts with (default: ours)
    process: subprocess.Popen[bytes] | None = None
    base_url: str = ""
    nodes: dict[str, tuple[str, int]] = field(default_factory=dict)  # node id -> (url, pid)

    @property
    def mcp_url(self) -> str:
        return self.base_url + "/mcp"

    def start(self, timeout: float = 60.0) -> TetherUp:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tether", "up", "--port", "0", *self.args],
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=self.env)
        banner = self._read_banner(timeout)
        self.base_url = re.search(r"MCP endpoint\s+(\S+)/mcp", banner).group(1)  # type: ignore[union-attr]
        for node_id, url, pid in re.findall(r"(node-\d+)\s+(\S+)\s+pid (\d+)", banner):
            self.nodes[node_id] = (url, int(pid))
        return self

    def _read_banner(self, timeout: float) -> str:
        assert self.process is not None
        out = read_until(self.process, b"Press Ctrl-C", timeout)
        if out is None:
            self.stop()
            raise RuntimeError(f"tether up printed no banner\n{self.log_path.read_text()[-3000:]}")
        return out.decode()

    def stop(self, timeout: float = 60.0) -> int:
        """Ctrl-C, as a user would; returns the exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()

    def log(self) -> str:
        return self.log_path.read_text()


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout: float, what: str,
                     interval: float = 0.05) -> None:
    """Re-check `condition` until it holds or `timeout` passes.

    For states nothing signals (a process reaped by another process, a counter
    on a metrics page): a deadline, never a fixed sleep standing in for the event.
    """
    try:
        async with asyncio.timeout(timeout):
            while not await condition():
                await asyncio.sleep(interval)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


def process_exists(pid: int) -> bool:
    """True while `pid` exists at all, zombie included (a zombie is a process nobody reaped)."""
    return Path(f"/proc/{pid}").exists()


async def wait_process_gone(pid: int, timeout: float) -> None:
    """Wait until `pid` has exited and been reaped. Raises TimeoutError."""
    with contextlib.suppress(ProcessLookupError):
        fd = os.pidfd_open(pid)
        exited = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(fd, exited.set)
        try:
            async with asyncio.timeout(timeout):
                await exited.wait()
        finally:
            loop.remove_reader(fd)
            os.close(fd)

    async def reaped() -> bool:
        return not process_exists(pid)

    await wait_until(reaped, timeout, f"pid {pid} reaped")


async def node_metric(http: aiohttp.ClientSession, up: TetherUp, name: str, **labels: str) -> float:
    """Sum a metric over every node's /metrics page."""
    total = 0.0
    for url, _ in up.nodes.values():
        async with http.get(url + "/metrics") as resp:
            for line in (await resp.text()).splitlines():
                if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                    total += float(line.rsplit(" ", 1)[1])
    return total


class RawClient:
    """Plain HTTP against the MCP endpoint, for checking statuses and bodies exactly."""

    def __init__(self, session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> None:
        self.session = session
        self.url = url
        self.headers = headers or {}  # sent with every request (credentials, say)

    async def post(self, body: Any, *, sid: str | None = None, accept: str = ACCEPT_BOTH,
                   content_type: str = "application/json", headers: dict[str, str] | None = None,
                   raw: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        h = {**self.headers, "Accept": accept, "Content-Type": content_type}
        if sid:
            h["Mcp-Session-Id"] = sid
        h.update(headers or {})
        data = raw if raw is not None else orjson.dumps(body)
        async with self.session.post(self.url, data=data, headers=h) as resp:
            return resp.status, dict(resp.headers), await resp.read()

    async def initialize(self, accept: str = "application/json") -> str:
        status, headers, body = await self.post(initialize_message(), accept=accept)
        assert status == 200, (status, body)
        sid = headers["Mcp-Session-Id"]
        status, _, _ = await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"}, sid=sid)
        assert status == 202
        return sid

    async def call(self, sid: str, request: dict[str, Any]) -> dict[str, Any]:
        status, _, body = await self.post(request, sid=sid, accept="application/json")
        assert status == 200, (status, body)
        return orjson.loads(body)  # type: ignore[no-any-return]

    async def whoami(self, sid: str) -> dict[str, Any]:
        answer = await self.call(sid, call_tool(99, "whoami"))
        return orjson.loads(answer["result"]["content"][0]["text"])  # type: ignore[no-any-return]


def error_message(body: bytes) -> str:
    """The message of a JSON-RPC error answer."""
    return str(orjson.loads(body)["error"]["message"])


def sse_messages(body: bytes) -> list[dict[str, Any]]:
    """The JSON-RPC messages in an SSE body."""
    return [orjson.loads(line[5:]) for line in body.splitlines() if line.startswith(b"data:")]


PEERS = Path(__file__).parent / "peers" / "node_modules"
SERVER_EVERYTHING = PEERS / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"


def server_everything_command() -> str:
    """The pinned server-everything (tests/peers, installed by scripts/test) as a stdio command."""
    if not SERVER_EVERYTHING.exists():
        raise RuntimeError(f"{SERVER_EVERYTHING} is missing: run scripts/test, which installs tests/peers")
    return f"node {SERVER_EVERYTHING} stdio"


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (zombies included)."""
    from loadtest.recipes import children

    return children(pid)


@dataclass
class RedisServer:
    """A real redis-server on an ephemeral loopback port, with nothing on disk; stopped by its PID."""

    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        for _ in range(5):  # a free port can be taken between the probe and the bind: try another
            self.port = self.port or free_port()
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--protected-mode", "yes"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            if self._ready(timeout):
                return self
            self.stop()
            self.port = 0
        raise RuntimeError("redis-server did not start")

    def _ready(self, timeout: float) -> bool:
        assert self.process is not None
        return read_until(self.process, b"Ready to accept connections", timeout) is not None

    def stop(self) -> None:
        stop_process(self.process)
        self.process = None


@dataclass
class HttpMcpServer:
    """The demo MCP server over HTTP on a free loopback port, read from the line it prints once it
    listens; stopped by its PID."""

    transport: str  # streamable-http or sse
    url: str = ""
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> HttpMcpServer:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tether_demo", "--transport", self.transport, "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        out = read_until(self.process, b"tether_demo listening on", timeout)
        if out is None:
            self.stop()
            raise RuntimeError(f"the demo server ({self.transport}) did not start listening")
        self.url = out.split(b"listening on ", 1)[1].split()[0].decode()
        return self

    def stop(self) -> None:
        stop_process(self.process)
        self.process = None


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM a child we started (by its PID), reap it, and close its pipe."""
    if process is not None:
        if process.poll() is None:
            process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()
