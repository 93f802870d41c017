"""`tools` and `websocket`: sessions call a stateful tool, and every answer is checked.

Each session calls `increment` on its own counter. Its first call adds a base of its own
(session i starts at i * 10^9 + 1), the rest add 1, so its answers must read base, base + 1,
base + 2...; an answer off that sequence means the request reached another session's state
(or a server that keeps one for everybody) and counts as a `misrouted` violation. A call that
failed may still have counted, now or later, so each failure since the last good answer
widens what the next answer may be by one. A 404 means the session is gone
(`sessions_lost`): the worker starts a new one, as a client does.
"""

from __future__ import annotations

from typing import Any

from loadtest.client import Failed, HttpSession, WebSocketSession
from loadtest.run import Run, Worker, apply_load

Client = HttpSession | WebSocketSession
BASE = 10**9  # each session's counter starts this far from the next session's


class CounterSession:
    """One client session and the counter it expects."""

    def __init__(self, run: Run, index: int, websocket: bool) -> None:
        self.run = run
        self.index = index
        self.websocket = websocket
        self.client: Client | None = None
        self.last: int | None = None  # the last good answer; None before the first call
        self.pending = 0  # calls failed since then: each may have counted, or may yet

    def _new_client(self) -> Client:
        o = self.run.options
        target = self.run.target_for(self.index)
        if self.websocket:
            return WebSocketSession(self.run.http, websocket_url(target), o.headers, o.timeout)
        return HttpSession(self.run.http, target, o.headers, o.timeout)

    async def start(self) -> None:
        client = self._new_client()
        await client.initialize()
        self.client, self.last, self.pending = client, None, 0
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
        base = self.index * BASE + 1
        by = base if self.last is None else 1  # until one call is known to have counted, each adds base
        try:
            text = await self.client.call("increment", {"by": by})
        except Failed as failed:
            self._failed(failed)
            return
        now = self.run.now()
        try:
            value = int(text)
        except ValueError:
            rec.wrong_answer(now, "malformed_counter", f"session {self.index}: {text[:80]!r}")
            self.pending += 1
            return
        if self.last is None:
            good, expected = value % base == 0 and 1 <= value // base <= self.pending + 1, f"a multiple of {base}"
        else:
            good = self.last + 1 <= value <= self.last + 1 + self.pending
            expected = str(self.last + 1) + (f"..{self.last + 1 + self.pending}" if self.pending else "")
        if good:
            rec.ok(now, now - due)
            self.last, self.pending = value, 0
        else:  # another session's state answered; ours may or may not have moved: keep our own count
            rec.wrong_answer(now, "misrouted", f"session {self.index}: expected {expected}, got {value}")
            self.pending += 1

    def _failed(self, failed: Failed) -> None:
        now = self.run.now()
        self.run.recorder.error(now, failed.kind)
        gone = ("http_404", "closed", "connection") if self.websocket else ("http_404",)
        if failed.kind in gone:  # the session is gone: a client starts a new one
            self.run.recorder.count("sessions_lost")
            self.run.recorder.losses.append(now)
            self.run.recorder.session_closed(now)
            self.client = None
        else:
            self.pending += 1

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
