"""Commands that act on a running Tether process from inside its container.

`tether drain` is a node's Kubernetes preStop hook: it starts the drain and waits
until the node has handed back every session (or its deadline passed), so the
SIGTERM that follows finds nothing left to cut. `tether health` is the image's
HEALTHCHECK. Both read the same settings as the process they talk to, so they
need no arguments in a container that already has its `TETHER_*` environment.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import aiohttp

from actors.internal import SECRET_HEADER
from tether.config import Config

DRAIN_POLL = 30.0  # seconds one status request waits for the drain to end
DRAIN_SLACK = 15.0  # beyond drain_timeout: ending the last sessions takes up to kill_grace each


def local_url(config: Config, path: str) -> str:
    """The process's own address as seen from inside its container."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(config.host, config.host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{config.port}{path}"


def _say(message: str) -> None:
    print(f"tether drain: {message}", flush=True)


# The node is gone: nothing listens, or it closed the connection as it exited.
GONE = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError)
RETRY = 1.0  # seconds before asking again a node that did not answer


async def drain_node(config: Config) -> int:
    """Start the node's drain and wait for it to finish. 0 when drained or the node is gone."""
    if not config.port:
        print("tether drain: the node's port is unknown; set port (TETHER_PORT)", file=sys.stderr)
        return 2
    url = local_url(config, "/admin/drain")
    headers = {SECRET_HEADER: config.internal_secret}
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http:
        try:
            status = await _call(http, "POST", url, headers, timeout=10)
        except GONE:
            _say(f"no node answers at {url}: nothing to drain")
            return 0
        except (PermissionError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
            print(f"tether drain: could not start the drain at {url}: {exc}", file=sys.stderr)
            return 1
        # The node's own drain_timeout decides, whatever this command was configured with.
        deadline = loop.time() + float(status["drain_timeout"]) + DRAIN_SLACK
        _say(f"draining {status['sessions']} sessions, for up to {status['drain_timeout']:g} s")
        while (left := deadline - loop.time()) > 0:
            wait = min(DRAIN_POLL, left)
            try:
                status = await _call(http, "GET", f"{url}?wait={wait:.1f}", headers, timeout=wait + 10)
            except GONE:
                _say("the node has stopped")
                return 0
            except (PermissionError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                _say(f"no answer from the node ({exc!r}); asking again")
                await asyncio.sleep(min(RETRY, max(0.0, deadline - loop.time())))
                continue
            if status["drained"]:
                _say("drained")
                return 0
            _say(f"{status['sessions']} sessions still open")
    print("tether drain: the node did not finish draining before its deadline", file=sys.stderr)
    return 1


async def _call(http: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str],
                timeout: float) -> dict[str, Any]:
    async with http.request(method, url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
        if response.status == 401:
            raise PermissionError("the node refused the internal secret (set internal_secret as the node has it)")
        response.raise_for_status()
        answer: dict[str, Any] = await response.json()
        return answer


async def check_health(config: Config, path: str) -> int:
    """GET `path` on the local process: 0 on 200, 1 otherwise (a container health check)."""
    url = local_url(config, path)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            async with http.get(url) as response:
                print(f"{url}: {response.status} {(await response.text()).strip()}")
                return 0 if response.status == 200 else 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        print(f"{url}: {exc!r}", file=sys.stderr)
        return 1
