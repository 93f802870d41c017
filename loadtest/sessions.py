"""`sessions`: how many new sessions a second a target opens.

Each worker opens a session (initialize, then notifications/initialized) and
leaves it, again and again: closed loop, or `--rate` sessions a second in all
(open loop). A session counts once both are answered; its latency is the time
for the two. Every session id must be new: a target that hands out one twice
is sharing state between clients (`session_reused`, a violation). The sessions
are left to the target's idle timeout, as vanished clients leave them, so the
target must hold them all for the run (Tether's recipes give nodes room).
"""

from __future__ import annotations

from typing import Any

from loadtest.client import Failed, HttpSession
from loadtest.run import Run, Worker, apply_load


class Opener:
    """One worker: opens one session per step."""

    def __init__(self, run: Run, index: int, seen: set[str]) -> None:
        self.run = run
        self.index = index
        self.seen = seen

    async def step(self, due: float) -> None:
        run, rec = self.run, self.run.recorder
        o = run.options
        client = HttpSession(run.http, run.target_for(self.index), o.headers, o.timeout)
        try:
            sid = await client.initialize()
        except Failed as failed:
            rec.error(run.now(), failed.kind)
            return
        now = run.now()
        if sid in self.seen:
            rec.wrong_answer(now, "session_reused", f"session id {sid[:12]}... was handed out before")
            return
        self.seen.add(sid)
        rec.ok(now, now - due)
        rec.session_opened(now)

    async def close(self) -> None:
        pass


async def sessions(run: Run, progress: Any = None) -> dict[str, Any]:
    seen: set[str] = set()
    workers: list[Worker] = [Opener(run, i, seen) for i in range(run.options.sessions)]
    await apply_load(run, workers, progress)
    return {"sessions_opened": len(seen)}
