"""The gateway-node link on its own: the gateway's `NodeLink` against a real node, with a real upstream."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator

import orjson
import pytest

from actors.internal import CREATE_HEADER, RESPONSE_HEADER
from actors.mcp import VERSION_HEADER
from actors.node import Node
from actors.server import serve_node
from actors.session import SessionActor
from actors.store.base import NodeRecord
from actors.store.memory import MemoryStore
from gateway.link import LinkLost, LinkResponse, NodeLink
from tests.support import call_tool, initialize_message, wait_until
from tether.config import Config
from tether.errors import CONNECTION_CLOSED
from tether.tasks import TaskSet

SECRET = "link-test-secret"
SID = "link-test-session"
LIMIT = 4096


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    config = Config(host="127.0.0.1", port=0, internal_secret=SECRET, keepalive_interval=0.5)
    async with serve_node(config, MemoryStore(), [sys.executable, "-m", "tether_demo.light"]) as node:
        await wait_until(lambda: _ready(node), timeout=10, what="the node's lease")
        yield node


async def _ready(node: Node) -> bool:
    return node.ready()


async def test_a_stream_its_reader_stops_taking_is_dropped_at_the_buffer_limit(node: Node) -> None:
    link = NodeLink(SECRET, buffer_limit=LIMIT)
    record = NodeRecord(node.node_id, node.url)
    try:
        async with await link.call(record, "POST", SID, body=orjson.dumps(initialize_message()), read_timeout=10,
                                   headers={CREATE_HEADER: "1", RESPONSE_HEADER: "json"}) as created:
            assert created.status == 200, await created.read()
        stream = await link.call(record, "GET", SID, read_timeout=10, headers={VERSION_HEADER: "2025-06-18"})
        assert stream.status == 200
        # Nobody reads `stream` from here on, as when the gateway's client stops reading.
        async with await link.call(record, "POST", SID, read_timeout=10, headers={RESPONSE_HEADER: "json"},
                                   body=orjson.dumps(call_tool(2, "tick", {"interval": 0.001, "count": 500}))) as ok:
            assert ok.status == 200

        async def all_sent() -> bool:
            async with await link.call(record, "POST", SID, read_timeout=10, headers={RESPONSE_HEADER: "json"},
                                       body=orjson.dumps(call_tool(3, "ticks_sent", {}))) as sent:
                return b'"text":"500"' in await sent.read()

        await wait_until(all_sent, timeout=10, what="the server to send every tick")
        with pytest.raises(LinkLost, match=f"over stream_buffer_bytes \\({LIMIT}\\)"):
            async with asyncio.timeout(10):  # a stream kept alive would be read forever
                async for _ in stream.chunks():  # what had arrived is gone: the stream was dropped
                    pass

        async def reopens() -> bool:  # the node freed the session's stream: a new reader may take it
            async with await link.call(record, "GET", SID, read_timeout=10) as again:
                return again.status == 200

        await wait_until(reopens, timeout=10, what="the node to free the dropped stream")
        async with await link.call(record, "POST", SID, read_timeout=10, headers={RESPONSE_HEADER: "json"},
                                   body=orjson.dumps(call_tool(4, "ticks_sent", {}))) as after:
            assert after.status == 200  # the link, shared with the dropped stream, goes on
    finally:
        await link.close()


async def test_an_idle_get_stream_costs_the_node_nothing_and_keeps_its_session() -> None:
    # The gateway pings its clients itself: the node sends nothing on an idle GET stream, not even at
    # its keep-alive interval, and the attached stream alone keeps the session from idle expiry.
    config = Config(host="127.0.0.1", port=0, internal_secret=SECRET, keepalive_interval=0.2,
                    idle_timeout=0.5, scan_interval=0.05)
    async with serve_node(config, MemoryStore(), [sys.executable, "-m", "tether_demo.light"]) as node:
        await wait_until(lambda: _ready(node), timeout=10, what="the node's lease")
        link = NodeLink(SECRET)
        record = NodeRecord(node.node_id, node.url)
        try:
            async with await link.call(record, "POST", SID, body=orjson.dumps(initialize_message()),
                                       read_timeout=10, headers={CREATE_HEADER: "1", RESPONSE_HEADER: "json"}):
                pass
            async with await link.call(record, "GET", SID, read_timeout=None,
                                       headers={VERSION_HEADER: "2025-06-18"}) as stream:
                quiet = 0
                async with asyncio.timeout(20):
                    async for chunk in stream.chunks(idle=0.1):
                        if chunk.startswith(b"id:"):
                            continue  # the priming event, sent when the stream opens
                        assert chunk == b"", f"the node sent {chunk!r} on an idle stream"
                        quiet += 1
                        if quiet == 30:  # 3 s: 15 of the node's keep-alive intervals, 6 idle timeouts
                            break
                assert SID in node.actors and node.actors[SID].ended is None
            # The stream is gone: the idle clock runs again.
            await wait_until(lambda: _ended(node), timeout=10, what="idle expiry after the stream closed")
        finally:
            await link.close()


async def _ended(node: Node) -> bool:
    return SID not in node.actors


@contextlib.asynccontextmanager
async def slow_request(node: Node, mode: str, seconds: float) -> AsyncIterator[tuple[NodeLink, SessionActor,
                                                                                  asyncio.Task[LinkResponse]]]:
    """A session over the link, and a request of it (`mode`) that its server works on for `seconds`,
    once the actor has it; with no task of the node's own waiting for its answer."""
    link = NodeLink(SECRET)
    record = NodeRecord(node.node_id, node.url)
    tasks = TaskSet("test")
    try:
        async with await link.call(record, "POST", SID, body=orjson.dumps(initialize_message()), read_timeout=10,
                                   headers={CREATE_HEADER: "1", RESPONSE_HEADER: "json"}):
            pass
        actor = node.actors[SID]
        slow = tasks.spawn(link.call(record, "POST", SID, read_timeout=30, headers={RESPONSE_HEADER: mode},
                                     body=orjson.dumps(call_tool(2, "burn_cpu", {"seconds": seconds}))), "slow")
        await wait_until(lambda: _pending(node, 1), timeout=10, what="the request to reach the actor")
        # It waits with no task: its answer goes out from the actor's delivery.
        assert not [task for task in asyncio.all_tasks() if task.get_name() == f"link:{actor.tag}"]
        yield link, actor, slow
    finally:
        await tasks.close()
        await link.close()


async def _pending(node: Node, count: int) -> bool:
    return len(node.actors[SID].pending) == count


async def test_an_auto_answer_whose_client_leaves_before_it_begins_is_abandoned(node: Node) -> None:
    # Nothing of it reached the client (no head, no event id): like a JSON answer, nothing can resume
    # it, so the node stops waiting for it and tells the upstream, rather than log it for no one.
    async with slow_request(node, "auto", 2) as (_, actor, slow):
        streams = len(actor.log.streams) - 1  # less the request's own, still undecided
        slow.cancel()  # the gateway's client left
        await wait_until(lambda: _pending(node, 0), timeout=10, what="the node to abandon the request")
        assert len(actor.log.streams) == streams  # its stream is not kept for a reader that cannot come


async def test_a_json_answer_whose_session_ends_first_is_the_session_s_end(node: Node) -> None:
    async with slow_request(node, "json", 10) as (link, _, slow):
        async with await link.call(NodeRecord(node.node_id, node.url), "DELETE", SID, read_timeout=30) as ended:
            assert ended.status == 200
        async with await asyncio.wait_for(slow, 30) as resp:
            assert (resp.status, resp.content_type) == (200, "application/json")
            answer = orjson.loads(await resp.read())
        assert answer["id"] == 2 and answer["error"]["code"] == CONNECTION_CLOSED, answer
        assert "Session ended" in answer["error"]["message"]


async def test_an_auto_answer_that_takes_past_the_keepalive_becomes_a_pinged_stream(node: Node) -> None:
    # The answer waits without a task; when the keep-alive falls due first it is a stream from then on:
    # primed, pinged, and its answer an event with an id, as if it had been a stream from the start.
    link = NodeLink(SECRET)
    record = NodeRecord(node.node_id, node.url)
    try:
        async with await link.call(record, "POST", SID, body=orjson.dumps(initialize_message()), read_timeout=10,
                                   headers={CREATE_HEADER: "1", RESPONSE_HEADER: "json"}):
            pass
        async with await link.call(record, "POST", SID, read_timeout=30,
                                   headers={RESPONSE_HEADER: "auto", VERSION_HEADER: "2025-11-25"},
                                   body=orjson.dumps(call_tool(2, "burn_cpu", {"seconds": 1.5}))) as slow:
            assert slow.status == 200
            assert slow.content_type == "text/event-stream"
            body = await slow.read()
        priming, ping, *events = [part for part in body.split(b"\n\n") if part]
        assert priming.startswith(b"id: ") and priming.endswith(b"data: ")
        assert ping == b": ping"
        answer = [e for e in events if e.startswith(b"id: ")]
        assert len(answer) == 1 and b'"id":2' in answer[0] and b'"result"' in answer[0], body
        async with await link.call(record, "POST", SID, read_timeout=10, headers={RESPONSE_HEADER: "auto"},
                                   body=orjson.dumps(call_tool(3, "increment", {}))) as quick:
            assert quick.content_type == "application/json"  # a prompt answer is still JSON
            assert orjson.loads(await quick.read())["id"] == 3
    finally:
        await link.close()
