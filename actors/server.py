"""Running a node: its socket, its link and aiohttp servers, its shutdown.

Apart from `actors.node_api` because it is an async generator, which mypyc does not compile (setup.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from actors.http import bind_socket
from actors.node import Node
from actors.node_api import NodeWire, build_node_app
from actors.store.base import Store
from actors.wire import Upgrades
from tether.config import Config

log = logging.getLogger("tether.node")


@contextlib.asynccontextmanager
async def serve_node(config: Config, store: Store, argv: list[str],
                     node_id: str | None = None) -> AsyncIterator[Node]:
    """Run a node on `config.host:config.port` (0: any free port) until the context ends."""
    sock = bind_socket(config.host, config.port)
    port = sock.getsockname()[1]
    node_id = node_id or config.node_id or f"node-{config.host}-{port}"
    node = Node(config, store, node_id, argv)
    node.url = config.advertise or f"http://{_url_host(config.host)}:{port}"
    # handler_cancellation: when the gateway drops a link request (its client left), the handler's
    # cleanup runs at once: the request is abandoned upstream, the GET stream slot freed.
    runner = web.AppRunner(build_node_app(node), access_log=None, handle_signals=False,
                           shutdown_timeout=1.0, handler_cancellation=True)
    await runner.setup()
    assert runner.server is not None  # set up above
    links: set[NodeWire] = set()
    fallback = runner.server
    server = await asyncio.get_running_loop().create_server(
        lambda: Upgrades(config.internal_secret, lambda: NodeWire(node, links), fallback,
                         config.client_header_timeout), sock=sock)
    node.start_loops()
    log.info("node.started", extra={"node": node.node_id, "url": node.url})
    try:
        yield node
    finally:
        await node.shutdown()
        server.close()
        for link in list(links):
            link.close()
        await runner.cleanup()
        log.info("node.stopped", extra={"node": node.node_id})


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
