"""Every Streamable HTTP error a client can provoke, by raw request, with status and body checked."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from actors.sse import Parser
from tests.conftest import BODY_LIMIT
from tests.support import ACCEPT_BOTH, RawClient, call_tool, initialize_message

LIST = {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}
UNKNOWN_SID = "A" * 32  # the shape of an id Tether mints, but never minted


def error_of(body: bytes) -> dict[str, Any]:
    return orjson.loads(body)["error"]  # type: ignore[no-any-return]


async def test_request_without_session_id_is_400(raw: RawClient) -> None:
    status, _, body = await raw.post(LIST)
    assert status == 400
    assert "Mcp-Session-Id" in error_of(body)["message"]


@pytest.mark.parametrize("sid", [UNKNOWN_SID, "not-one-of-ours"])
async def test_unknown_session_is_404(raw: RawClient, sid: str) -> None:
    status, _, body = await raw.post(LIST, sid=sid)
    assert status == 404
    assert "Session not found" in error_of(body)["message"]


async def test_session_id_with_forbidden_characters_is_400(raw: RawClient) -> None:
    status, _, body = await raw.post(LIST, sid="has space")
    assert status == 400
    assert "visible ASCII" in error_of(body)["message"]


@pytest.mark.parametrize("origin", ["http://evil.example", "https://localhost.evil.example:443", "http://[evil"])
async def test_disallowed_origin_is_403(raw: RawClient, origin: str) -> None:
    status, _, body = await raw.post(initialize_message(), headers={"Origin": origin})
    assert status == 403
    assert origin in error_of(body)["message"]


async def test_localhost_origin_is_allowed(raw: RawClient) -> None:
    status, headers, _ = await raw.post(initialize_message(), accept="application/json",
                                        headers={"Origin": "http://localhost:6274"})
    assert status == 200
    assert "Mcp-Session-Id" in headers


async def test_post_accepting_neither_json_nor_sse_is_406(raw: RawClient) -> None:
    status, _, body = await raw.post(initialize_message(), accept="text/html")
    assert status == 406
    assert "Accept" in error_of(body)["message"]


async def test_stream_without_sse_accept_is_406(raw: RawClient) -> None:
    sid = await raw.initialize()
    async with raw.session.get(raw.url, headers={"Mcp-Session-Id": sid, "Accept": "application/json"}) as r:
        assert r.status == 406
        assert "text/event-stream" in error_of(await r.read())["message"]


async def test_wrong_content_type_is_415(raw: RawClient) -> None:
    status, _, body = await raw.post(initialize_message(), content_type="text/plain")
    assert status == 415
    assert "application/json" in error_of(body)["message"]


async def test_unsupported_protocol_version_is_400(raw: RawClient) -> None:
    sid = await raw.initialize()
    status, _, body = await raw.post(LIST, sid=sid, headers={"MCP-Protocol-Version": "1999-01-01"})
    assert status == 400
    error = error_of(body)
    assert "1999-01-01" in error["message"]
    assert "2025-11-25" in error["data"]["supported"]


async def test_body_over_the_limit_is_413_and_the_session_lives_on(raw: RawClient) -> None:
    sid = await raw.initialize()
    big = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
           "params": {"name": "add_note", "arguments": {"text": "x" * BODY_LIMIT}}}
    status, _, body = await raw.post(big, sid=sid)
    assert status == 413
    assert str(BODY_LIMIT) in error_of(body)["message"]
    assert (await raw.call(sid, LIST))["result"]["tools"]  # nothing already accepted was lost


async def test_bad_json_is_a_parse_error(raw: RawClient) -> None:
    status, _, body = await raw.post(None, raw=b'{"jsonrpc": "2.0", "id": 1, "method": ')
    assert status == 400
    answer = orjson.loads(body)
    assert answer["id"] is None
    assert answer["error"]["code"] == -32700


@pytest.mark.parametrize("message, fragment", [
    ({"hello": "world"}, '"jsonrpc" must be "2.0"'),
    ({"jsonrpc": "2.0", "id": 1, "method": 5}, '"method" must be a non-empty string'),
    ({"jsonrpc": "2.0", "id": [1], "method": "tools/list"}, '"id" must be a string or an integer'),
    ([1, 2], "a JSON-RPC message must be an object"),
])
async def test_valid_json_that_is_not_json_rpc_is_invalid_request(raw: RawClient, message: Any,
                                                                 fragment: str) -> None:
    sid = await raw.initialize()
    status, _, body = await raw.post(message, sid=sid, headers={"MCP-Protocol-Version": "2025-03-26"})
    assert status == 400
    assert error_of(body)["code"] == -32600
    assert fragment in error_of(body)["message"]


async def test_batch_is_refused_where_the_revision_forbids_it(raw: RawClient) -> None:
    sid = await raw.initialize()
    status, _, body = await raw.post([LIST, LIST], sid=sid, headers={"MCP-Protocol-Version": "2025-06-18"})
    assert status == 400
    assert "batches are not allowed" in error_of(body)["message"]


async def test_batch_is_answered_where_the_revision_allows_it(raw: RawClient) -> None:
    sid = await raw.initialize()
    batch = [LIST, {**LIST, "id": 8}]
    status, _, body = await raw.post(batch, sid=sid, accept="application/json",
                                     headers={"MCP-Protocol-Version": "2025-03-26"})
    assert status == 200
    assert sorted(answer["id"] for answer in orjson.loads(body)) == [7, 8]


async def test_second_initialize_on_a_session_is_400(raw: RawClient) -> None:
    sid = await raw.initialize()
    status, _, body = await raw.post(initialize_message(), sid=sid)
    assert status == 400
    assert "already initialized" in error_of(body)["message"]


async def test_other_methods_are_405(raw: RawClient) -> None:
    async with raw.session.put(raw.url, data=b"{}") as resp:
        assert resp.status == 405


async def test_notification_is_202_with_no_body(raw: RawClient) -> None:
    sid = await raw.initialize()
    note = {"jsonrpc": "2.0", "method": "notifications/roots/list_changed"}
    status, _, body = await raw.post(note, sid=sid)
    assert (status, body) == (202, b"")


async def test_answer_is_json_or_sse_as_the_client_accepts(raw: RawClient) -> None:
    sid = await raw.initialize()
    status, headers, body = await raw.post(LIST, sid=sid, accept="application/json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert orjson.loads(body)["id"] == 7
    status, headers, body = await raw.post(LIST, sid=sid, accept="text/event-stream")
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert b"event: message" in body and b'"id":7' in body


async def test_with_both_accepted_an_answer_alone_is_json_and_one_after_progress_is_a_stream(raw: RawClient) -> None:
    # response_mode "auto", the default: nothing to resume in an answer that is all there is.
    sid = await raw.initialize()
    status, headers, body = await raw.post(LIST, sid=sid, accept=ACCEPT_BOTH)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert orjson.loads(body)["id"] == 7
    counting = call_tool(8, "count_slowly", {"steps": 2})
    counting["params"]["_meta"] = {"progressToken": "p8"}
    status, headers, body = await raw.post(counting, sid=sid, accept=ACCEPT_BOTH)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in Parser().feed(body) if e.data]
    assert [orjson.loads(e.data).get("method") for e in events] == [
        "notifications/progress", "notifications/progress", None]
    assert orjson.loads(events[-1].data)["id"] == 8 and all(e.id for e in events)  # ids: it resumes
