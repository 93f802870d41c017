"""The per-session waiting primitives: order, wake-ups, and waiters that leave early."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator

import pytest

from actors.waiting import COMPACT_AFTER, Broadcast, Inbox, Latch
from tether.tasks import TaskSet


@pytest.fixture
async def tasks() -> AsyncIterator[TaskSet]:
    tasks = TaskSet("test-waiting")
    yield tasks
    await tasks.close(timeout=1.0)


async def test_an_inbox_hands_items_over_in_order_and_wakes_its_reader(tasks: TaskSet) -> None:
    inbox: Inbox[int] = Inbox(3)
    reader = tasks.spawn(inbox.get(), "waiter")
    await asyncio.sleep(0)
    assert not reader.done()  # nothing queued: it waits
    inbox.put(1)
    assert await asyncio.wait_for(reader, 1) == 1
    for item in (2, 3, 4):
        inbox.put(item)
    assert (len(inbox), inbox.room) == (3, 0)
    assert [await inbox.get() for _ in range(3)] == [2, 3, 4]
    assert (len(inbox), inbox.room) == (0, 3)
    assert Inbox().room is None


async def test_an_inbox_that_never_empties_does_not_keep_what_was_taken() -> None:
    inbox: Inbox[int] = Inbox()
    inbox.put(0)
    for i in range(1, 10_000):  # a reader always one item behind: the inbox is never empty
        inbox.put(i)
        assert await inbox.get() == i - 1
    assert len(inbox) == 1
    assert len(inbox._items) <= 2 * COMPACT_AFTER, f"{len(inbox._items)} items kept for 1 waiting"


async def test_a_reader_cancelled_while_waiting_loses_nothing(tasks: TaskSet) -> None:
    inbox: Inbox[str] = Inbox()
    reader = tasks.spawn(inbox.get(), "waiter")
    await asyncio.sleep(0)
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    inbox.put("kept")
    assert await asyncio.wait_for(inbox.get(), 1) == "kept"


async def test_a_broadcast_wakes_every_waiter_and_forgets_those_that_left(tasks: TaskSet) -> None:
    changes = Broadcast()
    waiters = [tasks.spawn(changes.wait(), "waiter") for _ in range(3)]
    leaving = tasks.spawn(changes.wait(), "waiter")
    await asyncio.sleep(0)
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    assert changes._waiters is not None and len(changes._waiters) == 3  # the one that left is gone
    changes.notify()
    await asyncio.wait_for(asyncio.gather(*waiters), 1)
    assert changes._waiters is None
    late = tasks.spawn(changes.wait(), "waiter")  # a notify is not remembered: a later waiter waits
    await asyncio.sleep(0)
    assert not late.done()
    changes.notify()
    await asyncio.wait_for(late, 1)


async def test_a_broadcast_wait_that_times_out_says_so_and_is_forgotten(tasks: TaskSet) -> None:
    changes = Broadcast()
    staying = tasks.spawn(changes.wait(), "waiter")
    assert await changes.wait(0.01) is False  # nothing came: the keep-alive case
    assert changes._waiters is not None and len(changes._waiters) == 1  # only the one still waiting
    waiting = tasks.spawn(changes.wait(30), "waiter")
    await asyncio.sleep(0)
    changes.notify()
    assert await asyncio.wait_for(waiting, 1) is True
    assert await asyncio.wait_for(staying, 1) is True


async def test_a_broadcast_waiter_cancelled_after_the_notify_that_woke_it_just_leaves(tasks: TaskSet) -> None:
    # The notify has emptied the waiters when the cancellation lands: the waiter finds none to leave.
    # (The compiled module once checked that list against a type mypy had narrowed across the await.)
    changes = Broadcast()
    woken = tasks.spawn(changes.wait(), "waiter")
    await asyncio.sleep(0)
    changes.notify()
    woken.cancel()
    done, _ = await asyncio.wait([woken], timeout=1)
    assert done and woken.cancelled()  # a CancelledError, not a TypeError
    assert changes._waiters is None


async def test_a_latch_stays_set_and_one_waiter_leaving_does_not_cancel_the_others(tasks: TaskSet) -> None:
    latch = Latch()
    staying = tasks.spawn(latch.wait(), "waiter")
    leaving = tasks.spawn(latch.wait(), "waiter")
    await asyncio.sleep(0)
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    latch.set()
    await asyncio.wait_for(staying, 1)
    assert latch.is_set()
    await asyncio.wait_for(latch.wait(), 1)


async def test_idle_primitives_cost_a_fraction_of_asyncio_queue_and_event() -> None:
    def size(make: object) -> float:
        tracemalloc.start()
        try:
            kept = [make() for _ in range(1000)]  # type: ignore[operator]
            return tracemalloc.get_traced_memory()[0] / len(kept)
        finally:
            tracemalloc.stop()

    assert size(Inbox) * 4 < size(asyncio.Queue)
    assert size(Broadcast) * 4 < size(asyncio.Event)
    assert size(Latch) * 4 < size(asyncio.Event)
