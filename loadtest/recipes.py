"""Targets `--compare` can start on loopback, each in front of the same light upstream.

- `direct`: the light server over Streamable HTTP, no proxy (HTTP upstream only).
- `nginx`: nginx with `hash $http_mcp_session_id consistent` over two light servers (HTTP only).
- `supergateway`: `supergateway --stateful` (npm) over the light server on stdio (stdio only).
- `mcp-proxy`: `mcp-proxy` (PyPI, in its own virtual environment) over the light server on stdio.
- `tether`: `tether up`, the embedded form (both).
- `tether-distributed`: Redis, two gateways (sessions alternate between them) and two nodes (both).

Peers missing from this machine are installed where the recipe starts them: nginx from the
OS packages, supergateway with npm into loadtest/peers, mcp-proxy into .venv-peers/. Each
recipe names the processes that are the proxy (never the upstream), so CPU and memory are
measured for the proxy alone. Everything is stopped by its PID when the recipe stops.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(__file__).resolve().parent / "peers"
# Standard library only, so started without site (-S) and isolated (-I): importing site and this
# checkout's editable-install finder was a fifth of the server's start (32 -> 25 ms of CPU), and
# that start is what a new stdio session costs every target alike.
LIGHT_STDIO = [sys.executable, "-I", "-S", str(ROOT / "tether_demo" / "light.py")]
START_TIMEOUT = 60.0
SECRET = "loadtest-internal-secret"
MAX_SESSIONS = 50_000  # per node


@dataclass
class Target:
    """A started target: its MCP URLs and which processes are the proxy."""

    urls: list[str]
    proxy_pids: Callable[[], list[int]]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    workdir: Path | None = None

    def stop(self) -> None:
        stop_all(self.processes)


def stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    """Stop what we started, last first, by PID: Ctrl-C for Tether (SIGTERM would drain a node),
    SIGTERM for the rest; SIGKILL for any that does not exit within 20 s."""
    for process in reversed(processes):
        if process.poll() is None:
            tether = Path(str(process.args[0])).name == "tether"  # type: ignore[index]
            os.kill(process.pid, signal.SIGINT if tether else signal.SIGTERM)
    for process in reversed(processes):
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn(argv: list[str], log: Path, ready: re.Pattern[bytes] | None = None, env: dict[str, str] | None = None,
          ) -> tuple[subprocess.Popen[bytes], bytes]:
    """Start a process with its output in `log`; wait for `ready` in it (or return at once)."""
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, **(env or {})}, cwd=log.parent)
    if ready is None:
        return process, b""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        text = log.read_bytes()
        if match := ready.search(text):
            return process, match.group(0)
        if process.poll() is not None:
            break
        time.sleep(0.05)  # a process we cannot await: read its log until it says it is ready
    process.kill()
    process.wait()
    raise RuntimeError(f"{argv[0]} did not start: {log.read_text(errors='replace')[-1500:]}")


def wait_port(port: int, process: subprocess.Popen[bytes]) -> None:
    import socket

    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def light_http(workdir: Path, name: str = "light") -> tuple[subprocess.Popen[bytes], str]:
    process, line = spawn([sys.executable, "-m", "tether_demo.light_http", "--port", "0"], workdir / f"{name}.log",
                          re.compile(rb"listening on (http://\S+)"))
    return process, line.split(b"listening on ", 1)[1].decode()


@contextlib.contextmanager
def stopped_on_failure() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Collect what a recipe starts; if the recipe fails halfway, stop it all before raising."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    except BaseException:
        stop_all(started)
        raise


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


# --- the recipes --------------------------------------------------------------------------------

def direct(upstream: str, workdir: Path) -> Target:
    _http_only("direct", upstream)
    with stopped_on_failure() as started:
        process, url = light_http(workdir)
        started.append(process)
    return Target([url], lambda: [], started)


NGINX_CONF = """worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {work}/body; proxy_temp_path {work}/proxy; fastcgi_temp_path {work}/fastcgi;
  uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
  upstream mcp {{
    hash $http_mcp_session_id consistent;
    {servers}
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://mcp;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 3600s;
    }}
  }}
}}
"""


def nginx(upstream: str, workdir: Path) -> Target:
    _http_only("nginx", upstream)
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        subprocess.run(["apt-get", "install", "-y", "-q", "nginx"], check=True, capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, timeout=600)
    with stopped_on_failure() as started:
        urls = []
        for i in range(2):
            replica, url = light_http(workdir, f"light-{i}")
            started.append(replica)
            urls.append(url)
        servers = "\n    ".join(f"server {url.split('//')[1].split('/')[0]};" for url in urls)
        port = free_port()
        conf = workdir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(work=workdir, servers=servers, port=port))
        process, _ = spawn([binary, "-c", str(conf), "-p", str(workdir)], workdir / "nginx.log")
        started.append(process)
        wait_port(port, process)
    return Target([f"http://127.0.0.1:{port}/mcp"], lambda: [process.pid, *children(process.pid)], started)


def supergateway(upstream: str, workdir: Path) -> Target:
    _stdio_only("supergateway", upstream)
    script = PEERS / "node_modules" / "supergateway" / "dist" / "index.js"
    if not script.exists():
        subprocess.run(["npm", "ci", "--silent"], cwd=PEERS, check=True, capture_output=True, timeout=600)
    port = free_port()
    with stopped_on_failure() as started:
        process, _ = spawn(["node", str(script), "--stdio", shlex.join(LIGHT_STDIO), "--outputTransport",
                            "streamableHttp", "--stateful", "--port", str(port), "--logLevel", "none"],
                           workdir / "supergateway.log")
        started.append(process)
        wait_port(port, process)
    return Target([f"http://127.0.0.1:{port}/mcp"], lambda: [process.pid], started)


def mcp_proxy(upstream: str, workdir: Path) -> Target:
    _stdio_only("mcp-proxy", upstream)
    venv = ROOT / ".venv-peers" / "mcp-proxy"
    binary = venv / "bin" / "mcp-proxy"
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "mcp-proxy==0.13.0"], check=True,
                       capture_output=True, timeout=600)
    port = free_port()
    with stopped_on_failure() as started:
        process, _ = spawn([str(binary), "--port", str(port), "--host", "127.0.0.1", "--log-level", "WARNING",
                            "--", *LIGHT_STDIO], workdir / "mcp-proxy.log")
        started.append(process)
        wait_port(port, process)
    return Target([f"http://127.0.0.1:{port}/mcp"], lambda: [process.pid], started)


def tether(upstream: str, workdir: Path) -> Target:
    with stopped_on_failure() as started:
        args = _tether_upstream(upstream, workdir, started)
        tether_bin = str(Path(sys.executable).with_name("tether"))
        process, line = spawn([tether_bin, "up", "--port", "0", "--log-level", "warning", *args],
                              workdir / "tether.log", re.compile(rb"MCP endpoint +(http://\S+)"))
        started.append(process)
    url = line.split()[-1].decode()
    return Target([url], lambda: [process.pid, *children(process.pid)], started)


NODE_LINE = re.compile(rb"tether node: \S+ at (http://\S+)")


class LocalTopology:
    """Tether distributed on this host: Redis, nodes and gateways as child processes logging to
    `workdir`; every node runs the upstream that `upstream_args` names (tether node flags)."""

    def __init__(self, workdir: Path, upstream_args: list[str], env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.upstream_args = upstream_args
        self.extra_env = env or {}
        self.processes: list[subprocess.Popen[bytes]] = []
        self.nodes: dict[str, tuple[subprocess.Popen[bytes], str]] = {}  # name -> (process, URL)
        self.gateways: list[str] = []  # their MCP URLs
        self.tether = str(Path(sys.executable).with_name("tether"))
        self.env: dict[str, str] = {}
        self.stopping = False

    def start(self, nodes: int, gateways: int) -> None:
        """Start everything, or stop what did start and raise."""
        try:
            port = free_port()
            redis, _ = spawn(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], self.workdir / "redis.log",
                             re.compile(rb"Ready to accept connections"))
            self.processes.append(redis)
            self.env = {"TETHER_INTERNAL_SECRET": SECRET, "TETHER_REDIS": f"redis://127.0.0.1:{port}/0",
                        "TETHER_LOG_LEVEL": "warning", **self.extra_env}
            for i in range(nodes):
                self.add_node(f"node-{i + 1}")
            for i in range(gateways):
                gateway, line = spawn([self.tether, "gateway", "--port", "0"], self.workdir / f"gateway-{i + 1}.log",
                                      re.compile(rb"tether gateway: (http://\S+)"), self.env)
                self.processes.append(gateway)
                self.gateways.append(line.split(b": ", 1)[1].decode())
        except BaseException:
            self.stop()
            raise

    def add_node(self, name: str) -> None:
        node, line = spawn([self.tether, "node", "--port", "0", "--node-id", name, *self.upstream_args],
                           self.workdir / f"{name}.log", NODE_LINE, self.env)
        self.processes.append(node)
        if self.stopping:  # stopped while this node started (in a thread): stop it too
            stop_all([node])
        self.nodes[name] = (node, NODE_LINE.search(line)[1].decode())  # type: ignore[index]

    def stop(self) -> None:
        self.stopping = True
        stop_all(self.processes)


def tether_distributed(upstream: str, workdir: Path) -> Target:
    with stopped_on_failure() as started:
        topology = LocalTopology(workdir, _tether_upstream(upstream, workdir, started))
        topology.start(nodes=2, gateways=2)
    # Redis, nodes and gateways are the proxy; the upstream server is not.
    return Target(topology.gateways, lambda: [p.pid for p in topology.processes], [*started, *topology.processes])


def _tether_upstream(upstream: str, workdir: Path, started: list[subprocess.Popen[bytes]]) -> list[str]:
    """Node flags: the light upstream, and room for every session a run opens (the default
    max_sessions sizes a production node's memory; here a declined session would be noise)."""
    room = ["--max-sessions", str(MAX_SESSIONS)]
    if upstream == "stdio":
        return ["--upstream-command", shlex.join(LIGHT_STDIO), *room]
    process, url = light_http(workdir)
    started.append(process)
    return ["--upstream-url", url, *room]


def _http_only(name: str, upstream: str) -> None:
    if upstream != "http":
        raise ValueError(f"{name} fronts an HTTP server: use --upstream http")


def _stdio_only(name: str, upstream: str) -> None:
    if upstream != "stdio":
        raise ValueError(f"{name} fronts a stdio server: use --upstream stdio")


RECIPES: dict[str, Callable[[str, Path], Target]] = {
    "direct": direct, "nginx": nginx, "supergateway": supergateway, "mcp-proxy": mcp_proxy,
    "tether": tether, "tether-distributed": tether_distributed,
}
