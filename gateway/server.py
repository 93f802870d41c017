"""Running a gateway: its socket, its edge, the aiohttp app it hands other paths to, its shutdown.

Apart from `gateway.app`, which mypyc compiles (setup.py): mypyc compiles no async generator, and
aiohttp marks a middleware by setting an attribute on the function, which a compiled function has
no room for. Nothing here runs per request but the aiohttp app's own paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from actors.http import Handler, bind_socket, error_answer, health_routes, internal_refusal
from actors.store.base import Store
from actors.store.link import store_routes
from gateway.app import (
    GATEWAY_KEY,
    LISTEN_BACKLOG,
    MCP_PATH,
    PRINCIPAL_KEY,
    SHUTDOWN_GRACE,
    TRANSPORT,
    TRANSPORTS,
    Gateway,
    answer_mcp,
    read_body,
)
from gateway.auth import WELL_KNOWN
from gateway.channels import channel_routes
from gateway.edge import Edge
from tether.config import Config
from tether.errors import TetherError

log = logging.getLogger("tether.gateway")


async def handle_mcp(request: web.Request) -> web.StreamResponse:
    """`/mcp` on a connection aiohttp serves (one the edge handed over: see `gateway.edge`)."""
    gw = request.app[GATEWAY_KEY]
    body = await read_body(request, gw.config) if request.method == "POST" else b""
    answer = await answer_mcp(gw, request, request[PRINCIPAL_KEY], body)
    if answer.stream is None:
        return web.Response(status=answer.status, body=answer.body, headers=answer.headers)
    try:
        out = web.StreamResponse(status=answer.status, headers=answer.headers)
        await out.prepare(request)
        await gw.pipe(answer.stream, out, TRANSPORT)
        return out
    finally:
        answer.stream.close()


@web.middleware
async def measured(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Admit, count and time every client request; map TetherErrors to their answers. Internal paths
    (the embedded store's) need the internal secret: one middleware, not two, on every request."""
    started = time.monotonic()
    transport = TRANSPORTS.get(request.path)
    if transport is None and (refused := internal_refusal(request, request.app[GATEWAY_KEY].config.internal_secret)):
        return refused
    try:
        if transport is not None:
            request[PRINCIPAL_KEY] = await request.app[GATEWAY_KEY].admit(request)
        response = await handler(request)
    except TetherError as exc:
        response = error_answer(exc)
    if transport is not None:
        request.app[GATEWAY_KEY].metrics.observe(transport, request.method, response.status,
                                                 time.monotonic() - started)
    return response


async def protected_resource(request: web.Request) -> web.Response:
    """RFC 9728 metadata: where MCP clients get tokens for this gateway."""
    config = request.app[GATEWAY_KEY].config
    base = f"{request.scheme}://{request.host}"
    return web.json_response({"resource": base + MCP_PATH, "authorization_servers": [config.jwt_issuer],
                              "bearer_methods_supported": ["header"]})


def build_gateway_app(gateway: Gateway, store: Store | None = None) -> web.Application:
    """The gateway app; with `store`, it also serves that store to nodes over the internal link."""
    config = gateway.config
    app = web.Application(middlewares=[measured],
                          client_max_size=config.max_body_bytes)
    app[GATEWAY_KEY] = gateway
    app.add_routes([web.route("*", MCP_PATH, handle_mcp)])
    app.add_routes(channel_routes())
    app.add_routes(health_routes(gateway.metrics.registry, gateway.ready))
    if "jwt" in config.auth and config.jwt_issuer:
        app.add_routes([web.get(WELL_KNOWN, protected_resource), web.get(WELL_KNOWN + MCP_PATH, protected_resource)])
    if store is not None:
        app.add_routes(store_routes(store, config.internal_secret))
    return app


@contextlib.asynccontextmanager
async def serve_gateway(config: Config, store: Store, *, host_store: bool) -> AsyncIterator[Gateway]:
    """Run a gateway until the context ends; yields it, its base URL (http://host:port) in `url`."""
    sock = bind_socket(config.host, config.port)
    port = sock.getsockname()[1]
    gateway = Gateway(config, store)
    # The edge (gateway.edge) serves /mcp and hands every other connection to this aiohttp server,
    # which keeps the same rules. handler_cancellation: a client that goes away cancels its handler,
    # which closes the link response, which the node sees at once, not at the next keep-alive ping.
    # keepalive_timeout bounds how long a connection may go without a whole request: aiohttp arms it
    # when the connection opens and trickled bytes do not re-arm it, so a slowloris is cut off.
    runner = web.AppRunner(build_gateway_app(gateway, store if host_store else None), access_log=None,
                           handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE, handler_cancellation=True,
                           keepalive_timeout=config.client_header_timeout,
                           max_line_size=config.max_header_bytes, max_field_size=config.max_header_bytes)
    await runner.setup()
    assert runner.server is not None  # set up above
    edge = Edge(gateway, runner.server)
    server = await asyncio.get_running_loop().create_server(edge, sock=sock, backlog=LISTEN_BACKLOG)
    await gateway.start()
    host = f"[{config.host}]" if ":" in config.host else config.host
    edge.host = f"{host}:{port}"
    gateway.url = f"http://{host}:{port}"
    log.info("gateway.started", extra={"url": gateway.url})
    try:
        yield gateway
    finally:
        server.close()
        await gateway.close()
        await edge.close(SHUTDOWN_GRACE)
        await runner.cleanup()
