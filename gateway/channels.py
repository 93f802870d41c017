"""The gateway's channel transports: WebSocket on `/ws`, and HTTP+SSE (2024-11-05) on `/sse`.

A channel carries every message of its session, in both directions, on one
connection. The gateway creates the session on a node in channel mode,
relays the node's stream for it (the same event-id'd stream Streamable HTTP
clients read), and sends what the client says to the node as POSTs, which
the node answers with 202: the answers come back on the channel.

Every frame a WebSocket client receives is an event of the session's channel
(the node answers even a malformed frame with an error there), so the count
of frames received is its cursor. When the gateway cannot reach the node, it
closes the WebSocket (1011) rather than answer itself.

A client that loses its channel comes back to the same session, through any
gateway: WebSocket with `Mcp-Session-Id` (header, or `session_id` in the
query) and `Last-Event-ID` (header or `last_event_id`, the count of messages
it had); HTTP+SSE with `?session_id=` and `Last-Event-ID`.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import WSMsgType, web

from actors.http import error_answer
from actors.internal import RESPONSE_HEADER
from actors.mcp import SESSION_HEADER
from actors.session import CHANNEL
from actors.sse import HEADERS as SSE_HEADERS
from actors.sse import Parser, endpoint
from gateway import rules
from gateway.app import GATEWAY_KEY, PRINCIPAL_KEY, Gateway, as_error, read_body
from gateway.auth import Principal
from gateway.link import LinkLost, LinkResponse
from tether.errors import BadRequest, SessionNotFound, TetherError
from tether.logs import sid_tag
from tether.tasks import TaskSet

log = logging.getLogger("tether.gateway")

SSE_PATH = "/sse"
MESSAGES_PATH = "/messages"
WS_PATH = "/ws"
WS_SUBPROTOCOL = "mcp"
LEGACY_VERSION = "2024-11-05"  # HTTP+SSE's revision: batches allowed
# WebSocket close codes: the session ended; the gateway lost the node; the client sent binary.
CLOSE_ENDED, CLOSE_LOST, CLOSE_UNSUPPORTED = 1000, 1011, 1003


def _cursor(request: web.Request) -> dict[str, str]:
    last = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    return {"Last-Event-ID": last} if last else {}


async def _open_stream(gw: Gateway, sid: str | None, request: web.Request) -> tuple[str, LinkResponse]:
    """The session's channel stream from its node: an existing session's (resumed, when `sid` is given),
    or a new one's."""
    principal = request[PRINCIPAL_KEY]
    created = sid is None
    if sid is None:
        sid = await gw.create_channel(principal)
    try:
        resp = await gw.call("GET", sid, principal, headers=_cursor(request))
        if resp.status != 200:
            async with resp:
                raise await as_error(resp)
    except TetherError:
        if created:  # nobody will ever reach the session just made: do not leave it to idle out
            gw.end_later(sid, principal)
        raise
    return sid, resp


# -- HTTP+SSE (2024-11-05) -------------------------------------------------------


async def handle_sse(request: web.Request) -> web.StreamResponse:
    """GET /sse: open a session (or, with ?session_id=, resume one) and stream it, endpoint event first.
    A session this stream opened ends when its client leaves; one it resumed goes on (its client may
    come back again, or use it over another transport) until DELETE or idle expiry."""
    gw = request.app[GATEWAY_KEY]
    rules.check_stream_accept(request.headers.get("Accept"))
    resumed = request.query.get("session_id")
    sid, resp = await _open_stream(gw, resumed, request)
    try:
        out = web.StreamResponse(headers={**SSE_HEADERS, SESSION_HEADER: sid})
        await out.prepare(request)
        await out.write(endpoint(f"{MESSAGES_PATH}?session_id={sid}"))
        await gw.pipe(resp, out, "sse")
        return out
    finally:
        if resumed is None and not resp.at_eof:  # its client left: nobody else knows this session
            gw.end_later(sid, request[PRINCIPAL_KEY])
        resp.close()


async def handle_messages(request: web.Request) -> web.StreamResponse:
    """POST /messages?session_id=: one client message (or batch) for an HTTP+SSE session; 202, the
    answer goes out on the session's stream."""
    gw = request.app[GATEWAY_KEY]
    config = gw.config
    post: rules.Post | None = None
    try:
        sid = request.query.get("session_id")
        if not sid:
            raise BadRequest("Bad Request: the session_id query parameter is required (from the endpoint event)")
        rules.check_json_body(request.headers.get("Content-Type"))
        body = await read_body(request, config)
        post = rules.parse_post(body, LEGACY_VERSION, max_depth=config.max_json_depth)
        await _to_channel(gw, sid, request[PRINCIPAL_KEY], body)
        return web.Response(status=202, text="Accepted")
    except TetherError as exc:
        return error_answer(exc, post.first_id if post and not post.batch else None)


async def _to_channel(gw: Gateway, sid: str, principal: Principal, body: bytes) -> None:
    """Hand client messages to the session's node. Raises the node's refusal as a TetherError."""
    resp = await gw.call("POST", sid, principal, body=body, headers={RESPONSE_HEADER: CHANNEL})
    async with resp:
        if resp.status != 202:
            raise await as_error(resp)


# -- WebSocket -------------------------------------------------------------------


async def handle_ws(request: web.Request) -> web.StreamResponse:
    """GET /ws (upgrade, subprotocol `mcp`): a new session, or the live one the request names."""
    gw = request.app[GATEWAY_KEY]
    config = gw.config
    ws = web.WebSocketResponse(protocols=(WS_SUBPROTOCOL,), heartbeat=config.keepalive_interval,
                               max_msg_size=config.max_body_bytes)
    ready = ws.can_prepare(request)
    if not ready.ok:
        raise BadRequest(f"Bad Request: {WS_PATH} takes a WebSocket upgrade (subprotocol {WS_SUBPROTOCOL!r})")
    if ready.protocol != WS_SUBPROTOCOL:
        raise BadRequest(f"Bad Request: a WebSocket client must offer the subprotocol {WS_SUBPROTOCOL!r}")
    sid = rules.session_id(request.headers.get(SESSION_HEADER)) or request.query.get("session_id")
    created = sid is None
    sid, resp = await _open_stream(gw, sid, request)
    try:
        ws.headers[SESSION_HEADER] = sid
        try:
            await ws.prepare(request)
        except (ConnectionError, web.HTTPException):
            if created:
                gw.end_later(sid, request[PRINCIPAL_KEY])
            raise
        gauge = gw.metrics.streams_open.labels("websocket")
        gauge.inc()
        try:
            await _run_ws(gw, sid, request[PRINCIPAL_KEY], ws, resp)
        finally:
            gauge.dec()
        return ws
    finally:
        resp.close()


async def _run_ws(gw: Gateway, sid: str, principal: Principal, ws: web.WebSocketResponse,
                  resp: LinkResponse) -> None:
    """Pump both ways until one side ends; then close the other with a code that says which."""
    pumps = TaskSet(f"ws-{sid_tag(sid)}")
    down = pumps.spawn(_node_to_client(resp, ws, gw.config.client_write_timeout), "down")
    up = pumps.spawn(_client_to_node(gw, sid, principal, ws), "up")
    try:
        done, _ = await asyncio.wait((down, up), return_when=asyncio.FIRST_COMPLETED)
    finally:
        await pumps.close(timeout=1.0)
    code, why = CLOSE_ENDED, "session ended"
    for task in done:
        if not task.cancelled() and task.exception() is None:
            code, why = task.result()
    await ws.close(code=code, message=why.encode()[:120])


async def _node_to_client(resp: LinkResponse, ws: web.WebSocketResponse,
                          write_timeout: float) -> tuple[int, str]:
    """Each event of the node's stream as one text frame; a client that stops reading for
    `write_timeout` is cut off (it may reattach and get what it missed)."""
    parser = Parser()
    try:
        async for chunk in resp.chunks():
            for found in parser.feed(chunk):
                if found.data:
                    try:
                        async with asyncio.timeout(write_timeout):
                            await ws.send_str(found.data)
                    except TimeoutError:
                        return CLOSE_LOST, "the client did not read; reconnect with session_id and last_event_id"
    except (LinkLost, TimeoutError, ValueError) as exc:
        log.warning("ws.link_lost", extra={"detail": repr(exc)})
        return CLOSE_LOST, "lost the session's node; reconnect with session_id and last_event_id"
    except ConnectionError:
        return CLOSE_LOST, "client gone"
    return CLOSE_ENDED, "session ended"


async def _client_to_node(gw: Gateway, sid: str, principal: Principal, ws: web.WebSocketResponse) -> tuple[int, str]:
    """Each text frame, in order, to the node, as it came: the node answers a bad one with an error on
    the channel, so every frame the client gets is an event of the channel and its count a cursor."""
    async for frame in ws:
        if frame.type == WSMsgType.BINARY:
            return CLOSE_UNSUPPORTED, "MCP over WebSocket takes one JSON-RPC message per text frame"
        if frame.type != WSMsgType.TEXT:
            continue
        try:
            await _to_channel(gw, sid, principal, frame.data.encode())
        except SessionNotFound:
            return CLOSE_ENDED, "session ended"
        except TetherError as exc:  # the node could not be reached: the client may reattach later
            return CLOSE_LOST, f"{exc.message}"[:120]
    if ws.close_code == CLOSE_ENDED:  # the client said goodbye; after a mere drop it may come back
        gw.end_later(sid, principal)  # now: the handler may be cancelled as soon as the client's socket closes
        return CLOSE_ENDED, "client closed the session"
    return CLOSE_ENDED, "client gone"


def channel_routes() -> list[web.RouteDef]:
    return [web.get(SSE_PATH, handle_sse), web.post(MESSAGES_PATH, handle_messages), web.get(WS_PATH, handle_ws)]
