"""Quotas a principal runs into, and the box a spawned server lives in.

Quotas: sessions per principal (429 + Retry-After, across nodes, freed when a
session ends) and requests per second per principal (a token bucket), each hit
and then recovered. The sandbox: a server sees only allowlisted variables,
works in a directory of its own, and is held to its resource limits.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.guarded import Guarded, start_guarded
from tests.support import (
    RawClient,
    TetherUp,
    call_tool,
    error_message,
    initialize_message,
    wait_process_gone,
    wait_until,
)
from tests.topology import LIGHT

PING = {"jsonrpc": "2.0", "id": 5, "method": "ping"}
MB = 1024 * 1024


@pytest.fixture(scope="module")
def quotas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guarded]:
    g = start_guarded(tmp_path_factory.mktemp("quotas"), "--max-sessions-per-principal", "2",
                      "--rate-limit", "2", "--rate-burst", "12")
    yield g
    assert g.up.stop() == 0, g.up.log()[-3000:]


async def test_sessions_per_principal_are_capped_then_freed(quotas: Guarded, http: aiohttp.ClientSession) -> None:
    alice = RawClient(http, quotas.up.mcp_url, quotas.auth("alice"))
    bob = RawClient(http, quotas.up.mcp_url, quotas.auth("bob"))
    first, second = await alice.initialize(), await alice.initialize()
    assert {(await alice.whoami(s))["node"] for s in (first, second)} <= {"node-1", "node-2"}
    status, headers, body = await alice.post(initialize_message())
    assert status == 429 and int(headers["Retry-After"]) >= 1
    assert "max_sessions_per_principal" in error_message(body)
    ws_url = quotas.up.base_url.replace("http", "ws", 1) + "/ws"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:  # every transport counts
        await http.ws_connect(ws_url, protocols=("mcp",), headers=alice.headers)
    assert refused.value.status == 429
    assert await bob.initialize()  # another principal is not held back by alice
    async with http.delete(alice.url, headers={**alice.headers, "Mcp-Session-Id": first}) as resp:
        assert resp.status == 200
    third = await alice.initialize()  # an ended session frees its slot at once
    assert (await alice.call(third, call_tool(1, "increment")))["result"]["content"][0]["text"] == "1"


async def test_request_rate_per_principal_is_a_token_bucket(quotas: Guarded, http: aiohttp.ClientSession) -> None:
    url = quotas.up.mcp_url
    hasty = RawClient(http, url, {"Authorization": f"Bearer {quotas.jwt('hasty')}"})
    calm = RawClient(http, url, {"Authorization": f"Bearer {quotas.jwt('calm')}"})
    sid = await hasty.initialize()
    answers = [await hasty.post(PING, sid=sid) for _ in range(20)]  # more than the burst of 12
    statuses = [status for status, _, _ in answers]
    assert statuses[:10] == [200] * 10 and 429 in statuses  # the burst, then the bucket is empty
    status, headers, body = next(a for a in answers if a[0] == 429)
    assert int(headers["Retry-After"]) >= 1 and "Too Many Requests" in error_message(body)
    calm_sid = await calm.initialize()  # a principal's bucket is its own
    assert (await calm.post(PING, sid=calm_sid))[0] == 200

    served: list[bytes] = []

    async def served_again() -> bool:
        status, _, body = await hasty.post(call_tool(2, "increment"), sid=sid, accept="application/json")
        served.append(body)
        return status == 200

    await wait_until(served_again, timeout=10, what="the bucket to refill", interval=0.25)
    assert orjson.loads(served[-1])["result"]["content"][0]["text"] == "1"  # the session lived through it


# -- the sandbox -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def boxed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TetherUp]:
    root = tmp_path_factory.mktemp("boxed")
    (root / "work").mkdir()
    env = {**os.environ, "TETHER_TEST_CANARY": "gateway-only-value", "TETHER_TEST_PASS": "passed",
           "AWS_SECRET_ACCESS_KEY": "never-leaks"}
    up = TetherUp(["--upstream-command", LIGHT, "--internal-secret", "boxed-secret-value",
                   "--upstream-max-memory", str(128 * MB), "--upstream-max-cpu", "2", "--upstream-max-files", "64",
                   "--upstream-workdir", str(root / "work"),
                   "--upstream-env", "TETHER_TEST_PASS,TETHER_TEST_SET=fixed"],
                  root / "up.log", env=env).start()
    yield up
    assert up.stop() == 0, up.log()[-3000:]


async def environment(raw: RawClient, sid: str) -> dict[str, Any]:
    answer = await raw.call(sid, call_tool(3, "environment"))
    return orjson.loads(answer["result"]["content"][0]["text"])  # type: ignore[no-any-return]


async def test_a_server_sees_only_allowlisted_variables_in_a_directory_of_its_own(
        boxed: TetherUp, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    raw = RawClient(http, boxed.mcp_url)
    one, two = await raw.initialize(), await raw.initialize()
    first, second = await environment(raw, one), await environment(raw, two)
    env = first["env"]
    for leaked in ("TETHER_TEST_CANARY", "AWS_SECRET_ACCESS_KEY", "TETHER_INTERNAL_SECRET", "TETHER_STORE"):
        assert leaked not in env
    assert "boxed-secret-value" not in orjson.dumps(env).decode()
    assert env["TETHER_TEST_PASS"] == "passed" and env["TETHER_TEST_SET"] == "fixed"  # upstream_env
    assert "PATH" in env
    work = Path(boxed.args[boxed.args.index("--upstream-workdir") + 1])
    cwd = Path(first["cwd"])
    assert cwd.parent == work and Path(second["cwd"]).parent == work and cwd != Path(second["cwd"])
    assert first["limits"] == {"as": [128 * MB, 128 * MB], "cpu": [2, 3], "nofile": [64, 64], "core": [0, 0]}
    async with http.delete(raw.url, headers={"Mcp-Session-Id": one}) as resp:
        assert resp.status == 200

    async def removed() -> bool:
        return not cwd.exists()

    await wait_until(removed, timeout=10, what="the ended session's working directory to be removed")
    assert Path(second["cwd"]).exists()


async def test_a_server_past_its_memory_limit_is_refused_the_memory(boxed: TetherUp,
                                                                    http: aiohttp.ClientSession) -> None:
    raw = RawClient(http, boxed.mcp_url)
    sid = await raw.initialize()
    answer = await raw.call(sid, call_tool(4, "allocate", {"megabytes": 256}))
    assert answer["result"]["isError"] and "MemoryError" in answer["result"]["content"][0]["text"]
    assert (await raw.call(sid, call_tool(5, "allocate", {"megabytes": 16})))["result"]["isError"] is False


async def test_a_server_past_its_cpu_limit_is_killed_and_reaped(boxed: TetherUp,
                                                                http: aiohttp.ClientSession) -> None:
    raw = RawClient(http, boxed.mcp_url)
    sid = await raw.initialize()
    pid = (await raw.whoami(sid))["pid"]
    status, _, body = await raw.post(call_tool(6, "burn_cpu", {"seconds": 30}), sid=sid, accept="application/json")
    assert status in (200, 404), body  # killed mid-call: an error answer, or the session already gone
    if status == 200:
        assert "error" in orjson.loads(body)
    await wait_process_gone(pid, timeout=30)
    assert (await raw.post(PING, sid=sid))[0] == 404
