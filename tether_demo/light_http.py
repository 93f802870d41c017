"""The light server over Streamable HTTP: one process, many sessions, near-zero work per call.

POST /mcp answers with JSON (202 for notifications and responses), GET /mcp is the
session's stream of server notifications (ticks wait in a bounded queue until one is
open), DELETE ends the session. No event ids and no resumption: what a plain stateful
server offers. Run: python -m tether_demo.light_http [--host H] [--port P] (0 picks one;
the URL is printed once it listens).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
from typing import Any

from aiohttp import web

from tether_demo.light import Session, answer

SESSION_HEADER = "Mcp-Session-Id"
QUEUE = 10_000  # notifications a session keeps for a stream that is not open


class HttpSession:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(QUEUE)  # None: the session ended
        self.tickers: list[asyncio.Task[None]] = []
        self.streaming = False
        self.state = Session(self.start_ticks, self.notify)

    def notify(self, message: dict[str, Any]) -> None:
        if self.queue.full():
            self.queue.get_nowait()  # the oldest goes: the client was not reading
        self.queue.put_nowait(message)

    def start_ticks(self, interval: float, count: int, tick: Any) -> None:
        async def run() -> None:
            loop = asyncio.get_running_loop()
            next_at = loop.time()
            for _ in range(count):
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - loop.time()))
                tick()

        self.tickers.append(asyncio.get_running_loop().create_task(run()))  # cancelled in close()

    def close(self) -> None:
        for task in self.tickers:
            task.cancel()
        if self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(None)  # ends an open stream


SESSIONS = web.AppKey("sessions", dict[str, HttpSession])


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": message}},
                             status=status)


async def post(request: web.Request) -> web.Response:
    sessions = request.app[SESSIONS]
    try:
        message = json.loads(await request.read())
    except ValueError:
        return web.json_response({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "Parse error"}},
                                 status=400)
    sid = request.headers.get(SESSION_HEADER)
    if isinstance(message, dict) and message.get("method") == "initialize":
        sid = secrets.token_urlsafe(16)
        sessions[sid] = HttpSession()
    elif sid is None:
        return _error(400, "Bad Request: Mcp-Session-Id header is required")
    session = sessions.get(sid)
    if session is None:
        return _error(404, "Session not found")
    reply = answer(session.state, message)
    if reply is None:
        return web.Response(status=202)
    return web.json_response(reply, headers={SESSION_HEADER: sid})


async def stream(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSIONS].get(request.headers.get(SESSION_HEADER, ""))
    if session is None:
        return _error(404, "Session not found")
    if session.streaming:
        return _error(409, "Conflict: this session already has a stream open")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    session.streaming = True
    try:
        while (message := await session.queue.get()) is not None:
            await response.write(b"event: message\ndata: " + json.dumps(message).encode() + b"\n\n")
    finally:
        session.streaming = False
    return response


async def delete(request: web.Request) -> web.Response:
    session = request.app[SESSIONS].pop(request.headers.get(SESSION_HEADER, ""), None)
    if session is None:
        return _error(404, "Session not found")
    session.close()
    return web.Response(status=200)


def build_app() -> web.Application:
    app = web.Application()
    app[SESSIONS] = {}
    app.router.add_post("/mcp", post)
    app.router.add_get("/mcp", stream)
    app.router.add_delete("/mcp", delete)

    async def close_sessions(app: web.Application) -> None:
        for session in app[SESSIONS].values():
            session.close()

    app.on_shutdown.append(close_sessions)
    return app


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(build_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"tether_demo.light_http listening on http://{host}:{bound}/mcp", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tether_demo.light_http", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
