"""The node's upstream HTTP client against real servers on loopback: bodies by length, chunks and
close, connection reuse, back-pressure, and answers it must refuse."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import web

from actors.http_client import HIGH_WATER, HttpClient, HttpClientError, Response
from tests.support import wait_until


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    client = HttpClient(connect_timeout=2.0)
    yield client
    await client.close()


@pytest.fixture
async def app_url() -> AsyncIterator[tuple[str, list[int]]]:
    """An aiohttp server; the list collects the client port of every request it serves. Handlers
    that must hold a request open wait for `done`, set when the test is over."""
    ports: list[int] = []
    done = asyncio.Event()

    async def echo(request: web.Request) -> web.StreamResponse:
        ports.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        body = await request.read()
        return web.json_response({"method": request.method, "body": body.decode(),
                                  "session": request.headers.get("Mcp-Session-Id")},
                                 headers={"Mcp-Session-Id": "s-1", "X-Twice": "a"})

    async def stream(request: web.Request) -> web.StreamResponse:
        ports.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for i in range(int(request.query.get("n", "3"))):
            await out.write(f"data: {i}\n\n".encode())
        if "open" in request.query:
            await done.wait()  # a stream that does not end while its reader is there
        await out.write_eof()
        return out

    async def big(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse()
        await out.prepare(request)
        for _ in range(64):
            await out.write(b"x" * 65536)
        await out.write_eof()
        return out

    async def silent(request: web.Request) -> web.StreamResponse:
        await done.wait()  # no answer while the test runs
        return web.Response()

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/stream", stream)
    app.router.add_get("/big", big)
    app.router.add_get("/silent", silent)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}", ports
    done.set()
    await runner.cleanup()


async def _raw_server(answer: bytes) -> tuple[asyncio.Server, str]:
    """A server that reads a request's head, writes `answer` as it is, and closes the connection."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_a_json_answer_comes_whole_and_the_connection_is_reused(
        client: HttpClient, app_url: tuple[str, list[int]]) -> None:
    url, ports = app_url
    for i in range(3):
        async with await client.request("POST", url + "/echo", body=f"hello {i}".encode(),
                                        headers={"Mcp-Session-Id": "abc"}, read_timeout=5) as resp:
            assert resp.status == 200
            assert resp.content_type == "application/json"
            assert resp.headers["mcp-session-id"] == "s-1"  # names in lower case
            body = await resp.read()
            assert orjson.loads(body) == {"method": "POST", "body": f"hello {i}", "session": "abc"}
    assert len(set(ports)) == 1, f"three requests took {len(set(ports))} connections"


async def test_a_chunked_stream_arrives_in_order_and_an_abandoned_one_closes_its_connection(
        client: HttpClient, app_url: tuple[str, list[int]]) -> None:
    url, ports = app_url
    async with await client.request("GET", url + "/stream?n=50", read_timeout=5) as resp:
        assert resp.content_type == "text/event-stream"
        body = await resp.read()
    assert body == b"".join(f"data: {i}\n\n".encode() for i in range(50))
    async with await client.request("GET", url + "/stream?n=2&open=1", read_timeout=5) as resp:
        async for _ in resp.chunks():
            break  # left before the end: the connection cannot be reused
    async with await client.request("GET", url + "/stream?n=1", read_timeout=5) as resp:
        assert await resp.read() == b"data: 0\n\n"
    assert ports[0] == ports[1] != ports[2]


async def test_a_reader_that_waits_holds_at_most_the_high_water_mark(
        client: HttpClient, app_url: tuple[str, list[int]]) -> None:
    url, _ = app_url
    async with await client.request("GET", url + "/big", read_timeout=5) as resp:
        async def stopped_reading() -> bool:  # a reader that does not read: the client stops taking more
            return resp._conn._paused

        await wait_until(stopped_reading, timeout=10, what="the client to stop reading from the socket")
        held = resp._size
        total = len(await resp.read())
    assert total == 64 * 65536  # nothing lost: the rest came once the reader read
    # At most the mark plus what one socket read brings (uvloop reads up to 256 KiB at a time).
    assert held <= HIGH_WATER + 256 * 1024, f"{held} bytes buffered for a reader that did not read"


async def test_a_body_that_runs_to_the_close_ends_with_it_and_a_truncated_one_fails(client: HttpClient) -> None:
    server, url = await _raw_server(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                     b"Connection: close\r\n\r\ndata: 1\n\n")
    async with server, await client.request("GET", url, read_timeout=5) as resp:
        assert await resp.read() == b"data: 1\n\n"
    server, url = await _raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
    async with server, await client.request("GET", url, read_timeout=5) as resp:
        with pytest.raises(HttpClientError, match="closed the connection mid-answer"):
            await resp.read()


async def test_an_interim_answer_is_skipped_for_the_answer_after_it(client: HttpClient) -> None:
    server, url = await _raw_server(b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n"
                                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    async with server, await client.request("GET", url, read_timeout=5) as resp:
        assert (resp.status, await resp.read()) == (200, b"ok")
        assert "link" not in resp.headers


async def test_what_it_cannot_do_is_an_error_that_says_why(client: HttpClient,
                                                            app_url: tuple[str, list[int]]) -> None:
    server, url = await _raw_server(b"NOT HTTP AT ALL\r\n\r\n")
    async with server:
        with pytest.raises(HttpClientError, match="Cannot read the upstream's answer"):
            await client.request("GET", url, read_timeout=5)
    with pytest.raises(HttpClientError, match="line break"):
        await client.request("GET", app_url[0] + "/echo", headers={"X-Evil": "a\r\nInjected: 1"})
    with pytest.raises(HttpClientError, match="only http:// and https://"):
        await client.request("GET", "ftp://127.0.0.1/x")
    server, url = await _raw_server(b"NOT HTTP AT ALL\r\n\r\n")
    server.close()
    await server.wait_closed()
    with pytest.raises(HttpClientError, match="Cannot connect"):
        await client.request("GET", url, read_timeout=5)
    with pytest.raises(TimeoutError):
        await client.request("GET", app_url[0] + "/silent", read_timeout=0.2)


async def test_an_answer_sent_without_waiting_reaches_its_listener_on_the_same_connection(
        client: HttpClient, app_url: tuple[str, list[int]]) -> None:
    url, ports = app_url
    prepared = client.prepare("POST", url + "/echo", {"Mcp-Session-Id": "abc"})
    assert client.send_nowait(prepared, b"first", lambda resp: None) is None  # no idle connection yet
    async with await client.send(prepared, b"first", read_timeout=5) as resp:
        assert orjson.loads(await resp.read())["body"] == "first"
    for i in range(3):
        answered: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        calls: list[bool] = []

        def listener(resp: Response, answered: asyncio.Future[tuple[int, bytes]] = answered,
                     calls: list[bool] = calls) -> None:
            calls.append(resp._done)
            if resp._done and not answered.done():
                answered.set_result((resp.status, resp.take()))
                resp.listener = None
                resp.release()

        assert client.send_nowait(prepared, f"hello {i}".encode(), listener) is not None
        status, body = await asyncio.wait_for(answered, 5)
        assert status == 200
        assert orjson.loads(body) == {"method": "POST", "body": f"hello {i}", "session": "abc"}
        assert calls == [True]  # head and body came in one read: the listener heard once, at the end
    assert len(set(ports)) == 1, f"four requests took {len(set(ports))} connections"


async def test_a_listener_can_hand_a_stream_to_a_reader(client: HttpClient, app_url: tuple[str, list[int]]) -> None:
    url, _ = app_url
    async with await client.request("GET", url + "/stream?n=1") as resp:  # leaves an idle connection
        await resp.read()
    handed: asyncio.Future[Response] = asyncio.get_running_loop().create_future()

    def listener(resp: Response) -> None:
        if resp.status and not handed.done():
            resp.listener = None  # from here a reader takes what comes
            handed.set_result(resp)

    assert client.send_nowait(client.prepare("GET", url + "/stream?n=5"), b"", listener, read_timeout=5) is not None
    async with await asyncio.wait_for(handed, 5) as resp:
        assert resp.content_type == "text/event-stream"
        assert await resp.read() == b"".join(f"data: {i}\n\n".encode() for i in range(5))
