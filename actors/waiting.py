"""Light waiting primitives for what a node holds per session, by the thousand.

An `asyncio.Queue` costs about 3.3 KB and an `asyncio.Event` about 0.9 KB even
when nothing waits on them (each holds deques, which allocate a block at
once). A node holds several per session, so they were a third of an idle
session's memory. These hold a list or a future only while something is
queued or waiting, and serve the one pattern each is used for here.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

from mypy_extensions import mypyc_attr

T = TypeVar("T")
COMPACT_AFTER = 32  # items taken from an inbox that is never empty before the list sheds them


class Inbox(Generic[T]):
    """A FIFO with one reader. `put` never blocks: a caller that must bound it checks `room` first."""

    __slots__ = ("maxsize", "_items", "_head", "_waiter")

    def __init__(self, maxsize: int = 0) -> None:
        self.maxsize = maxsize  # 0: unbounded
        self._items: list[T] = []
        self._head = 0  # items before it have been taken; the list is cleared when all are
        self._waiter: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._items) - self._head

    @property
    def room(self) -> int | None:
        """How many more items fit, or None without a bound."""
        return None if not self.maxsize else self.maxsize - (len(self._items) - self._head)  # len(self), in place

    def put(self, item: T) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> T:
        while self._head == len(self._items):
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items[self._head]
        self._head += 1
        if self._head == len(self._items):
            self._items.clear()
            self._head = 0
        elif self._head >= COMPACT_AFTER and 2 * self._head >= len(self._items):
            # A reader that never quite catches up would otherwise keep every item it took.
            del self._items[:self._head]
            self._head = 0
        return item


class Broadcast:
    """Wakes every waiter at once; costs a slot while no one waits. A waiter that wakes checks what it
    waits for and waits again: nothing is remembered between `notify` calls."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[bool]] | None = None

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait for the next `notify`: True; False if `timeout` passed first. The timeout is a plain
        timer that answers the waiter (as in `Arrivals._wait`), not `asyncio.timeout`."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        if self._waiters is None:
            self._waiters = [waiter]
        else:
            self._waiters.append(waiter)
        timer = None if timeout is None else loop.call_later(timeout, _answer, waiter, False)
        notified = False
        try:
            notified = await waiter
            return notified
        finally:
            if timer is not None:
                timer.cancel()
            if not notified:  # left early, or timed out: it must not be kept until the next notify
                self._leave(waiter)

    def _leave(self, waiter: asyncio.Future[bool]) -> None:
        # Not in `wait`: there mypy keeps `_waiters` narrowed to a list across the await, though a
        # `notify` may have emptied it, and the compiled module checks what it reads against that.
        waiters = self._waiters
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(True)


class Latch:
    """Set once, for good; `wait` returns at once after that."""

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self) -> None:
        if self._set:
            return
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._waiter)  # shared by every waiter: one leaving must not cancel it


@mypyc_attr(allow_interpreted_subclasses=True)  # the node's and the gateway's answers build on it
class Arrivals:
    """The body of one answer as its connection hands it over, for one reader: the pieces that came
    and have not been taken, whether the last has come, and what broke it. The connection calls
    `_add`, `_finish` and `_fail`; the reader `take`s and `_wait`s."""

    __slots__ = ("_chunks", "_size", "_done", "_error", "_waiter")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0  # bytes waiting to be taken
        self._done = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[bool] | None = None  # True: something came; False: the timer ran out

    @property
    def error(self) -> Exception | None:
        """What broke the answer before its end came, if anything did."""
        return self._error

    def take(self) -> bytes:
        """Everything that has arrived and not been taken, joined (b"" if nothing has)."""
        chunk = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        return chunk

    async def _wait(self, timeout: float | None) -> bool:
        """Wait for the next piece, the end or a failure; False if `timeout` passed first. Raises the
        failure once what came before it has been taken.

        The timeout is a plain timer that answers the waiter, not `asyncio.timeout`: an idle stream
        times out every keep-alive interval, and cancelling a task each time costs several times more.
        """
        if self._error is not None and not self._chunks:
            raise self._error
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        timer = None if timeout is None else loop.call_later(timeout, _answer, waiter, False)
        try:
            arrived = await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        if self._error is not None and not self._chunks:
            raise self._error
        return arrived

    def _add(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._wake()

    def _fail(self, error: Exception) -> None:
        if not self._done:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None:
            _answer(self._waiter, True)


def _answer(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)
