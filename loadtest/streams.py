"""`idle-streams` and `resume`: sessions hold a GET stream and count the server's numbered events.

Each session (all at once, or spread evenly over `ramp` seconds) opens its stream, then asks
the server (the light upstream's `tick` tool) for one notification every `tick_interval`
seconds, numbered from 1. At the end it asks how many were sent and waits for the stream to
catch up. Every number not received is an `event_lost` violation, every number received twice
an `event_duplicated`. The latency recorded for an event is how long after its due time it
arrived.

`resume` also cuts each stream at random points and reconnects with `Last-Event-ID`, as a
client on a flaky network does; a target that resumes correctly loses and repeats nothing.

`idle-streams` with no event due (`tick_interval` past `duration`) measures what idle streams
cost. Over the second half of the time every session holds its stream (from the end of the ramp
to the end of the duration), once arrivals have settled, it counts the keep-alive comments the
streams receive and, where `--compare` reads the target's CPU, the CPU the target uses, as a
share of a core. The run must outlast its ramp (`duration` > `ramp`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from typing import Any

import orjson

from loadtest.client import Failed, HttpSession, sse_events
from loadtest.run import Options, Run
from tether.tasks import TaskSet

CATCH_UP = 5.0  # seconds the stream may take, after the last tick, to deliver what is owed
CUT_AFTER = (0.2, 1.0)  # resume: seconds a stream lives before it is cut, drawn uniformly
OPEN_TIMEOUT = 10.0
RECONNECT = 0.1  # seconds before reopening a stream the server ended


class Streams:
    """What every session's stream adds to: how many are open, and the keep-alives received."""

    def __init__(self) -> None:
        self.open = 0
        self.keepalives = 0

    def keepalive(self) -> None:
        self.keepalives += 1


class TickStream:
    """One session's stream and what it has received."""

    def __init__(self, run: Run, streams: Streams, index: int, cut: bool, rng: random.Random,
                 progress: Callable[[], None] | None = None) -> None:
        self.run = run
        self.streams = streams
        self.progress = progress
        self.index = index
        self.cut = cut
        self.rng = rng
        self.client = HttpSession(run.http, run.target_for(index), run.options.headers, run.options.timeout)
        self.seen: set[int] = set()
        self.last_event_id: str | None = None
        self.ticking_since: float | None = None
        self.opened = asyncio.Event()
        self.changed = asyncio.Event()
        self.gone = False

    async def listen(self) -> None:
        """Read the stream until cancelled, reconnecting after each cut (with Last-Event-ID)."""
        was_cut = False
        while not self.gone:
            try:
                async with self.client.stream(self.last_event_id) as response:
                    self.opened.set()
                    if was_cut:
                        self.run.recorder.count("streams_resumed")
                    self.streams.open += 1
                    try:
                        was_cut = await self._read(response)
                    finally:
                        self.streams.open -= 1
            except Failed as failed:
                self.run.recorder.error(self.run.now(), failed.kind)
                if failed.kind == "http_404":
                    self.gone = True
                    self.changed.set()
                    return
            if not was_cut:
                await asyncio.sleep(RECONNECT)  # the server ended it, or refused: not in a tight loop

    async def _read(self, response: Any) -> bool:
        """Read events until the stream ends (False) or, in `resume`, until a random moment (True)."""
        try:
            async with asyncio.timeout(self.rng.uniform(*CUT_AFTER) if self.cut else None):
                async for event in sse_events(response, self.streams.keepalive):
                    if event.id:
                        self.last_event_id = event.id
                    if event.data:  # a priming event carries only its id
                        self._received(orjson.loads(event.data))
        except TimeoutError:
            self.run.recorder.count("streams_cut")
            return True  # leaving the context closes the connection mid-stream
        return False

    def _received(self, message: dict[str, Any]) -> None:
        params = message.get("params") or {}
        if message.get("method") != "notifications/message" or params.get("logger") != "tick":
            return
        seq = int(params["data"]["seq"])
        now = self.run.now()
        rec = self.run.recorder
        rec.count("events_received")
        if seq in self.seen:
            rec.violation(now, "event_duplicated", f"session {self.index}: event {seq} again")
        else:
            self.seen.add(seq)
            due = (self.ticking_since or now) + seq * self.run.options.tick_interval
            rec.ok(now, max(0.0, now - due))
        self.changed.set()
        if self.progress:
            self.progress()

    async def wait_for(self, count: int, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while not self.gone and len(self.seen) < count:  # seqs run 1..count
                    self.changed.clear()
                    await self.changed.wait()


async def one_session(run: Run, streams: Streams, index: int, cut: bool, rng: random.Random,
                      progress: Callable[[], None] | None) -> None:
    rec, o = run.recorder, run.options
    await run.sleep_until(index * o.ramp / o.sessions)  # a crowd arrives over the ramp, not in one instant
    stream = TickStream(run, streams, index, cut, rng, progress)
    try:
        await stream.client.initialize()
    except Failed as failed:
        rec.error(run.now(), failed.kind)
        return
    rec.session_opened(run.now())
    listeners = TaskSet(f"stream-{index}")
    try:
        listeners.spawn(stream.listen(), "listen")
        async with asyncio.timeout(OPEN_TIMEOUT):
            await stream.opened.wait()
        # idle-streams with an interval past the duration: 0, a stream held idle; resume needs one event
        count = max(int(cut), int(o.duration / o.tick_interval))
        stream.ticking_since = run.now()
        if count:
            await stream.client.call("tick", {"interval": o.tick_interval, "count": count})
            await run.sleep_until(stream.ticking_since + count * o.tick_interval)
            await stream.wait_for(count, CATCH_UP)  # every tick asked for is owed to this client
        else:
            await run.sleep_until(stream.ticking_since + o.duration)
        rec.count("events_expected", count)
        try:
            sent = await stream.client.call("ticks_sent", {})
        except Failed as failed:
            sent = f"unknown: {failed.kind}"  # the session may be gone; what was missed still counts
        for seq in sorted(set(range(1, count + 1)) - stream.seen):
            rec.violation(run.now(), "event_lost", f"session {index}: event {seq} of {count} never arrived "
                          f"(the server sent {sent})")
    except (Failed, TimeoutError) as exc:
        rec.error(run.now(), exc.kind if isinstance(exc, Failed) else "stream_not_opened")
    finally:
        await listeners.close()
        await stream.client.delete()
        rec.session_closed(run.now())


async def idle_streams(run: Run, progress: Callable[[], None] | None = None) -> dict[str, Any]:
    return await _streams(run, False, progress)


async def resume(run: Run, progress: Callable[[], None] | None = None) -> dict[str, Any]:
    return await _streams(run, True, progress)


async def _streams(run: Run, cut: bool, progress: Callable[[], None] | None) -> dict[str, Any]:
    rng = random.Random(run.options.seed)
    o = run.options
    streams = Streams()
    tasks = TaskSet("streams")
    sessions = [tasks.spawn(one_session(run, streams, i, cut, random.Random(rng.random()), progress), "session")
                for i in range(o.sessions)]
    window = None if cut or o.tick_interval <= o.duration else idle_window(o)  # held streams, no event sent
    idle = tasks.spawn(measure_idle(run, streams, *window), "idle") if window else None
    # Each session: start (2 requests), open, tick, the ticks, catch up, ask, delete.
    _, late = await asyncio.wait(sessions, timeout=o.ramp + o.duration + CATCH_UP + OPEN_TIMEOUT + 5 * o.timeout)
    for _ in late:
        run.recorder.error(run.now(), "unfinished")
    await tasks.close()
    extra: dict[str, Any] = {"tick_interval": o.tick_interval, "ramp": o.ramp}
    if idle is not None and not idle.cancelled():
        extra["idle"] = idle.result()
    for task in sessions:  # one still unfinished (its DELETE outlived the close) was counted above
        if task.done() and not task.cancelled() and (exc := task.exception()) is not None:
            raise exc  # a bug in the scenario, not a finding about the target
    return extra


def idle_window(o: Options) -> tuple[float, float] | None:
    """When to measure idle streams (run time): the second half of the time every session holds its
    stream, from the end of the ramp to the end of the duration, less a margin before the first
    ones leave. The first half lets the tail of the arrivals settle (a session's first lease
    renewals, the garbage of its start). None when no time has every stream held."""
    if o.duration <= o.ramp:
        return None
    return (o.ramp + o.duration) / 2, o.duration - min(1.0, (o.duration - o.ramp) / 10)


async def measure_idle(run: Run, streams: Streams, start: float, end: float) -> dict[str, Any]:
    """Keep-alives received and the target's CPU from `start` to `end`."""
    await run.sleep_until(start)
    began, keepalives, held = run.now(), streams.keepalives, streams.open
    cpu_before = run.cpu() if run.cpu is not None else 0.0
    await run.sleep_until(end)
    seconds, received = run.now() - began, streams.keepalives - keepalives
    result: dict[str, Any] = {"from": round(began, 3), "seconds": round(seconds, 3),
                              "streams": min(held, streams.open), "keepalives": received,
                              "keepalives_per_second": round(received / seconds, 2)}
    if run.cpu is not None:
        used = run.cpu() - cpu_before
        result |= {"cpu_seconds": round(used, 3), "cpu_percent": round(used / seconds * 100, 3)}
    return result
