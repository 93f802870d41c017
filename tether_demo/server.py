"""A stateful demo MCP server (stdio). Run: python -m tether_demo"""

from __future__ import annotations

import logging
import os
import socket

from mcp.server.mcpserver import Context, MCPServer

server = MCPServer("tether-demo", instructions="A stateful demo server: counter, notes, whoami.")
_state: dict[str, object] = {"counter": 0, "notes": []}


@server.tool()
def increment(by: int = 1) -> int:
    """Add `by` to this session's counter and return the new value."""
    _state["counter"] = int(_state["counter"]) + by  # type: ignore[call-overload]
    return int(_state["counter"])  # type: ignore[call-overload]


@server.tool()
def add_note(text: str) -> list[str]:
    """Append a note to this session's notes; returns them all."""
    notes: list[str] = _state["notes"]  # type: ignore[assignment]
    notes.append(text)
    return list(notes)


@server.tool()
def list_notes() -> list[str]:
    """This session's notes, oldest first."""
    return list(_state["notes"])  # type: ignore[call-overload]


@server.tool()
def whoami() -> dict[str, object]:
    """Which node and process serve this session."""
    return {"node": os.environ.get("TETHER_NODE_ID", "direct"), "pid": os.getpid(),
            "host": socket.gethostname(), "session_tag": os.environ.get("TETHER_SESSION_TAG", "")}


@server.tool()
async def count_slowly(steps: int, ctx: Context) -> int:
    """Report progress `steps` times, then return `steps`: shows progress streaming through Tether."""
    for step in range(1, steps + 1):
        await ctx.report_progress(step, steps, f"step {step}")
    return steps


@server.tool()
async def announce_change(ctx: Context) -> str:
    """Send notifications/tools/list_changed: a server message tied to no request (GET stream)."""
    await ctx.session.send_tool_list_changed()
    return "announced"


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("mcp").setLevel(logging.WARNING)
    server.run("stdio")
