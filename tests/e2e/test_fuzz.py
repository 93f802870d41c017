"""Generated hostile requests against a live, guarded gateway: never a 5xx, never an unhandled exception.

Hypothesis builds each request from the pieces a client controls: method,
path, query, credentials, the MCP headers and the body (JSON-RPC shaped,
JSON of any shape, or raw bytes), mixing in a live session's id and
forgeries of it. Every answer must be a 4xx or a 2xx, the live session must
still answer, and what the gateway and nodes logged meanwhile must hold no
traceback.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.guarded import Guarded
from tests.support import ACCEPT_BOTH, RawClient

VISIBLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
TEXT = st.text(VISIBLE, max_size=24)
SCALARS = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | TEXT
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=24)
METHODS = st.sampled_from(["initialize", "tools/list", "tools/call", "ping", "notifications/initialized",
                           "notifications/cancelled", "resources/read", "prompts/get", "whoami"]) | TEXT
MESSAGE = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "2.0", "1.0"]) | JSON},
    optional={"id": st.integers(-5, 2**63 - 1) | TEXT | JSON, "method": METHODS | JSON, "params": JSON,
              "result": JSON, "error": JSON})
TOOLS = st.sampled_from(["increment", "whoami", "add_note", "environment", "no-such-tool"])
PLAUSIBLE = st.one_of(
    st.builds(lambda i, m, p: {"jsonrpc": "2.0", "id": i, "method": m, "params": p},
              st.integers(0, 10**6) | TEXT, METHODS, st.dictionaries(TEXT, JSON, max_size=3)),
    st.builds(lambda i, name, args: {"jsonrpc": "2.0", "id": i, "method": "tools/call",
                                     "params": {"name": name, "arguments": args}},
              st.integers(0, 10**6), TOOLS, st.dictionaries(st.sampled_from(["by", "text"]), JSON, max_size=2)),
    st.builds(lambda i, r: {"jsonrpc": "2.0", "id": i, "result": r}, st.integers(0, 10**6), JSON),
)
VERSIONS = st.sampled_from(["2024-11-05", "2026-07-28"]) | TEXT


def mostly(usual: st.SearchStrategy[Any], wild: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`usual` about four times in five, else `wild`: most requests get deep enough to reach a node."""
    return st.integers(0, 4).flatmap(lambda n: wild if n == 0 else usual)


@st.composite
def requests(draw: st.DrawFn, guarded: Guarded, live: dict[str, str]) -> tuple[str, str, dict[str, str], bytes]:
    live_sid = live["sid"]
    method = draw(mostly(st.just("POST"), st.sampled_from(["GET", "DELETE", "PUT", "OPTIONS", "PATCH"])))
    path = draw(mostly(st.just("/mcp"), st.sampled_from(["/messages", "/sse", "/ws", "/mcp/extra", "/"])))
    sid = draw(mostly(st.just(live_sid), st.sampled_from([live_sid[:-1] + "A", live_sid[:32], "n_" + "x" * 60])
                      | TEXT))
    if draw(st.booleans()):
        path += "?session_id=" + draw(mostly(st.just(sid), TEXT.map(lambda t: t.replace("#", ""))))
    headers: dict[str, str] = {}
    credentials = draw(mostly(st.sampled_from(["alice", "jwt"]), st.sampled_from(["bob", "garbage", "none"])))
    if credentials in ("alice", "bob"):
        headers.update(guarded.auth(credentials))
    elif credentials == "jwt":
        headers["Authorization"] = "Bearer " + guarded.jwt("fuzzer")
    elif credentials == "garbage":
        headers["Authorization"] = draw(TEXT)
    usual = {  # header -> (how often it is sent, of 5; the values it usually has; the wild ones)
        "Accept": (5, st.just(ACCEPT_BOTH), st.sampled_from(["application/json", "text/event-stream", "*/*"]) | TEXT),
        "Content-Type": (5, st.just("application/json"), st.just("application/json; charset=utf-8") | TEXT),
        "Mcp-Session-Id": (4, st.just(sid), st.just(sid)),
        "MCP-Protocol-Version": (2, st.sampled_from(["2025-03-26", "2025-06-18", "2025-11-25"]), VERSIONS),
        "Mcp-Method": (1, METHODS, TEXT),
        "Mcp-Name": (1, TEXT, st.sampled_from(["=?base64?aGk=?=", "=?base64?***?="])),
        "Last-Event-ID": (1, st.sampled_from(["0-1", "1-3", "0-999999"]), TEXT),
        "Origin": (1, st.just("http://localhost:3000"), st.just("http://evil.example") | TEXT),
        "Upgrade": (1, st.just("websocket"), TEXT),
    }
    for name, (often, values, wild) in usual.items():
        if draw(st.integers(0, 4)) < often:
            headers[name] = draw(mostly(values, wild))
    wild = (MESSAGE.map(orjson.dumps) | st.lists(MESSAGE, max_size=3).map(orjson.dumps)
            | JSON.map(orjson.dumps) | st.binary(max_size=256))
    return method, path, headers, draw(mostly(PLAUSIBLE.map(orjson.dumps), wild))


@pytest.fixture
async def live(guarded: Guarded) -> dict[str, str]:
    """alice's live session, which the generated requests aim at (and which one may end: then a new one)."""
    async with aiohttp.ClientSession() as http:
        return {"sid": await RawClient(http, guarded.up.mcp_url, guarded.auth("alice")).initialize()}


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
async def test_generated_requests_never_get_a_5xx(guarded: Guarded, live: dict[str, str],
                                                  data: st.DataObject) -> None:
    method, path, headers, body = data.draw(requests(guarded, live))
    log_from = guarded.up.log_path.stat().st_size
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.request(method, guarded.up.base_url + path, headers=headers, data=body) as resp:
            event(f"{method} {path.split('?')[0]} -> {resp.status}")
            assert resp.status < 500, (resp.status, await _peek(resp))
        alice = RawClient(http, guarded.up.mcp_url, guarded.auth("alice"))
        status, _, _ = await alice.post({"jsonrpc": "2.0", "id": 1, "method": "ping"}, sid=live["sid"])
        if method == "DELETE" and resp.status == 200:  # alice ended her own session: that is hers to do
            assert status == 404
            live["sid"] = await alice.initialize()
        else:
            assert status == 200  # nothing else ends or breaks it
    with guarded.up.log_path.open() as log:
        log.seek(log_from)
        written = log.read()
    for sign in ("Traceback", "Error handling request", "Unhandled exception"):
        assert sign not in written, written[-4000:]


async def _peek(resp: aiohttp.ClientResponse) -> Any:
    if resp.content_type == "text/event-stream":
        return "(a stream)"
    return await resp.read()
