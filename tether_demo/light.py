"""A light stateful MCP server, standard library only over stdio: starts in milliseconds.

The same per-session state as the demo (a counter, notes, whoami), for load
tests and tests that start hundreds of sessions, where importing the SDK
would cost each one about a second of CPU; and `tick`, a numbered stream of
server notifications, for the stream scenarios. Over stdio one process is one
session: python -m tether_demo.light. Over Streamable HTTP one process serves
many (tether_demo.light_http).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

PROTOCOL_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
TOOLS = [
    {"name": "increment", "description": "Add `by` to this session's counter; returns the new value.",
     "inputSchema": {"type": "object", "properties": {"by": {"type": "integer", "default": 1}}}},
    {"name": "add_note", "description": "Append a note; returns all notes.",
     "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}},
    {"name": "whoami", "description": "Which node and process serve this session.",
     "inputSchema": {"type": "object", "properties": {}}},
    {"name": "environment", "description": "This process's environment variables, working directory and "
     "resource limits.", "inputSchema": {"type": "object", "properties": {}}},
    {"name": "burn_cpu", "description": "Spin until this process has used `seconds` of CPU (at most 60).",
     "inputSchema": {"type": "object", "properties": {"seconds": {"type": "number"}}, "required": ["seconds"]}},
    {"name": "allocate", "description": "Allocate and touch `megabytes` of memory; says whether it could.",
     "inputSchema": {"type": "object", "properties": {"megabytes": {"type": "integer"}},
                     "required": ["megabytes"]}},
    {"name": "tick", "description": "Send `count` notifications/message, numbered from 1, one every `interval` "
     "seconds, to this session's stream; returns at once.",
     "inputSchema": {"type": "object", "properties": {"interval": {"type": "number"}, "count": {"type": "integer"}},
                     "required": ["interval", "count"]}},
    {"name": "ticks_sent", "description": "How many tick notifications this session has sent so far.",
     "inputSchema": {"type": "object", "properties": {}}},
]
MAX_TICKS = 1_000_000
MIN_TICK_INTERVAL = 0.001

# Starts `count` ticks, one every `interval` seconds, each by calling `send` (transport-specific).
TickStarter = Callable[[float, int, Callable[[], None]], None]


class Session:
    def __init__(self, start_ticks: TickStarter | None = None, notify: Callable[[dict[str, Any]], None] | None = None,
                 ) -> None:
        self.counter = 0
        self.notes: list[str] = []
        self.ticks_sent = 0
        self._start_ticks = start_ticks
        self._notify = notify

    def tick(self) -> None:
        """Send the next numbered notification."""
        self.ticks_sent += 1
        if self._notify is not None:
            self._notify({"jsonrpc": "2.0", "method": "notifications/message",
                          "params": {"level": "info", "logger": "tick", "data": {"seq": self.ticks_sent}}})

    def handle(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        if method == "initialize":
            asked = params.get("protocolVersion")
            return {"protocolVersion": asked if asked in PROTOCOL_VERSIONS else PROTOCOL_VERSIONS[-1],
                    "capabilities": {"tools": {"listChanged": False}},
                    "serverInfo": {"name": "tether-light", "version": "1"}}
        if method == "ping":
            return {}
        if method == "tools/list":
            return {"tools": TOOLS}
        if method == "tools/call":
            return self.call(params.get("name"), params.get("arguments") or {})
        raise LookupError(method)

    def call(self, name: object, args: dict[str, Any]) -> dict[str, Any]:
        if name == "increment":
            self.counter += int(args.get("by", 1))
            return _text(str(self.counter))
        if name == "add_note":
            self.notes.append(str(args["text"]))
            return _text(json.dumps(self.notes))
        if name == "whoami":
            return _text(json.dumps({"node": os.environ.get("TETHER_NODE_ID", "direct"), "pid": os.getpid()}))
        if name == "environment":
            limits = {name: resource.getrlimit(getattr(resource, f"RLIMIT_{name.upper()}"))
                      for name in ("as", "cpu", "nofile", "core")}
            return _text(json.dumps({"env": dict(os.environ), "cwd": os.getcwd(), "limits": limits}))
        if name == "burn_cpu":
            target = time.process_time() + min(float(args["seconds"]), 60.0)
            deadline = time.monotonic() + 120.0  # bounded in wall time too, on a busy machine
            while time.process_time() < target and time.monotonic() < deadline:
                pass
            return _text(f"burned {time.process_time():.2f}s of CPU")
        if name == "allocate":
            try:
                block = bytearray(int(args["megabytes"]) * 1024 * 1024)
            except MemoryError:
                return {"content": [{"type": "text", "text": "MemoryError: the allocation was refused"}],
                        "isError": True}
            return _text(f"allocated {len(block) // (1024 * 1024)} MB")
        if name == "tick" and self._start_ticks is not None:
            interval, count = max(float(args["interval"]), MIN_TICK_INTERVAL), min(int(args["count"]), MAX_TICKS)
            self._start_ticks(interval, count, self.tick)
            return _text(f"ticking {count} times every {interval:g} s")
        if name == "ticks_sent":
            return _text(str(self.ticks_sent))
        return {"content": [{"type": "text", "text": f"unknown tool {name!r}"}], "isError": True}


def _text(text: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "isError": False}


def answer(session: Session, message: object) -> dict[str, Any] | None:
    """The JSON-RPC answer to one client message; None for notifications and responses."""
    if not isinstance(message, dict) or "id" not in message or "method" not in message:
        return None
    params = message.get("params")
    try:
        return {"jsonrpc": "2.0", "id": message["id"],
                "result": session.handle(message["method"], params if isinstance(params, dict) else {})}
    except (AttributeError, TypeError, ValueError, KeyError) as exc:  # arguments of the wrong shape
        return {"jsonrpc": "2.0", "id": message["id"], "error": {"code": -32602, "message": f"Invalid params: {exc!r}"}}
    except LookupError:
        return {"jsonrpc": "2.0", "id": message["id"],
                "error": {"code": -32601, "message": f"Method not found: {message['method']}"}}


def main() -> None:
    out = sys.stdout
    lock = threading.Lock()  # ticks write from their own thread

    def write(message: dict[str, Any]) -> None:
        with lock:
            out.write(json.dumps(message) + "\n")
            out.flush()

    def start_ticks(interval: float, count: int, tick: Callable[[], None]) -> None:
        def run() -> None:
            next_at = time.monotonic()
            for _ in range(count):
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))
                tick()

        threading.Thread(target=run, daemon=True, name="ticks").start()

    session = Session(start_ticks, write)
    for line in sys.stdin:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if (reply := answer(session, message)) is not None:
            write(reply)


if __name__ == "__main__":
    main()
