"""MCP and JSON-RPC rules both the gateway and the actors apply. Sans-IO.

Everything that decides what a message is, which protocol revision a request
speaks, and where an upstream message must be delivered lives here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, NamedTuple

from tether.errors import BadRequest

# The protocol's HTTP headers, as the transports name them.
SESSION_HEADER = "Mcp-Session-Id"
VERSION_HEADER = "MCP-Protocol-Version"

# Revisions that open a session with `initialize` (the session era).
HANDSHAKE_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
# Revisions served over Streamable HTTP with a session id.
STREAMABLE_VERSIONS = ("2025-03-26", "2025-06-18", "2025-11-25")
# Stateless revisions: no initialize, no session id, `Mcp-Method` on every request.
MODERN_VERSIONS = ("2026-07-28",)
# What a Streamable HTTP server assumes when a request carries no MCP-Protocol-Version.
DEFAULT_HTTP_VERSION = "2025-03-26"
# The first revision whose SSE streams start with a priming event (an id, no data) and a retry hint.
PRIMING_SINCE = "2025-11-25"
# The first revision that forbids JSON-RPC batches.
NO_BATCH_SINCE = "2025-06-18"

Message = dict[str, Any]
RequestId = str | int


class Kind(StrEnum):
    """What a JSON-RPC message is. (A str: its hash is the string's, not a Python call.)"""

    REQUEST = "request"
    NOTIFICATION = "notification"
    RESPONSE = "response"


def kind_of(message: Mapping[str, Any]) -> Kind:
    """Classify a message that `check_message` accepted."""
    if "method" in message:
        return Kind.REQUEST if "id" in message else Kind.NOTIFICATION
    return Kind.RESPONSE


def _valid_id(value: object) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def check_message(message: object) -> Message:
    """Return `message` if it is a JSON-RPC 2.0 request, notification or response, else raise BadRequest."""
    if not isinstance(message, dict):
        raise BadRequest("Invalid Request: a JSON-RPC message must be an object")
    if message.get("jsonrpc") != "2.0":
        raise BadRequest('Invalid Request: "jsonrpc" must be "2.0"')
    if "method" in message:
        if not isinstance(message["method"], str) or not message["method"]:
            raise BadRequest('Invalid Request: "method" must be a non-empty string')
        if "id" in message and not _valid_id(message["id"]):
            raise BadRequest('Invalid Request: "id" must be a string or an integer')
        if "params" in message and not isinstance(message["params"], dict):  # MCP never uses by-position
            raise BadRequest('Invalid Request: "params" must be an object')
        return message
    if "id" not in message or not (_valid_id(message["id"]) or message["id"] is None):
        raise BadRequest('Invalid Request: a message needs "method", or "id" with "result" or "error"')
    if ("result" in message) == ("error" in message):
        raise BadRequest('Invalid Request: a response carries exactly one of "result" and "error"')
    return message


def error_response(request_id: RequestId | None, code: int, message: str, data: object = None) -> Message:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def progress_token(message: Mapping[str, Any]) -> object:
    """The progress token a request asked for (params._meta.progressToken), or None."""
    params = message.get("params")
    if isinstance(params, dict):
        meta = params.get("_meta")
        if isinstance(meta, dict):
            return meta.get("progressToken")
    return None


def allows_batch(version: str) -> bool:
    return version < NO_BATCH_SINCE


class Destination(NamedTuple):
    """Where an upstream message goes: the stream of a pending request, or the session's GET stream.
    (A tuple: one is made for every upstream message.)"""

    request_id: RequestId | None  # None: the GET stream (or the event log while none is open)
    final: bool = False  # a response: the request's stream may close after it


GET_STREAM = Destination(None)


def route_upstream(message: Mapping[str, Any], pending: Mapping[RequestId, object],
                   tokens: Mapping[object, RequestId], *, related: RequestId | None = None,
                   sole: RequestId | None = None) -> Destination:
    """Decide which client stream carries `message` from the upstream.

    A response goes to its request's stream. A message the upstream sent on a
    request's own stream (`related`, known for HTTP upstreams) stays with that
    request. A progress notification goes to the request that asked for its
    token, a cancellation to the request it cancels. A log message or a
    server-to-client request (sampling, elicitation, roots) goes to the request
    that is running, when exactly one is (`sole`): a stdio server cannot say
    which request it belongs to, and that is the one it must be. Everything
    else goes to the GET stream.
    """
    if "method" not in message:
        request_id = _hashable(message.get("id"))
        if request_id in pending:
            return Destination(request_id, final=True)
        return GET_STREAM
    if related is not None and related in pending:
        return Destination(related)
    params = message.get("params")
    method = message["method"]
    if "id" not in message and isinstance(params, dict):
        if method == "notifications/progress":
            owner = tokens.get(_hashable(params.get("progressToken")))
            return Destination(owner) if owner is not None else GET_STREAM
        if method == "notifications/cancelled":
            request_id = _hashable(params.get("requestId"))
            return Destination(request_id) if request_id in pending else GET_STREAM
    if sole is not None and sole in pending and ("id" in message or method == "notifications/message"):
        return Destination(sole)
    return GET_STREAM


def _hashable(value: object) -> RequestId | None:
    return value if isinstance(value, str | int) else None


_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_INNERMOST = re.compile(rb"\[\]|\{\}")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def check_depth(body: bytes, limit: int) -> None:
    """Refuse a JSON text nested deeper than `limit`. Raises `BadRequest` (400).

    For a text orjson has already accepted. Every step runs at C speed: a body
    with no more opening brackets than the limit cannot be too deep (nearly
    every message stops there); otherwise strings are cut out, everything but
    brackets dropped, and innermost pairs removed one level per pass.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return
    brackets = _STRINGS.sub(b"", body).translate(None, _NOT_BRACKETS)
    for _ in range(limit):
        if not brackets:
            return
        brackets = _INNERMOST.sub(b"", brackets)  # one pass, one level: a removal never joins a new pair
    if brackets:
        raise BadRequest(f"Invalid Request: the message is nested more than {limit} levels deep")
