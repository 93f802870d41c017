"""The `tether` command: `up` (everything on one host), `gateway` and `node` (the parts)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tether import __version__
from tether.config import GW, NODE, SETTINGS, UP, Config, load, read_toml
from tether.errors import ConfigError

TOKEN, DRAIN, HEALTH, LOADTEST = "token", "drain", "health", "loadtest"

if TYPE_CHECKING:
    from actors.store.base import Store

GC_THRESHOLD = 20_000  # new container objects between young-generation collections

DESCRIPTIONS = {
    UP: "Start a gateway, actor nodes and the in-memory store on this host, in front of a stdio "
        "MCP server (the bundled demo unless --upstream-command is given). Ctrl-C stops everything.",
    GW: "Run one gateway: the MCP endpoint on /mcp. With the memory store it also hosts the store "
        "that separate nodes join (--store http://GATEWAY/_tether/store on each node).",
    NODE: "Run one actor node: it joins the ring through --store and hosts sessions, one upstream "
          "process each.",
}
EPILOG = ("Every flag is also a config key (TOML, --config FILE) and a TETHER_* variable, e.g. "
          "--idle-timeout / idle_timeout / TETHER_IDLE_TIMEOUT. Flags beat variables beat the file.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether", description="Tether: a session-affinity gateway for stateful MCP servers.",
        epilog="Try: tether up   (then point an MCP client at http://127.0.0.1:8080/mcp)")
    parser.add_argument("--version", action="version", version=f"tether {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    token = commands.add_parser(
        TOKEN, help="Make a client token for auth_tokens_file",
        description="Print a new random token (give it to the client) on the first line, and the line "
                    "to add to auth_tokens_file (only its SHA-256 is kept) on the second.")
    token.add_argument("principal", help="who the token speaks for; sessions are bound to this name")
    for command in (UP, GW, NODE):
        _add_settings(commands.add_parser(command, help=DESCRIPTIONS[command].split(".")[0],
                                          description=DESCRIPTIONS[command], epilog=EPILOG), command)
    _add_settings(commands.add_parser(
        DRAIN, help="Drain the node on this host and wait until it is done (a preStop hook)",
        description="Ask the node listening on this host's port to drain, then wait until its sessions have "
                    "ended or its drain_timeout has passed. Reads the node's own settings (config file, "
                    "TETHER_* variables), so in its container it needs no arguments.", epilog=EPILOG), NODE)
    health = commands.add_parser(
        HEALTH, help="Check the Tether process on this host (a container health check)",
        description="GET /healthz (or --path) on this host's port; exit 0 on 200.", epilog=EPILOG)
    health.add_argument("--path", default="/healthz", help="probe path: /healthz or /readyz")
    commands.add_parser(LOADTEST, help="Load-test an MCP endpoint, checking every answer (tether loadtest --help)",
                        add_help=False)
    _add_settings(health, GW)
    return parser


def _add_settings(sub: argparse.ArgumentParser, command: str) -> None:
    sub.add_argument("--config", metavar="FILE", help="TOML config file (also TETHER_CONFIG)")
    for setting in SETTINGS:
        if command in setting.commands:
            default = getattr(Config(), setting.name)
            shown = ",".join(default) if isinstance(default, tuple) else default
            sub.add_argument(setting.flag, dest=setting.name, metavar=setting.name.upper(),
                             help=f"{setting.help} [{setting.env}; default: {shown!r}]")


def resolve(command: str, args: argparse.Namespace, env: dict[str, str]) -> Config:
    """Merge the config file, the environment and the flags for `command`."""
    path = args.config or env.get("TETHER_CONFIG")
    toml = read_toml(Path(path)) if path else None
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "path")}
    return load(command, toml=toml, env=env, flags=flags, toml_source=str(path))


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [LOADTEST]:
        from loadtest.cli import main as loadtest

        return loadtest(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == TOKEN:
        return _token(args.principal)
    try:
        config = resolve(NODE if args.command == DRAIN else args.command, args, dict(os.environ))
    except ConfigError as exc:
        print(f"tether {args.command}: {exc.message}", file=sys.stderr)
        return 2
    if args.command in (DRAIN, HEALTH):
        from tether.probes import check_health, drain_node

        return _run(drain_node(config) if args.command == DRAIN else check_health(config, args.path))
    from tether.logs import configure

    configure(args.command, config.log_level)
    runners: dict[str, Callable[[Config], Awaitable[int]]] = {UP: _up, GW: _gateway, NODE: _node}
    try:
        return _run(runners[args.command](config))
    except ConfigError as exc:
        print(f"tether {args.command}: {exc.message}", file=sys.stderr)
        return 2


def _token(principal: str) -> int:
    import secrets

    from gateway.auth import token_hash

    if not principal or principal != principal.strip() or "\n" in principal:
        print("tether token: the principal must be a non-empty name without leading or trailing spaces",
              file=sys.stderr)
        return 2
    token = "tt_" + secrets.token_urlsafe(32)
    print(token)
    print(f"{principal} {token_hash(token)}")
    return 0


def _run(main: Awaitable[int]) -> int:
    # Everything imported so far lives as long as the process: out of the collector's sight, so
    # that no full collection walks it. And a collection every 700 new containers (the default) is
    # one every few requests; nearly everything a request makes is freed by its reference count.
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)
    try:
        import uvloop  # libuv's loop: faster sockets and subprocess pipes than the default loop
    except ImportError:
        return asyncio.run(main)  # type: ignore[arg-type]
    return uvloop.run(main)  # type: ignore[arg-type]


def install_task_dump() -> None:
    """On SIGUSR1, log every asyncio task and where it waits: for a process that will not stop."""
    import io
    import logging

    loop = asyncio.get_running_loop()

    def dump() -> None:
        out = io.StringIO()
        for task in asyncio.all_tasks(loop):
            task.print_stack(limit=12, file=out)
        logging.getLogger("tether.debug").warning("tasks.dump", extra={"detail": out.getvalue()})

    loop.add_signal_handler(signal.SIGUSR1, dump)


async def wait_for_signal() -> int:
    """Block until SIGINT or SIGTERM; return the signal number."""
    loop = asyncio.get_running_loop()
    install_task_dump()
    got: asyncio.Future[int] = loop.create_future()

    def caught(sig: signal.Signals) -> None:
        if not got.done():
            got.set_result(int(sig))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, caught, sig)
    return await got


def upstream_argv(config: Config) -> list[str]:
    """The stdio server each session runs: the configured command, or the bundled demo; none when
    sessions connect to `upstream_url` instead."""
    if config.upstream_url:
        return []
    argv = config.upstream_command_argv()
    if argv:
        if shutil.which(argv[0]) is None:
            raise ConfigError(f"Cannot use upstream_command: got {config.upstream_command!r}, expected a "
                              f"command whose program {argv[0]!r} is an executable file or on PATH")
        return argv
    import importlib.util

    if importlib.util.find_spec("mcp") is None or importlib.util.find_spec("tether_demo") is None:
        raise ConfigError("Cannot start the bundled demo server: it needs the MCP SDK "
                          "(pip install 'tether[demo]'), or name a server with --upstream-command")
    return [sys.executable, "-m", "tether_demo"]


async def _up(config: Config) -> int:
    from tether.up import run_up

    return await run_up(config, upstream_argv(config))


def open_store(config: Config, *, for_node: bool) -> Store:
    """The store `config` names: Redis, the gateway's store over the link (nodes), or memory (gateways)."""
    from actors.store.link import StoreLink
    from actors.store.memory import MemoryStore
    from actors.store.redis import RedisStore

    if config.redis:
        if not config.redis.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"Cannot use redis: got {config.redis!r}, expected a URL like redis://HOST:PORT/0")
        return RedisStore(config.redis)
    if not for_node:
        return MemoryStore()
    if not config.store.startswith(("http://", "https://")):
        raise ConfigError(f"Cannot join store {config.store!r}: a node needs --redis URL, or the gateway's "
                          "store URL, e.g. --store http://127.0.0.1:8080/_tether/store")
    return StoreLink(config.store, config.internal_secret)


def _need_secret(config: Config, what: str) -> None:
    if not config.internal_secret:
        raise ConfigError(f"Cannot start a {what} without internal_secret: gateways and nodes must prove who "
                          "they are to each other (set TETHER_INTERNAL_SECRET)")


async def _gateway(config: Config) -> int:
    from gateway.app import MCP_PATH
    from gateway.server import serve_gateway

    _need_secret(config, "gateway")
    store = open_store(config, for_node=False)
    try:
        async with serve_gateway(config, store, host_store=not config.redis) as gateway:
            print(f"tether gateway: {gateway.url}{MCP_PATH}", flush=True)
            await wait_for_signal()
    finally:
        await store.close()
    return 0


async def _node(config: Config) -> int:
    """Run a node. SIGTERM drains it (up to drain_timeout), as does POST /admin/drain; SIGINT stops it now."""
    from actors.server import serve_node
    from tether.tasks import TaskSet

    _need_secret(config, "node")
    store = open_store(config, for_node=True)
    waits = TaskSet("node-main")
    try:
        async with serve_node(config, store, upstream_argv(config)) as node:
            print(f"tether node: {node.node_id} at {node.url}", flush=True)
            signalled = waits.spawn(wait_for_signal(), "signals")
            ends = [signalled]
            if config.exit_when_drained:
                ends.append(waits.spawn(node.drained.wait(), "drained"))
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            if signalled.done() and signalled.result() == signal.SIGTERM:
                await node.drain(config.drain_timeout)
    finally:
        await waits.close()
        await store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
