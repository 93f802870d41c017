"""A stateful demo MCP server. Run: python -m tether_demo [--transport stdio|streamable-http|sse]

Over stdio a process serves one session; over HTTP one process serves many,
each with its own counter and notes.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from dataclasses import dataclass, field

import anyio
from mcp.server.mcpserver import Context, MCPServer

server = MCPServer("tether-demo", instructions="A stateful demo server: counter, notes, whoami.")


@dataclass
class SessionState:
    counter: int = 0
    notes: list[str] = field(default_factory=list)


_states: dict[str, SessionState] = {}  # a demo: sessions' state lives as long as the process


def _state(ctx: Context) -> SessionState:
    """This session's state: one per client session, however many a process serves. Over HTTP the
    session is named by the Mcp-Session-Id header (Streamable HTTP) or the session_id query (SSE)."""
    request = ctx.request_context.request
    key = ""
    if request is not None:
        key = request.headers.get("mcp-session-id") or request.query_params.get("session_id") or ""
    return _states.setdefault(key, SessionState())


@server.tool()
def increment(ctx: Context, by: int = 1) -> int:
    """Add `by` to this session's counter and return the new value."""
    state = _state(ctx)
    state.counter += by
    return state.counter


@server.tool()
def add_note(ctx: Context, text: str) -> list[str]:
    """Append a note to this session's notes; returns them all."""
    state = _state(ctx)
    state.notes.append(text)
    return list(state.notes)


@server.tool()
def list_notes(ctx: Context) -> list[str]:
    """This session's notes, oldest first."""
    return list(_state(ctx).notes)


@server.tool()
def whoami() -> dict[str, object]:
    """Which node and process serve this session."""
    return {"node": os.environ.get("TETHER_NODE_ID", "direct"), "pid": os.getpid(),
            "host": socket.gethostname(), "session_tag": os.environ.get("TETHER_SESSION_TAG", "")}


@server.tool()
async def count_slowly(steps: int, ctx: Context, interval: float = 0.0) -> int:
    """Report progress `steps` times, `interval` seconds apart, then return `steps`: shows progress
    streaming through Tether (and, with an interval, a stream that can be cut and resumed)."""
    for step in range(1, steps + 1):
        if interval:
            await anyio.sleep(interval)
        await ctx.report_progress(step, steps, f"step {step}")
    return steps


@server.tool()
async def announce_change(ctx: Context) -> str:
    """Send notifications/tools/list_changed: a server message tied to no request (GET stream)."""
    await ctx.session.send_tool_list_changed()
    return "announced"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tether_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=("stdio", "streamable-http", "sse"), default="stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("mcp").setLevel(logging.WARNING)
    if args.transport == "stdio":
        server.run("stdio")
    elif args.transport == "sse":
        server.run("sse", host=args.host, port=args.port)
    else:
        server.run("streamable-http", host=args.host, port=args.port)
