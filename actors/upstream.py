"""What an actor fronts: the `Upstream` protocol, and the stdio upstream.

An upstream turns JSON-RPC messages into whatever reaches the server and back.
`receive` also says which client request a message belongs to when the
transport knows (an HTTP server answers on the request's own stream); stdio
cannot tell, and says None. The HTTP upstreams live in `actors.upstream_http`.

The stdio upstream is one MCP server process per session, in its own process
group. The command comes from configuration only. The process gets a scrubbed
environment (an allowlist), its own process group (so ending it ends its
children too), its own working directory (removed when it ends), resource
limits set before it runs (`prlimit`: address space, CPU time, open files; no
core dumps) and, where `setpriv` exists, a parent-death signal, so a node that
is killed does not leave servers behind. `stop()` always reaps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from actors.mcp import RequestId
from tether.errors import ConfigError, UpstreamError

log = logging.getLogger("tether.node")

# What an upstream inherits from the node's environment; everything else is dropped.
ENV_ALLOWLIST = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME",
                 "SHELL", "TERM", "NODE_PATH", "NPM_CONFIG_CACHE", "npm_config_cache",
                 "VIRTUAL_ENV", "PYTHONPATH", "UV_CACHE_DIR", "XDG_CACHE_HOME")
_pidfd_refused = False  # said once: every server's exit is then waited for by a thread
_SETPRIV = shutil.which("setpriv")
_PRLIMIT = shutil.which("prlimit")


# One message from the upstream (an object, or a batch), and the client request it belongs to, if known.
Inbound = tuple[Any, RequestId | None]


class Upstream(Protocol):
    """One session's server, as the actor sees it."""

    @property
    def pid(self) -> int | None: ...

    def describe(self) -> str: ...

    async def send(self, message: Mapping[str, Any]) -> None:
        """Deliver one client message. Raises `UpstreamError` when the server is gone."""

    def send_now(self, message: Mapping[str, Any]) -> bool:
        """Deliver one client message without waiting, if that can be done now; False if it must go
        through `send`. Called only when no earlier message is still being sent."""

    async def receive(self) -> Inbound | None:
        """The next server message, or None when the server has gone. Raises `UpstreamError`."""

    def deliver_to(self, sink: Callable[[Inbound], None]) -> None:
        """Hand each server message to `sink` as it comes, from now on, if this upstream can; if not,
        the actor reads them with `receive`. Either way `receive` still reports the end (None)."""

    async def background(self) -> None:
        """Work that runs as long as the session (stderr draining, the server's GET stream)."""

    async def stop(self, grace: float) -> str:
        """End the server's side of the session, within about `grace` seconds; returns what happened."""


def scrubbed_env(extra: Mapping[str, str], source: Mapping[str, str] | None = None,
                 allow: Iterable[str] = ()) -> dict[str, str]:
    """The allowlisted part of `source` (default: this process's environment), plus `allow` (entries
    NAME, passed through, or NAME=VALUE), plus `extra`."""
    source = os.environ if source is None else source
    env = {key: source[key] for key in ENV_ALLOWLIST if key in source}
    for entry in allow:
        name, eq, value = entry.partition("=")
        if eq:
            env[name] = value
        elif name in source:
            env[name] = source[name]
    env.update(extra)
    return env


@dataclass(frozen=True)
class ProcessLimits:
    """Resource limits of one upstream process; 0 leaves a limit as the node has it."""

    memory: int = 0  # bytes of address space
    cpu: int = 0  # seconds of CPU time: SIGXCPU then, SIGKILL a second later
    files: int = 0  # open file descriptors

    def rlimits(self) -> list[tuple[int, tuple[int, int]]]:
        limits = [(resource.RLIMIT_CORE, (0, 0))]  # a server's memory never lands on disk
        if self.memory:
            limits.append((resource.RLIMIT_AS, (self.memory, self.memory)))
        if self.cpu:
            limits.append((resource.RLIMIT_CPU, (self.cpu, self.cpu + 1)))
        if self.files:
            limits.append((resource.RLIMIT_NOFILE, (self.files, self.files)))
        return limits

    def prefix(self) -> list[str]:
        """`prlimit` arguments that set these limits before the server runs (empty without prlimit)."""
        if _PRLIMIT is None:
            return []
        names = {resource.RLIMIT_CORE: "core", resource.RLIMIT_AS: "as", resource.RLIMIT_CPU: "cpu",
                 resource.RLIMIT_NOFILE: "nofile"}
        return [_PRLIMIT, *(f"--{names[which]}={soft}:{hard}" for which, (soft, hard) in self.rlimits()), "--"]

    def check(self) -> None:
        """Refuse limits the node itself cannot grant. Raises `ConfigError`."""
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if self.files and hard != resource.RLIM_INFINITY and self.files > hard:
            raise ConfigError(f"Cannot use upstream_max_files: got {self.files}, but this node may open at "
                              f"most {hard} files itself (ulimit -Hn)")

    def apply_to(self, pid: int) -> None:
        """Set the limits on a running process: the fallback where prlimit(1) is missing."""
        for which, values in self.rlimits():
            try:
                resource.prlimit(pid, which, values)
            except (PermissionError, ValueError) as exc:
                log.warning("upstream.limit_not_set", extra={"pid": pid, "detail": f"{which}: {exc}"})
            except ProcessLookupError:
                return


def with_death_signal(argv: Sequence[str], sig: str = "KILL") -> list[str]:
    """`argv` prefixed so the kernel signals the process when its parent dies (Linux, if available)."""
    if _SETPRIV is None:
        return list(argv)
    return [_SETPRIV, f"--pdeathsig={sig}", "--", *argv]


class Child:
    """A server process with its pipes on the event loop: what `asyncio.create_subprocess_exec` gives,
    started the way `subprocess` starts one. That is vfork and exec, which costs the same however
    much memory the node holds; the event loop's own spawn (uvloop's) forks, copying the page tables
    of a node that holds thousands of sessions on every start. Its exit is read from a pidfd on the
    loop."""

    def __init__(self, popen: subprocess.Popen[bytes], stdin: asyncio.StreamWriter, stdout: asyncio.StreamReader,
                 stderr: asyncio.StreamReader, pipes: list[asyncio.BaseTransport]) -> None:
        self._popen = popen
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self._pipes = pipes
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = self._loop.create_future()
        self._pidfd = -1
        try:
            self._pidfd = os.pidfd_open(popen.pid)
        except (AttributeError, OSError) as exc:  # no pidfds (before Linux 5.3, or a seccomp profile)
            global _pidfd_refused
            if not _pidfd_refused:
                _pidfd_refused = True
                log.warning("upstream.no_pidfd", extra={"detail": f"pidfd_open failed ({exc!r}): a thread "
                                                                  "waits for each server's exit instead"})
            threading.Thread(target=self._wait_in_thread, name=f"wait-{popen.pid}", daemon=True).start()
        else:
            self._loop.add_reader(self._pidfd, self._reap)

    @classmethod
    async def spawn(cls, argv: Sequence[str], *, env: Mapping[str, str], cwd: str, limit: int) -> Child:
        """Start `argv` in a session of its own, its stdin, stdout and stderr piped. Raises `OSError`."""
        # bufsize=0: the pipes' file objects get no 8 KB buffers each, as the loop does the reading
        popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 env=env, cwd=cwd, start_new_session=True, bufsize=0)
        assert popen.stdin is not None and popen.stdout is not None and popen.stderr is not None
        loop = asyncio.get_running_loop()
        pipes: list[asyncio.BaseTransport] = []
        try:
            stdout, stderr = asyncio.StreamReader(limit), asyncio.StreamReader(limit)
            out, _ = await loop.connect_read_pipe(lambda: _PipeReader(stdout), popen.stdout)
            pipes.append(out)
            err, _ = await loop.connect_read_pipe(lambda: _PipeReader(stderr), popen.stderr)
            pipes.append(err)
            transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, popen.stdin)
            pipes.append(transport)
            return cls(popen, asyncio.StreamWriter(transport, protocol, None, loop), stdout, stderr, pipes)
        except BaseException:  # never leave it running unwatched, nor its pipes open
            for pipe in pipes:
                pipe.close()  # a transport closes its pipe's file object with it
            for file in (popen.stdin, popen.stdout, popen.stderr):
                with contextlib.suppress(OSError):
                    file.close()  # those no transport took yet
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()
            raise

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def close(self) -> None:
        """Close the pipes, once it has exited; a reader still waiting on one sees its end."""
        for pipe in self._pipes:
            pipe.close()

    def _reap(self) -> None:
        """The pidfd is readable: the process has exited. Reaped here, by `Popen`, which decodes its status."""
        code = self._popen.poll()
        if code is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._exited_with(code)

    def _wait_in_thread(self) -> None:
        code = self._popen.wait()
        self._loop.call_soon_threadsafe(self._exited_with, code)

    def _exited_with(self, code: int) -> None:
        if not self._exited.done():
            self._exited.set_result(code)


class _PipeReader(asyncio.StreamReaderProtocol):
    def eof_received(self) -> bool:
        super().eof_received()
        return False  # close the pipe at its end: uvloop keeps a read pipe open after it otherwise


class StdioUpstream:
    """Newline-delimited JSON-RPC over a child's stdin and stdout."""

    def __init__(self, process: Child, workdir: str | None = None) -> None:
        self._process = process
        self._workdir = workdir
        self._write_lock = asyncio.Lock()

    @classmethod
    async def start(cls, argv: Sequence[str], *, env: Mapping[str, str], max_message_bytes: int,
                    limits: ProcessLimits = ProcessLimits(), workdir_in: str | None = None,
                    name: str = "session") -> StdioUpstream:
        """Spawn the server in a working directory of its own, made under `workdir_in` (default: the
        system temp directory) and removed when it stops. Raises `UpstreamError` if it cannot start."""
        try:
            workdir = tempfile.mkdtemp(prefix=f"tether-{name}-", dir=workdir_in or None)
        except OSError as exc:
            raise UpstreamError(f"Cannot make a working directory for upstream in {workdir_in!r}: "
                                f"{exc.strerror or exc}") from exc
        prefix = limits.prefix()
        try:
            process = await Child.spawn(with_death_signal([*prefix, *argv]), env=dict(env), cwd=workdir,
                                        limit=max_message_bytes)
        except OSError as exc:
            shutil.rmtree(workdir, ignore_errors=True)
            raise UpstreamError(f"Cannot start upstream {argv[0]!r}: {exc.strerror or exc}") from exc
        except BaseException:  # cancelled while its pipes were being set up
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        if not prefix:
            limits.apply_to(process.pid)
        return cls(process, workdir)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    def __repr__(self) -> str:
        return f"StdioUpstream(pid={self.pid}, returncode={self.returncode})"

    def describe(self) -> str:
        code = self.returncode
        return f"pid {self.pid}" if code is None else f"pid {self.pid}, exited with code {code}"

    async def send(self, message: Mapping[str, Any]) -> None:
        """Write one message. Raises `UpstreamError` if the process no longer reads."""
        stdin = self._process.stdin
        async with self._write_lock:
            try:
                stdin.write(orjson.dumps(message) + b"\n")
                await stdin.drain()
            except (ConnectionError, RuntimeError) as exc:
                raise UpstreamError("Cannot write to upstream: it has exited") from exc

    def send_now(self, message: Mapping[str, Any]) -> bool:
        """Write one message if the pipe takes it at once (it is not full, the process has not exited)."""
        stdin = self._process.stdin
        transport = stdin.transport
        if self._write_lock.locked() or transport.is_closing() \
                or transport.get_write_buffer_size() > 0:  # full, or filling: `send` waits for it to drain
            return False
        stdin.write(orjson.dumps(message) + b"\n")
        return True

    def deliver_to(self, sink: Callable[[Inbound], None]) -> None:
        """Lines are read by the actor's reader (`receive`), which waits on the pipe anyway."""

    async def receive(self) -> Inbound | None:
        """The next JSON-RPC message, or None at end of output. Lines that are not JSON are logged."""
        stdout = self._process.stdout
        while True:
            try:
                line = await stdout.readline()
            except ValueError as exc:  # a line longer than the reader's limit
                raise UpstreamError(f"Cannot read upstream message: {exc}") from exc
            if not line:
                return None
            try:
                message = orjson.loads(line)
            except orjson.JSONDecodeError:
                log.warning("upstream.not_json", extra={"pid": self.pid, "detail": line[:200].decode(
                    errors="replace")})
                continue
            if isinstance(message, dict | list):
                return message, None

    async def background(self) -> None:
        """Forward the server's stderr to the node log, so the pipe never fills."""
        stderr = self._process.stderr
        while True:
            try:
                line = await stderr.readline()
            except ValueError:  # a "line" past the reader's limit (a progress bar with no newline)
                continue  # the reader dropped it; keep draining so the server never blocks on stderr
            if not line:
                return
            log.info("upstream.stderr", extra={"pid": self.pid,
                                               "detail": line[:500].decode(errors="replace").rstrip()})

    async def stop(self, grace: float) -> str:
        """End the process group: close stdin, SIGTERM, SIGKILL after `grace`; always reap, and remove
        the working directory."""
        try:
            return f"upstream exit code {await self._stop(grace)}"
        finally:
            if self._workdir is not None:
                await asyncio.to_thread(shutil.rmtree, self._workdir, True)

    async def _stop(self, grace: float) -> int:
        process = self._process
        if not process.stdin.is_closing():
            process.stdin.close()
        self._signal_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=grace)
        except TimeoutError:
            log.warning("upstream.kill", extra={"pid": self.pid, "detail": f"no exit {grace}s after SIGTERM"})
        # The group may hold children the leader left behind; they go too.
        self._signal_group(signal.SIGKILL)
        try:
            return await process.wait()
        finally:
            process.close()

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, sig)
