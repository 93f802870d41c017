"""How many upstream servers a node starts at once.

A start is mostly CPU: an interpreter and its imports, often a second of it. Past the CPUs there
are, starting more at once starts none sooner; it only takes the CPU from the sessions already
open, whose requests then wait behind the starts. A start that waits on the network instead (a
server that connects somewhere first) gains from running beside others. So the gate starts one at
a time, admits one more each time a start takes about as long as the quickest recent one (up to
`max_starting`), and one fewer each time a start takes more than twice that: concurrency sized as
TCP Vegas sizes a window, from how much longer the work takes than it would alone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

SLOWER = 2.0  # a start this many times the quickest recent one: one fewer at once
STEADY = 1.5  # under this many times it: one more at once, up to the most
RECENT = 64  # starts the quickest is taken over


class StartGate:
    """A semaphore whose size follows how long starts take: `limit` between 1 and `most`."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.limit = 1  # until starts have shown how long one takes alone
        self.starting = 0
        self._recent: deque[float] = deque(maxlen=RECENT)
        self._waiting: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        """Wait for a turn to start. Cancellable: a cancelled wait holds no turn."""
        if self.starting < self.limit and not self._waiting:
            self.starting += 1
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled():  # the turn came as the wait was cancelled: pass it on
                self.starting -= 1
                self._admit()
            else:
                with contextlib.suppress(ValueError):  # `_admit` may have dropped it already
                    self._waiting.remove(turn)
            raise

    def release(self, took: float | None) -> None:
        """A start ended after `took` seconds; None when it failed, which says nothing of the CPU. The
        limit grows only while it is what holds starts back: quiet hours do not raise it to the most."""
        full = self.starting >= self.limit or bool(self._waiting)
        self.starting -= 1
        if took is not None:
            self._recent.append(took)
            quickest = min(self._recent)
            if took > SLOWER * quickest:
                self.limit = max(1, self.limit - 1)
            elif took < STEADY * quickest and full:
                self.limit = min(self.most, self.limit + 1)
        self._admit()

    def _admit(self) -> None:
        while self._waiting and self.starting < self.limit:
            turn = self._waiting.popleft()
            if not turn.done():
                self.starting += 1
                turn.set_result(None)
