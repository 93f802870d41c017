"""`tether up`: a gateway with the in-memory store, and N actor node processes, on one host.

The gateway runs in this process and serves the store to the nodes over the
internal link. Nodes are child processes in their own process groups, with a
parent-death signal; on Ctrl-C they are told to stop (each ends its sessions
and reaps their upstreams), then killed if they overstay.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shlex
import signal
import sys
from dataclasses import dataclass

from actors.internal import STORE_PATH
from actors.upstream import with_death_signal
from gateway.app import MCP_PATH, Gateway
from gateway.server import serve_gateway
from tether.config import NODE, SETTINGS, Config
from tether.errors import ConfigError

NODE_START_TIMEOUT = 30.0


@dataclass
class NodeProcess:
    node_id: str
    process: asyncio.subprocess.Process


def node_env(config: Config, store_url: str) -> dict[str, str]:
    """The environment a node child runs with: ours, plus every node setting as TETHER_*."""
    env = dict(os.environ)
    for setting in SETTINGS:
        if NODE in setting.commands:
            value = getattr(config, setting.name)
            env[setting.env] = ",".join(value) if isinstance(value, tuple) else str(value)
    env.update(TETHER_STORE=store_url, TETHER_HOST="127.0.0.1", TETHER_PORT="0")
    return env


async def start_node(node_id: str, env: dict[str, str], argv: list[str]) -> NodeProcess:
    cmd = [sys.executable, "-m", "tether", "node", "--node-id", node_id]
    if argv:
        cmd += ["--upstream-command", shlex.join(argv)]
    process = await asyncio.create_subprocess_exec(*with_death_signal(cmd, "TERM"), env=env,
                                                   start_new_session=True, stdin=asyncio.subprocess.DEVNULL)
    return NodeProcess(node_id, process)


async def stop_node(node: NodeProcess, grace: float) -> None:
    """SIGINT (stop now, no drain), wait `grace`, then SIGKILL the node's process group; always reap."""
    with contextlib.suppress(ProcessLookupError):
        node.process.send_signal(signal.SIGINT)
    try:
        await asyncio.wait_for(node.process.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.process.pid, signal.SIGKILL)
        await node.process.wait()


async def run_up(config: Config, argv: list[str]) -> int:
    from tether.cli import open_store, wait_for_signal

    config = config.replace(internal_secret=config.internal_secret or secrets.token_urlsafe(32))
    store = open_store(config, for_node=False)
    async with serve_gateway(config, store, host_store=not config.redis) as gateway:
        url = gateway.url
        env = node_env(config, url + STORE_PATH)
        nodes = [await start_node(f"node-{i + 1}", env, argv) for i in range(config.nodes)]
        stop = asyncio.get_running_loop().create_task(wait_for_signal(), name="up:signals")
        try:
            members = await _wait_for_members(gateway, nodes, stop)
            if members is not None:
                _banner(url, config.upstream_url or f"{shlex.join(argv)}  (one process per session)",
                        nodes, members)
                await stop
        finally:
            stop.cancel()
            print("\nStopping: ending sessions and their servers...", file=sys.stderr, flush=True)
            await asyncio.gather(*(stop_node(n, config.kill_grace + 10) for n in nodes))
    await store.close()
    return 0


async def _wait_for_members(gateway: Gateway, nodes: list[NodeProcess],
                            stop: asyncio.Task[int]) -> dict[str, str] | None:
    """Wait until the gateway's ring holds every node; None if stopped first. Raises ConfigError."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + NODE_START_TIMEOUT
    while loop.time() < deadline and not stop.done():
        await gateway.placement.refresh()
        members = {n.node_id: n.url for n in gateway.placement.members.values()}
        if all(n.node_id in gateway.placement.ring.nodes for n in nodes):
            return members
        if dead := [n for n in nodes if n.process.returncode is not None]:
            raise ConfigError(f"Cannot start {dead[0].node_id}: it exited with {dead[0].process.returncode}")
        await asyncio.sleep(0.05)
    if stop.done():
        return None
    raise ConfigError(f"Cannot start the nodes: not all joined within {NODE_START_TIMEOUT:g}s")


def _banner(url: str, upstream: str, nodes: list[NodeProcess], members: dict[str, str]) -> None:
    lines = [
        "Tether is up.",
        f"  MCP endpoint   {url}{MCP_PATH}  (also WebSocket {url.replace('http', 'ws', 1)}/ws, HTTP+SSE {url}/sse)",
        f"  upstream       {upstream}",
    ]
    lines += [f"  {n.node_id:<14} {members[n.node_id]}  pid {n.process.pid}" for n in nodes]
    lines += [f"  metrics        {url}/metrics", "Press Ctrl-C to stop."]
    print("\n".join(lines), flush=True)
