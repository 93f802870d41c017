"""Resumable streams: a cut stream comes back through any gateway with every missed event, once.

Rule 7. The cut happens on either side: the client closes its connection, or
the gateway carrying the stream is killed. The client then reconnects through
the other gateway with Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import aiohttp
import orjson
import pytest
import websockets

from actors.sse import Event, Parser
from tests.conftest import MakeTopology, start_tether
from tests.support import ACCEPT_BOTH, RawClient, TetherUp, call_tool, initialize_message, wait_until

DEMO = f"{sys.executable} -m tether_demo"
STEPS = 25
LATEST = "2025-11-25"


def slow_count(request_id: int, steps: int = STEPS, interval: float = 0.04) -> dict[str, Any]:
    request = call_tool(request_id, "count_slowly", {"steps": steps, "interval": interval})
    request["params"]["_meta"] = {"progressToken": f"t{request_id}"}
    return request


def headers(sid: str, **extra: str) -> dict[str, str]:
    return {"Accept": ACCEPT_BOTH, "Content-Type": "application/json", "Mcp-Session-Id": sid,
            "MCP-Protocol-Version": LATEST, **extra}


async def read_events(resp: aiohttp.ClientResponse, parser: Parser, found: list[Event],
                      until: int | None = None) -> None:
    """Read SSE events into `found` until the stream ends, or `until` of them carry data."""
    async for chunk in resp.content.iter_any():
        found += parser.feed(chunk)
        if until is not None and sum(1 for e in found if e.data) >= until:
            return


async def count_to_the_end(http: aiohttp.ClientSession, url: str, sid: str, steps: int) -> str:
    """Run count_slowly with no pauses, reading its POST stream to the end; returns the stream's number."""
    async with http.post(url, data=orjson.dumps(slow_count(3, steps=steps, interval=0)), headers=headers(sid)) as resp:
        events: list[Event] = []
        await read_events(resp, Parser(), events)
    return events[-1].id.split("-")[0]  # type: ignore[union-attr]


def progress_and_result(events: list[Event]) -> tuple[list[float], list[Any]]:
    messages = [orjson.loads(e.data) for e in events if e.data]
    progress = [m["params"]["progress"] for m in messages if m.get("method") == "notifications/progress"]
    results = [m["result"]["structuredContent"]["result"] for m in messages if "result" in m]
    return progress, results


@pytest.mark.parametrize("cut", ["client", "server"])
async def test_a_cut_stream_resumes_through_the_other_gateway(make_topology: MakeTopology,
                                                               http: aiohttp.ClientSession, cut: str) -> None:
    topo = await make_topology(nodes=2, upstream_command=DEMO)
    sid = await RawClient(http, topo.mcp_url(0)).initialize()
    parser, before = Parser(), []
    async with http.post(topo.mcp_url(0), data=orjson.dumps(slow_count(7)), headers=headers(sid)) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        await read_events(resp, parser, before, until=5)
        if cut == "server":  # the gateway that carries the stream dies under it
            topo.gateways[0].signal(signal.SIGKILL)
            try:
                await read_events(resp, parser, before)
            except aiohttp.ClientError:
                pass
    assert before[0].id and not before[0].data  # 2025-11-25: the priming event comes first
    assert before[0].retry == 1000
    after: list[Event] = []
    async with http.get(topo.mcp_url(1), headers=headers(sid, **{"Last-Event-ID": parser.last_id or ""})) as resp:
        assert resp.status == 200, await resp.text()
        await read_events(resp, parser, after)  # ends with the stream: once the answer is out
    progress, results = progress_and_result(before + after)
    assert progress == [float(n) for n in range(1, STEPS + 1)]  # every event, once, in order
    assert results == [STEPS]
    ids = [e.id for e in before + after if e.data]
    assert len(set(ids)) == len(ids)


async def test_a_resumed_stream_can_be_resumed_again_from_any_point(tether: TetherUp,
                                                                   http: aiohttp.ClientSession) -> None:
    sid = await RawClient(http, tether.mcp_url).initialize()
    stream = await count_to_the_end(http, tether.mcp_url, sid, steps=5)
    async with http.get(tether.mcp_url, headers=headers(sid, **{"Last-Event-ID": f"{stream}-2"})) as resp:
        replayed: list[Event] = []
        await read_events(resp, Parser(), replayed)
    assert [e.id for e in replayed if e.data] == [f"{stream}-{n}" for n in range(3, 7)]  # 3 progress + result


async def test_a_cursor_older_than_the_log_is_410_not_a_gap(tmp_path: Any, http: aiohttp.ClientSession) -> None:
    up = start_tether(tmp_path, "--event-log-size", "4")
    try:
        sid = await RawClient(http, up.mcp_url).initialize()
        stream = await count_to_the_end(http, up.mcp_url, sid, steps=10)
        async with http.get(up.mcp_url, headers=headers(sid, **{"Last-Event-ID": f"{stream}-1"})) as resp:
            assert resp.status == 410
            error = (await resp.json())["error"]
        assert f"events after {stream}-1 are no longer in the session's event log" in error["message"]
        async with http.get(up.mcp_url, headers=headers(sid, **{"Last-Event-ID": "x"})) as resp:
            assert resp.status == 400
            assert "is not an event id" in (await resp.json())["error"]["message"]
    finally:
        assert up.stop() == 0


async def test_a_dropped_websocket_reattaches_and_gets_what_it_missed(tether: TetherUp) -> None:
    url = tether.base_url.replace("http://", "ws://") + "/ws"
    mcp = [websockets.Subprotocol("mcp")]
    async with websockets.connect(url, subprotocols=mcp) as ws:
        sid = ws.response.headers["Mcp-Session-Id"]
        await ws.send(orjson.dumps(initialize_message()).decode())
        await ws.recv()
        await ws.send(orjson.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).decode())
        await ws.send("{not json")  # answered on the channel too: it counts like any message
        error = orjson.loads(await ws.recv())
        assert error["error"]["code"] == -32700 and error["id"] is None
        await ws.send(orjson.dumps(slow_count(5, steps=STEPS, interval=0.02)).decode())
        received = [error, *[orjson.loads(await ws.recv()) for _ in range(4)]]  # after initialize's answer
        ws.transport.abort()  # the network drops: no close frame, so the session waits for us
    async with websockets.connect(f"{url}?session_id={sid}&last_event_id={1 + len(received)}",
                                  subprotocols=mcp) as ws:
        while "result" not in received[-1]:
            received.append(orjson.loads(await ws.recv()))
    progress = [m["params"]["progress"] for m in received if m.get("method") == "notifications/progress"]
    assert progress == [float(n) for n in range(1, STEPS + 1)]
    assert received[-1]["result"]["structuredContent"]["result"] == STEPS


async def test_websocket_needs_the_mcp_subprotocol(tether: TetherUp) -> None:
    url = tether.base_url.replace("http://", "ws://") + "/ws"
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(url):
            pass
    assert refused.value.response.status_code == 400
    assert b"subprotocol 'mcp'" in refused.value.response.body


async def test_a_resuming_reader_takes_the_stream_over_from_a_stale_one(tether: TetherUp,
                                                                       http: aiohttp.ClientSession) -> None:
    raw = RawClient(http, tether.mcp_url)
    sid = await raw.initialize()
    resume = headers(sid, **{"Last-Event-ID": "0-0"})
    async with http.get(tether.mcp_url, headers=resume) as stale, http.get(tether.mcp_url, headers=resume) as fresh:
        assert stale.status == fresh.status == 200
        # The stale reader's stream ends (only its priming event was sent), rather than dangling.
        assert [e.data for e in Parser().feed(await stale.content.read())] == [""]
        answer = await raw.call(sid, call_tool(2, "announce_change"))  # the node still serves
        assert answer["result"]["content"][0]["text"] == "announced"
        parser, events = Parser(), []
        async with asyncio.timeout(10):
            while not any(e.data for e in events):
                events += parser.feed(await fresh.content.readany())
    assert [orjson.loads(e.data)["method"] for e in events if e.data] == ["notifications/tools/list_changed"]


async def test_resuming_over_http_sse_and_leaving_does_not_end_the_session(tether: TetherUp,
                                                                          http: aiohttp.ClientSession) -> None:
    # Only a session that its own /sse stream opened ends with that stream: this one was made over
    # Streamable HTTP, and its owner merely looked in over HTTP+SSE.
    raw = RawClient(http, tether.mcp_url)
    sid = await raw.initialize()
    async with http.get(f"{tether.base_url}/sse?session_id={sid}", headers={"Accept": "text/event-stream"}) as resp:
        assert resp.status == 200
        assert (await resp.content.readline()).startswith(b"event: endpoint")

    async def stream_closed() -> bool:
        async with http.get(tether.base_url + "/metrics") as metrics:
            return 'tether_gateway_streams_open{transport="sse"} 0.0' in await metrics.text()

    await wait_until(stream_closed, 10, "the gateway to see the /sse client go")
    for request_id in (2, 3):  # an end, had one been started, is done by now
        assert (await raw.post({"jsonrpc": "2.0", "id": request_id, "method": "ping"}, sid=sid))[0] == 200
