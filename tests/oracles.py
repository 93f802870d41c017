"""Deliberately broken MCP targets, real HTTP servers on loopback, to show the load oracles catch
what they claim: a balancer without affinity, and a stream that loses events."""

from __future__ import annotations

import contextlib
import random
import secrets
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from loadtest.recipes import light_http, stop_all

SESSION = "Mcp-Session-Id"
PASSED = {"mcp-session-id", "content-type", "accept", "last-event-id", "mcp-protocol-version"}


@contextlib.contextmanager
def light_http_servers(count: int) -> Any:
    """`count` light servers over Streamable HTTP; their /mcp URLs."""
    started: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="tether-oracle-") as workdir:
        try:
            urls = []
            for i in range(count):
                process, url = light_http(Path(workdir), f"light-{i}")
                started.append(process)
                urls.append(url)
            yield urls
        finally:
            stop_all(started)


def non_sticky(upstreams: list[str], http: aiohttp.ClientSession) -> web.Application:
    """Every request goes to an upstream picked at random (seeded). Each upstream got the initialize,
    so each knows the session, and each keeps its own state: the counter a client sees jumps around."""
    pick = random.Random(7)
    sessions: dict[str, list[str]] = {}

    async def post(request: web.Request) -> web.Response:
        body = await request.read()
        if orjson.loads(body).get("method") == "initialize":
            sids, answer = [], b""
            for url in upstreams:
                async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                    sids.append(r.headers[SESSION])
                    answer = await r.read()
            sid = secrets.token_urlsafe(12)
            sessions[sid] = sids
            return web.Response(body=answer, content_type="application/json", headers={SESSION: sid})
        sids = sessions.get(request.headers.get(SESSION, ""))
        if sids is None:
            return web.Response(status=404)
        turn = pick.randrange(len(upstreams))
        async with http.post(upstreams[turn], data=body, headers={SESSION: sids[turn]}) as r:
            return web.Response(body=await r.read(), status=r.status, content_type="application/json")

    async def delete(request: web.Request) -> web.Response:
        for url, sid in zip(upstreams, sessions.pop(request.headers.get(SESSION, ""), []), strict=False):
            async with http.delete(url, headers={SESSION: sid}) as r:
                await r.read()
        return web.Response()

    app = web.Application()
    app.router.add_post("/mcp", post)
    app.router.add_delete("/mcp", delete)
    return app


def one_session(upstream: str, http: aiohttp.ClientSession) -> web.Application:
    """Opens one session upstream and hands it to every client that initializes, as a proxy that
    shares one server among all its clients does."""
    shared: list[str] = []

    async def post(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if shared and orjson.loads(body).get("method") == "initialize":
            return web.Response(body=orjson.dumps({"jsonrpc": "2.0", "id": 1, "result": {
                "protocolVersion": "2025-06-18", "capabilities": {}, "serverInfo": {"name": "one", "version": "1"}}}),
                content_type="application/json", headers={SESSION: shared[0]})
        if shared:
            headers[SESSION] = shared[0]
        async with http.post(upstream, data=body, headers=headers) as r:
            if r.headers.get(SESSION) and not shared:
                shared.append(r.headers[SESSION])
            return web.Response(body=await r.read(), status=r.status, content_type=r.content_type,
                                headers={SESSION: shared[0]} if shared else {})

    app = web.Application()
    app.router.add_post("/mcp", post)
    return app


def faulty_stream(upstream: str, http: aiohttp.ClientSession, drop_every: int = 0,
                  repeat_every: int = 0) -> web.Application:
    """Passes everything through, but the GET stream loses every `drop_every`-th event, or sends
    every `repeat_every`-th twice."""

    def passed(request: web.Request) -> dict[str, str]:
        return {k: v for k, v in request.headers.items() if k.lower() in PASSED}

    async def forward(request: web.Request) -> web.Response:
        async with http.request(request.method, upstream, data=await request.read(), headers=passed(request)) as r:
            out = {SESSION: r.headers[SESSION]} if SESSION in r.headers else {}
            return web.Response(body=await r.read(), status=r.status, headers=out,
                                content_type=r.content_type if r.status == 200 else None)

    async def stream(request: web.Request) -> web.StreamResponse:
        async with http.get(upstream, headers=passed(request), timeout=aiohttp.ClientTimeout(total=None)) as r:
            response = web.StreamResponse(status=r.status, headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            n = 0
            async for chunk in _events(r):
                n += 1
                if not drop_every or n % drop_every:
                    await response.write(chunk)
                if repeat_every and n % repeat_every == 0:
                    await response.write(chunk)
            return response

    app = web.Application()
    app.router.add_post("/mcp", forward)
    app.router.add_delete("/mcp", forward)
    app.router.add_get("/mcp", stream)
    return app


async def _events(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    event = b""
    async for line in response.content:
        event += line
        if line in (b"\n", b"\r\n"):
            yield event
            event = b""


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Serve `app` on a free loopback port; its /mcp URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/mcp"
    finally:
        await runner.cleanup()
