"""HTTP pieces the node and the gateway share: error answers, health routes, the secret check."""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from actors.internal import INTERNAL_PREFIX, authorized
from actors.mcp import error_response
from tether.errors import INVALID_REQUEST, ConfigError, TetherError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = logging.getLogger("tether.http")


def error_parts(exc: TetherError, request_id: object = None) -> tuple[int, dict[str, str], bytes]:
    """The answer for a TetherError: its status; headers with Retry-After, if any; a JSON-RPC error body."""
    log.debug("request.refused", extra={"status": exc.status, "detail": exc.message})
    code = exc.rpc_code if exc.rpc_code is not None else INVALID_REQUEST
    body = error_response(request_id, code, exc.message, exc.data)  # type: ignore[arg-type]
    headers = {"Content-Type": "application/json", **exc.headers}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return exc.status, headers, orjson.dumps(body)


def error_answer(exc: TetherError, request_id: object = None) -> web.Response:
    """`error_parts` as an HTTP response."""
    status, headers, body = error_parts(exc, request_id)
    return web.Response(status=status, body=body, headers=headers)


@web.middleware
async def tether_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except TetherError as exc:
        return error_answer(exc)


def internal_refusal(request: web.Request, secret: str,
                     prefixes: tuple[str, ...] = (INTERNAL_PREFIX,)) -> web.Response | None:
    """The 401 for a request under any of `prefixes` without the internal secret; None if it may pass."""
    if request.path.startswith(prefixes) and not authorized(request.headers, secret):
        return web.json_response({"error": "internal secret missing or wrong"}, status=401)
    return None


def internal_only(secret: str,
                  prefixes: tuple[str, ...] = (INTERNAL_PREFIX,)) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Middleware: paths under any of `prefixes` need the internal secret (401 otherwise)."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        return internal_refusal(request, secret, prefixes) or await handler(request)

    return check


def health_routes(registry: CollectorRegistry, ready: Callable[[], bool]) -> list[web.RouteDef]:
    """`/healthz` (alive), `/readyz` (accepting work) and `/metrics` (Prometheus text)."""

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if ready():
            return web.Response(text="ready\n")
        return web.Response(text="not ready\n", status=503)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return [web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics)]


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, so the real port is known before the app is built."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(1024)
    sock.setblocking(False)
    return sock
