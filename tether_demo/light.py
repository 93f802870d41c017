"""A light stateful MCP server over stdio, standard library only: starts in milliseconds.

The same per-session state as the demo (a counter, notes, whoami), for load
tests and tests that start hundreds of sessions, where importing the SDK
would cost each one about a second of CPU. Run: python -m tether_demo.light
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

PROTOCOL_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
TOOLS = [
    {"name": "increment", "description": "Add `by` to this session's counter; returns the new value.",
     "inputSchema": {"type": "object", "properties": {"by": {"type": "integer", "default": 1}}}},
    {"name": "add_note", "description": "Append a note; returns all notes.",
     "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}},
    {"name": "whoami", "description": "Which node and process serve this session.",
     "inputSchema": {"type": "object", "properties": {}}},
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
        try:
            answer = {"jsonrpc": "2.0", "id": message["id"],
                      "result": session.handle(message["method"], message.get("params") or {})}
        except LookupError:
            answer = {"jsonrpc": "2.0", "id": message["id"],
                      "error": {"code": -32601, "message": f"Method not found: {message['method']}"}}
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
