"""`tools` and `websocket`: sessions call a stateful tool, and every answer is checked.

Each session calls `increment` on its own counter, which must read 1, 2, 3... in that
session; an answer off that sequence means the request reached another session's state
(or a server that keeps none) and counts as a `misrouted` violation. After a failed call
the counter may or may not have moved, so the next answer may be one further. A 404
means the session is gone (`sessions_lost`): the worker starts a new one, as a client does.
"""

from __future__ import annotations

from typing import Any

from loadtest.client import Failed, HttpSession, WebSocketSession
from loadtest.run import Run, Worker, apply_load

Client = HttpSession | WebSocketSession


class CounterSession:
    """One client session and the counter it expects."""

    def __init__(self, run: Run, index: int, websocket: bool) -> None:
        self.run = run
        self.index = index
        self.websocket = websocket
        self.client: Client | None = None
        self.expected = 0
        self.uncertain = False  # the last call failed: it may or may not have counted

    def _new_client(self) -> Client:
        o = self.run.options
        target = self.run.target_for(self.index)
        if self.websocket:
            return WebSocketSession(self.run.http, websocket_url(target), o.headers, o.timeout)
        return HttpSession(self.run.http, target, o.headers, o.timeout)

    async def start(self) -> None:
        client = self._new_client()
        await client.initialize()
        self.client, self.expected, self.uncertain = client, 0, False
        self.run.recorder.session_opened(self.run.now())

    async def step(self, due: float) -> None:
        rec = self.run.recorder
        if self.client is None:
            try:
                await self.start()
            except Failed as failed:
                rec.error(self.run.now(), failed.kind)
                return
            if not self.run.options.rate:  # closed loop: the call is due once the session is up
                due = self.run.now()
        assert self.client is not None
        try:
            text = await self.client.call("increment", {"by": 1})
        except Failed as failed:
            self._failed(failed)
            return
        now = self.run.now()
        try:
            value = int(text)
        except ValueError:
            rec.wrong_answer(now, "malformed_counter", f"session {self.index}: {text[:80]!r}")
            return
        allowed = (self.expected + 1, self.expected + 2) if self.uncertain else (self.expected + 1,)
        if value in allowed:
            rec.ok(now, now - due)
        else:
            rec.wrong_answer(now, "misrouted", f"session {self.index}: expected {allowed[0]}, got {value}")
        self.expected, self.uncertain = value, False

    def _failed(self, failed: Failed) -> None:
        now = self.run.now()
        self.run.recorder.error(now, failed.kind)
        if failed.kind in ("http_404", "closed"):  # the session is gone: a client starts a new one
            self.run.recorder.count("sessions_lost")
            self.run.recorder.losses.append(now)
            self.run.recorder.session_closed(now)
            self.client = None
        else:
            self.uncertain = True

    async def close(self) -> None:
        if isinstance(self.client, HttpSession):
            await self.client.delete()
        elif self.client is not None:
            await self.client.close()
        if self.client is not None:
            self.run.recorder.session_closed(self.run.now())
            self.client = None


def websocket_url(target: str) -> str:
    """The WebSocket endpoint beside an MCP URL: http://h/mcp -> ws://h/ws."""
    base = target.rsplit("/", 1)[0] if target.rstrip("/").endswith("/mcp") else target.rstrip("/")
    return base.replace("https://", "wss://", 1).replace("http://", "ws://", 1) + "/ws"


async def tools(run: Run, progress: Any = None, websocket: bool = False) -> dict[str, Any]:
    workers: list[Worker] = [CounterSession(run, i, websocket) for i in range(run.options.sessions)]
    await apply_load(run, workers, progress)
    return {}


async def websocket(run: Run, progress: Any = None) -> dict[str, Any]:
    return await tools(run, progress, websocket=True)
