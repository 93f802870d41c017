"""The gateway's link to actor nodes: pooled, authenticated HTTP, streamed without buffering.

One `aiohttp.ClientSession` with keep-alive connections serves every node, so
no request pays for a connection or a client. Failures to reach a node are
mapped to `Overloaded` (503 with Retry-After) at this boundary.
"""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from actors.internal import SECRET_HEADER, session_path
from actors.store.base import NodeRecord
from tether.errors import Overloaded, UpstreamTimeout


class NodeLink:
    def __init__(self, secret: str, connect_timeout: float = 2.0) -> None:
        self._secret = secret
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, enable_cleanup_closed=True)
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout,
                                                  auto_decompress=False, skip_auto_headers=("User-Agent",))
        return self._session

    async def call(self, node: NodeRecord, method: str, sid: str, *, read_timeout: float,
                   body: bytes | None = None, headers: Mapping[str, str] | None = None) -> aiohttp.ClientResponse:
        """Send one request to `node` for session `sid`; the caller reads and releases the response.

        `read_timeout` bounds every wait for bytes from the node, so a node that
        stalls is given up on. Raises `Overloaded` when the node cannot be
        reached, `UpstreamTimeout` when it stops answering.
        """
        all_headers = {SECRET_HEADER: self._secret}
        if headers:
            all_headers.update(headers)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout, sock_read=read_timeout)
        try:
            return await self._client().request(method, node.url + session_path(sid), data=body,
                                                headers=all_headers, timeout=timeout)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"Gateway Timeout: node {node.node_id} did not answer within "
                                  f"{read_timeout:g}s") from exc
        except aiohttp.ClientConnectionError as exc:
            raise Overloaded(f"Service Unavailable: node {node.node_id} cannot be reached ({exc!r})",
                             retry_after=1.0) from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
