"""The start gate: one start at a time until starts show how long one takes, more while they keep
that pace (up to `max_starting`), fewer when they slow down, and a turn is never lost."""

from __future__ import annotations

import asyncio

import pytest

from actors.starts import SLOWER, StartGate


async def burst(gate: StartGate, took: float | None) -> None:
    """As many starts as the gate lets in at once, each taking `took`."""
    admitted = 0
    while gate.starting < gate.limit:
        await gate.acquire()
        admitted += 1
    for _ in range(admitted):
        gate.release(took)


async def test_starts_that_keep_their_pace_open_the_gate_up_to_the_most() -> None:
    gate = StartGate(most=4)
    assert gate.limit == 1
    for _ in range(10):
        await burst(gate, 0.5)  # as quick as any: starts that wait on the network, say
    assert gate.limit == 4


async def test_starts_one_at_a_time_leave_it_where_it_is() -> None:
    gate = StartGate(most=8)
    for _ in range(10):
        await gate.acquire()
        gate.release(0.5)  # the first found the gate full; the rest did not
    assert gate.limit == 2


async def test_starts_that_slow_down_close_it_to_one_and_failures_teach_nothing() -> None:
    gate = StartGate(most=8)
    for _ in range(10):
        await burst(gate, 0.1)
    assert gate.limit == 8
    for expected in (7, 6, 5):
        await gate.acquire()
        gate.release(0.1 * SLOWER * 1.5)  # the CPU is shared: each start takes three times as long
        assert gate.limit == expected
    await gate.acquire()
    gate.release(None)  # failed: says nothing of how long a start takes
    assert gate.limit == 5
    for _ in range(10):
        await gate.acquire()
        gate.release(1.0)
    assert gate.limit == 1


async def test_waiters_start_in_order_as_turns_free_and_a_cancelled_wait_holds_none() -> None:
    gate = StartGate(most=2)
    await gate.acquire()  # the limit is 1: the next ones wait
    order: list[str] = []

    async def start(name: str) -> None:
        await gate.acquire()
        order.append(name)

    first = asyncio.create_task(start("first"))  # noqa: TID251 (a test's own tasks)
    cancelled = asyncio.create_task(start("cancelled"))  # noqa: TID251
    last = asyncio.create_task(start("last"))  # noqa: TID251
    await asyncio.sleep(0)  # all three are waiting
    assert gate.starting == 1 and order == []
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    gate.release(0.2)  # as quick as the quickest: the limit goes to 2, and two turns are free
    await asyncio.wait_for(asyncio.gather(first, last), 5)
    assert order == ["first", "last"] and gate.starting == 2


async def test_a_turn_given_to_a_wait_as_it_is_cancelled_passes_on() -> None:
    gate = StartGate(most=1)
    await gate.acquire()
    waiting = asyncio.create_task(gate.acquire())  # noqa: TID251
    behind = asyncio.create_task(gate.acquire())  # noqa: TID251
    await asyncio.sleep(0)
    gate.release(0.2)  # the turn goes to `waiting`...
    waiting.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.wait_for(behind, 5)  # the turn went on to the next
    assert gate.starting == 1
