"""A light stateful MCP server over stdio, standard library only: starts in milliseconds.

The same per-session state as the demo (a counter, notes, whoami), for load
tests and tests that start hundreds of sessions, where importing the SDK
would cost each one about a second of CPU. Run: python -m tether_demo.light
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
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
]


class Session:
    def __init__(self) -> None:
        self.counter = 0
        self.notes: list[str] = []

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
        return {"content": [{"type": "text", "text": f"unknown tool {name!r}"}], "isError": True}


def _text(text: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "isError": False}


def main() -> None:
    session = Session()
    out = sys.stdout
    for line in sys.stdin:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if not isinstance(message, dict) or "id" not in message or "method" not in message:
            continue  # notifications and responses need no answer
        params = message.get("params")
        try:
            answer = {"jsonrpc": "2.0", "id": message["id"],
                      "result": session.handle(message["method"], params if isinstance(params, dict) else {})}
        except (AttributeError, TypeError, ValueError, KeyError) as exc:  # arguments of the wrong shape
            answer = {"jsonrpc": "2.0", "id": message["id"],
                      "error": {"code": -32602, "message": f"Invalid params: {exc!r}"}}
        except LookupError:
            answer = {"jsonrpc": "2.0", "id": message["id"],
                      "error": {"code": -32601, "message": f"Method not found: {message['method']}"}}
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
