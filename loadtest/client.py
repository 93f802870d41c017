"""Minimal MCP clients for load: Streamable HTTP (POST, GET stream, DELETE) and WebSocket.

They speak only what the scenarios need and report every failure as a `Failed` with a
short kind (`http_404`, `jsonrpc_-32603`, `timeout`, `connection`), so the recorder can
count it. Answers to POSTs may come as JSON or as an SSE stream, as the server likes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

LATEST = "2025-11-25"
CLIENT_INFO = {"name": "tether-loadtest", "version": "1"}
SESSION_HEADER = "Mcp-Session-Id"


class Failed(Exception):
    """A request that did not get a usable answer; `kind` is how the recorder counts it."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def initialize_request(request_id: int = 0) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "initialize",
            "params": {"protocolVersion": LATEST, "capabilities": {}, "clientInfo": CLIENT_INFO}}


def tool_call(request_id: int, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
            "params": {"name": name, "arguments": arguments}}


def tool_text(answer: dict[str, Any]) -> str:
    """The text a tool answered, or Failed if the answer is an error."""
    if "error" in answer:
        raise Failed(f"jsonrpc_{answer['error'].get('code')}", str(answer["error"].get("message", ""))[:200])
    try:
        result = answer["result"]
        if result.get("isError"):
            raise Failed("tool_error", str(result.get("content"))[:200])
        return str(result["content"][0]["text"])
    except (KeyError, IndexError, TypeError) as exc:
        raise Failed("malformed_answer", repr(answer)[:200]) from exc


@dataclass
class SseEvent:
    id: str | None
    data: str


async def sse_events(response: aiohttp.ClientResponse,
                     on_comment: Callable[[], None] | None = None) -> AsyncIterator[SseEvent]:
    """Parse a text/event-stream body into events (retry lines skipped); `on_comment` is called for
    each comment line, such as a keep-alive ping."""
    event_id: str | None = None
    data: list[str] = []
    async for raw in response.content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield SseEvent(event_id, "\n".join(data))
            event_id, data = None, []
        elif line.startswith(":"):
            if on_comment is not None:
                on_comment()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" ") if line[5:6] == " " else line[5:])
        elif line.startswith("id:"):
            event_id = line[3:].strip()


class HttpSession:
    """One MCP session over Streamable HTTP."""

    def __init__(self, http: aiohttp.ClientSession, url: str, headers: dict[str, str], timeout: float) -> None:
        self.http = http
        self.url = url
        self.headers = headers
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.sid: str | None = None
        self.version = LATEST
        self._ids = itertools.count(1)

    def _headers(self, accept: str = "application/json, text/event-stream") -> dict[str, str]:
        headers = {**self.headers, "Accept": accept, "Content-Type": "application/json"}
        if self.sid:
            headers[SESSION_HEADER] = self.sid
            headers["MCP-Protocol-Version"] = self.version
        return headers

    async def post(self, message: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        """POST one message: the answer to it (None for 202), and the session id header if any."""
        try:
            async with self.http.post(self.url, data=orjson.dumps(message), headers=self._headers(),
                                      timeout=self.timeout) as response:
                sid = response.headers.get(SESSION_HEADER)
                if response.status == 202:
                    return None, sid
                if response.status != 200:
                    await response.read()
                    raise Failed(f"http_{response.status}")
                if response.content_type == "text/event-stream":
                    async for event in sse_events(response):
                        if not event.data:
                            continue  # a priming event: an id to resume from, no message
                        answer = orjson.loads(event.data)
                        if answer.get("id") == message.get("id") and ("result" in answer or "error" in answer):
                            return answer, sid
                    raise Failed("stream_ended", "the SSE answer ended without the response")
                return orjson.loads(await response.read()), sid
        except TimeoutError as exc:
            raise Failed("timeout") from exc
        except aiohttp.ClientError as exc:
            raise Failed("connection", type(exc).__name__) from exc
        except orjson.JSONDecodeError as exc:
            raise Failed("malformed_answer", str(exc)) from exc

    async def initialize(self) -> str:
        answer, sid = await self.post(initialize_request())
        if answer is None or "result" not in answer or not sid:
            raise Failed("initialize_refused", repr(answer)[:200])
        self.sid = sid
        self.version = answer["result"].get("protocolVersion", LATEST)
        await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return self.sid

    async def call(self, name: str, arguments: dict[str, Any]) -> str:
        answer, _ = await self.post(tool_call(next(self._ids), name, arguments))
        if answer is None:
            raise Failed("malformed_answer", "202 to a request")
        return tool_text(answer)

    async def delete(self) -> None:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with self.http.delete(self.url, headers=self._headers(), timeout=self.timeout) as response:
                await response.read()

    @contextlib.asynccontextmanager
    async def stream(self, last_event_id: str | None = None) -> AsyncIterator[aiohttp.ClientResponse]:
        """The session's GET stream (resumed after `last_event_id`), open once the context is entered."""
        headers = self._headers("text/event-stream")
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout.total, sock_read=None)
        try:
            async with self.http.get(self.url, headers=headers, timeout=timeout) as response:
                if response.status != 200:
                    raise Failed(f"http_{response.status}")
                yield response
        except aiohttp.ClientError as exc:
            raise Failed("connection", type(exc).__name__) from exc


class WebSocketSession:
    """One MCP session over WebSocket (subprotocol `mcp`, one JSON-RPC message per text frame)."""

    def __init__(self, http: aiohttp.ClientSession, url: str, headers: dict[str, str], timeout: float) -> None:
        self.http = http
        self.url = url
        self.headers = headers
        self.timeout = timeout
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)

    async def initialize(self) -> None:
        try:
            self.ws = await self.http.ws_connect(self.url, protocols=("mcp",), headers=self.headers,
                                                 timeout=aiohttp.ClientWSTimeout(ws_close=self.timeout))
        except aiohttp.WSServerHandshakeError as exc:
            raise Failed(f"http_{exc.status}") from exc
        except aiohttp.ClientError as exc:
            raise Failed("connection", type(exc).__name__) from exc
        answer = await self.request(initialize_request(0))
        if "result" not in answer:
            raise Failed("initialize_refused", repr(answer)[:200])
        assert self.ws is not None
        await self.ws.send_str(orjson.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).decode())

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.ws is not None
        try:
            await self.ws.send_str(orjson.dumps(message).decode())
            async with asyncio.timeout(self.timeout):
                while True:
                    frame = await self.ws.receive()
                    if frame.type != aiohttp.WSMsgType.TEXT:
                        raise Failed("closed", f"frame {frame.type.name}")
                    answer = orjson.loads(frame.data)
                    if answer.get("id") == message["id"] and ("result" in answer or "error" in answer):
                        return dict(answer)
        except TimeoutError as exc:
            raise Failed("timeout") from exc
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise Failed("connection", type(exc).__name__) from exc

    async def call(self, name: str, arguments: dict[str, Any]) -> str:
        return tool_text(await self.request(tool_call(next(self._ids), name, arguments)))

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(aiohttp.ClientError, ConnectionError):
                await self.ws.close()
