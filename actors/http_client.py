"""A lean keep-alive HTTP/1.1 client for a node's HTTP upstreams.

A node talks to its upstream server on every client request, opens a GET
stream per session and holds it for the session's life. aiohttp's client did
this at about a fifth of a node's CPU and 9 KB per held stream. This one does
only what an upstream needs: one request at a time per connection, a pool of
idle connections per origin, bodies by Content-Length, chunked or to the close,
read as they arrive with back-pressure, and parsing by llhttp (`httptools`, the
parser uvicorn uses), not Python.

Idle connections are reused for `IDLE_REUSE` seconds, less than the 5 s after
which Node.js and uvicorn close an idle keep-alive connection, so a request is
not written into a connection the server is closing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from functools import lru_cache
from typing import NamedTuple, cast
from urllib.parse import urlsplit

import httptools

from actors.waiting import Arrivals

IDLE_REUSE = 4.0  # seconds an idle connection is kept for reuse
HIGH_WATER = 256 * 1024  # body bytes buffered before the connection stops reading
MAX_IDLE = 1024  # idle connections kept per origin (each also ends after IDLE_REUSE, or when the server closes it)


class HttpClientError(Exception):
    """The request could not be made, or its answer could not be read."""


class _Target(NamedTuple):
    scheme: str
    host: str
    port: int
    target: str  # path and query, as the request line carries it
    host_header: str


@lru_cache(maxsize=256)
def _split(url: str) -> _Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpClientError(f"Cannot request {url!r}: only http:// and https:// URLs")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(parts.scheme, parts.hostname, port, target, parts.netloc.rpartition("@")[2])


class Response(Arrivals):
    """One answer: status and headers at once, the body as it arrives. Leaving `async with` (or
    `release`) gives the connection back once the body has ended, and closes it otherwise.

    With a `listener`, arrivals (the head, a piece of the body, the end, a failure) call it from the
    connection's callback instead of waking a reader: an answer read whole costs no task. What one
    read of the socket brings calls it once, after the read (the usual answer, head and body in one
    read, calls it once). A listener that sets `listener` to None hands the rest to a reader.
    """

    __slots__ = ("status", "headers", "listener", "_conn", "_read_timeout")

    def __init__(self, conn: _Connection, read_timeout: float | None,
                 listener: Callable[[Response], None] | None = None) -> None:
        super().__init__()
        self.status = 0
        self.headers: dict[str, str] = {}  # names in lower case
        self.listener = listener
        self._conn = conn
        self._read_timeout = read_timeout

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").partition(";")[0].strip().lower()

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it comes. Raises `HttpClientError`, or `TimeoutError` after `read_timeout` of silence."""
        return _Chunks(self)

    async def read(self, limit: int | None = None) -> bytes:
        """The body, or its first `limit` bytes (the rest is not waited for)."""
        body = bytearray()
        async for chunk in self.chunks():
            body += chunk
            if limit is not None and len(body) >= limit:
                return bytes(body[:limit])
        return bytes(body)

    def release(self) -> None:
        self._conn.release(self)

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def _add(self, chunk: bytes) -> None:
        super()._add(chunk)
        if self._size > HIGH_WATER:
            self._conn.pause()

    def _wake(self) -> None:
        if self.listener is None:
            super()._wake()
        elif self._conn.reading:
            self._conn.woke = True  # the listener hears of it once the read is done
        else:
            self.listener(self)



class _Chunks:
    """`Response.chunks`: an iterator, where an async generator would do, because mypyc compiles no
    async generators (setup.py)."""

    __slots__ = ("_resp",)

    def __init__(self, resp: Response) -> None:
        self._resp = resp

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        resp = self._resp
        while True:
            if resp._chunks:
                chunk = resp.take()
                resp._conn.resume()
                return chunk
            if resp._done:
                raise StopAsyncIteration
            if not await resp._wait(resp._read_timeout):
                raise TimeoutError

class _Connection(asyncio.Protocol):
    """One connection, one exchange at a time; the parser's callbacks fill the current response."""

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._response: Response | None = None
        self._framed = False  # the answer says where its body ends (a length, or chunks)
        self._interim = False  # the head being read is a 1xx, not the answer
        self._keep = False
        self._paused = False
        self.reading = False  # in data_received: the response's listener waits for the read's end
        self.woke = False  # something arrived for the listener during this read
        self.closed = False
        self.idle_since = 0.0

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        resp = self._response
        self.reading = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._abort(HttpClientError(f"Cannot read the upstream's answer: {exc}"))
        finally:
            self.reading = False
        if self.woke:
            self.woke = False
            if resp is not None and resp.listener is not None:
                try:
                    resp.listener(resp)
                except Exception as failure:  # as from a parser callback: the answer cannot be had
                    self._abort(HttpClientError(f"Cannot read the upstream's answer: {failure!r}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        resp = self._response
        if resp is not None and not resp._done:
            if resp.status and not self._framed:
                resp._finish()  # a body that runs to the close ends with it
            else:
                resp._fail(HttpClientError(f"The upstream closed the connection mid-answer ({exc!r})" if exc else
                                           "The upstream closed the connection mid-answer"))
        self._pool.forget(self)

    # -- httptools callbacks --

    def on_message_begin(self) -> None:
        if self._response is None:
            raise HttpClientError("The upstream sent an answer no request asked for")

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        assert self._response is not None
        headers = self._response.headers
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
        if key in ("content-length", "transfer-encoding"):
            self._framed = True

    def on_headers_complete(self) -> None:
        assert self._response is not None
        status = self._parser.get_status_code()
        if status < 200:  # an interim answer (103 Early Hints): the answer itself follows
            self._interim, self._framed = True, False
            self._response.headers.clear()
            return
        self._response.status = status
        self._response._wake()  # the head has come

    def on_body(self, body: bytes) -> None:
        assert self._response is not None
        self._response._add(body)

    def on_message_complete(self) -> None:
        resp = self._response
        if resp is None or self._interim:
            self._interim = False
            return
        self._framed = True  # 204 and 304 end without either header
        self._keep = self._parser.should_keep_alive()
        resp._finish()

    # -- the pool's side --

    def start(self, request: bytes, resp: Response) -> None:
        assert self._transport is not None
        self._response, self._framed, self._keep = resp, False, False
        self._transport.write(request)

    async def send(self, request: bytes, resp: Response) -> None:
        self.start(request, resp)
        while resp.status == 0:
            if not await resp._wait(resp._read_timeout):
                raise TimeoutError

    def release(self, resp: Response) -> None:
        if self._response is not resp:
            return
        self._response = None
        if self._paused:
            self.resume()
        if resp._done and self._keep and resp._error is None and not self.closed:
            self.idle_since = time.monotonic()
            self._pool.put_back(self)
        else:
            self.close()

    def pause(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self._transport is not None and not self.closed:
            self._paused = False
            self._transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def _abort(self, error: Exception) -> None:
        if self._response is not None:
            self._response._fail(error)
        if self._transport is not None:
            self._transport.abort()


class _Pool:
    """The idle connections to one origin."""

    def __init__(self, target: _Target, connect_timeout: float) -> None:
        self._target = target
        self._connect_timeout = connect_timeout
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()

    def idle(self) -> _Connection | None:
        """An idle connection still fit to reuse, if there is one."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_REUSE:
                return conn
            conn.close()
        return None

    async def connection(self) -> _Connection:
        if (conn := self.idle()) is not None:
            return conn
        loop = asyncio.get_running_loop()
        target = self._target
        context = ssl.create_default_context() if target.scheme == "https" else None
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(lambda: _Connection(self), target.host, target.port,
                                                       ssl=context)
        except TimeoutError as late:  # first: a TimeoutError is an OSError too
            raise HttpClientError(f"Cannot connect to {target.host}:{target.port} within "
                                  f"{self._connect_timeout:g}s") from late
        except (OSError, ssl.SSLError) as exc:
            raise HttpClientError(f"Cannot connect to {target.host}:{target.port}: {exc}") from exc
        self._open.add(conn)
        return conn

    def put_back(self, conn: _Connection) -> None:
        if len(self._idle) < MAX_IDLE:
            self._idle.append(conn)
        else:
            conn.close()

    def forget(self, conn: _Connection) -> None:
        self._open.discard(conn)
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    def close(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._idle.clear()


class Prepared(NamedTuple):
    """A request's head made once, to send many times: the pool it goes to, and its bytes up to the
    Content-Length (an upstream session's POSTs differ only in their bodies)."""

    pool: _Pool
    head: bytes
    length: bool  # it carries a Content-Length, even for an empty body


class HttpClient:
    """Requests to HTTP upstreams, over pooled keep-alive connections."""

    def __init__(self, *, connect_timeout: float = 5.0) -> None:
        self._connect_timeout = connect_timeout
        self._pools: dict[tuple[str, str, int], _Pool] = {}

    def prepare(self, method: str, url: str, headers: Mapping[str, str] | None = None) -> Prepared:
        """The head of a request to send with `send` or `send_nowait`. Raises `HttpClientError`."""
        target = _split(url)
        key = (target.scheme, target.host, target.port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(target, self._connect_timeout)
        lines = [f"{method} {target.target} HTTP/1.1\r\nHost: {target.host_header}\r\n"]
        for name, value in (headers or {}).items():
            if "\r" in value or "\n" in value:
                raise HttpClientError(f"Cannot send header {name}: its value holds a line break")
            lines.append(f"{name}: {value}\r\n")
        try:
            head = "".join(lines).encode("latin-1")
        except UnicodeEncodeError as exc:
            raise HttpClientError(f"Cannot send a header that is not Latin-1: {exc}") from exc
        return Prepared(pool, head, method in ("POST", "PUT", "PATCH"))

    async def request(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                      body: bytes = b"", read_timeout: float | None = None) -> Response:
        """Send one request; returns once the answer's head has come. The caller reads the body and
        releases the response (`async with`). Raises `HttpClientError`, or `TimeoutError` when the
        server sends nothing for `read_timeout`."""
        return await self.send(self.prepare(method, url, headers), body, read_timeout)

    async def send(self, prepared: Prepared, body: bytes = b"", read_timeout: float | None = None) -> Response:
        """`request` with a head made by `prepare`."""
        conn = await prepared.pool.connection()
        resp = Response(conn, read_timeout)
        try:
            await conn.send(_bytes(prepared, body), resp)
        except BaseException:
            conn.close()
            raise
        return resp

    def send_nowait(self, prepared: Prepared, body: bytes, listener: Callable[[Response], None],
                    read_timeout: float | None = None) -> Response | None:
        """Send at once on an idle connection, if one is at hand (None if not: use `send`). The answer
        calls `listener` as it arrives (see `Response`); `read_timeout` holds only once a reader
        takes over."""
        conn = prepared.pool.idle()
        if conn is None:
            return None
        resp = Response(conn, read_timeout, listener)
        conn.start(_bytes(prepared, body), resp)
        return resp

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        await asyncio.sleep(0)  # let the transports' close callbacks run


def _bytes(prepared: Prepared, body: bytes) -> bytes:
    if body or prepared.length:
        return b"%sContent-Length: %d\r\n\r\n%s" % (prepared.head, len(body), body)
    return prepared.head + b"\r\n"
