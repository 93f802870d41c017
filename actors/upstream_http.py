"""HTTP upstreams: a stateful MCP server reached by URL, over Streamable HTTP or HTTP+SSE.

Each actor holds its own upstream session on the server: the client's
`initialize` opens it (the server's `Mcp-Session-Id` is kept here, never shown
to the client), the server's GET stream is held open for the session's whole
life and resumed with `Last-Event-ID` when it drops, and ending the session
sends DELETE. Messages the server sends on a request's own stream are
reported as belonging to that request, so the actor keeps them on the
client's stream for it. All sessions of a node share one pooled HTTP client
(`actors.http_client`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urljoin

import orjson

from actors.http_client import HIGH_WATER, HttpClient, HttpClientError, Prepared, Response
from actors.mcp import SESSION_HEADER, VERSION_HEADER, RequestId, error_response
from actors.sse import Parser
from actors.upstream import Inbound
from actors.waiting import Inbox, Latch
from actors.wheel import Deadlines
from tether.errors import INTERNAL_ERROR, UpstreamError
from tether.tasks import TaskSet

log = logging.getLogger("tether.node")

ACCEPT_BOTH = "application/json, text/event-stream"
_SESSION = SESSION_HEADER.lower()  # the client's header names are in lower case
RECONNECT_DELAYS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)  # between tries to get a dropped stream back
MAX_RECONNECTS = 8  # tries in a row before the server counts as gone


def transport_for(url: str, setting: str) -> str:
    """'streamable_http' or 'sse' for an upstream URL; 'auto' picks sse for a path ending in /sse."""
    if setting != "auto":
        return setting
    path = url.split("?", 1)[0].rstrip("/")
    return "sse" if path.endswith("/sse") else "streamable_http"


class _HttpUpstream:
    """What both HTTP upstreams share: the inbox the actor reads, the tasks, the pooled client."""

    def __init__(self, client: HttpClient, url: str, *, max_message_bytes: int,
                 request_timeout: float) -> None:
        self._client = client
        self.url = url
        self._max = max_message_bytes
        self._request_timeout = request_timeout
        self._inbox: Inbox[Inbound | None] = Inbox()
        self._sink: Callable[[Inbound], None] = self._inbox.put
        self._tasks = TaskSet(f"upstream-{url}")

    @property
    def pid(self) -> int | None:
        return None

    async def receive(self) -> Inbound | None:
        return await self._inbox.get()

    def deliver_to(self, sink: Callable[[Inbound], None]) -> None:
        self._sink = sink  # an answer reaches its client's stream from the task or callback that read it

    def _gone(self, why: str) -> None:
        log.warning("upstream.gone", extra={"detail": f"{self.url}: {why}"})
        self._inbox.put(None)

    def _fail(self, message: Mapping[str, Any], why: str) -> None:
        """A request the server will never answer gets an error answer, so the client is not left waiting."""
        if "method" in message and "id" in message:
            self._sink((error_response(message["id"], INTERNAL_ERROR, why), message["id"]))
        else:
            log.warning("upstream.message_refused", extra={"detail": f"{self.url}: {why}"})

    async def _events(self, resp: Response, parser: Parser,
                      related: RequestId | None, until: RequestId | None = None) -> bool:
        """Hand an SSE body's messages to the sink. True once the answer to `until` has come (the stream is
        done)."""
        async for chunk in resp.chunks():
            try:
                events = parser.feed(chunk)
            except ValueError as exc:
                raise UpstreamError(f"Cannot read upstream stream: {exc}") from exc
            for found in events:
                if found.name != "message" or not found.data:
                    continue  # a priming event, or one this transport does not define
                try:
                    message = orjson.loads(found.data)
                except orjson.JSONDecodeError:
                    log.warning("upstream.not_json", extra={"detail": found.data[:200]})
                    continue
                self._seen(message)
                self._sink((message, related))
                if until is not None and isinstance(message, dict) and "method" not in message \
                        and message.get("id") == until:
                    return True
        return False

    def _seen(self, message: object) -> None:
        """A hook for what a transport learns from the messages it passes on."""


class StreamableHttpUpstream(_HttpUpstream):
    """A session on a Streamable HTTP server (2025-03-26 and later)."""

    def __init__(self, client: HttpClient, url: str, *, max_message_bytes: int,
                 request_timeout: float) -> None:
        super().__init__(client, url, max_message_bytes=max_message_bytes, request_timeout=request_timeout)
        self.session_id: str | None = None
        self.version: str | None = None
        self._initialized = Latch()  # the session is open: the GET stream may start
        self._post_head: tuple[tuple[str | None, str | None], Prepared] | None = None
        # Requests whose answers the connections' callbacks read, each given up on if none has come in time.
        self.posted: Deadlines[_Posted] = Deadlines(request_timeout + 5.0, _Posted.give_up)

    def describe(self) -> str:
        return f"{self.url} session {self.session_id or '(none yet)'}"

    def _headers(self, accept: str = ACCEPT_BOTH) -> dict[str, str]:
        headers = {"Accept": accept}
        if self.session_id:
            headers[SESSION_HEADER] = self.session_id
        if self.version:
            headers[VERSION_HEADER] = self.version
        return headers

    async def send(self, message: Mapping[str, Any]) -> None:
        """POST one message. Requests are answered in the background (a slow tool must not hold up the
        messages behind it), except initialize, whose answer opens the session."""
        if self.send_now(message):
            return
        await self._post(message)
        if message.get("method") == "notifications/initialized":
            self._initialized.set()

    def send_now(self, message: Mapping[str, Any]) -> bool:
        """A request (but initialize) goes at once: it waits for nothing before it. On an idle pooled
        connection its answer is read in the connection's callbacks (`_Posted`); else by a task."""
        if "id" not in message or "method" not in message or message["method"] == "initialize":
            return False
        body = orjson.dumps(message)
        try:
            prepared = self._prepared()
        except HttpClientError:
            prepared = None  # the task's request reports it
        if prepared is not None:
            posted = _Posted(self, message)
            resp = self._client.send_nowait(prepared, body, posted.arrived, self._request_timeout + 5.0)
            if resp is not None:
                posted.started(resp)
                return True
        self._tasks.spawn(self._post(message, body), "post")
        return True

    def _prepared(self) -> Prepared:
        """The head of this session's POSTs, made again only when what it carries changes."""
        key = (self.session_id, self.version)
        if self._post_head is None or self._post_head[0] != key:
            prepared = self._client.prepare("POST", self.url, {**self._headers(), "Content-Type": "application/json"})
            self._post_head = (key, prepared)
        return self._post_head[1]

    async def _post(self, message: Mapping[str, Any], body: bytes | None = None) -> None:
        request_id = message.get("id") if "method" in message else None
        try:
            async with await self._client.send(self._prepared(), orjson.dumps(message) if body is None else body,
                                               read_timeout=self._request_timeout + 5.0) as resp:
                if message.get("method") == "initialize" and resp.status == 200:
                    self.session_id = resp.headers.get(_SESSION)
                await self._answer(message, request_id, resp)
        except (HttpClientError, TimeoutError, UpstreamError, ValueError) as exc:
            if message.get("method") == "initialize":
                raise UpstreamError(f"Cannot open a session on upstream {self.url}: {exc!r}") from exc
            self._failed(message, exc)

    def _failed(self, message: Mapping[str, Any], exc: BaseException) -> None:
        self._fail(message, f"Upstream {self.url} failed: {exc!r}")

    async def _answer(self, message: Mapping[str, Any], request_id: RequestId | None,
                      resp: Response) -> None:
        if resp.status == 200 and resp.content_type == "text/event-stream":
            await self._stream_answer(resp, request_id)
            return
        self._took(message, request_id, resp.status,
                   await resp.read(self._max + 1) if self._has_answer(resp.status, request_id) else b"")

    async def _finish(self, message: Mapping[str, Any], resp: Response) -> None:
        """Read the rest of an answer that `_Posted` handed over (a stream, or a body that takes long)."""
        try:
            async with resp:
                await self._answer(message, message.get("id"), resp)
        except (HttpClientError, TimeoutError, UpstreamError, ValueError) as exc:
            self._failed(message, exc)

    def _has_answer(self, status: int, request_id: RequestId | None) -> bool:
        """Whether an answer's body says anything: not for 202, a 200 to a notification, or the 404 of
        a session the server has forgotten."""
        return status != 202 and not (status == 200 and request_id is None) and \
            not (status == 404 and self.session_id)

    def _took(self, message: Mapping[str, Any], request_id: RequestId | None, status: int, body: bytes) -> None:
        """What a whole (not streamed) answer means: the answer for the client, an error, or the end."""
        if status == 404 and self.session_id:
            self._gone("the server no longer knows this session (404)")
            return
        if not self._has_answer(status, request_id):
            return
        if status != 200:
            text = body[:300].decode(errors="replace")
            self._fail(message, f"Upstream answered HTTP {status}: {text}")
            return
        if len(body) > self._max:
            self._fail(message, f"Upstream answered with more than max_message_bytes ({self._max})")
            return
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            self._fail(message, "Upstream answered with a body that is not JSON")
            return
        if self.version is None:  # until the initialize answer names it
            self._seen(answer)
        self._sink((answer, request_id))

    def _seen(self, answer: object) -> None:
        """The initialize answer names the revision every later request must carry."""
        if isinstance(answer, dict) and isinstance(answer.get("result"), dict) and self.version is None:
            version = answer["result"].get("protocolVersion")
            if isinstance(version, str):
                self.version = version

    async def _stream_answer(self, resp: Response, request_id: RequestId | None) -> None:
        """Read a POST's SSE answer; if it drops before the answer, resume it with GET and Last-Event-ID."""
        parser = Parser(self._max)
        try:
            if await self._events(resp, parser, request_id, until=request_id):
                return
        except (HttpClientError, TimeoutError):
            pass
        for delay in RECONNECT_DELAYS:
            if parser.last_id is None:
                break  # the server gave no ids: nothing to resume from
            await asyncio.sleep(delay)
            with contextlib.suppress(HttpClientError, TimeoutError):
                async with await self._client.request("GET", self.url, headers={
                        **self._headers("text/event-stream"), "Last-Event-ID": parser.last_id},
                        read_timeout=self._request_timeout + 5.0) as again:
                    if again.status == 200 and await self._events(again, parser, request_id, until=request_id):
                        return
        if request_id is not None:
            self._sink((error_response(request_id, INTERNAL_ERROR, "Upstream stream ended before the answer"),
                        request_id))

    async def background(self) -> None:
        """Hold the server's GET stream open from `initialized` to the end; resume it when it drops."""
        await self._initialized.wait()
        parser = Parser(self._max)
        failures = 0
        while True:
            headers = self._headers("text/event-stream")
            if parser.last_id is not None:
                headers["Last-Event-ID"] = parser.last_id
            seen = parser.dispatched
            try:
                async with await self._client.request("GET", self.url, headers=headers) as resp:
                    if resp.status == 404:
                        self._gone("the server no longer knows this session (404 on GET)")
                        return
                    if 400 <= resp.status < 500:  # 405: it offers none; others: it will not give us one
                        log.warning("upstream.no_stream", extra={"detail": f"{self.url}: GET {resp.status}"})
                        return  # the session goes on without the server's GET stream
                    if resp.status == 200:
                        await self._events(resp, parser, None)
            except (HttpClientError, TimeoutError, UpstreamError) as exc:
                log.info("upstream.stream_dropped", extra={"detail": f"{self.url}: {exc!r}"})
            if parser.dispatched > seen:
                failures = 0  # it carried events: a drop after a working stream starts the count again
            failures += 1
            if failures > MAX_RECONNECTS:
                self._gone(f"its GET stream failed {MAX_RECONNECTS} times in a row")
                return
            await asyncio.sleep(RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS)) - 1])

    async def stop(self, grace: float) -> str:
        for posted, _ in self.posted.items():
            posted.abandon()
        self.posted.close()
        await self._tasks.close(timeout=grace)
        if not self.session_id:
            return "no upstream session"
        try:
            async with asyncio.timeout(grace):
                async with await self._client.request("DELETE", self.url, headers=self._headers()) as resp:
                    return f"upstream DELETE answered {resp.status}"
        except (HttpClientError, TimeoutError) as exc:
            return f"upstream DELETE failed: {exc!r}"


class _Posted:
    """A request sent on an idle connection, its answer read in the connection's callbacks: a JSON
    answer costs no task. Anything else (a stream, an error to read) goes to a task (`_finish`)."""

    __slots__ = ("upstream", "message", "resp")

    def __init__(self, upstream: StreamableHttpUpstream, message: Mapping[str, Any]) -> None:
        self.upstream = upstream
        self.message = message
        self.resp: Response | None = None

    def started(self, resp: Response) -> None:
        self.resp = resp
        self.upstream.posted.add(self)

    def give_up(self) -> None:
        """No answer in time: the connection reads it as a timeout (and the listener reports it)."""
        if self.resp is not None:
            self.resp._fail(TimeoutError())

    def arrived(self, resp: Response) -> None:
        upstream, message = self.upstream, self.message
        if resp._error is not None:
            self._done(resp)
            upstream._failed(message, resp._error)
        elif resp.content_type == "text/event-stream" or (not resp._done and resp._size > min(upstream._max,
                                                                                               HIGH_WATER)):
            # Read by a task: a stream (even one that came whole in one read), or a body big enough
            # to need back-pressure.
            self._done(resp, release=False)
            resp.listener = None
            upstream._tasks.spawn(upstream._finish(message, resp), "post")
        elif resp._done:
            body = resp.take()
            self._done(resp)
            upstream._took(message, message["id"], resp.status, body)

    def _done(self, resp: Response, release: bool = True) -> None:
        self.upstream.posted.discard(self)
        if release:
            resp.listener = None
            resp.release()

    def abandon(self) -> None:
        """The session ends: the connection of an answer still to come is closed."""
        if self.resp is not None:
            self._done(self.resp)


class SseUpstream(_HttpUpstream):
    """A session on an HTTP+SSE server (2024-11-05): a GET stream, and POSTs to the URI it names."""

    def __init__(self, client: HttpClient, url: str, *, max_message_bytes: int,
                 request_timeout: float) -> None:
        super().__init__(client, url, max_message_bytes=max_message_bytes, request_timeout=request_timeout)
        self._endpoint: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def describe(self) -> str:
        return f"{self.url} endpoint {self._endpoint.result() if self._endpoint.done() else '(none yet)'}"

    async def background(self) -> None:
        """The session's stream: the endpoint event first, then the server's messages until it ends."""
        parser = Parser(self._max)
        try:
            async with await self._client.request("GET", self.url, headers={"Accept": "text/event-stream"}) as resp:
                if resp.status != 200:
                    raise UpstreamError(f"Upstream {self.url} answered HTTP {resp.status} to the stream GET")
                async for chunk in resp.chunks():
                    for found in parser.feed(chunk):
                        self._on_event(found.name, found.data)
        except (HttpClientError, TimeoutError, UpstreamError, ValueError) as exc:
            self._gone(f"its stream failed: {exc!r}")
            return
        self._gone("its stream ended (HTTP+SSE sessions cannot be resumed)")

    def send_now(self, message: Mapping[str, Any]) -> bool:
        return False  # a POST waits for the endpoint the stream names

    def _on_event(self, name: str, data: str) -> None:
        if name == "endpoint" and not self._endpoint.done():
            self._endpoint.set_result(urljoin(self.url, data.strip()))
        elif name == "message" and data:
            try:
                self._sink((orjson.loads(data), None))
            except orjson.JSONDecodeError:
                log.warning("upstream.not_json", extra={"detail": data[:200]})

    async def send(self, message: Mapping[str, Any]) -> None:
        try:
            async with asyncio.timeout(self._request_timeout):
                endpoint = await asyncio.shield(self._endpoint)
        except TimeoutError:
            raise UpstreamError(f"Upstream {self.url} sent no endpoint event") from None
        try:
            async with await self._client.request("POST", endpoint, body=orjson.dumps(message),
                                                  headers={"Content-Type": "application/json"},
                                                  read_timeout=self._request_timeout) as resp:
                if resp.status == 404:
                    self._gone("the server no longer knows this session (404)")
                elif resp.status >= 300:
                    body = (await resp.read(300)).decode(errors="replace")
                    self._fail(message, f"Upstream answered HTTP {resp.status}: {body}")
        except (HttpClientError, TimeoutError) as exc:
            self._fail(message, f"Upstream {self.url} cannot be reached: {exc!r}")

    async def stop(self, grace: float) -> str:
        await self._tasks.close(timeout=grace)
        return "upstream stream closed"
