"""The gateway: Streamable HTTP on `/mcp`, routed to the owning node.

It applies `gateway.rules`, asks `actors.placement` where a session lives,
and relays the node's answer byte for byte (SSE streamed as it arrives). The
gateway keeps no session state but its route cache. `gateway.edge` serves
`/mcp` with it; `gateway.server` runs it, with the aiohttp app for other paths.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import orjson
from aiohttp import web

from actors.http import error_parts
from actors.ids import SessionIds
from actors.internal import (
    BATCH_HEADER,
    CREATE_HEADER,
    DECLINED_HEADER,
    EPOCH_HEADER,
    INCARNATION_HEADER,
    PRINCIPAL_HEADER,
    QUOTA_HEADER,
    RESPONSE_HEADER,
)
from actors.mcp import MODERN_VERSIONS, SESSION_HEADER, VERSION_HEADER
from actors.placement import Placement
from actors.session import AUTO, CHANNEL, SSE
from actors.sse import HEADERS as SSE_HEADERS
from actors.sse import PING
from actors.store.base import NodeRecord, OwnershipRecord, Store
from gateway import rules
from gateway.auth import Authenticator, Principal, anonymous
from gateway.limits import RateLimiter
from gateway.link import LinkLost, LinkResponse, NodeLink, no_head
from gateway.metrics import GatewayMetrics
from tether.config import Config
from tether.errors import (
    BadRequest,
    MethodNotAllowed,
    Overloaded,
    PayloadTooLarge,
    QuotaExceeded,
    RequestTimeout,
    SessionNotFound,
    TetherError,
    UpstreamError,
    UpstreamTimeout,
)
from tether.logs import sid_tag
from tether.tasks import TaskSet

log = logging.getLogger("tether.gateway")

MCP_PATH = "/mcp"
TRANSPORT = "streamable_http"
# The transport label of each client path (the channel transports' paths are in gateway.channels).
TRANSPORTS = {MCP_PATH: TRANSPORT, "/sse": "sse", "/messages": "sse", "/ws": "websocket"}
SHUTDOWN_GRACE = 1.0  # seconds requests in flight get to finish when the gateway stops
LISTEN_BACKLOG = 1024  # connections the kernel queues before the gateway accepts them
LINK_SLACK = 5.0  # seconds a node may take beyond its own limits before the gateway gives up on it
# Client headers a node needs to see; nothing else crosses the link.
_FORWARDED = (VERSION_HEADER, "Last-Event-ID")
_RELAYED = ("Content-Type", "Retry-After")  # a node's headers a whole answer carries to the client


class ClientRequest(Protocol):
    """What the gateway reads of a client request; aiohttp's `web.Request` and the edge's `EdgeRequest`
    both are one."""

    @property
    def method(self) -> str: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def cookies(self) -> Mapping[str, str]: ...
    @property
    def query(self) -> Mapping[str, str]: ...
    @property
    def remote(self) -> str | None: ...
    @property
    def scheme(self) -> str: ...
    @property
    def host(self) -> str: ...


class StreamSink(Protocol):
    """Where `Gateway.pipe` writes a stream: aiohttp's `web.StreamResponse`, or the edge's."""

    async def write(self, data: bytes) -> None: ...
    async def write_eof(self, data: bytes = b"") -> None: ...


@dataclass(slots=True)
class Answer:
    """What the client gets: a status, headers and a whole body, or a node's live SSE stream to pipe
    (its sender closes it)."""

    status: int
    headers: Mapping[str, str]
    body: bytes = b""
    stream: LinkResponse | None = None

    @classmethod
    def error(cls, exc: TetherError, request_id: object = None) -> Answer:
        return cls(*error_parts(exc, request_id))


class Sent(NamedTuple):
    """A request on its way to the node that owns its session, sent with no wait (`Gateway.send_now`):
    its answer comes to `resp`, whose head is due within `read_timeout`."""

    resp: LinkResponse
    sid: str
    node: NodeRecord
    read_timeout: float | None
    post: rules.Post | None  # what an error answer's JSON-RPC id comes from


class Gateway:
    """Routes client requests to the node that owns their session."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.placement = Placement(store, config.route_cache_size, stale_after=config.heartbeat_ttl)
        self.link = NodeLink(config.internal_secret, connections=config.link_connections,
                             buffer_limit=config.stream_buffer_bytes)
        self.metrics = GatewayMetrics(self.placement)
        self._tasks = TaskSet("gateway")
        self.url = ""
        self.affinity = rules.AffinitySource.parse(config.affinity_key) if config.affinity_key else None
        self.ids = SessionIds(config.session_id_key, config.internal_secret)
        self.auth = Authenticator(config)
        self.rate = RateLimiter(config.rate_limit, config.rate_burst)

    def named_session(self, request: ClientRequest, principal: Principal, post: rules.Post | None) -> str | None:
        """In key-affinity mode, the session id the request names (by header, cookie, query or body)."""
        if self.affinity is None:
            return None
        name = self.affinity.value(request.headers, request.cookies, request.query, post)
        return self.ids.for_name(name, principal.name) if name else None

    def admit_now(self, request: ClientRequest) -> Principal | None:
        """Who the client is, if it may call at all: Origin, credentials, then its request rate. None
        when its JWT must be verified first (`admit` waits for that; nothing has been counted yet).
        Raises `Forbidden` (403), `Unauthorized` (401) or `QuotaExceeded` (429)."""
        if (origin := request.headers.get("Origin")) is not None:  # a browser's: checked (else no call)
            rules.check_origin(origin, self.config.allowed_origins)
        if not self.auth.methods:
            principal: Principal | None = anonymous(request.remote)  # what identify_now says, in one call
        else:
            try:
                principal = self.auth.identify_now(request.headers, request.remote, _base(request))
            except TetherError:
                self._unidentified(request)
                raise
        if principal is not None and self.rate.enabled:
            self._limit(principal.quota_key)
        return principal

    async def admit(self, request: ClientRequest) -> Principal:
        """`admit_now`, waiting for a JWT's verification when it needs one."""
        return self.admit_now(request) or await self.admit_jwt(request)

    async def admit_jwt(self, request: ClientRequest) -> Principal:
        """The rest of `admit` for a request `admit_now` left None: verify its JWT, then count it."""
        try:
            principal = await self.auth.verify(request.headers, _base(request))
        except TetherError:
            self._unidentified(request)
            raise
        self._limit(principal.quota_key)
        return principal

    def _unidentified(self, request: ClientRequest) -> None:
        self.metrics.refused["unauthorized"].inc()
        self._limit(f"addr:{request.remote}")  # guessing tokens is rate-limited too

    def _limit(self, key: str) -> None:
        if (wait := self.rate.take(key)) > 0:
            self.metrics.refused["rate_limited"].inc()
            raise QuotaExceeded(f"Too Many Requests: over {self.config.rate_limit:g} requests a second; "
                                f"retry in {wait:.2f}s", retry_after=wait, status=429)

    def ready(self) -> bool:
        return len(self.placement.ring) > 0 and self.placement.fresh

    async def membership_loop(self) -> None:
        while not self._tasks.closing:
            try:
                if await self.placement.refresh():
                    log.info("ring.changed", extra={"detail": repr(self.placement.ring)})
            except TetherError as exc:
                log.warning("membership.read_failed", extra={"detail": exc.message})
            await self.placement.store.wait_for_change(self.config.membership_refresh)

    async def start(self) -> None:
        await self.auth.start()
        await self.placement.refresh()
        self._tasks.spawn(self.membership_loop(), "membership")

    async def close(self) -> None:
        await self._tasks.close()
        await self.link.close()
        await self.auth.close()

    # -- routing ---------------------------------------------------------------

    async def create_session(self, body: bytes, mode: str, version: str, principal: Principal,
                             sid: str | None = None) -> Answer:
        """Place a new session (a minted id, or a named one) on the first node of its ring order that
        accepts it, and relay the upstream's initialize answer. A named session already live elsewhere
        is joined where it lives."""
        if sid is not None and self.placement.settling:  # its old owner may not have re-asserted yet
            raise Overloaded("Service Unavailable: the store is recovering; try this named session again",
                             retry_after=1.0)
        sid = sid or self.ids.mint()
        resp = await self.place(sid, body, {CREATE_HEADER: "1", RESPONSE_HEADER: mode, VERSION_HEADER: version,
                                            **_principal_headers(principal, create=True)})
        return await self.relay(resp, {SESSION_HEADER: sid} if resp.headers.get(EPOCH_HEADER) else {})

    async def create_channel(self, principal: Principal) -> str:
        """Place a new WebSocket or HTTP+SSE session; its initialize comes later, on the channel.
        Returns the session id. Raises `TetherError` with the node's answer when it cannot start."""
        sid = self.ids.mint()
        resp = await self.place(sid, b"", {CREATE_HEADER: "1", RESPONSE_HEADER: CHANNEL,
                                           **_principal_headers(principal, create=True)})
        async with resp:
            if resp.status != 201:
                raise await as_error(resp)
        return sid

    async def place(self, sid: str, body: bytes, headers: Mapping[str, str]) -> LinkResponse:
        """Ask the nodes of `sid`'s ring order, first to last, to create it; the first that does not
        decline answers. Raises `Overloaded` when none can."""
        self.placement.check_fresh()
        candidates = self.placement.candidates(sid)
        if not candidates:  # a ring that has not seen its first members yet: look once more
            await self.placement.refresh()
            candidates = self.placement.candidates(sid)
        for node in candidates:
            try:
                resp = await self.link.call(node, "POST", sid, body=body, headers=headers,
                                            read_timeout=self.config.upstream_start_timeout + LINK_SLACK)
            except Overloaded as exc:
                log.warning("placement.unreachable", extra={"node": node.node_id, "detail": exc.message})
                continue
            if resp.status == 503 and resp.headers.get(DECLINED_HEADER):
                resp.close()
                self.metrics.declines.inc()
                continue
            if resp.status == 409:  # a named session another node owns: initialize it there
                resp.close()
                resp, node = await self._join_elsewhere(sid, body, headers)
            if epoch := resp.headers.get(EPOCH_HEADER):
                incarnation = resp.headers.get(INCARNATION_HEADER, "")
                self.placement.remember(OwnershipRecord(sid, node.node_id, int(epoch), incarnation))
                self.metrics.sessions_created.inc()
            return resp
        raise Overloaded("Service Unavailable: no actor node can take a new session now", retry_after=5.0)

    async def _join_elsewhere(self, sid: str, body: bytes,
                              headers: Mapping[str, str]) -> tuple[LinkResponse, NodeRecord]:
        """Send a named session's initialize to the node that owns it now. Raises `Overloaded` when
        ownership is in flux (just released, or still ending): the client retries."""
        self.placement.forget(sid)  # whatever we cached led to the wrong node
        try:
            _, owner = await self.placement.locate(sid)
        except SessionNotFound:
            raise Overloaded("Service Unavailable: this named session is changing hands; try again",
                             retry_after=1.0) from None
        resp = await self.link.call(owner, "POST", sid, body=body, headers=headers,
                                    read_timeout=self.config.upstream_start_timeout + LINK_SLACK)
        if resp.status == 409:
            resp.close()
            raise Overloaded("Service Unavailable: this named session is changing hands; try again",
                             retry_after=1.0)
        return resp, owner

    async def forward(self, method: str, sid: str, principal: Principal, *, body: bytes | None = None,
                      headers: Mapping[str, str] | None = None) -> Answer:
        """Send a request to the owner of `sid` and relay its answer. Raises `SessionNotFound`."""
        return await self.relay(await self.call(method, sid, principal, body=body, headers=headers), {})

    async def call(self, method: str, sid: str, principal: Principal, *, body: bytes | None = None,
                   headers: Mapping[str, str] | None = None) -> LinkResponse:
        """Send a request to the owner of `sid` on behalf of `principal`; the caller reads and releases
        the answer. Raises `SessionNotFound` (also for another principal's session: no oracle), or
        `Overloaded` when the owner cannot be reached."""
        self._check_genuine(sid)
        _, node = await self.placement.locate(sid)
        resp = await self.link.call(node, method, sid, body=body, headers=_on_behalf(principal, headers),
                                    read_timeout=self.read_timeout(method, headers))
        self.check_answer(method, sid, resp)
        return resp

    def send_now(self, method: str, sid: str, principal: Principal, *, body: bytes, headers: Mapping[str, str],
                 post: rules.Post | None = None) -> Sent | None:
        """`call`'s sending, when it needs no wait: the owner is in the route cache and its link is open
        and not full. None otherwise (`call` waits). The caller times the head of the answer and hands
        it to `check_answer`. Raises `SessionNotFound` or `Overloaded`."""
        self._check_genuine(sid)
        node = self.placement.known(sid)
        if node is None:
            return None
        read_timeout = self.read_timeout(method, headers)
        resp = self.link.send_now(node, method, sid, body=body, headers=_on_behalf(principal, headers),
                                  read_timeout=read_timeout)
        return None if resp is None else Sent(resp, sid, node, read_timeout, post)

    def _check_genuine(self, sid: str) -> None:
        if not self.ids.genuine(sid):  # forged, altered or malformed: refused without a lookup
            self.metrics.refused["forged_session_id"].inc()
            raise SessionNotFound("Session not found")

    def check_answer(self, method: str, sid: str, resp: LinkResponse) -> None:
        """Forget the owner of a session its node no longer has, or has just ended. Raises
        `SessionNotFound` for the first, answered here so that every unknown id gets the same bytes."""
        if resp.status == 404 or (method == "DELETE" and resp.status == 200):
            self.placement.forget(sid)
        if resp.status == 404:
            resp.close()
            raise SessionNotFound("Session not found")

    def read_timeout(self, method: str, headers: Mapping[str, str] | None) -> float | None:
        """How long the gateway waits for bytes from a node before it gives up on it. A GET stream may
        be silent for ever (the gateway pings its client): only the link's heartbeat watches it."""
        config = self.config
        if method == "GET":
            return None
        if (headers or {}).get(RESPONSE_HEADER) in (SSE, AUTO):  # the node pings a POST's stream while it waits
            return 3 * config.keepalive_interval + LINK_SLACK
        if method == "DELETE":
            return config.kill_grace + LINK_SLACK
        return config.upstream_request_timeout + LINK_SLACK

    async def relay(self, resp: LinkResponse, extra: Mapping[str, str]) -> Answer:
        """A node's answer for the client. A whole answer is read here (a POST's SSE answer usually comes
        whole: one frame) and leaves in one write; a live SSE stream is handed on, to be piped as it
        comes and closed by whoever sends it."""
        answer = self.relay_now(resp, extra)
        if answer is None:  # a whole answer, still arriving
            try:
                body = await resp.read()
            finally:
                resp.close()
            answer = Answer(resp.status, _relayed_headers(resp, False, extra), body)
        return answer

    def relay_now(self, resp: LinkResponse, extra: Mapping[str, str]) -> Answer | None:
        """`relay` when it needs no wait: a live SSE stream, or a whole answer that has all come. None
        while a whole answer is still arriving."""
        sse = resp.content_type == "text/event-stream"
        if sse and not resp.complete:
            return Answer(resp.status, {**SSE_HEADERS, **extra}, stream=resp)
        if not resp.complete:
            return None
        body = resp.take()
        resp.close()
        return Answer(resp.status, _relayed_headers(resp, sse, extra), body)

    def end_later(self, sid: str, principal: Principal) -> None:
        """End a session whose client has left for good, without holding up the handler that saw it."""
        self._tasks.spawn(self._end(sid, principal), f"end-{sid_tag(sid)}")

    async def _end(self, sid: str, principal: Principal) -> None:
        try:
            resp = await self.call("DELETE", sid, principal)
            resp.close()
        except TetherError as exc:
            log.info("session.end_failed", extra={"sid": sid_tag(sid), "detail": exc.message})

    async def pipe(self, resp: LinkResponse, out: StreamSink, transport: str, *, edge: bool = False) -> None:
        """Copy a node's SSE stream to the client as it arrives, until either side goes, with a
        keep-alive comment after each `keepalive_interval` of silence: the gateway pings its own
        clients, so an idle stream wakes no node. A client that stops reading for
        `client_write_timeout` is cut off; what it missed waits in the event log. An `edge` sink
        keeps that bound itself, only while it waits, and the edge's sweep pings it
        (`Edge.keepalive`); any other's writes are each timed, and it is pinged from here."""
        gauge = self.metrics.streams_open.labels(transport)
        gauge.inc()
        write_timeout = self.config.client_write_timeout
        try:
            async for chunk in resp.chunks(idle=None if edge else self.config.keepalive_interval):
                last = resp.at_eof  # the last chunk: sent with the end of the body, in one write
                write = out.write_eof(chunk) if last else out.write(chunk or PING)
                if edge:
                    await write
                else:
                    async with asyncio.timeout(write_timeout):
                        await write
                if last:
                    return
        except (ConnectionError, TimeoutError, LinkLost):
            pass  # one side went away or stalled; closing the link response tells the node
        finally:
            gauge.dec()


GATEWAY_KEY = web.AppKey("gateway", Gateway)
PRINCIPAL_KEY = "tether.principal"  # set on every client request by `admitted`


def _base(request: ClientRequest) -> str:
    """The gateway's own URL, as the client reached it: for a 401's challenge."""
    return f"{request.scheme}://{request.host}"


def _on_behalf(principal: Principal, headers: Mapping[str, str] | None) -> dict[str, str]:
    return {**headers, PRINCIPAL_HEADER: principal.binding} if headers else {PRINCIPAL_HEADER: principal.binding}


def _relayed_headers(resp: LinkResponse, sse: bool, extra: Mapping[str, str]) -> Mapping[str, str]:
    """The headers a whole answer from a node carries to the client."""
    if sse:
        return {**SSE_HEADERS, **extra} if extra else SSE_HEADERS
    headers = {}
    for name in _RELAYED:  # a loop, not a comprehension: one call fewer on every answer
        if (value := resp.headers.get(name)) is not None:
            headers[name] = value
    if extra:
        headers.update(extra)
    return headers


def _principal_headers(principal: Principal, *, create: bool = False) -> dict[str, str]:
    headers = {PRINCIPAL_HEADER: principal.binding}
    if create:
        headers[QUOTA_HEADER] = principal.quota_tag
    return headers


async def as_error(resp: LinkResponse) -> TetherError:
    """A node's error answer as the TetherError that gives the client the same status and message."""
    try:
        body = orjson.loads(await resp.read())
        message = str(body["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError, LinkLost, TimeoutError):
        message = f"the node answered HTTP {resp.status}"
    retry = resp.headers.get("Retry-After")
    if resp.status == 404:
        return SessionNotFound(message)
    if resp.status in (503, 429):
        return Overloaded(message, retry_after=float(retry) if retry and retry.isdigit() else 1.0,
                          status=resp.status)
    if resp.status == 504:
        return UpstreamTimeout(message)
    if resp.status >= 500:
        return UpstreamError(message)
    error = BadRequest(message)
    error.status = resp.status
    return error


def _forwarded(request: ClientRequest, headers: dict[str, str] | None = None) -> dict[str, str]:
    """`headers`, and the client's headers a node needs to see."""
    headers = {} if headers is None else headers
    for name in _FORWARDED:
        if (value := request.headers.get(name)) is not None:
            headers[name] = value
    return headers


async def read_body(request: web.Request, config: Config) -> bytes:
    """The whole body, within `max_body_bytes` (else 413) and `client_body_timeout` (else 408)."""
    limit = config.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(too_large(request.content_length, limit))
    try:
        async with asyncio.timeout(config.client_body_timeout):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(too_large(None, limit)) from None
    except TimeoutError:
        raise RequestTimeout(body_late(config)) from None


def too_large(length: int | None, limit: int) -> str:
    if length is None:
        return f"Payload Too Large: the body is over the {limit}-byte limit"
    return f"Payload Too Large: the body is {length} bytes, the limit is {limit}"


def body_late(config: Config) -> str:
    return f"Request Timeout: the body did not arrive within {config.client_body_timeout:g}s"


def answer_mcp(gw: Gateway, request: ClientRequest, principal: Principal, body: bytes) -> Awaitable[Answer]:
    """The answer to one admitted request on `/mcp`, whichever server read it. Never raises TetherError.
    (The POST's own coroutine is returned, not awaited in one more: a request waits in the fewest.)"""
    if request.method == "POST":
        return _answer_post(gw, request, principal, body)
    return _answer_other(gw, request, principal)


async def _answer_other(gw: Gateway, request: ClientRequest, principal: Principal) -> Answer:
    method = request.method
    try:
        if method == "GET":
            sid = _session_request(gw, request, principal, "open a stream")
            rules.check_stream_accept(request.headers.get("Accept"))
            return await gw.forward("GET", sid, principal, headers=_forwarded(request))
        if method == "DELETE":
            sid = _session_request(gw, request, principal, "end a session")
            return await gw.forward("DELETE", sid, principal, headers=_forwarded(request))
        raise MethodNotAllowed(f"Method Not Allowed: {method} on {MCP_PATH}; use POST, GET or DELETE")
    except TetherError as exc:
        return Answer.error(exc)


async def _answer_post(gw: Gateway, request: ClientRequest, principal: Principal, body: bytes) -> Answer:
    post: rules.Post | None = None
    try:
        mode, version, post = _read_post(gw.config, request.headers, body)
        sid, create = _post_target(gw, request, principal, post, version)
        if create:
            return await gw.create_session(body, mode, version, principal, sid=sid)
        assert sid is not None  # only a new session may have none yet
        resp = await gw.call("POST", sid, principal, body=body, headers=_post_headers(request, mode, post))
        return await gw.relay(resp, {})  # `forward`, one coroutine fewer deep while the node answers
    except TetherError as exc:
        return Answer.error(exc, _error_id(post))


def post_now(gw: Gateway, request: ClientRequest, principal: Principal, body: bytes) -> Answer | Sent | None:
    """`_answer_post` as far as it goes with no wait: an error answered at once, or the message sent to
    its session's node (`answered` then makes the answer). None when it must wait (a new session, an
    owner not in the route cache, a link to open or drain): `answer_mcp` serves it."""
    post: rules.Post | None = None
    try:
        mode, version, post = _read_post(gw.config, request.headers, body)
        sid, create = _post_target(gw, request, principal, post, version)
        if create:
            return None
        assert sid is not None  # only a new session may have none yet
        return gw.send_now("POST", sid, principal, body=body, headers=_post_headers(request, mode, post),
                           post=post)
    except TetherError as exc:
        return Answer.error(exc, _error_id(post))


def answered(gw: Gateway, sent: Sent, *, late: bool = False) -> Answer | None:
    """The answer to a POST sent by `post_now`, once the head of its node's answer has come, or has
    failed to (`late`: its `read_timeout` passed). None when a whole answer is still arriving: `relay`
    reads the rest. A stream's answer carries it, to be piped."""
    resp = sent.resp
    try:
        if late or resp.status == 0:
            resp.close()
            raise no_head(sent.node, TimeoutError() if late else resp.error or LinkLost("no answer"),
                          sent.read_timeout)
        gw.check_answer("POST", sent.sid, resp)
        return gw.relay_now(resp, {})
    except TetherError as exc:
        return Answer.error(exc, _error_id(sent.post))


def _read_post(config: Config, headers: Mapping[str, str], body: bytes) -> tuple[str, str, rules.Post]:
    """A POST's answer mode, protocol version and parsed body. Raises TetherError."""
    mode = rules.post_answer_mode(headers.get("Content-Type"), headers.get("Accept"), config.response_mode)
    version = rules.protocol_version(headers.get(VERSION_HEADER))
    return mode, version, rules.parse_post(body, version, max_depth=config.max_json_depth)


def _post_target(gw: Gateway, request: ClientRequest, principal: Principal, post: rules.Post,
                 version: str) -> tuple[str | None, bool]:
    """The session a POST is for, and whether it creates it (a None id: a new one, minted). Raises
    TetherError."""
    headers = request.headers
    sid = rules.session_id(headers.get(SESSION_HEADER))
    if sid is None and (named := gw.named_session(request, principal, post)) is not None:
        if post.initialize:
            return named, True
        sid = named
    if version in MODERN_VERSIONS:
        rules.check_modern_headers(headers, post, version)
    if sid is None:
        if post.initialize:
            return None, True
        if version in MODERN_VERSIONS:
            raise rules.stateless_fallback(version)
        raise BadRequest(f"Bad Request: {SESSION_HEADER} header is required (start with initialize)")
    if post.initialize:
        raise BadRequest("Invalid Request: this session is already initialized")
    return sid, False


def _post_headers(request: ClientRequest, mode: str, post: rules.Post) -> dict[str, str]:
    return _forwarded(request, {RESPONSE_HEADER: mode, BATCH_HEADER: "1"} if post.batch else {RESPONSE_HEADER: mode})


def _error_id(post: rules.Post | None) -> object:
    return post.first_id if post and not post.batch else None


def _session_request(gw: Gateway, request: ClientRequest, principal: Principal, purpose: str) -> str:
    """The checks every GET and DELETE passes; returns the session id. Raises TetherError."""
    rules.protocol_version(request.headers.get(VERSION_HEADER))
    sid = rules.session_id(request.headers.get(SESSION_HEADER)) or gw.named_session(request, principal, None)
    if sid is None:
        raise BadRequest(f"Bad Request: {SESSION_HEADER} header is required to {purpose}")
    return sid
