"""The timing wheel on a real event loop: each item is looked at once it falls due, never before,
again when its check says it moved on, and not at all once dropped; an empty wheel runs no timer."""

from __future__ import annotations

import asyncio
import time

import pytest

from actors.lease import IdleLease
from actors.wheel import Deadlines, Wheel

STEP = 0.02


async def test_items_are_checked_once_due_and_again_when_they_moved_on() -> None:
    checks: list[tuple[str, float]] = []
    done = asyncio.Event()
    later = {"moved": 2}  # checks that say "due again later" before it is dropped

    def check(item: str, now: float) -> float | None:
        checks.append((item, now))
        if later.get(item):
            later[item] -= 1
            return now + 2 * STEP
        names = [c[0] for c in checks]
        if "soon" in names and "late" in names and names.count("moved") == 3:
            done.set()
        return None

    wheel: Wheel[str] = Wheel(STEP, check)
    start = time.monotonic()
    due = {"soon": start + STEP, "moved": start + 2 * STEP, "late": start + 6 * STEP}
    for item, when in due.items():
        wheel.add(item, when)
    wheel.add("dropped", start + STEP)
    wheel.discard("dropped")
    assert len(wheel) == 3 and "dropped" not in wheel
    await asyncio.wait_for(done.wait(), 10)
    assert [item for item, _ in checks].count("moved") == 3
    assert sorted({item for item, _ in checks}) == ["late", "moved", "soon"]
    for item, now in checks:
        assert now >= due[item] - 0.002, f"{item} looked at before it was due"
    assert len(wheel) == 0 and wheel._timer is None  # nothing left: no timer runs


async def test_idle_leases_on_the_wheel_end_only_when_they_have_run_out() -> None:
    # The node's use: a lease touched since it was placed is looked at again at its new deadline.
    leases = {name: IdleLease(3 * STEP, time.monotonic()) for name in ("left", "touched")}
    ended: dict[str, float] = {}
    all_ended = asyncio.Event()

    def check(name: str, now: float) -> float | None:
        lease = leases[name]
        if not lease.expired(now):
            return lease.last_activity + lease.idle_timeout
        ended[name] = now
        if len(ended) == len(leases):
            all_ended.set()
        return None

    wheel: Wheel[str] = Wheel(STEP, check)
    for name, lease in leases.items():
        wheel.add(name, lease.last_activity + lease.idle_timeout)
    touched_at = time.monotonic() + 2 * STEP
    while time.monotonic() < touched_at:  # activity before the first deadline
        await asyncio.sleep(STEP / 2)
    leases["touched"].touch(time.monotonic())
    await asyncio.wait_for(all_ended.wait(), 10)
    assert ended["touched"] >= leases["touched"].last_activity + leases["touched"].idle_timeout - 0.002
    assert ended["left"] < ended["touched"]


async def test_a_thousand_items_each_checked_exactly_once() -> None:
    seen: list[int] = []
    done = asyncio.Event()

    def check(item: int, now: float) -> float | None:
        seen.append(item)
        if len(seen) == 1000:
            done.set()
        return None

    wheel: Wheel[int] = Wheel(STEP, check)
    start = time.monotonic()
    for i in range(1000):
        wheel.add(i, start + (i % 10) * STEP / 3)
    await asyncio.wait_for(done.wait(), 10)
    assert sorted(seen) == list(range(1000))
    assert wheel._timer is None


async def test_a_check_that_fails_is_logged_and_tried_again_and_the_others_go_on(
        caplog: pytest.LogCaptureFixture) -> None:
    tries: dict[str, int] = {"broken": 0, "fine": 0}
    done = asyncio.Event()

    def check(item: str, now: float) -> float | None:
        tries[item] += 1
        if item == "broken" and tries[item] < 3:
            raise RuntimeError("a bug in the check")
        if tries["broken"] == 3 and tries["fine"] == 1:
            done.set()
        return None

    wheel: Wheel[str] = Wheel(STEP, check)
    start = time.monotonic()
    wheel.add("broken", start + STEP)
    wheel.add("fine", start + STEP)
    await asyncio.wait_for(done.wait(), 10)
    assert tries == {"broken": 3, "fine": 1}
    assert [r.message for r in caplog.records].count("wheel.check_failed") == 2
    assert len(wheel) == 0 and wheel._timer is None


async def test_deadlines_expire_the_oldest_first_from_one_timer() -> None:
    """Items expire `timeout` after they were added, oldest first; an answer (discard) or an add while
    the timer runs makes no timer; the timer, when it fires early for what is left, is set again."""
    now = [100.0]
    expired: list[str] = []
    deadlines: Deadlines[str] = Deadlines(1.0, expired.append, clock=lambda: now[0])
    deadlines.add("a")  # due 101.0
    timer = deadlines._timer
    now[0] = 100.5
    deadlines.add("b")  # due 101.5
    deadlines.add("answered")
    deadlines.discard("answered")
    assert deadlines._timer is timer and len(deadlines) == 2 and "answered" not in deadlines
    deadlines.close()  # the test fires it by hand, at the clock it sets
    now[0] = 101.0
    deadlines._fire()
    assert expired == ["a"] and [item for item, _ in deadlines.items()] == ["b"]
    assert deadlines._timer is not None  # set again, for "b"
    deadlines.close()
    now[0] = 101.5
    deadlines._fire()
    assert expired == ["a", "b"] and len(deadlines) == 0 and deadlines._timer is None


async def test_deadlines_on_the_loop_clock_expire_in_time_and_survive_a_failing_expiry() -> None:
    loop = asyncio.get_running_loop()
    expired: dict[str, float] = {}
    done = asyncio.Event()

    def expire(item: str) -> None:
        expired[item] = loop.time()
        if item == "broken":
            raise RuntimeError("an expiry that fails")
        if len(expired) == 3:
            done.set()

    deadlines: Deadlines[str] = Deadlines(STEP, expire)
    added = {}
    for item in ("broken", "first", "second"):
        added[item] = loop.time()
        deadlines.add(item)
    await asyncio.wait_for(done.wait(), 10)
    assert list(expired) == ["broken", "first", "second"]
    for item, at in expired.items():
        assert at >= added[item] + STEP - 0.002, f"{item} expired early"
    assert len(deadlines) == 0 and deadlines._timer is None
