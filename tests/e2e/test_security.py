"""Tether on the public edge: who may call, whose sessions they reach, and what hostile input gets.

One guarded `tether up` (tokens and JWTs, HMAC-tagged session ids, tight
limits) serves every test here. The hostile-input table checks each row's
status and body, then that every session live before it is live after it,
its state intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.guarded import ISSUER, LIMITS, SECRET, SESSION_KEY, Guarded
from tests.support import ACCEPT_BOTH, RawClient, call_tool, error_message, initialize_message

LIST = {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}


@pytest.fixture
def alice(http: aiohttp.ClientSession, guarded: Guarded) -> RawClient:
    return RawClient(http, guarded.up.mcp_url, guarded.auth("alice"))


@pytest.fixture
def bob(http: aiohttp.ClientSession, guarded: Guarded) -> RawClient:
    return RawClient(http, guarded.up.mcp_url, guarded.auth("bob"))


async def count(client: RawClient, sid: str) -> int:
    answer = await client.call(sid, call_tool(1, "increment"))
    return int(answer["result"]["content"][0]["text"])


# -- authentication ------------------------------------------------------------------


async def test_no_credentials_is_401_with_a_challenge(guarded: Guarded, http: aiohttp.ClientSession) -> None:
    anonymous = RawClient(http, guarded.up.mcp_url)
    status, headers, body = await anonymous.post(initialize_message())
    assert status == 401
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="tether"')
    metadata_url = f"{guarded.up.base_url}/.well-known/oauth-protected-resource"
    assert f'resource_metadata="{metadata_url}"' in challenge
    assert "error=" not in challenge  # no token is not an invalid token
    assert "bearer token" in error_message(body)
    status, headers, body = await anonymous.post(initialize_message(), headers={"Authorization": "Bearer nope"})
    assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]
    async with http.get(metadata_url) as resp:  # where an MCP client learns whom to ask for a token
        assert resp.status == 200
        assert (await resp.json())["authorization_servers"] == [ISSUER]
    async with http.get(guarded.up.base_url + "/healthz") as resp:  # probes need no credentials
        assert resp.status == 200
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(guarded.up.base_url.replace("http", "ws", 1) + "/ws", protocols=("mcp",))
    assert refused.value.status == 401
    async with http.get(guarded.up.base_url + "/sse", headers={"Accept": "text/event-stream"}) as resp:
        assert resp.status == 401


async def test_tokens_api_keys_and_jwts_are_accepted(guarded: Guarded, http: aiohttp.ClientSession) -> None:
    url = guarded.up.mcp_url
    for headers in (guarded.auth("alice"), {"X-API-Key": guarded.tokens["alice"]},
                    {"Authorization": f"Bearer {guarded.jwt('carol')}"}):
        sid = await RawClient(http, url, headers).initialize()
        assert await count(RawClient(http, url, headers), sid) == 1


@pytest.mark.parametrize(("claims", "why"), [
    ({"exp": int(time.time()) - 600}, "expired"),
    ({"aud": "someone-else"}, "audience"),
    ({"iss": "https://evil.example"}, "issuer"),
    ({"kid": "no-such-key"}, "unknown key"),
    ({"key": "other"}, "signature"),
    ({"sub": ""}, "'sub' claim"),
])
async def test_bad_jwts_are_401(guarded: Guarded, http: aiohttp.ClientSession, claims: dict[str, Any],
                                why: str) -> None:
    if claims.pop("key", None):
        claims["key"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # same kid, wrong key
    token = guarded.jwt(claims.pop("sub", "mallory"), **claims)
    status, headers, body = await RawClient(http, guarded.up.mcp_url, {"Authorization": f"Bearer {token}"}).post(
        initialize_message())
    assert status == 401, body
    assert why.lower() in error_message(body).lower() and 'error="invalid_token"' in headers["WWW-Authenticate"]


async def test_an_unsigned_jwt_is_refused(guarded: Guarded, http: aiohttp.ClientSession) -> None:
    import jwt

    token = jwt.encode({"sub": "mallory", "iss": ISSUER, "exp": int(time.time()) + 60}, key=None, algorithm="none")
    status, _, body = await RawClient(http, guarded.up.mcp_url, {"Authorization": f"Bearer {token}"}).post(LIST)
    assert status == 401, body


async def test_a_session_answers_only_the_principal_that_made_it(guarded: Guarded, alice: RawClient,
                                                                 bob: RawClient, http: aiohttp.ClientSession) -> None:
    sid = await alice.initialize()
    assert await count(alice, sid) == 1
    forged = sid[:-1] + ("A" if sid[-1] != "A" else "B")
    _, _, unknown_body = await bob.post(LIST, sid=forged)
    status, _, body = await bob.post(LIST, sid=sid)
    assert (status, body) == (404, unknown_body)  # exactly what an id that never existed gets: no oracle
    async with http.get(bob.url, headers={**bob.headers, "Mcp-Session-Id": sid, "Accept": "text/event-stream"}) as r:
        assert r.status == 404
    async with http.delete(bob.url, headers={**bob.headers, "Mcp-Session-Id": sid}) as r:
        assert r.status == 404
    jwt_alice = RawClient(http, alice.url, {"Authorization": f"Bearer {guarded.jwt('alice')}"})
    assert (await jwt_alice.post(LIST, sid=sid))[0] == 404  # a JWT subject "alice" is not token alice
    ws_url = guarded.up.base_url.replace("http", "ws", 1) + f"/ws?session_id={sid}"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(ws_url, protocols=("mcp",), headers=bob.headers)
    assert refused.value.status == 404
    assert await count(alice, sid) == 2  # nothing bob did reached it


async def test_forged_session_ids_are_refused_without_a_store_lookup(guarded: Guarded, alice: RawClient,
                                                                     http: aiohttp.ClientSession) -> None:
    sid = await alice.initialize()
    assert len(sid) == 54  # 32 random characters and a 22-character HMAC tag
    before = await refused_forged(http, guarded)
    for forged in (sid[:32] + "A" * 22, "B" * 32 + sid[32:], "C" * 54):
        status, _, body = await alice.post(LIST, sid=forged)
        assert status == 404 and error_message(body) == "Session not found"
    assert await refused_forged(http, guarded) == before + 3
    assert await count(alice, sid) == 1


async def refused_forged(http: aiohttp.ClientSession, guarded: Guarded) -> float:
    async with http.get(guarded.up.base_url + "/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith('tether_gateway_refused_total{reason="forged_session_id"}'):
                return float(line.split()[-1])
    return 0.0


# -- the hostile-input table -----------------------------------------------------------


@dataclass
class Row:
    name: str
    send: Callable[[], Awaitable[tuple[int | None, bytes]]]
    status: int | None  # None: no answer, the connection closed
    says: str = ""  # a phrase the answer's body must hold


async def raw_exchange(base_url: str, data: bytes, *, then: bytes = b"", trickle: bool = False,
                       close_early: bool = False, deadline: float = 15.0) -> tuple[int | None, bytes]:
    """Write `data` on a fresh connection and read the answer until the server closes it.

    `trickle` sends one more header byte whenever the server stays quiet for a
    moment (a slowloris); `close_early` hangs up right after writing.
    """
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        if close_early:
            writer.transport.abort()
            return None, b""
        answer = b""
        async with asyncio.timeout(deadline):
            while True:
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), 0.25)
                except TimeoutError:
                    if trickle:
                        writer.write(b"X")
                        await writer.drain()
                    elif then:
                        writer.write(then)
                        then = b""
                    continue
                except ConnectionError:
                    break
                if not chunk:
                    break
                answer += chunk
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    if not answer:
        return None, b""
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def request_bytes(sid: str, body: bytes, headers: dict[str, str], *, length: int | None = None,
                  drop: tuple[str, ...] = ()) -> bytes:
    all_headers = {"Host": "127.0.0.1", "Content-Type": "application/json", "Accept": ACCEPT_BOTH,
                   "Mcp-Session-Id": sid, "Content-Length": str(len(body) if length is None else length),
                   **headers}
    lines = "".join(f"{k}: {v}\r\n" for k, v in all_headers.items() if k not in drop)
    return f"POST /mcp HTTP/1.1\r\n{lines}Connection: close\r\n\r\n".encode() + body


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.fixture
async def live_before(guarded: Guarded, alice: RawClient, bob: RawClient,
                      http: aiohttp.ClientSession) -> AsyncIterator[dict[str, Any]]:
    """Sessions live before the table: alice's (counter at 3), bob's (two notes), and alice's WebSocket."""
    a, b = await alice.initialize(), await bob.initialize()
    for _ in range(3):
        await count(alice, a)
    for text in ("first", "second"):
        await bob.call(b, call_tool(2, "add_note", {"text": text}))
    ws = await http.ws_connect(guarded.up.base_url.replace("http", "ws", 1) + "/ws", protocols=("mcp",),
                               headers=alice.headers)
    await ws.send_json(initialize_message(1))
    assert "result" in await ws.receive_json(timeout=30)
    await ws.send_json(call_tool(2, "increment"))
    assert (await ws.receive_json(timeout=30))["result"]["content"][0]["text"] == "1"
    yield {"alice": a, "bob": b, "ws": ws}
    await ws.close()


async def test_hostile_input_loses_nothing(guarded: Guarded, alice: RawClient, bob: RawClient,
                                           live_before: dict[str, Any]) -> None:
    sid, bobs = live_before["alice"], live_before["bob"]
    base = guarded.up.base_url
    auth = guarded.auth("alice")
    depth = int(LIMITS["max_json_depth"])
    body_limit = int(LIMITS["max_body_bytes"])
    header_limit = int(LIMITS["max_header_bytes"])
    modern = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/list"}

    def post(body: Any = LIST, *, raw: bytes | None = None, to: str | None = sid,
             **headers: str) -> Callable[[], Awaitable[tuple[int | None, bytes]]]:
        async def send() -> tuple[int | None, bytes]:
            status, _, answer = await alice.post(body, sid=to, raw=raw, headers=headers)
            return status, answer
        return send

    def wire(data: bytes, **kw: Any) -> Callable[[], Awaitable[tuple[int | None, bytes]]]:
        return lambda: raw_exchange(base, data, **kw)

    valid = orjson.dumps(call_tool(9, "increment"))
    rows = [
        Row("malformed JSON", post(raw=b'{"jsonrpc": "2.0", "id": 1,'), 400, "Parse error"),
        Row("bytes that are not UTF-8", post(raw=b"\xff\xfe\x00{"), 400, "Parse error"),
        Row("JSON that is not JSON-RPC", post({"hello": "world"}), 400, '"jsonrpc" must be "2.0"'),
        Row("a batch where the revision forbids it", post([LIST, LIST], **{"MCP-Protocol-Version": "2025-11-25"}),
            400, "batches are not allowed"),
        Row("an object as id", post({"jsonrpc": "2.0", "id": {"x": 1}, "method": "tools/list"}), 400,
            '"id" must be a string or an integer'),
        Row("a number as method", post({"jsonrpc": "2.0", "id": 1, "method": 5}), 400,
            '"method" must be a non-empty string'),
        Row("an oversize body", post(raw=b" " * (body_limit + 1)), 413, "Payload Too Large"),
        Row("an oversize header", wire(request_bytes(sid, b"{}", {**auth, "X-Big": "a" * (header_limit + 1)})),
            400, f"Got more than {header_limit} bytes"),
        Row("too many headers", wire(request_bytes(sid, b"{}", {**auth, **{f"X-H{i}": "1" for i in range(130)}})),
            400, "Too many headers"),
        Row("deep nesting", post({"jsonrpc": "2.0", "id": 1, "method": "tools/list",
                                  "params": {"x": nested(depth + 5)}}), 400, f"nested more than {depth}"),
        Row("a session id with a space", post(to="has space"), 400, "visible ASCII"),
        Row("a session id of 300 characters", post(to="A" * 300), 400, "visible ASCII"),
        Row("a forged HMAC tag", post(to=sid[:-2] + ("AA" if not sid.endswith("AA") else "BB")), 404,
            "Session not found"),
        Row("another principal's session", post(to=bobs), 404, "Session not found"),
        Row("no credentials", wire(request_bytes(sid, orjson.dumps(LIST), {})), 401, "bearer token"),
        Row("no Accept", wire(request_bytes(sid, orjson.dumps(LIST), auth, drop=("Accept",))), 406,
            "Accept must include"),
        Row("Accept: text/html", post(**{"Accept": "text/html"}), 406, "Accept must include"),
        Row("no Content-Type", wire(request_bytes(sid, orjson.dumps(LIST), auth, drop=("Content-Type",))), 415,
            "Content-Type must be application/json"),
        Row("Content-Type: text/plain", post(**{"Content-Type": "text/plain"}), 415, "text/plain"),
        Row("a foreign Origin", post(Origin="http://evil.example"), 403, "is not allowed"),
        Row("an unknown protocol version", post(**{"MCP-Protocol-Version": "1999-01-01"}), 400,
            "unsupported MCP-Protocol-Version"),
        Row("2026-07-28 headers that disagree with the body", post(call_tool(3, "increment"), to=None, **modern),
            400, "Mcp-Method is 'tools/list'"),
        Row("PUT", lambda: _put(alice, sid), 405, "Method Not Allowed"),
        Row("a disconnect in the middle of a body",
            wire(request_bytes(sid, valid[:20], auth, length=len(valid)), close_early=True), None),
        Row("a body that stops coming", wire(request_bytes(sid, valid[:20], auth, length=len(valid))), 408,
            "did not arrive within"),
        Row("a slowloris", wire(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ", trickle=True), None),
    ]
    wrong = []
    for row in rows:
        status, answer = await row.send()
        if status != row.status or row.says not in said(answer):
            wrong.append(f"{row.name}: got {status} {answer[:200]!r}, expected {row.status} with {row.says!r}")
    assert wrong == [], "\n".join(wrong)

    # Nothing lost: every session live before the table is live, and its state is where it was.
    assert await count(alice, sid) == 4
    notes = await bob.call(bobs, call_tool(3, "add_note", {"text": "third"}))
    assert orjson.loads(notes["result"]["content"][0]["text"]) == ["first", "second", "third"]
    ws = live_before["ws"]
    await ws.send_json(call_tool(3, "increment"))
    assert (await ws.receive_json(timeout=30))["result"]["content"][0]["text"] == "2"
    assert "Traceback" not in guarded.up.log()  # no row reached an unhandled exception


def said(answer: bytes) -> str:
    """What an answer tells the client: a JSON-RPC error's message, or the text of a plain body."""
    try:
        return error_message(answer)
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return answer.decode(errors="replace")


async def _put(client: RawClient, sid: str) -> tuple[int | None, bytes]:
    async with client.session.put(client.url, headers={**client.headers, "Mcp-Session-Id": sid}) as resp:
        return resp.status, await resp.read()


async def test_a_kept_alive_connection_idle_for_the_header_timeout_is_closed(guarded: Guarded,
                                                                            alice: RawClient) -> None:
    """Each answer starts the wait for the next request's head afresh; once a connection has been idle
    `client_header_timeout` since its last answer, the gateway closes it (no earlier)."""
    sid = await alice.initialize()
    timeout = float(LIMITS["client_header_timeout"])
    host, port = guarded.up.base_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    keep = request_bytes(sid, orjson.dumps(LIST), guarded.auth("alice")).replace(b"Connection: close\r\n", b"")
    try:
        async with asyncio.timeout(timeout * 5):
            for _ in range(2):
                writer.write(keep)
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200"), head
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                assert b'"tools"' in await reader.readexactly(length)
            answered = time.monotonic()
            assert await reader.read(1) == b""  # closed by the gateway
            assert time.monotonic() - answered >= timeout * 0.9
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


# -- logs --------------------------------------------------------------------------


async def test_logs_hold_no_credentials_and_no_whole_session_ids(guarded: Guarded, alice: RawClient,
                                                                 http: aiohttp.ClientSession) -> None:
    sid = await alice.initialize()
    await count(alice, sid)
    jwt_client = RawClient(http, alice.url, {"Authorization": f"Bearer {guarded.jwt('dave')}"})
    jwt_sid = await jwt_client.initialize()
    await jwt_client.post(LIST, sid=sid)  # refused: another principal's session, logged at debug
    await alice.post(LIST, sid=sid, headers={"Authorization": "Bearer not-a-real-token-1234567"})
    async with http.delete(alice.url, headers={**alice.headers, "Mcp-Session-Id": sid}) as resp:
        assert resp.status == 200
    log = guarded.up.log()
    assert '"level":"debug"' in log  # the log is as chatty as it gets
    for secret in (guarded.tokens["alice"], guarded.tokens["bob"], SECRET, SESSION_KEY, sid, jwt_sid,
                   "not-a-real-token-1234567"):
        assert secret not in log
    for path in Path(guarded.up.log_path).parent.glob("*.log"):
        assert guarded.tokens["alice"] not in path.read_text()


async def test_a_jwt_that_picks_another_key_types_algorithm_is_401(guarded: Guarded,
                                                                   http: aiohttp.ClientSession) -> None:
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec

    now = int(time.time())
    claims = {"iss": ISSUER, "aud": "tether-tests", "sub": "mallory", "exp": now + 60}
    token = jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256",
                       headers={"kid": "test-key-1"})  # the RSA key's kid, an EC signature
    status, headers, body = await RawClient(http, guarded.up.mcp_url, {"Authorization": f"Bearer {token}"}).post(
        initialize_message())
    assert status == 401 and "algorithm" in error_message(body), body
    assert "Traceback" not in guarded.up.log()
