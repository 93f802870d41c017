"""A stateful demo MCP server. Run: python -m tether_demo [--transport stdio|streamable-http|sse]

Over stdio a process serves one session; over HTTP one process serves many,
each with its own counter and notes.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from collections import deque
from dataclasses import dataclass, field

import anyio
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.streamable_http import EventCallback, EventMessage, EventStore
from mcp_types import JSONRPCMessage
from starlette.applications import Starlette

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
async def drop_stream_between(ctx: Context) -> str:
    """Over HTTP: announce a tool-list change on the GET stream, drop that stream, then announce a
    resource-list change while it is down. A client resuming with Last-Event-ID gets both."""
    await ctx.session.send_tool_list_changed()
    await anyio.sleep(0.2)  # let the first reach the wire, so the client has an id to resume from
    await ctx.close_standalone_sse_stream()
    await ctx.session.send_resource_list_changed()
    return "dropped"


@server.tool()
async def announce_change(ctx: Context) -> str:
    """Send notifications/tools/list_changed: a server message tied to no request (GET stream)."""
    await ctx.session.send_tool_list_changed()
    return "announced"


class MemoryEventStore(EventStore):
    """The newest events of every stream, for replay with Last-Event-ID. A demo: stream ids are the
    SDK's, which name a session's GET stream the same in every session, so it serves tests that use
    one resumable session at a time."""

    def __init__(self, limit: int = 10_000) -> None:
        self._events: deque[tuple[str, str, JSONRPCMessage | None]] = deque(maxlen=limit)
        self._count = 0

    async def store_event(self, stream_id: str, message: JSONRPCMessage | None) -> str:
        self._count += 1
        self._events.append((str(self._count), stream_id, message))
        return str(self._count)

    async def replay_events_after(self, last_event_id: str, send_callback: EventCallback) -> str | None:
        events = list(self._events)
        at = next((i for i, (event_id, _, _) in enumerate(events) if event_id == last_event_id), None)
        if at is None:
            return None
        stream = events[at][1]
        for event_id, stream_id, message in events[at + 1:]:
            if stream_id == stream and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tether_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=("stdio", "streamable-http", "sse"), default="stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free one (printed at start)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("mcp").setLevel(logging.WARNING)
    if args.transport == "stdio":
        server.run("stdio")
    elif args.transport == "sse":
        _serve_http(server.sse_app(host=args.host), args.host, args.port, "/sse")
    else:
        app = server.streamable_http_app(host=args.host, event_store=MemoryEventStore())
        _serve_http(app, args.host, args.port, "/mcp")


def _serve_http(app: Starlette, host: str, port: int, path: str) -> None:
    """Serve `app` on host:port; once the socket listens, print its URL on stdout (a line to wait for)."""
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    bound = sock.getsockname()[1]
    print(f"tether_demo listening on http://{f'[{host}]' if ':' in host else host}:{bound}{path}", flush=True)
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    anyio.run(uvicorn_server.serve, [sock])
