"""A stdio server's process on the node's loop: its pipes carry lines both ways, and its exit is seen
and reaped, with a pidfd where the kernel has them and a waiting thread where it does not, on the
default loop and on uvloop (what `tether` runs)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from actors.upstream import Child
from tests.support import process_exists, wait_until

ECHO = ["sh", "-c", 'read line; echo "got $line"; echo "to stderr" >&2; read rest; exit 3']
LOOPS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {"asyncio": asyncio.run, "uvloop": uvloop.run}


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(params=["pidfd", "thread"])
def exit_watch(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "thread":
        def no_pidfds(pid: int, flags: int = 0) -> int:
            raise OSError(38, "Function not implemented")

        monkeypatch.setattr(os, "pidfd_open", no_pidfds)
    return str(request.param)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_child_talks_over_its_pipes_and_its_exit_code_is_reaped(loop: str, exit_watch: str, tmp_path) -> None:
    async def once() -> None:
        child = await Child.spawn(ECHO, env={"PATH": os.environ["PATH"]}, cwd=str(tmp_path), limit=1024)
        child.stdin.write(b"hello\n")
        await child.stdin.drain()
        assert await asyncio.wait_for(child.stdout.readline(), 10) == b"got hello\n"
        assert await asyncio.wait_for(child.stderr.readline(), 10) == b"to stderr\n"
        assert child.returncode is None
        child.stdin.close()  # its second read sees the end of input, and it exits
        assert await asyncio.wait_for(child.wait(), 10) == 3
        assert child.returncode == 3
        assert not process_exists(child.pid), "exited but not reaped: a zombie"
        assert await child.stdout.read() == b"" and await child.stderr.read() == b""  # as the node reads them

    async def scenario() -> None:
        await once()  # the loop opens what it keeps for every child (uvloop: /dev/null) the first time
        files = open_files()
        await once()
        async def closed() -> bool:  # the kernel's file table: nothing signals it
            return open_files() == files

        await wait_until(closed, 5, "the pipes closed at their end, and the pidfd with the exit")

    LOOPS[loop](scenario())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_killed_child_reports_its_signal_to_every_waiter(loop: str, exit_watch: str, tmp_path) -> None:
    async def scenario() -> None:
        child = await Child.spawn(["sleep", "60"], env={"PATH": os.environ["PATH"]}, cwd=str(tmp_path), limit=1024)
        assert os.getpgid(child.pid) == child.pid  # a session, and so a process group, of its own
        waiters = [asyncio.create_task(child.wait()) for _ in range(2)]  # noqa: TID251 (a test's own tasks)
        os.killpg(child.pid, signal.SIGKILL)
        assert await asyncio.wait_for(asyncio.gather(*waiters), 10) == [-signal.SIGKILL] * 2
        assert not process_exists(child.pid)
        child.stdin.close()
        assert await child.stdout.read() == b"" and await child.stderr.read() == b""

    LOOPS[loop](scenario())


def test_a_command_that_cannot_start_raises_oserror(tmp_path) -> None:
    async def scenario() -> None:
        with pytest.raises(FileNotFoundError):
            await Child.spawn([str(tmp_path / "missing")], env={}, cwd=str(tmp_path), limit=1024)

    uvloop.run(scenario())
