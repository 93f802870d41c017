"""Background work with an owner: every task is named, referenced and reaped."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("tether.tasks")


class TaskSet:
    """Owns background tasks: keeps references, logs crashes, cancels on close."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()
        # Loops check this each round, so they stop even if a library swallowed their cancellation.
        self.closing = False

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self._owner}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("task.crashed", extra={"task": task.get_name()}, exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self, timeout: float = 5.0) -> None:
        """Cancel every task still running and wait for them, at most `timeout` seconds.

        A task that swallows its cancellation (some client libraries do) is logged and
        left behind rather than allowed to hang shutdown.
        """
        self.closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            log.error("task.ignored_cancel", extra={"task": task.get_name(), "seconds": timeout})
