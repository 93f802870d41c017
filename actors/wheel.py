"""Timers for many items from one timer: a timing wheel, and deadlines of one length.

`Wheel`: many items, each due at a time, checked from one timer a slot at a time.

A node held its idle sessions to account by scanning every one of them each
`scan_interval`: at 10,000 idle sessions that scan was all the CPU an idle node
used (0.5 % of a core), for sessions that mostly were not due for minutes. Here
each item sits in the slot (`step` wide) of when it is next due, and one timer
serves the earliest slot. When a slot comes, `check` looks at each of its items
and says when it is due next (it moved on since it was placed), or None (it is
done: dropped). An item costs one look per time it falls due; with no items, no
timer runs.

`Deadlines`: items that each run out the same while after they were added (requests waiting for
their answers), expired oldest first from one timer that an answer never touches.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)
log = logging.getLogger("tether.wheel")


class Wheel(Generic[T]):
    """Items by due time on `clock`, checked within `step` after they fall due."""

    def __init__(self, step: float, check: Callable[[T, float], float | None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._step = step
        self._check = check  # (item, now) -> when it is due next, or None to drop it
        self._clock = clock
        self._slots: dict[int, dict[T, None]] = {}
        self._where: dict[T, int] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for = 0

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, item: T) -> bool:
        return item in self._where

    def add(self, item: T, due: float) -> None:
        """Check `item` once `due` has passed (again, if it is on the wheel already)."""
        self.discard(item)
        self._place(item, due)

    def discard(self, item: T) -> None:
        slot = self._where.pop(item, None)
        if slot is None:
            return
        items = self._slots[slot]
        del items[item]
        if not items:
            del self._slots[slot]
        if not self._slots:
            self.close()

    def close(self) -> None:
        """Stop the timer; items still on the wheel stay there, unchecked, until `add` arms it again."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _place(self, item: T, due: float, arm: bool = True) -> None:
        slot = math.ceil(due / self._step)
        items = self._slots.get(slot)
        if items is None:
            items = self._slots[slot] = {}
        items[item] = None
        self._where[item] = slot
        if arm and (self._timer is None or slot < self._armed_for):
            self._arm(slot)

    def _arm(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_for = slot
        delay = max(0.0, slot * self._step - self._clock())
        self._timer = asyncio.get_running_loop().call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = self._clock()
        for slot in sorted(s for s in self._slots if s * self._step <= now + 0.001):  # timers may run early
            for item in self._slots.pop(slot):
                del self._where[item]
                try:
                    due = self._check(item, now)
                except Exception:  # a bug in one check must not stop the wheel for every other item
                    log.exception("wheel.check_failed", extra={"detail": repr(item)})
                    due = now + self._step
                if due is not None:
                    self._place(item, max(due, now + self._step), arm=False)  # never again in this tick
        if self._slots:
            self._arm(min(self._slots))


class Deadlines(Generic[T]):
    """Items that each run out `timeout` after they were added, unless discarded first: requests
    waiting for their answers. All wait as long, so the earliest due is the oldest item: one timer,
    set for it, serves them all, and discarding an item (its answer came) touches no timer. When the
    timer fires it expires every item due and sleeps again until the next. A timer made and
    cancelled per request cost more than the rest of a request's bookkeeping."""

    def __init__(self, timeout: float, expire: Callable[[T], None],
                 clock: Callable[[], float] | None = None) -> None:
        self.timeout = timeout
        self._expire = expire  # called with an item once it is due (it is off the list by then)
        self._clock = clock  # None: the running loop's
        self._loop: asyncio.AbstractEventLoop | None = None  # kept: asking asyncio costs a getpid() call
        self._due: dict[T, float] = {}  # insertion order is due order
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, item: T) -> bool:
        return item in self._due

    def items(self) -> list[tuple[T, float]]:
        """The items and when each is due, earliest first."""
        return list(self._due.items())

    def add(self, item: T) -> None:
        """Expire `item` once `timeout` has passed from now (from now again, if it is here already)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        now = loop.time() if self._clock is None else self._clock()
        self._due.pop(item, None)
        self._due[item] = due = now + self.timeout
        if self._timer is None:
            self._timer = loop.call_later(due - now, self._fire)

    def discard(self, item: T) -> None:
        self._due.pop(item, None)

    def close(self) -> None:
        """Stop the timer; items still here stay, and expire only if `add` arms it again."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None  # set by the `add` that armed the timer
        now = loop.time() if self._clock is None else self._clock()
        due_now = []
        for item, due in self._due.items():  # earliest first: stop at the first not yet due
            if due > now:
                break
            due_now.append(item)
        for item in due_now:
            if self._due.pop(item, None) is None:
                continue  # an earlier expiry discarded it
            try:
                self._expire(item)
            except Exception:  # one failing must not leave the rest waiting for ever
                log.exception("deadline.expire_failed", extra={"detail": repr(item)})
        for due in self._due.values():
            self._timer = loop.call_later(max(0.0, due - now), self._fire)
            break
