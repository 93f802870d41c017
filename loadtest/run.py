"""One run of a scenario: its options, its clock and budget, and the two ways to apply load.

Closed loop: each session sends its next request when the last is answered (fixed
concurrency). Open loop: requests are due at a fixed rate whatever the target does, and
latency runs from when a request was due, so a slow target cannot hide its queue
(coordinated omission). Both stop by themselves at `duration` or `max_requests`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

from loadtest.recorder import Recorder
from tether.tasks import TaskSet

BACKLOG = 1000  # requests a session may have waiting in open loop before new ones count as errors
DRAIN_GRACE = 30.0  # seconds past the deadline for requests in flight to finish


@dataclass(frozen=True)
class Options:
    target: str
    sessions: int = 16
    duration: float = 10.0
    rate: float = 0.0  # requests per second in open loop; 0: closed loop
    max_requests: int = 1_000_000
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float = 30.0  # seconds one request may take
    tick_interval: float = 1.0  # idle-streams and resume: seconds between server notifications
    ramp: float = 0.0  # idle-streams and resume: seconds over which the sessions start, evenly; 0: at once
    idle_timeout: float = 0.0  # churn: the target's idle timeout, seconds
    scan_interval: float = 0.0  # churn: the target's reaper interval, seconds
    metrics: tuple[str, ...] = ()  # /metrics URLs that count the target's live sessions
    seed: int = 0

    def __post_init__(self) -> None:
        for name, value, low, strict in (("sessions", self.sessions, 1, False),
                                         ("max_requests", self.max_requests, 1, False),
                                         ("duration", self.duration, 0, True), ("rate", self.rate, 0, False),
                                         ("timeout", self.timeout, 0, True), ("ramp", self.ramp, 0, False),
                                         ("tick_interval", self.tick_interval, 0, True)):
            if value < low or (strict and value == low):
                bound = "above" if strict else "of at least"
                raise ValueError(f"Cannot use {name} {value!r}: expected a number {bound} {low}")


class Run:
    """Shared by every task of a run: options, recorder, clock, request budget."""

    def __init__(self, options: Options, http: aiohttp.ClientSession,
                 cpu: Callable[[], float] | None = None) -> None:
        self.options = options
        self.http = http
        self.cpu = cpu  # CPU seconds the target's processes have used so far, where `--compare` knows them
        self.recorder = Recorder()
        self.started = time.monotonic()
        self.budget = options.max_requests

    def target_for(self, index: int) -> str:
        """Session `index`'s endpoint: with several (comma-separated), sessions take turns."""
        targets = self.options.target.split(",")
        return targets[index % len(targets)]

    def now(self) -> float:
        return time.monotonic() - self.started

    @property
    def over(self) -> bool:
        return self.budget <= 0 or self.now() >= self.options.duration

    def take(self) -> bool:
        """Spend one request of the budget; False once the run is over."""
        if self.over:
            return False
        self.budget -= 1
        return True

    async def sleep_until(self, at: float) -> None:
        await asyncio.sleep(max(0.0, at - self.now()))


class Worker(Protocol):
    async def step(self, due: float) -> None:
        """Send one request that was due at `due` (run time), check and record its answer."""

    async def close(self) -> None: ...


async def apply_load(run: Run, workers: list[Worker], progress: Callable[[], None] | None = None) -> None:
    """Drive the workers closed loop, or open loop at `options.rate`, until the run is over."""
    tasks = TaskSet("load")
    try:
        if run.options.rate > 0:
            await _open_loop(run, workers, tasks, progress)
        else:
            spawned = [tasks.spawn(_closed_loop(run, worker, progress), "session") for worker in workers]
            done, _ = await asyncio.wait(spawned, timeout=run.options.duration + DRAIN_GRACE)
            for task in done:
                task.result()  # a bug in a scenario surfaces here, not as a quiet zero
    finally:
        await tasks.close()
        await asyncio.gather(*(w.close() for w in workers), return_exceptions=True)


async def _closed_loop(run: Run, worker: Worker, progress: Callable[[], None] | None) -> None:
    while run.take():
        await worker.step(run.now())
        if progress:
            progress()


async def _open_loop(run: Run, workers: list[Worker], tasks: TaskSet,
                     progress: Callable[[], None] | None) -> None:
    queues: list[asyncio.Queue[float]] = [asyncio.Queue() for _ in workers]

    async def serve(worker: Worker, queue: asyncio.Queue[float]) -> None:
        while True:
            due = await queue.get()
            await worker.step(due)
            queue.task_done()
            if progress:
                progress()

    servers = [tasks.spawn(serve(worker, queue), "session") for worker, queue in zip(workers, queues, strict=True)]
    interval = 1.0 / run.options.rate
    n = 0
    while (due := n * interval) < run.options.duration and run.take():
        await run.sleep_until(due)
        queue = queues[n % len(queues)]
        if queue.qsize() >= BACKLOG:
            run.recorder.error(run.now(), "backlog")
        else:
            queue.put_nowait(due)
        n += 1
    waiting = {tasks.spawn(q.join(), "drain") for q in queues}
    give_up = run.now() + DRAIN_GRACE
    while waiting and (left := give_up - run.now()) > 0:  # until all is answered, a worker dies, or the grace ends
        done, _ = await asyncio.wait([*waiting, *servers], timeout=left, return_when=asyncio.FIRST_COMPLETED)
        if not done or any(task in done for task in servers):
            break
        waiting -= done
    for task in servers:
        if task.done():
            task.result()  # a worker that crashed: a bug in the scenario, raised rather than hidden
    for queue in queues:  # still due after the grace: the target never got to them
        for _ in range(queue.qsize()):
            run.recorder.error(run.now(), "unfinished")

