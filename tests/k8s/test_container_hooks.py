"""`tether drain` (the nodes' preStop hook) and `tether health` (the image's HEALTHCHECK) against a
real node: what each prints and returns when things are right, and when they are not."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

from actors.internal import SECRET_HEADER
from loadtest.recipes import free_port
from tests.support import RawClient, call_tool, error_message
from tests.topology import SECRET

pytestmark = pytest.mark.e2e
TETHER = str(Path(sys.executable).with_name("tether"))


async def run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    environ = {"PATH": os.environ["PATH"], **env}
    return await asyncio.to_thread(subprocess.run, [TETHER, *args], env=environ, capture_output=True,
                                   text=True, timeout=60)


async def test_hooks_check_a_live_node_and_refuse_a_wrong_secret(make_topology, http):
    topo = await make_topology(nodes=1, gateways=1)
    (node,) = topo.nodes.values()
    port = str(urlparse(node.url).port)

    healthy = await run(["health"], TETHER_PORT=port)
    assert healthy.returncode == 0 and f":{port}/healthz: 200 ok" in healthy.stdout
    ready = await run(["health", "--path", "/readyz"], TETHER_PORT=port)
    assert ready.returncode == 0 and "200 ready" in ready.stdout

    refused = await run(["drain"], TETHER_PORT=port, TETHER_INTERNAL_SECRET="not-the-secret")
    assert refused.returncode == 1
    assert "refused the internal secret" in refused.stderr
    no_port = await run(["drain"], TETHER_INTERNAL_SECRET=SECRET)
    assert no_port.returncode == 2 and "set port (TETHER_PORT)" in no_port.stderr

    async with http.get(node.url + "/admin/drain") as response:
        assert response.status == 401
    async with http.get(node.url + "/admin/drain?wait=soon", headers={SECRET_HEADER: SECRET}) as response:
        assert response.status == 400
        assert "wait must be a number of seconds" in error_message(await response.read())
    async with http.get(node.url + "/admin/drain", headers={SECRET_HEADER: SECRET}) as response:
        assert await response.json() == {"draining": False, "drained": False, "sessions": 0,
                                         "drain_timeout": 300.0}
    assert node.process.poll() is None  # nothing above started a drain


async def test_hooks_with_no_process_listening():
    port = str(free_port())
    drain = await run(["drain"], TETHER_PORT=port, TETHER_INTERNAL_SECRET=SECRET)
    assert drain.returncode == 0 and "nothing to drain" in drain.stdout  # the node is already gone
    health = await run(["health"], TETHER_PORT=port)
    assert health.returncode == 1 and f":{port}/healthz" in health.stderr


async def test_drain_ends_what_is_left_at_the_node_deadline_and_the_node_waits_for_sigterm(make_topology, http):
    topo = await make_topology(nodes=1, gateways=1, drain_timeout="1", exit_when_drained="false")
    (node,) = topo.nodes.values()
    raw = RawClient(http, topo.mcp_url())
    sid = await raw.initialize()
    # The hook's own settings say nothing of the drain: it goes by the node's drain_timeout.
    drain = await run(["drain"], TETHER_PORT=str(urlparse(node.url).port), TETHER_INTERNAL_SECRET=SECRET)
    assert drain.returncode == 0, drain.stderr
    assert "draining 1 sessions, for up to 1 s" in drain.stdout and drain.stdout.endswith("drained\n")
    assert (await raw.post(call_tool(2, "increment"), sid=sid))[0] == 404  # ended at the deadline
    async with http.get(node.url + "/readyz") as response:
        assert response.status == 503
    assert node.process.poll() is None
    node.signal(signal.SIGTERM)
    assert await asyncio.to_thread(node.wait, 30) == 0


async def test_drain_returns_when_the_node_dies_while_it_waits(make_topology, http):
    topo = await make_topology(nodes=1, gateways=1)
    (node,) = topo.nodes.values()
    raw = RawClient(http, topo.mcp_url())
    await raw.initialize()
    hook = await asyncio.create_subprocess_exec(
        TETHER, "drain", env={"PATH": os.environ["PATH"], "TETHER_PORT": str(urlparse(node.url).port),
                              "TETHER_INTERNAL_SECRET": SECRET},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    async with asyncio.timeout(30):
        first = await hook.stdout.readline()
        assert b"draining 1 sessions" in first
        node.process.kill()  # a node that crashes mid-drain (or is OOM-killed)
        rest = await hook.stdout.read()
        assert await hook.wait() == 0
    assert rest.endswith(b"the node has stopped\n")
    topo.remove(node.name)
