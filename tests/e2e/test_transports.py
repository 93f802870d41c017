"""Every client transport through Tether to every upstream transport, with state kept and ends clean.

Clients: the official SDK's Streamable HTTP and HTTP+SSE clients, and the
`websockets` library on `/ws`. Upstreams: the demo server over stdio (a
process per session), and one demo process serving many sessions over
Streamable HTTP, and over HTTP+SSE.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import httpx2
import orjson
import pytest
import websockets
from mcp.client.session import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from actors.sse import Parser
from tests.conftest import start_tether
from tests.support import HttpMcpServer, RawClient, TetherUp, call_tool, initialize_message, wait_until

UPSTREAMS = ("stdio", "streamable_http", "sse")
CLIENTS = ("streamable_http", "sse", "websocket")
LIST = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}


@pytest.fixture(scope="module")
def tethers(tmp_path_factory: pytest.TempPathFactory, tether: TetherUp) -> Iterator[dict[str, TetherUp]]:
    """A Tether per upstream kind: the shared stdio one, and one in front of each HTTP demo server."""
    servers = {kind: HttpMcpServer(kind.replace("_", "-")).start() for kind in ("streamable_http", "sse")}
    ups = {kind: start_tether(tmp_path_factory.mktemp(kind), "--upstream-url", server.url)
           for kind, server in servers.items()}
    try:
        yield {"stdio": tether, **ups}
    finally:
        codes = [up.stop() for up in ups.values()]
        for server in servers.values():
            server.stop()
        assert codes == [0, 0]


def text(result: Any) -> str:
    return result.content[0].text  # type: ignore[no-any-return]


async def via_streamable_http(up: TetherUp) -> tuple[list[str], set[str], str]:
    sids: set[str] = set()

    async def note_session(response: httpx2.Response) -> None:
        if sid := response.headers.get("mcp-session-id"):
            sids.add(sid)

    async with httpx2.AsyncClient(event_hooks={"response": [note_session]},
                                  timeout=httpx2.Timeout(30, read=300)) as http_client, \
            streamable_http_client(up.mcp_url, http_client=http_client) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        tools = {tool.name for tool in (await session.list_tools()).tools}
        counts = [text(await session.call_tool("increment", {})) for _ in range(3)]
    (sid,) = sids
    return counts, tools, sid


async def via_sse(up: TetherUp) -> tuple[list[str], set[str], str]:
    sids: list[str] = []
    async with sse_client(up.base_url + "/sse", on_session_created=sids.append) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        tools = {tool.name for tool in (await session.list_tools()).tools}
        counts = [text(await session.call_tool("increment", {})) for _ in range(3)]
    return counts, tools, sids[0]


async def via_websocket(up: TetherUp) -> tuple[list[str], set[str], str]:
    url = up.base_url.replace("http://", "ws://") + "/ws"
    async with websockets.connect(url, subprotocols=[websockets.Subprotocol("mcp")]) as ws:
        sid = ws.response.headers["Mcp-Session-Id"]
        await ws.send(orjson.dumps(initialize_message()).decode())
        assert orjson.loads(await ws.recv())["result"]["serverInfo"]
        await ws.send(orjson.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).decode())
        await ws.send(orjson.dumps(LIST).decode())
        tools = {tool["name"] for tool in orjson.loads(await ws.recv())["result"]["tools"]}
        counts = []
        for n in range(3):
            await ws.send(orjson.dumps(call_tool(10 + n, "increment")).decode())
            answer = orjson.loads(await ws.recv())
            assert answer["id"] == 10 + n
            counts.append(answer["result"]["content"][0]["text"])
    return counts, tools, sid


CLIENT_RUNS = {"streamable_http": via_streamable_http, "sse": via_sse, "websocket": via_websocket}


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize("client", CLIENTS)
async def test_matrix(client: str, upstream: str, tethers: dict[str, TetherUp],
                      http: aiohttp.ClientSession) -> None:
    up = tethers[upstream]
    deletes = up.log().count("upstream DELETE answered 200")
    counts, tools, sid = await CLIENT_RUNS[client](up)
    assert counts == ["1", "2", "3"]  # one session's state, kept across calls
    assert {"increment", "add_note", "whoami"} <= tools
    raw = RawClient(http, up.mcp_url)

    async def ended() -> bool:  # the session ended with its client: its id is refused now
        return (await raw.post(LIST, sid=sid, accept="application/json"))[0] == 404

    await wait_until(ended, 10, f"{client} session {sid} ended")
    if upstream == "streamable_http":  # and its upstream session with it

        async def deleted_upstream() -> bool:
            return up.log().count("upstream DELETE answered 200") >= deletes + 1

        await wait_until(deleted_upstream, 10, "DELETE sent to the upstream")


async def test_the_upstream_get_stream_is_resumed_when_the_server_drops_it(tethers: dict[str, TetherUp],
                                                                            http: aiohttp.ClientSession) -> None:
    up = tethers["streamable_http"]
    raw = RawClient(http, up.mcp_url)
    sid = await raw.initialize()
    async with http.get(up.mcp_url, headers={"Accept": "text/event-stream", "Mcp-Session-Id": sid}) as stream:
        assert stream.status == 200
        answer = await raw.call(sid, call_tool(5, "drop_stream_between"))
        assert answer["result"]["content"][0]["text"] == "dropped"
        parser, methods = Parser(), []
        async with asyncio.timeout(15):
            async for chunk in stream.content.iter_any():
                methods += [orjson.loads(e.data).get("method") for e in parser.feed(chunk) if e.data]
                if "notifications/resources/list_changed" in methods:
                    break
    # The second was sent while the server's stream was down: only a resumed stream carries it.
    assert methods == ["notifications/tools/list_changed", "notifications/resources/list_changed"]
