from __future__ import annotations

import base64

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.ids import SessionIds, is_valid_session_id
from actors.mcp import check_depth
from gateway import rules
from tether.config import Config
from tether.errors import (
    BadRequest,
    Forbidden,
    HeaderMismatch,
    NotAcceptable,
    ParseError,
    TetherError,
    UnsupportedMediaType,
    UnsupportedProtocolVersion,
)

ALLOWED = Config().allowed_origins


@pytest.mark.parametrize("origin", [None, "http://localhost", "http://localhost:6274", "http://127.0.0.1:3000",
                                    "http://[::1]:8080", "https://localhost"])
def test_local_origins_pass(origin: str | None) -> None:
    rules.check_origin(origin, ALLOWED)


@pytest.mark.parametrize("origin", ["http://evil.example", "http://localhost.evil.example", "http://[evil",
                                    "null", "file://"])
def test_other_origins_are_forbidden(origin: str) -> None:
    with pytest.raises(Forbidden, match="not allowed"):
        rules.check_origin(origin, ALLOWED)


def test_wildcard_allows_any_origin() -> None:
    rules.check_origin("http://evil.example", ("*",))


@pytest.mark.parametrize("accept, preferred, mode", [
    ("application/json, text/event-stream", "auto", "auto"),
    ("application/json", "auto", "json"),
    ("text/event-stream", "auto", "sse"),
    ("application/json, text/event-stream", "sse", "sse"),
    ("application/json, text/event-stream", "json", "json"),
    ("application/json", "sse", "json"),
    ("text/event-stream", "json", "sse"),
    ("*/*", "sse", "sse"),
])
def test_post_answer_mode(accept: str | None, preferred: str, mode: str) -> None:
    assert rules.post_answer_mode("application/json; charset=utf-8", accept, preferred) == mode


def test_post_needs_json_content_and_an_acceptable_answer() -> None:
    for _ in range(2):  # answer modes are remembered; a refusal is not, and is refused again
        with pytest.raises(UnsupportedMediaType, match="text/plain"):
            rules.post_answer_mode("text/plain", "application/json", "sse")
    with pytest.raises(NotAcceptable):
        rules.post_answer_mode("application/json", "text/html", "sse")
    with pytest.raises(NotAcceptable):
        rules.check_stream_accept("application/json")
    with pytest.raises(NotAcceptable):  # a client must say what it accepts
        rules.post_answer_mode("application/json", None, "sse")
    with pytest.raises(NotAcceptable):
        rules.check_stream_accept(None)


def test_protocol_versions() -> None:
    assert rules.protocol_version(None) == "2025-03-26"
    assert rules.protocol_version("2025-11-25") == "2025-11-25"
    assert rules.protocol_version("2026-07-28") == "2026-07-28"
    with pytest.raises(UnsupportedProtocolVersion) as info:
        rules.protocol_version("2024-01-01")
    assert info.value.status == 400 and "2025-06-18" in info.value.data["supported"]  # type: ignore[index]


def test_parse_post() -> None:
    post = rules.parse_post(b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}', "2025-11-25", max_depth=64)
    assert post.initialize and post.has_requests and not post.batch
    note = rules.parse_post(b'{"jsonrpc":"2.0","method":"notifications/initialized"}', "2025-11-25", max_depth=64)
    assert not note.has_requests
    with pytest.raises(ParseError):
        rules.parse_post(b"{", "2025-11-25", max_depth=64)
    with pytest.raises(BadRequest, match="batches are not allowed"):
        rules.parse_post(b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]', "2025-11-25", max_depth=64)
    batch = rules.parse_post(b'[{"jsonrpc":"2.0","id":1,"method":"ping"}]', "2025-03-26", max_depth=64)
    assert batch.batch
    with pytest.raises(BadRequest, match="initialize must not be part of a batch"):
        rules.parse_post(b'[{"jsonrpc":"2.0","id":1,"method":"initialize"}]', "2025-03-26", max_depth=64)
    with pytest.raises(BadRequest, match="exactly one"):
        rules.parse_post(b'{"jsonrpc":"2.0","id":1}', "2025-11-25", max_depth=64)


def test_stateless_fallback_names_the_handshake_revisions() -> None:
    error = rules.stateless_fallback("2026-07-28")
    assert error.rpc_code == -32022
    assert error.data == {"supported": ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"],
                          "requested": "2026-07-28"}


def test_affinity_sources() -> None:
    post = rules.parse_post(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"arguments":{"ws":"w-7"}}}',
                            "2025-11-25", max_depth=64)
    headers, cookies, query = {"X-Workspace": "w-1"}, {"ws": "w-2"}, {"ws": "w-3"}
    assert rules.AffinitySource.parse("header:X-Workspace").value(headers, cookies, query, post) == "w-1"
    assert rules.AffinitySource.parse("cookie:ws").value(headers, cookies, query, post) == "w-2"
    assert rules.AffinitySource.parse("query:ws").value(headers, cookies, query, post) == "w-3"
    assert rules.AffinitySource.parse("json:/params/arguments/ws").value({}, {}, {}, post) == "w-7"
    assert rules.AffinitySource.parse("json:/params/missing").value({}, {}, {}, post) is None
    assert rules.AffinitySource.parse("header:X-Workspace").value({"X-Workspace": "has space"}, {}, {},
                                                                  None) is None


@pytest.mark.parametrize("spec", ["header", "header:", "body:/x", "json:params"])
def test_bad_affinity_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        rules.AffinitySource.parse(spec)


MODERN = "2026-07-28"


def modern_post(method: str, **params: object) -> rules.Post:
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    return rules.parse_post(orjson.dumps(body), MODERN, max_depth=64)


@pytest.mark.parametrize(("headers", "post", "complaint"), [
    ({}, modern_post("tools/list"), "Mcp-Method header is required"),
    ({"Mcp-Method": "tools/list"}, modern_post("tools/call", name="add"), "Mcp-Method is 'tools/list'"),
    ({"Mcp-Method": "tools/call"}, modern_post("tools/call", name="add"), "Mcp-Name header is required"),
    ({"Mcp-Method": "tools/call", "Mcp-Name": "rm"}, modern_post("tools/call", name="add"), "Mcp-Name is 'rm'"),
    ({"Mcp-Method": "resources/read", "Mcp-Name": "file:///a"}, modern_post("resources/read", uri="file:///b"),
     "params.uri is 'file:///b'"),
    ({"Mcp-Method": "tools/list", "Mcp-Name": "x"}, modern_post("tools/list"), "Mcp-Name is 'x'"),
    ({"Mcp-Method": "tools/list"}, modern_post("tools/list", _meta={rules.PROTOCOL_META: "2025-11-25"}),
     "_meta says '2025-11-25'"),
    ({"Mcp-Method": "=?base64?!!?="}, modern_post("tools/list"), "not valid base64"),
])
def test_modern_headers_must_mirror_the_body(headers: dict[str, str], post: rules.Post, complaint: str) -> None:
    with pytest.raises(HeaderMismatch) as caught:
        rules.check_modern_headers(headers, post, MODERN)
    assert caught.value.status == 400 and caught.value.rpc_code == -32020
    assert complaint in caught.value.message


def test_modern_headers_that_agree_pass_base64_included() -> None:
    name = "résumé"
    encoded = "=?base64?" + base64.b64encode(name.encode()).decode() + "?="
    rules.check_modern_headers({"Mcp-Method": "tools/call", "Mcp-Name": encoded},
                               modern_post("tools/call", name=name), MODERN)
    rules.check_modern_headers({"Mcp-Method": "tools/list"},
                               modern_post("tools/list", _meta={rules.PROTOCOL_META: MODERN}), MODERN)


# -- properties: whatever a client sends, the rules answer with a 4xx or let it through ----------

_TEXT = st.text(max_size=40)
_JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
                     | _TEXT, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
                     max_leaves=30)


def _depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


@given(body=st.binary(max_size=300) | _JSON.map(orjson.dumps), version=st.sampled_from(
    ["2024-11-05", "2025-03-26", "2025-11-25", "2026-07-28"]), headers=st.dictionaries(
    st.sampled_from(["Mcp-Method", "Mcp-Name", "Origin", "Accept"]), _TEXT, max_size=4))
def test_the_rules_refuse_with_a_4xx_or_pass(body: bytes, version: str, headers: dict[str, str]) -> None:
    try:
        post = rules.parse_post(body, version, max_depth=8)
        if version == "2026-07-28":
            rules.check_modern_headers(headers, post, version)
        rules.check_origin(headers.get("Origin"), ("http://localhost",))
        rules.post_answer_mode("application/json", headers.get("Accept"), "sse")
    except TetherError as exc:
        assert 400 <= exc.status < 500 and exc.message


@given(value=_JSON, limit=st.integers(4, 12))
def test_the_depth_check_agrees_with_the_parsed_depth(value: object, limit: int) -> None:
    body = orjson.dumps(value)
    try:
        check_depth(body, limit)
    except TetherError:
        assert _depth(value) > limit
    else:
        assert _depth(value) <= limit


@given(sid=st.text(max_size=80))
def test_only_ids_we_minted_are_genuine(sid: str) -> None:
    ids = SessionIds("key", "secret")
    assert ids.genuine(ids.mint()) and ids.genuine(ids.for_name("w-1", "token:alice"))
    assert not ids.genuine(sid)  # a guess is never genuine
    assert SessionIds("", "secret").genuine(sid) == is_valid_session_id(sid)  # untagged: shape only
