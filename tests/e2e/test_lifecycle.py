"""Sessions end cleanly: DELETE, idle expiry, upstream exit, and stopping `tether up` itself."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
import websockets

from tests.conftest import start_tether
from tests.support import (
    RawClient,
    TetherUp,
    call_tool,
    initialize_message,
    node_metric,
    process_exists,
    wait_process_gone,
    wait_until,
)

IDLE = 1.0
SCAN = 0.2
KEEPALIVE = 0.2
GRACE = 1.0
# Rule 4: gone within idle timeout plus one scan interval (plus the kill grace and scheduling slack).
REAP_DEADLINE = IDLE + SCAN + GRACE + 5.0
LIST = {"jsonrpc": "2.0", "id": 3, "method": "tools/list"}
BURST = 120  # sessions opened at once


@pytest.fixture(scope="module")
def short_idle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TetherUp]:
    up = start_tether(tmp_path_factory.mktemp("idle"), "--idle-timeout", str(IDLE), "--scan-interval",
                      str(SCAN), "--keepalive-interval", str(KEEPALIVE), "--kill-grace", str(GRACE))
    yield up
    assert up.stop() == 0, up.log()[-3000:]


@pytest.fixture
def idle_raw(http: aiohttp.ClientSession, short_idle: TetherUp) -> RawClient:
    return RawClient(http, short_idle.mcp_url)


async def test_delete_ends_the_session_and_reaps_its_server(raw: RawClient, tether: TetherUp,
                                                            http: aiohttp.ClientSession) -> None:
    sid = await raw.initialize()
    pid = (await raw.whoami(sid))["pid"]
    deleted_before = await node_metric(http, tether, "tether_node_sessions_ended_total", reason="deleted")
    async with raw.session.delete(raw.url, headers={"Mcp-Session-Id": sid}) as resp:
        assert resp.status == 200
    await wait_process_gone(pid, timeout=10)
    status, _, _ = await raw.post(LIST, sid=sid)
    assert status == 404
    async with raw.session.get(raw.url, headers={"Mcp-Session-Id": sid, "Accept": "text/event-stream"}) as r:
        assert r.status == 404
    async with raw.session.delete(raw.url, headers={"Mcp-Session-Id": sid}) as resp:
        assert resp.status == 404
    deleted_after = await node_metric(http, tether, "tether_node_sessions_ended_total", reason="deleted")
    assert deleted_after == deleted_before + 1


async def test_idle_session_is_reaped_and_then_404(idle_raw: RawClient, short_idle: TetherUp,
                                                   http: aiohttp.ClientSession) -> None:
    sid = await idle_raw.initialize()
    pid = (await idle_raw.whoami(sid))["pid"]
    await wait_process_gone(pid, timeout=REAP_DEADLINE)
    status, _, _ = await idle_raw.post(LIST, sid=sid)
    assert status == 404
    assert await node_metric(http, short_idle, "tether_node_sessions_ended_total", reason="idle") >= 1


async def test_open_stream_keeps_the_session_alive(idle_raw: RawClient) -> None:
    sid = await idle_raw.initialize()
    pid = (await idle_raw.whoami(sid))["pid"]
    headers = {"Mcp-Session-Id": sid, "Accept": "text/event-stream"}
    async with idle_raw.session.get(idle_raw.url, headers=headers) as stream:
        assert stream.status == 200
        pings = 0
        # Each ping is one keep-alive interval: read three idle timeouts' worth of them.
        while pings < 3 * IDLE / KEEPALIVE:
            line = await stream.content.readline()
            assert line, "the stream closed while the session should be alive"
            pings += line.startswith(b": ping")
        assert process_exists(pid)
        assert (await idle_raw.call(sid, LIST))["result"]["tools"]
    await wait_process_gone(pid, timeout=REAP_DEADLINE)  # with the stream gone, idle expiry resumes


async def test_each_stream_is_pinged_only_after_an_interval_of_silence(idle_raw: RawClient) -> None:
    # The edge pings its streams from one timing wheel, not a timer each: every open stream gets its
    # keep-alives, one that carries messages is pinged only once it has been silent for the interval,
    # and once the last stream has gone (the wheel's timer with it), the next one is pinged too.
    loop = asyncio.get_running_loop()

    async def silences(pings: int, busy: bool = False) -> tuple[list[float], int]:
        """A new session's GET stream, held until `pings` keep-alives came (and, `busy`, every message
        sent): the silence before each, as read here, and how many messages came. `busy`: after the
        first ping, messages are sent back to back for three intervals (how many: in `sent`)."""
        sid = await idle_raw.initialize()  # its stream opens at once, well within its idle timeout
        gaps: list[float] = []
        messages = 0
        pinged, done = asyncio.Event(), asyncio.Event()
        if not busy:
            done.set()

        async def read(stream: aiohttp.ClientResponse) -> None:
            nonlocal messages
            last = loop.time()
            while len(gaps) < pings or not done.is_set() or messages < len(sent if busy else ()):
                line = await stream.content.readline()
                assert line, "the stream closed while its session was alive"
                if line.startswith(b": ping"):
                    gaps.append(loop.time() - last)
                    pinged.set()
                messages += line.startswith(b"data:")
                if line.strip():
                    last = loop.time()

        async def send() -> None:
            await pinged.wait()
            until = loop.time() + 3 * KEEPALIVE
            while busy and loop.time() < until:
                sent.append(await idle_raw.call(sid, call_tool(20 + len(sent), "announce_change")))
            done.set()

        headers = {"Mcp-Session-Id": sid, "Accept": "text/event-stream"}
        async with idle_raw.session.get(idle_raw.url, headers=headers) as stream:
            assert stream.status == 200
            async with asyncio.timeout(30), asyncio.TaskGroup() as both:
                both.create_task(read(stream))
                both.create_task(send())
        return gaps, messages

    sent: list[dict[str, object]] = []
    held = await asyncio.gather(*(silences(3, busy=i == 0) for i in range(4)))
    for gaps, _ in held:
        # Pinged after between half a wheel step less than the interval and two steps more; read
        # here, with slack for the reading.
        assert min(gaps) >= KEEPALIVE / 2, f"a ping came after only {min(gaps):.3f}s of silence"
    assert held[0][1] == len(sent) > 3, "the announcements did not come on the stream"
    again, _ = await silences(2)  # the wheel emptied when the streams closed
    assert len(again) == 2


async def test_server_messages_reach_the_stream_or_wait_in_the_log(idle_raw: RawClient) -> None:
    sid = await idle_raw.initialize()
    headers = {"Mcp-Session-Id": sid, "Accept": "text/event-stream"}
    # With no stream open, the notification waits in the session's event log...
    await idle_raw.call(sid, call_tool(4, "announce_change"))
    async with idle_raw.session.get(idle_raw.url, headers=headers) as stream:
        assert stream.status == 200
        assert await next_message(stream) == {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
        # ...and with one open, it arrives there, not on the POST's answer.
        answer = await idle_raw.call(sid, call_tool(5, "announce_change"))
        assert answer["result"]["content"][0]["text"] == "announced"
        assert (await next_message(stream))["method"] == "notifications/tools/list_changed"
        async with idle_raw.session.get(idle_raw.url, headers=headers) as second:
            assert second.status == 409  # one GET stream per session at a time


async def next_message(stream: aiohttp.ClientResponse) -> dict[str, object]:
    """The next JSON-RPC message on an SSE stream, skipping keep-alive comments."""
    while line := await stream.content.readline():
        if line.startswith(b"data:"):
            return orjson.loads(line[5:])  # type: ignore[no-any-return]
    raise AssertionError("the stream ended")


async def test_upstream_exit_ends_the_session(idle_raw: RawClient) -> None:
    sid = await idle_raw.initialize()
    pid = (await idle_raw.whoami(sid))["pid"]
    os.kill(pid, signal.SIGKILL)  # a crash of the server this test's tether started

    async def answers_404() -> bool:
        return (await idle_raw.post(LIST, sid=sid))[0] == 404

    await wait_until(answers_404, timeout=10, what="404 after the upstream died")
    await wait_process_gone(pid, timeout=10)


async def test_stopping_tether_up_leaves_no_process_behind(tmp_path: Path,
                                                            http: aiohttp.ClientSession) -> None:
    up = start_tether(tmp_path, "--kill-grace", "1")
    raw = RawClient(http, up.mcp_url)
    sids = [await raw.initialize() for _ in range(4)]
    upstream_pids = [(await raw.whoami(sid))["pid"] for sid in sids]
    # One request still running when Ctrl-C lands.
    pending = raw.session.post(raw.url, json=call_tool(5, "count_slowly", {"steps": 1}),
                               headers={"Mcp-Session-Id": sids[0], "Accept": "application/json"})
    async with pending as resp:
        assert resp.status == 200
    node_pids = [pid for _, pid in up.nodes.values()]
    assert up.stop() == 0
    for pid in [*upstream_pids, *node_pids]:
        assert not process_exists(pid), f"pid {pid} outlived tether up"
    assert "Traceback" not in up.log()


async def test_a_dropped_stream_frees_its_slot_at_once(raw: RawClient, tether: TetherUp) -> None:
    # The shared tether pings every 15 s: a slot freed within 5 s was freed by the disconnect itself.
    sid = await raw.initialize()
    headers = {"Mcp-Session-Id": sid, "Accept": "text/event-stream"}
    async with aiohttp.ClientSession() as first:
        async with first.get(raw.url, headers=headers) as stream:
            assert stream.status == 200
    # that client and its connection are gone now

    async def reopens() -> bool:
        async with raw.session.get(raw.url, headers=headers) as again:
            return again.status == 200

    await wait_until(reopens, timeout=5, what="the GET stream slot freed after a disconnect")


async def test_an_idle_websocket_keeps_its_session_alive(idle_raw: RawClient, short_idle: TetherUp) -> None:
    url = short_idle.base_url.replace("http://", "ws://") + "/ws"
    async with websockets.connect(url, subprotocols=[websockets.Subprotocol("mcp")]) as ws:
        await ws.send(orjson.dumps(initialize_message()).decode())
        await ws.recv()
        await ws.send(orjson.dumps(call_tool(2, "whoami")).decode())
        pid = orjson.loads(orjson.loads(await ws.recv())["result"]["content"][0]["text"])["pid"]
        # A session with no stream, started now, is reaped after one idle timeout: by then the
        # WebSocket's would have been too, but for its keep-alive pings.
        control = await idle_raw.initialize()
        await wait_process_gone((await idle_raw.whoami(control))["pid"], timeout=REAP_DEADLINE)
        assert process_exists(pid)
        await ws.send(orjson.dumps(call_tool(3, "increment")).decode())
        assert orjson.loads(await ws.recv())["result"]["content"][0]["text"] == "1"
    await wait_process_gone(pid, timeout=REAP_DEADLINE)  # closed with 1000: the session ends with it


async def test_a_burst_of_new_sessions_leaves_the_node_its_lease(tmp_path: Path,
                                                                 http: aiohttp.ClientSession) -> None:
    # Each new session forks an upstream; forks taken all at once would hold the node's loop past
    # its lease (1 s here), and a node that cannot prove its lease ends every session it holds.
    up = start_tether(tmp_path, "--nodes", "1", "--heartbeat-ttl", "1", "--membership-refresh", "0.2",
                      "--upstream-command", f"{sys.executable} -m tether_demo.light")
    try:
        raw = RawClient(http, up.mcp_url)
        sids = await asyncio.gather(*(raw.initialize() for _ in range(BURST)))
        for sid in sids:  # every session is still there, on a node that kept its lease
            assert "result" in await raw.call(sid, LIST)
        assert "lease.lost" not in up.log()
    finally:
        assert up.stop() == 0, up.log()[-3000:]
