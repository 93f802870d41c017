"""Tether in front of a third-party server, and the limits of rule 5 (bounded) answered clearly."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import mcp.types as types
import orjson
import pytest
import websockets
from mcp.client.client import Client

from actors.sse import Parser
from tests.conftest import start_tether
from tests.support import (
    RawClient,
    TetherUp,
    call_tool,
    children_of,
    initialize_message,
    server_everything_command,
    sse_messages,
    wait_until,
)
from tether.errors import REQUEST_TIMEOUT

LIST = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}


@pytest.fixture(scope="module")
def everything(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TetherUp]:
    up = start_tether(tmp_path_factory.mktemp("everything"), "--upstream-command", server_everything_command())
    yield up
    assert up.stop() == 0, up.log()[-3000:]


async def test_server_everything_through_tether(everything: TetherUp) -> None:
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    async with Client(everything.mcp_url, mode="legacy") as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert {"echo", "get-sum", "trigger-long-running-operation"} <= names
        echoed = await client.call_tool("echo", {"message": "through tether"})
        assert echoed.content[0].text == "Echo: through tether"  # type: ignore[union-attr]
        result = await client.call_tool("trigger-long-running-operation", {"duration": 1, "steps": 3},
                                        progress_callback=on_progress)
        assert "completed" in result.content[0].text  # type: ignore[union-attr]
        assert progress == [1.0, 2.0, 3.0]


async def test_upstream_gets_a_scrubbed_environment(everything: TetherUp) -> None:
    async with Client(everything.mcp_url, mode="legacy") as client:
        env = orjson.loads((await client.call_tool("get-env", {})).content[0].text)  # type: ignore[union-attr]
    assert env["TETHER_NODE_ID"] in everything.nodes
    assert "TETHER_INTERNAL_SECRET" not in env  # the node's secret never reaches a server
    assert set(env) <= {"PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME",
                        "SHELL", "TERM", "TETHER_NODE_ID", "TETHER_SESSION_TAG", "VIRTUAL_ENV"}


async def test_upstream_that_dies_at_start_is_502(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    up = start_tether(tmp_path, "--upstream-command", f"{sys.executable} -c 'raise SystemExit(3)'")
    try:
        status, headers, body = await RawClient(http, up.mcp_url).post(initialize_message())
        assert status == 502
        message = orjson.loads(body)["error"]["message"]
        assert "exited with code 3) ended before answering initialize" in message
        assert "Mcp-Session-Id" not in headers
    finally:
        assert up.stop() == 0


async def test_upstream_that_never_answers_is_504_and_reaped(tmp_path: Path,
                                                             http: aiohttp.ClientSession) -> None:
    silent = f"{sys.executable} -c 'import sys; sys.stdin.read()'"
    up = start_tether(tmp_path, "--upstream-command", silent, "--upstream-start-timeout", "1",
                      "--kill-grace", "1")
    try:
        status, headers, body = await RawClient(http, up.mcp_url).post(initialize_message())
        assert status == 504
        assert "did not answer initialize within 1s" in orjson.loads(body)["error"]["message"]
        assert "Mcp-Session-Id" not in headers
        node_pids = [pid for _, pid in up.nodes.values()]

        async def no_children() -> bool:
            return not any(children_of(pid) for pid in node_pids)

        await wait_until(no_children, timeout=10, what="the silent upstream reaped")
    finally:
        assert up.stop() == 0


async def test_a_server_slower_to_start_than_the_request_timeout_still_starts(tmp_path: Path,
                                                                             http: aiohttp.ClientSession) -> None:
    """`upstream_start_timeout` bounds initialize, not `upstream_request_timeout`: a server that takes
    longer to start than any request may take to answer gets its session, over Streamable HTTP (the
    node waits for initialize as it creates the session) and over WebSocket (the client sends it
    once the server was spawned)."""
    slow_start = f"sh -c 'sleep 1.5 && exec {sys.executable} -m tether_demo.light'"
    up = start_tether(tmp_path, "--upstream-command", slow_start, "--upstream-request-timeout", "0.5",
                      "--upstream-start-timeout", "20")
    raw = RawClient(http, up.mcp_url)
    try:
        sid = await raw.initialize()
        status, _, body = await raw.post(LIST, sid=sid, accept="application/json")
        assert status == 200 and "tools" in orjson.loads(body)["result"], body
        async with asyncio.timeout(30), websockets.connect(up.base_url.replace("http://", "ws://") + "/ws",
                                                           subprotocols=[websockets.Subprotocol("mcp")]) as ws:
            await ws.send(orjson.dumps(initialize_message()).decode())
            answer = orjson.loads(await ws.recv())
            assert answer["result"]["serverInfo"], answer
    finally:
        assert up.stop() == 0


async def test_full_nodes_decline_and_the_ring_places_elsewhere(tmp_path: Path,
                                                                http: aiohttp.ClientSession) -> None:
    up = start_tether(tmp_path, "--max-sessions", "1")
    raw = RawClient(http, up.mcp_url)
    try:
        sids = [await raw.initialize(), await raw.initialize()]
        owners = {(await raw.whoami(sid))["node"] for sid in sids}
        assert owners == {"node-1", "node-2"}  # whichever owned the second, the other took it
        status, headers, body = await raw.post(initialize_message())
        assert status == 503
        assert int(headers["Retry-After"]) >= 1
        assert "no actor node can take a new session" in orjson.loads(body)["error"]["message"]
        async with http.delete(up.mcp_url, headers={"Mcp-Session-Id": sids[0]}) as resp:
            assert resp.status == 200
        assert await raw.initialize()  # room again
    finally:
        assert up.stop() == 0


async def test_parallel_creates_cannot_overfill_nodes(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    up = start_tether(tmp_path, "--max-sessions", "1")
    raw = RawClient(http, up.mcp_url)
    try:
        answers = await asyncio.gather(*(raw.post(initialize_message(), accept="application/json")
                                         for _ in range(6)))
        statuses = sorted(status for status, _, _ in answers)
        assert statuses == [200, 200, 503, 503, 503, 503]  # two nodes, one session each, never more
    finally:
        assert up.stop() == 0


async def test_a_stalled_node_is_answered_with_504_not_a_hang(tmp_path: Path,
                                                              http: aiohttp.ClientSession) -> None:
    # A lease far longer than the stall: this test is about the gateway not hanging, not about
    # fencing (a stall past the lease ends the node's sessions: tests/e2e/test_distributed.py).
    up = start_tether(tmp_path, "--upstream-request-timeout", "1", "--heartbeat-ttl", "30")
    raw = RawClient(http, up.mcp_url)
    try:
        sid = await raw.initialize()
        owner_pid = up.nodes[(await raw.whoami(sid))["node"]][1]
        os.kill(owner_pid, signal.SIGSTOP)  # the node this test's tether started stops answering
        try:
            status, _, body = await raw.post(LIST, sid=sid, accept="application/json")
        finally:
            os.kill(owner_pid, signal.SIGCONT)
        answer = orjson.loads(body)
        assert (status, answer["id"]) == (504, LIST["id"])
        assert "did not answer within 6s" in answer["error"]["message"]
        assert (await raw.call(sid, LIST))["result"]["tools"]  # resumed, the session is intact
    finally:
        assert up.stop() == 0


async def test_requests_the_server_sits_on_are_answered_with_a_timeout_error(tmp_path: Path,
                                                                             http: aiohttp.ClientSession) -> None:
    """Each request the server has not answered within `upstream_request_timeout` gets a JSON-RPC error
    and the server a notifications/cancelled; the session answers the next request as before."""
    up = start_tether(tmp_path, "--upstream-request-timeout", "1")
    raw = RawClient(http, up.mcp_url)
    slow = [call_tool(10 + i, "count_slowly", {"steps": 2, "interval": 60}) for i in range(2)]
    try:
        sid = await raw.initialize()
        async with asyncio.TaskGroup() as group:
            first = group.create_task(raw.post(slow[0], sid=sid, accept="application/json"))
            assert (await raw.call(sid, LIST))["result"]["tools"]  # the session works while one waits
            second = group.create_task(raw.post(slow[1], sid=sid, accept="application/json"))
        for request, (status, _, body) in zip(slow, (first.result(), second.result()), strict=True):
            answer = orjson.loads(body)
            assert (status, answer["id"], answer["error"]["code"]) == (200, request["id"], REQUEST_TIMEOUT)
            assert "did not answer within 1s" in answer["error"]["message"]
        assert (await raw.call(sid, LIST))["result"]["tools"]
    finally:
        assert up.stop() == 0


async def test_a_sampling_request_reaches_the_client_and_its_answer_the_server(everything: TetherUp) -> None:
    asked: list[str] = []

    async def sample(context: object, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        asked.append(params.messages[0].content.text)  # type: ignore[union-attr]
        return types.CreateMessageResult(role="assistant", model="tether-test", stop_reason="endTurn",
                                         content=types.TextContent(type="text", text="sampled through tether"))

    async with Client(everything.mcp_url, mode="legacy", sampling_callback=sample) as client:
        result = await client.call_tool("trigger-sampling-request", {"prompt": "ping"})
    assert asked and "ping" in asked[0]  # the server's request reached the client...
    assert "sampled through tether" in str(result.content)  # ...and the client's answer reached the server


async def test_logging_and_resource_updates_reach_their_streams(everything: TetherUp,
                                                                http: aiohttp.ClientSession) -> None:
    raw = RawClient(http, everything.mcp_url)
    sid = await raw.initialize()
    headers = {"Accept": "text/event-stream", "Mcp-Session-Id": sid}
    async with http.get(everything.mcp_url, headers=headers) as get_stream:
        assert get_stream.status == 200
        set_level = {"jsonrpc": "2.0", "id": 2, "method": "logging/setLevel", "params": {"level": "debug"}}
        assert (await raw.post(set_level, sid=sid))[0] == 200
        uri = "demo://resource/static/document/architecture.md"
        subscribe = {"jsonrpc": "2.0", "id": 3, "method": "resources/subscribe", "params": {"uri": uri}}
        status, _, body = await raw.post(subscribe, sid=sid, accept="text/event-stream, application/json")
        # The server logs the subscription while the request runs: that log message is the request's.
        logged = [m for m in sse_messages(body) if m.get("method") == "notifications/message"]
        assert status == 200 and any(uri in str(m["params"]["data"]) for m in logged)
        status, _, body = await raw.post(call_tool(4, "toggle-subscriber-updates"), sid=sid,
                                         accept="text/event-stream, application/json")
        assert status == 200
        assert not [m for m in sse_messages(body) if m.get("method") == "notifications/resources/updated"]
        parser, updates = Parser(), []
        async with asyncio.timeout(15):  # sent at once, then every 5 s
            async for chunk in get_stream.content.iter_any():
                updates += [orjson.loads(e.data) for e in parser.feed(chunk) if e.data]
                if any(m.get("method") == "notifications/resources/updated" for m in updates):
                    break
    assert {"method": "notifications/resources/updated", "params": {"uri": uri}, "jsonrpc": "2.0"} in updates


async def test_a_client_that_stops_reading_its_stream_is_cut_off(tmp_path: Path,
                                                                 http: aiohttp.ClientSession) -> None:
    """A client that holds a stream open but reads none of it is cut off `client_write_timeout` after
    its socket fills, and its stream freed; it does not hold the gateway's buffers for ever."""
    up = start_tether(tmp_path, "--upstream-command", f"{sys.executable} -m tether_demo.light",
                      "--client-write-timeout", "1")
    raw = RawClient(http, up.mcp_url)
    try:
        sid = await raw.initialize()
        host, port = up.base_url.removeprefix("http://").rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once: the gateway waits
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        try:
            await asyncio.get_running_loop().sock_sendall(sock, (
                f"GET /mcp HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\nMcp-Session-Id: {sid}\r\n\r\n"
            ).encode())
            await wait_until(lambda: _streams_open(http, up, 1), timeout=10, what="the stream to open")
            for _ in range(20):  # 20 tickers of 1,000 numbered notifications a second each, for the stream
                assert (await raw.call(sid, call_tool(7, "tick", {"interval": 0.001, "count": 100_000})))["result"]
            # The stream's client reads nothing: once its socket and the gateway's are full, the
            # gateway waits client_write_timeout, then cuts it.
            await wait_until(lambda: _streams_open(http, up, 0), timeout=60, what="the stalled stream to be cut")
        finally:
            sock.close()
        assert (await raw.call(sid, LIST))["result"]["tools"]  # the session itself goes on
    finally:
        assert up.stop() == 0


async def _streams_open(http: aiohttp.ClientSession, up: TetherUp, count: int) -> bool:
    async with http.get(up.base_url + "/metrics") as resp:
        text = await resp.text()
    gauge = 'tether_gateway_streams_open{transport="streamable_http"}'
    lines = [line for line in text.splitlines() if line.startswith(gauge)]
    return (float(lines[0].split()[-1]) if lines else 0.0) == count
