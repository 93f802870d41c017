"""The MCP edge rules of the gateway. Sans-IO: headers and bytes in, decisions or errors out.

Everything the gateway checks before a request may reach a node lives here:
Origin, Accept, Content-Type, MCP-Protocol-Version, the session id header and
the shape of the body. Each check raises the `TetherError` whose status the
Streamable HTTP transport prescribes.
"""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urlsplit

import orjson

from actors.ids import is_visible_ascii
from actors.mcp import (
    DEFAULT_HTTP_VERSION,
    HANDSHAKE_VERSIONS,
    MODERN_VERSIONS,
    STREAMABLE_VERSIONS,
    Kind,
    Message,
    allows_batch,
    check_depth,
    check_message,
    kind_of,
)
from tether.errors import (
    BadRequest,
    Forbidden,
    HeaderMismatch,
    NotAcceptable,
    ParseError,
    UnsupportedMediaType,
    UnsupportedProtocolVersion,
)

JSON = "application/json"
SSE = "text/event-stream"
ANSWER_MODES_KEPT = 256  # (Content-Type, Accept, preference) triples whose answer mode is remembered


def check_origin(origin: str | None, allowed: Sequence[str]) -> None:
    """Refuse a browser Origin that is not allowed (DNS-rebinding protection). Raises `Forbidden`."""
    if origin is None or "*" in allowed or origin in allowed:
        return
    try:
        parts = urlsplit(origin)
        host = parts.hostname
    except ValueError:  # e.g. "http://[evil": not a URL at all
        raise Forbidden(f"Forbidden: Origin {origin!r} is not allowed (not a valid origin)") from None
    bare = origin
    if host:
        bare = f"{parts.scheme}://[{host}]" if ":" in host else f"{parts.scheme}://{host}"
    if bare not in allowed:
        raise Forbidden(f"Forbidden: Origin {origin!r} is not allowed")


def accepted(accept: str | None) -> tuple[bool, bool]:
    """Whether an Accept header admits (JSON, SSE). A missing one admits neither: the transport
    says a client MUST list what it accepts."""
    if not accept:
        return False, False
    types = {part.split(";", 1)[0].strip().lower() for part in accept.split(",")}
    wild = "*/*" in types
    return (wild or JSON in types or "application/*" in types,
            wild or SSE in types or "text/*" in types)


def check_json_body(content_type: str | None) -> None:
    """A POST body must be JSON. Raises `UnsupportedMediaType` (415)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != JSON:
        raise UnsupportedMediaType(f"Unsupported Media Type: Content-Type must be {JSON}, got {media or 'none'!r}")


@functools.lru_cache(maxsize=ANSWER_MODES_KEPT)  # a client sends the same two headers every time
def post_answer_mode(content_type: str | None, accept: str | None, preferred: str) -> str:
    """'sse', 'json' or 'auto' (the node picks, answer by answer) for a POST. Raises
    `UnsupportedMediaType` (415) or `NotAcceptable` (406), which are never kept."""
    check_json_body(content_type)
    json_ok, sse_ok = accepted(accept)
    if not (json_ok or sse_ok):
        raise NotAcceptable(f"Not Acceptable: Accept must include {JSON} and {SSE}")
    if json_ok and sse_ok and preferred == "auto":
        return "auto"
    if sse_ok and (preferred != "json" or not json_ok):
        return "sse"
    return "json"


def check_stream_accept(accept: str | None) -> None:
    """A GET stream needs `text/event-stream` in Accept. Raises `NotAcceptable`."""
    if not accepted(accept)[1]:
        raise NotAcceptable(f"Not Acceptable: Accept must include {SSE} to open a stream")


@functools.lru_cache(maxsize=16)  # a handful of revisions exist; a refusal raises and is never kept
def protocol_version(header: str | None) -> str:
    """The revision a request speaks. Raises `UnsupportedProtocolVersion` (400) for one we do not serve."""
    if header is None:
        return DEFAULT_HTTP_VERSION
    version = header.strip()
    if version in STREAMABLE_VERSIONS or version in MODERN_VERSIONS:
        return version
    supported = [*STREAMABLE_VERSIONS, *MODERN_VERSIONS]
    raise UnsupportedProtocolVersion(
        f"Bad Request: unsupported MCP-Protocol-Version {version!r}; supported: {', '.join(supported)}",
        data={"supported": supported, "requested": version})


def session_id(header: str | None) -> str | None:
    """The Mcp-Session-Id header, if any. Raises `BadRequest` for characters the spec forbids."""
    if header is None:
        return None
    if not is_visible_ascii(header):
        raise BadRequest("Bad Request: Mcp-Session-Id must be 1 to 256 visible ASCII characters")
    return header


class Post(NamedTuple):
    """A parsed, checked POST body. (A tuple: every POST makes one.)"""

    messages: tuple[Message, ...]
    batch: bool
    initialize: bool  # it holds an initialize request

    @property
    def has_requests(self) -> bool:
        return any(kind_of(m) is Kind.REQUEST for m in self.messages)

    @property
    def first_id(self) -> object:
        return self.messages[0].get("id") if self.messages else None


def parse_post(body: bytes, version: str, *, max_depth: int) -> Post:
    """Parse and check a POST body. Raises `ParseError` for bad JSON, `BadRequest` for bad JSON-RPC or
    nesting deeper than `max_depth`."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ParseError(f"Parse error: the body is not valid JSON ({exc})") from None
    check_depth(body, max_depth)
    if isinstance(data, list):
        if not allows_batch(version):
            raise BadRequest(f"Invalid Request: JSON-RPC batches are not allowed in protocol revision {version}")
        if not data:
            raise BadRequest("Invalid Request: an empty batch")
        messages = tuple(check_message(m) for m in data)
        if any(m.get("method") == "initialize" for m in messages):
            raise BadRequest("Invalid Request: initialize must not be part of a batch")
        return Post(messages, True, False)
    message = check_message(data)
    return Post((message,), False, message.get("method") == "initialize")


# 2026-07-28 (SEP-2243): the body field that `Mcp-Name` mirrors, for the methods that name a target.
NAMED_PARAM = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri",
               "resources/subscribe": "uri", "resources/unsubscribe": "uri"}
PROTOCOL_META = "io.modelcontextprotocol/protocolVersion"


def check_modern_headers(headers: Mapping[str, str], post: Post, version: str) -> None:
    """2026-07-28: `Mcp-Method` (on every request), `Mcp-Name` (on a request that names a target) and
    MCP-Protocol-Version must say what the body says. Raises `HeaderMismatch` (400, -32020)."""
    message = post.messages[0]
    method = message.get("method")
    if method is None:
        return  # a response: nothing to mirror
    given = _header_value(headers, "Mcp-Method")
    if given is None:
        raise HeaderMismatch("Header mismatch: the Mcp-Method header is required in protocol revision "
                             f"{version}")
    if given != method:
        raise HeaderMismatch(f"Header mismatch: Mcp-Method is {given!r} but the body's method is {method!r}")
    params = message.get("params")
    params = params if isinstance(params, dict) else {}
    key = NAMED_PARAM.get(method)
    target = params.get(key) if key else None
    name = _header_value(headers, "Mcp-Name")
    if isinstance(target, str) and name is None:
        raise HeaderMismatch(f"Header mismatch: the Mcp-Name header is required for {method} (it mirrors "
                             f"params.{key})")
    if name is not None and name != target:
        raise HeaderMismatch(f"Header mismatch: Mcp-Name is {name!r} but the body's params.{key or 'name'} "
                             f"is {target!r}")
    meta = params.get("_meta")
    stated = meta.get(PROTOCOL_META) if isinstance(meta, dict) else None
    if stated is not None and stated != version:
        raise HeaderMismatch(f"Header mismatch: MCP-Protocol-Version is {version!r} but the body's "
                             f"_meta says {stated!r}")


def _header_value(headers: Mapping[str, str], name: str) -> str | None:
    """A mirrored header's value; non-ASCII values travel as =?base64?...?=. Raises `HeaderMismatch`."""
    raw = headers.get(name)
    if raw is None or not (raw.startswith("=?base64?") and raw.endswith("?=")):
        return raw
    try:
        return base64.b64decode(raw[9:-2], validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise HeaderMismatch(f"Header mismatch: {name} is not valid base64-encoded UTF-8") from None


def stateless_fallback(version: str) -> UnsupportedProtocolVersion:
    """What a stateless (2026-07-28) request gets when only session-era upstreams sit behind us.

    The -32022 error names the handshake revisions, which tells a client in
    `auto` mode to fall back to `initialize`.
    """
    return UnsupportedProtocolVersion(
        f"Unsupported protocol version {version}: this server speaks the session-era revisions; "
        "open a session with initialize",
        data={"supported": list(HANDSHAKE_VERSIONS), "requested": version})


@dataclass(frozen=True)
class AffinitySource:
    """Where key-affinity mode reads a session's name: a header, cookie, query parameter or JSON pointer."""

    kind: str  # header | cookie | query | json
    name: str

    @classmethod
    def parse(cls, spec: str) -> AffinitySource:
        """'header:X-Workspace', 'cookie:ws', 'query:ws' or 'json:/params/arguments/ws'. Raises ValueError."""
        kind, _, name = spec.partition(":")
        if kind not in ("header", "cookie", "query", "json") or not name:
            raise ValueError(f"expected header:NAME, cookie:NAME, query:NAME or json:/POINTER, got {spec!r}")
        if kind == "json" and not name.startswith("/"):
            raise ValueError(f"a JSON pointer starts with '/', got {name!r}")
        return cls(kind, name)

    def value(self, headers: Mapping[str, str], cookies: Mapping[str, str], query: Mapping[str, str],
              post: Post | None) -> str | None:
        """The session name this request carries, if any (non-empty, visible ASCII, at most 256)."""
        raw: object
        if self.kind == "header":
            raw = headers.get(self.name)
        elif self.kind == "cookie":
            raw = cookies.get(self.name)
        elif self.kind == "query":
            raw = query.get(self.name)
        else:
            raw = _pointer(post.messages[0], self.name) if post and post.messages else None
        if isinstance(raw, str) and raw and is_visible_ascii(raw):
            return raw
        return None


def _pointer(document: object, pointer: str) -> object:
    for part in pointer.lstrip("/").split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(document, dict):
            document = document.get(part)
        elif isinstance(document, list) and part.isdigit() and int(part) < len(document):
            document = document[int(part)]
        else:
            return None
    return document
