"""The official MCP SDK client through the gateway: state, isolation, placement, both eras."""

from __future__ import annotations

import asyncio

import orjson
from mcp.client.client import Client
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from tests.support import RawClient, TetherUp


def text(result: object) -> str:
    return result.content[0].text  # type: ignore[attr-defined,no-any-return]


async def test_legacy_client_sees_its_state_grow(tether: TetherUp) -> None:
    async with Client(tether.mcp_url, mode="legacy") as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert {"increment", "add_note", "list_notes", "whoami"} <= names
        values = [int(text(await client.call_tool("increment", {"by": 1}))) for _ in range(20)]
        assert values == list(range(1, 21))
        await client.call_tool("add_note", {"text": "first"})
        notes = await client.call_tool("add_note", {"text": "second"})
        assert notes.structured_content == {"result": ["first", "second"]}


async def test_low_level_client_with_progress(tether: TetherUp) -> None:
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    async with streamable_http_client(tether.mcp_url) as (read, write), ClientSession(read, write) as session:
        init = await session.initialize()
        assert init.server_info.name == "tether-demo"
        for expected in range(1, 21):
            assert int(text(await session.call_tool("increment", {"by": 1}))) == expected
        result = await session.call_tool("count_slowly", {"steps": 4}, progress_callback=on_progress)
        assert text(result) == "4"
        assert progress == [1, 2, 3, 4]  # each progress event reached the stream of its request


async def test_auto_mode_falls_back_to_initialize(tether: TetherUp) -> None:
    async with Client(tether.mcp_url) as client:  # mode="auto": server/discover first
        assert client.session.initialize_result is not None  # it ended up on the handshake
        assert [int(text(await client.call_tool("increment", {}))) for _ in range(3)] == [1, 2, 3]


async def test_stateless_request_gets_the_fallback_error(raw: RawClient) -> None:
    discover = {"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {}}
    status, _, body = await raw.post(discover, headers={"MCP-Protocol-Version": "2026-07-28",
                                                        "Mcp-Method": "server/discover"})
    assert status == 400
    error = orjson.loads(body)["error"]
    assert error["code"] == -32022
    assert "2025-11-25" in error["data"]["supported"]


async def test_concurrent_sessions_never_share_state(tether: TetherUp) -> None:
    async with Client(tether.mcp_url, mode="legacy") as a, Client(tether.mcp_url, mode="legacy") as b:
        seen_a, seen_b = [], []
        for _ in range(10):
            got_a, got_b = await asyncio.gather(a.call_tool("increment", {"by": 1}),
                                                b.call_tool("increment", {"by": 10}))
            seen_a.append(int(text(got_a)))
            seen_b.append(int(text(got_b)))
        assert seen_a == list(range(1, 11))
        assert seen_b == list(range(10, 101, 10))
        await a.call_tool("add_note", {"text": "only in a"})
        assert (await b.call_tool("list_notes", {})).structured_content == {"result": []}
        assert (await a.call_tool("list_notes", {})).structured_content == {"result": ["only in a"]}


async def test_twenty_sessions_land_on_both_nodes(tether: TetherUp, raw: RawClient) -> None:
    sids = [await raw.initialize() for _ in range(20)]
    owners = [(await raw.whoami(sid))["node"] for sid in sids]
    assert set(owners) == set(tether.nodes), owners
    pids = {(await raw.whoami(sid))["pid"] for sid in sids}
    assert len(pids) == 20  # one upstream process per session
    for sid in sids:
        async with raw.session.delete(raw.url, headers={"Mcp-Session-Id": sid}) as resp:
            assert resp.status == 200


async def test_stateless_headers_that_disagree_with_the_body_are_refused(raw: RawClient) -> None:
    call = {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "increment", "arguments": {}}}
    status, _, body = await raw.post(call, headers={"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call",
                                                    "Mcp-Name": "delete_everything"})
    assert status == 400
    error = orjson.loads(body)
    assert error["id"] == 4 and error["error"]["code"] == -32020
    assert "Mcp-Name is 'delete_everything'" in error["error"]["message"]
