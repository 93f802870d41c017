"""Tether's exception tree.

Every error a client can see is a `TetherError` that knows its HTTP status and,
where the protocol wants one, its JSON-RPC error code. Foreign errors are mapped
at the boundary (`raise SessionNotFound(...) from exc`), never leaked.
"""

from __future__ import annotations

# JSON-RPC 2.0 and MCP error codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INTERNAL_ERROR = -32603
CONNECTION_CLOSED = -32000
REQUEST_TIMEOUT = -32001
UNSUPPORTED_PROTOCOL_VERSION = -32022
HEADER_MISMATCH = -32020  # 2026-07-28: Mcp-Method / Mcp-Name / MCP-Protocol-Version disagree with the body


class TetherError(Exception):
    """Base of every error Tether raises on purpose."""

    status: int = 500
    rpc_code: int | None = INTERNAL_ERROR
    retry_after: float | None = None
    headers: dict[str, str] = {}  # noqa: RUF012 - replaced per instance, never mutated

    def __init__(self, message: str, *, data: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


# -- the request was wrong ---------------------------------------------------


class BadRequest(TetherError):
    status = 400
    rpc_code = INVALID_REQUEST


class ParseError(BadRequest):
    rpc_code = PARSE_ERROR


class UnsupportedProtocolVersion(BadRequest):
    rpc_code = UNSUPPORTED_PROTOCOL_VERSION


class HeaderMismatch(BadRequest):
    """2026-07-28: a header that mirrors the body is missing, malformed, or says something else."""

    rpc_code = HEADER_MISMATCH


class Unauthorized(TetherError):
    """No credentials, or credentials that do not hold; `challenge` is the WWW-Authenticate value."""

    status = 401
    rpc_code = None

    def __init__(self, message: str, *, challenge: str) -> None:
        super().__init__(message)
        self.headers = {"WWW-Authenticate": challenge}


class RequestTimeout(TetherError):
    """The client took longer than allowed to send its request."""

    status = 408
    rpc_code = None


class Forbidden(TetherError):
    status = 403
    rpc_code = None


class NotAcceptable(TetherError):
    status = 406
    rpc_code = None


class UnsupportedMediaType(TetherError):
    status = 415
    rpc_code = None


class PayloadTooLarge(TetherError):
    status = 413
    rpc_code = INVALID_REQUEST


class MethodNotAllowed(TetherError):
    status = 405
    rpc_code = None


class Conflict(TetherError):
    status = 409
    rpc_code = None


# -- the session is not there --------------------------------------------------


class SessionNotFound(TetherError):
    status = 404
    rpc_code = None


class CursorExpired(TetherError):
    """A `Last-Event-ID` older than the event log's bound: resuming would leave a gap."""

    status = 410
    rpc_code = INVALID_REQUEST


# -- capacity and availability -------------------------------------------------


class Overloaded(TetherError):
    """A limit was reached; the client may retry after `retry_after` seconds."""

    status = 503
    rpc_code = None

    def __init__(self, message: str, *, retry_after: float = 1.0, status: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        if status is not None:
            self.status = status


class QuotaExceeded(Overloaded):
    """A principal is over one of its quotas (sessions, request rate)."""

    status = 429


class UpstreamError(TetherError):
    """The upstream MCP server failed to start, answer, or stay alive."""

    status = 502
    rpc_code = INTERNAL_ERROR


class UpstreamTimeout(UpstreamError):
    status = 504
    rpc_code = REQUEST_TIMEOUT


# -- configuration and the store ------------------------------------------------


class ConfigError(TetherError):
    """A configuration value is missing or malformed; names key, value and expectation."""


class StoreError(TetherError):
    """The store could not be reached or refused an operation."""

    status = 503
    rpc_code = None
    retry_after = 1.0


class OwnershipConflict(StoreError):
    """Another node already owns the key."""

    status = 409


class LeaseLost(StoreError):
    """This node's lease lapsed (or its id is held by another live process): it must fence itself."""
