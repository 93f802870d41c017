"""The Streamable HTTP upstream against a real aiohttp server on loopback: every kind of answer a
request can get reaches the actor's sink, whether the connection's callbacks read it (an idle
pooled connection) or a task does (a stream, a big body, a new connection)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from actors.http_client import HIGH_WATER, HttpClient
from actors.upstream import Inbound
from actors.upstream_http import StreamableHttpUpstream
from tests.oracles import serving

INITIALIZE = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                         "clientInfo": {"name": "t", "version": "1"}}}


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, list[int], asyncio.Event]]:
    """Answers by the tool named: `json`, `sse` (progress, then the answer), `big` (a result bigger
    than the high-water mark), `silent` (nothing until the test ends), `fail` (HTTP 500). Collects
    the client port of every POST."""
    ports: list[int] = []
    done = asyncio.Event()

    async def mcp(request: web.Request) -> web.StreamResponse:
        if request.method == "DELETE":
            return web.Response()
        message = await request.json()
        ports.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        if "id" not in message:
            return web.Response(status=202)
        if message["method"] == "initialize":
            return web.json_response({"jsonrpc": "2.0", "id": message["id"],
                                      "result": {"protocolVersion": "2025-06-18"}},
                                     headers={"Mcp-Session-Id": "up-1"})
        name = message["params"]["name"]
        answer = {"jsonrpc": "2.0", "id": message["id"], "result": {"name": name}}
        if name == "sse":
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}
            await out.write(b"data: " + orjson.dumps(progress) + b"\n\n")
            await out.write(b"data: " + orjson.dumps(answer) + b"\n\n")
            await out.write_eof()
            return out
        if name == "big":
            answer["result"]["blob"] = "x" * (2 * HIGH_WATER)
        if name == "silent":
            await done.wait()
        if name == "fail":
            return web.Response(status=500, text="the tool broke")
        return web.json_response(answer)

    async def stream(request: web.Request) -> web.StreamResponse:
        await done.wait()  # the server's GET stream: open, quiet
        return web.Response()

    app = web.Application()
    app.router.add_post("/mcp", mcp)
    app.router.add_delete("/mcp", mcp)
    app.router.add_get("/mcp", stream)
    async with serving(app) as url:
        try:
            yield url, ports, done
        finally:
            done.set()  # held handlers return before the server stops


class Sink:
    def __init__(self) -> None:
        self.got: list[Inbound] = []
        self.changed = asyncio.Event()

    def __call__(self, inbound: Inbound) -> None:
        self.got.append(inbound)
        self.changed.set()

    async def answer(self, request_id: int, timeout: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                for message, _ in self.got:
                    if isinstance(message, dict) and message.get("id") == request_id and "method" not in message:
                        return message
                self.changed.clear()
                await self.changed.wait()


def call(request_id: int, name: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": {"name": name}}


@pytest.fixture
async def upstream(server: tuple[str, list[int], asyncio.Event]) -> AsyncIterator[tuple[StreamableHttpUpstream, Sink]]:
    client = HttpClient(connect_timeout=2.0)
    up = StreamableHttpUpstream(client, server[0], max_message_bytes=4 * HIGH_WATER, request_timeout=1.0)
    sink = Sink()
    up.deliver_to(sink)
    await up.send(INITIALIZE)
    assert (await sink.answer(0))["result"]["protocolVersion"] == "2025-06-18"
    yield up, sink
    await up.stop(1.0)
    await client.close()


async def test_every_kind_of_answer_reaches_the_sink_in_callbacks_or_a_task(
        upstream: tuple[StreamableHttpUpstream, Sink], server: tuple[str, list[int], asyncio.Event]) -> None:
    up, sink = upstream
    _, ports, _ = server
    for i, name in enumerate(["json", "sse", "big", "json", "fail", "json"], start=1):
        assert up.send_now(call(i, name))
        assert len(up.posted) == 1  # sent on the idle connection, its answer awaited in callbacks
        answer = await sink.answer(i)
        if name == "fail":
            assert answer["error"]["message"] == "Upstream answered HTTP 500: the tool broke"
        else:
            assert answer["result"]["name"] == name
            if name == "big":
                assert len(answer["result"]["blob"]) == 2 * HIGH_WATER
        if name == "sse":
            progress = [m for m, _ in sink.got if isinstance(m, dict) and m.get("method") == "notifications/progress"]
            assert progress and [r for m, r in sink.got if m is progress[0]] == [2]  # kept with its request
    assert len(set(ports)) == 1, f"one request at a time took {len(set(ports))} connections"
    assert not up.posted


async def test_an_answer_that_never_comes_is_an_error_and_ending_closes_its_connection(
        upstream: tuple[StreamableHttpUpstream, Sink]) -> None:
    up, sink = upstream
    assert up.send_now(call(1, "json"))
    await sink.answer(1)
    assert up.send_now(call(5, "json")) and up.send_now(call(6, "json"))  # the second opens a connection
    await sink.answer(5), await sink.answer(6)
    assert up.send_now(call(2, "silent")) and up.send_now(call(7, "silent"))  # one on each idle connection,
    assert len(up.posted) == 2  # both read in callbacks
    for silent in (2, 7):
        answer = await sink.answer(silent, timeout=up._request_timeout + 10)
        assert "TimeoutError" in answer["error"]["message"]
    assert not up.posted
    assert up.send_now(call(3, "json"))  # the timed-out answer's connection was closed: a new one
    await sink.answer(3)
    assert up.send_now(call(4, "silent"))
    ((posted, _),) = up.posted.items()
    assert posted.resp is not None
    connection = posted.resp._conn
    await up.stop(1.0)
    assert not up.posted
    assert connection.closed
    assert not [m for m, _ in sink.got if isinstance(m, dict) and m.get("id") == 4]  # ended, not answered
