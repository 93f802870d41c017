"""The gateway's lean HTTP/1.1 edge, byte by byte on raw connections: keep-alive and pipelining,
the hand-over to aiohttp for other paths, chunked and 100-continue bodies, HTTP/1.0 and HEAD."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import orjson
import pytest

from tests.conftest import BODY_LIMIT
from tests.support import (
    RawClient,
    TetherUp,
    call_tool,
    error_message,
    initialize_message,
    node_metric,
    wait_until,
)

DEADLINE = 30.0


@dataclass
class Wire:
    """One raw client connection."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def answer(self) -> tuple[int, dict[str, str], bytes]:
        """The next whole answer: status, headers (lower-cased names), body (de-chunked)."""
        async with asyncio.timeout(DEADLINE):
            head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            lines = head.split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            if "content-length" in headers:
                body = await self.reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding") == "chunked":
                body = b""
                while size := int((await self.reader.readuntil(b"\r\n")).strip(), 16):
                    body += (await self.reader.readexactly(size + 2))[:-2]
                await self.reader.readuntil(b"\r\n")
            else:
                body = b""
            return int(lines[0].split()[1]), headers, body

    async def closed(self) -> bool:
        """True once the server has closed its side (nothing more comes)."""
        async with asyncio.timeout(DEADLINE):
            return await self.reader.read(1) == b""


@contextlib.asynccontextmanager
async def wire(up: TetherUp) -> AsyncIterator[Wire]:
    host, port = up.base_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield Wire(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def post(sid: str, message: dict[str, object], *, extra: str = "", version: str = "1.1") -> bytes:
    body = orjson.dumps(message)
    return (f"POST /mcp HTTP/{version}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Accept: application/json\r\nMcp-Session-Id: {sid}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            ).encode() + body


def result_text(body: bytes) -> str:
    return str(orjson.loads(body)["result"]["content"][0]["text"])


@pytest.fixture
async def sid(raw: RawClient) -> str:
    return await raw.initialize()


async def test_pipelined_requests_are_answered_in_order_on_one_connection(tether: TetherUp, sid: str) -> None:
    async with wire(tether) as w:
        w.send(b"".join(post(sid, call_tool(i, "increment")) for i in (1, 2, 3)))  # in one write
        answers = [await w.answer() for _ in range(3)]
        assert [(status, orjson.loads(body)["id"]) for status, _, body in answers] == [(200, 1), (200, 2), (200, 3)]
        assert [result_text(body) for _, _, body in answers] == ["1", "2", "3"]
        w.send(post(sid, call_tool(4, "increment")))  # still open: kept alive
        status, headers, body = await w.answer()
        assert (status, result_text(body)) == (200, "4")
        assert "connection" not in headers


async def test_a_connection_is_kept_alive_as_its_client_asks(tether: TetherUp, sid: str) -> None:
    async with wire(tether) as w:  # HTTP/1.1 asking to close: answered, then closed
        w.send(post(sid, call_tool(1, "increment"), extra="Connection: close\r\n"))
        status, headers, _ = await w.answer()
        assert (status, headers.get("connection")) == (200, "close")
        assert await w.closed()
    async with wire(tether) as w:  # HTTP/1.0 asking to stay (any letter case, among other tokens)
        for i in (2, 3):
            w.send(post(sid, call_tool(i, "increment"), version="1.0", extra="Connection: TE, Keep-Alive\r\n"))
            status, headers, body = await w.answer()
            assert (status, result_text(body), headers.get("connection")) == (200, str(i), "keep-alive")
    async with wire(tether) as w:  # HTTP/1.0 that says nothing: closed after the answer
        w.send(post(sid, call_tool(4, "increment"), version="1.0"))
        status, headers, _ = await w.answer()
        assert (status, headers.get("connection")) == (200, "close")
        assert await w.closed()


async def test_a_long_pipeline_of_refusals_is_answered_in_order(tether: TetherUp, sid: str) -> None:
    # Refusals are answered as they are read, with no task; 1,500 of them in one write (past Python's
    # default recursion limit, were each answer to read the next) come back in order, and the
    # connection serves on.
    count = 1500
    async with wire(tether) as w:
        w.send(b"".join(post(sid, initialize_message(i)) for i in range(count)))  # initialized already: 400
        answers = [await w.answer() for _ in range(count)]
        assert {status for status, _, _ in answers} == {400}
        assert "already initialized" in error_message(answers[-1][2])
        assert [orjson.loads(body)["id"] for _, _, body in answers] == list(range(count))
        w.send(post(sid, call_tool(1, "increment")))
        status, headers, body = await w.answer()
        assert (status, result_text(body), headers.get("connection")) == (200, "1", None)


async def test_a_client_that_leaves_a_waiting_post_ends_its_request_on_the_node(
        tether: TetherUp, sid: str, http: aiohttp.ClientSession) -> None:
    # A POST waits for its node's answer with no task of the gateway's own to cancel: the client
    # hanging up must still tell the node, which then stops waiting for the upstream's answer (it
    # would otherwise wait for upstream_request_timeout, five minutes).
    requests = await node_metric(http, tether, "tether_actor_messages_total", kind="request")
    ended = await node_metric(http, tether, "tether_actor_request_seconds_count")
    async with wire(tether) as w:
        w.send(post(sid, call_tool(7, "count_slowly", {"steps": 2, "interval": 600})))
        await wait_until(lambda: _above(http, tether, "tether_actor_messages_total", requests, kind="request"),
                         timeout=DEADLINE, what="the request to reach the node")
        assert await node_metric(http, tether, "tether_actor_request_seconds_count") == ended  # still waiting
    await wait_until(lambda: _above(http, tether, "tether_actor_request_seconds_count", ended),
                     timeout=DEADLINE, what="the node to end the request its client left")


async def _above(http: aiohttp.ClientSession, up: TetherUp, name: str, value: float, **labels: str) -> bool:
    return await node_metric(http, up, name, **labels) > value


async def test_other_paths_hand_the_connection_to_aiohttp_and_mcp_still_works_there(tether: TetherUp,
                                                                                    sid: str) -> None:
    async with wire(tether) as w:
        w.send(post(sid, call_tool(1, "increment")))
        assert (await w.answer())[0] == 200
        w.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, _, body = await w.answer()
        assert (status, body) == (200, b"ok\n")
        w.send(post(sid, call_tool(2, "increment")))  # now on aiohttp's side of the same connection
        status, _, body = await w.answer()
        assert (status, result_text(body)) == (200, "2")


async def test_a_chunked_body_is_read_and_its_connection_then_closes(tether: TetherUp, sid: str) -> None:
    body = orjson.dumps(call_tool(5, "increment"))
    chunks = b"".join(b"%x\r\n%b\r\n" % (len(part), part) for part in (body[:10], body[10:])) + b"0\r\n\r\n"
    async with wire(tether) as w:
        w.send(post(sid, {}).split(b"Content-Length")[0] + b"Transfer-Encoding: chunked\r\n\r\n" + chunks)
        status, headers, answer = await w.answer()
        assert (status, result_text(answer), headers.get("connection")) == (200, "1", "close")
        assert await w.closed()


async def test_an_oversize_chunked_body_is_413(tether: TetherUp, sid: str) -> None:
    filler = b" " * 8192
    async with wire(tether) as w:
        w.send(post(sid, {}).split(b"Content-Length")[0] + b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(BODY_LIMIT // len(filler) + 1):
            w.send(b"%x\r\n%b\r\n" % (len(filler), filler))
        status, headers, answer = await w.answer()
        assert (status, headers.get("connection")) == (413, "close")
        assert "Payload Too Large" in error_message(answer)
    async with wire(tether) as w:  # the session lost nothing
        w.send(post(sid, call_tool(6, "increment")))
        assert result_text((await w.answer())[2]) == "1"


async def test_expect_100_continue_is_answered_before_the_body_is_sent(tether: TetherUp, sid: str) -> None:
    request = post(sid, call_tool(7, "increment"), extra="Expect: 100-continue\r\n")
    head, _, body = request.partition(b"\r\n\r\n")
    async with wire(tether) as w:
        w.send(head + b"\r\n\r\n")
        async with asyncio.timeout(DEADLINE):
            assert await w.reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        w.send(body)
        status, _, answer = await w.answer()
        assert (status, result_text(answer)) == (200, "1")


async def test_an_http_1_0_stream_is_not_chunked_and_ends_with_the_connection(tether: TetherUp, sid: str) -> None:
    async with wire(tether) as w:
        w.send(f"GET /mcp HTTP/1.0\r\nAccept: text/event-stream\r\nMcp-Session-Id: {sid}\r\n\r\n".encode())
        async with asyncio.timeout(DEADLINE):
            head = (await w.reader.readuntil(b"\r\n\r\n")).decode().lower()
        assert head.startswith("http/1.1 200")
        assert "content-type: text/event-stream" in head
        assert "transfer-encoding" not in head and "connection: close" in head


async def test_head_is_405_with_no_body_and_the_connection_reads_on(tether: TetherUp, sid: str) -> None:
    async with wire(tether) as w:
        w.send(b"HEAD /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        async with asyncio.timeout(DEADLINE):
            head = (await w.reader.readuntil(b"\r\n\r\n")).decode()
        assert head.startswith("HTTP/1.1 405") and "Content-Length: " in head
        w.send(post(sid, call_tool(8, "increment")))  # a body sent for HEAD would be read as this answer
        status, _, answer = await w.answer()
        assert (status, result_text(answer)) == (200, "1")


async def test_repeated_session_headers_are_joined_and_refused(tether: TetherUp, sid: str) -> None:
    async with wire(tether) as w:
        w.send(post(sid, call_tool(9, "increment"), extra=f"mcp-session-id: {sid}\r\n"))
        status, _, answer = await w.answer()
        assert status == 400 and "visible ASCII" in error_message(answer)


async def test_field_values_lose_their_whitespace_and_repeated_fields_join(tether: TetherUp, sid: str) -> None:
    """RFC 9110 5.5 and 5.3: a field value excludes the whitespace around it, and a field sent twice
    is one list."""
    body = orjson.dumps(call_tool(9, "increment"))
    request = (f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type:application/json \t\r\n"
               f"Accept: application/json\r\nACCEPT: text/event-stream\r\nMcp-Session-Id: \t{sid}  \r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    async with wire(tether) as w:
        w.send(request)
        status, headers, answer = await w.answer()
        assert (status, headers["content-type"], result_text(answer)) == (200, "application/json", "1")


async def test_folded_and_spaced_field_lines_are_400(tether: TetherUp, sid: str) -> None:
    for line in (b"X-Folded: a\r\n b\r\n", b"X-Spaced : a\r\n"):
        async with wire(tether) as w:
            w.send(post(sid, call_tool(9, "increment"), extra=line.decode()))
            status, _, answer = await w.answer()
            assert status == 400 and "malformed HTTP request" in error_message(answer), line
            assert await w.closed()


async def test_garbage_is_400_and_closes(tether: TetherUp) -> None:
    async with wire(tether) as w:
        w.send(b"POST /mcp HTTP/1.1\r\nContent-Length: 12\r\nContent-Length: 13\r\n\r\n")
        status, headers, answer = await w.answer()
        assert (status, headers.get("connection")) == (400, "close")
        assert "malformed HTTP request" in error_message(answer)
        assert await w.closed()


async def test_a_client_that_leaves_a_stream_frees_it(tether: TetherUp, sid: str) -> None:
    async def streams_open() -> float:
        async with wire(tether) as w:
            w.send(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            text = (await w.answer())[2].decode()
        lines = [line for line in text.splitlines()
                 if line.startswith('tether_gateway_streams_open{transport="streamable_http"}')]
        return float(lines[0].split()[-1]) if lines else 0.0  # no line until a stream first opens

    before = await streams_open()
    async with wire(tether) as w:
        w.send(f"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
               f"Mcp-Session-Id: {sid}\r\n\r\n".encode())
        async with asyncio.timeout(DEADLINE):
            assert (await w.reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        assert await streams_open() == before + 1
    # The client hung up: the gateway's work for it stops, and its stream to the node closes.
    await wait_until(lambda: _is(streams_open, before), timeout=DEADLINE, what="the stream to be freed")


async def _is(value: Callable[[], Awaitable[float]], expected: float) -> bool:
    return await value() == expected


async def test_an_upgrade_in_any_letter_case_goes_to_aiohttp_and_is_answered(tether: TetherUp, sid: str) -> None:
    async with wire(tether) as w:
        w.send(post(sid, call_tool(10, "increment"), extra="Connection: Upgrade\r\nuPgRaDe: h2c\r\n"))
        status, _, answer = await w.answer()
        assert (status, result_text(answer)) == (200, "1")
