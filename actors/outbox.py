"""Frames that leave together: a link connection's writes, one WebSocket message per turn of the loop.

A gateway under load sends a node many requests in one turn of its event loop
(every client whose bytes came in the same poll), and a node answers many in
one turn. Each WebSocket message costs a send() here and a wake-up and a read
on the other side; the profile put a fifth of the gateway's CPU in those
sends. An `Outbox` joins the frames put in one turn into one message (the
`actors.mux` format allows many frames a message), written by one task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

HIGH_WATER = 256 * 1024  # bytes waiting to be sent before `put` waits for them to leave


class Outbox:
    """The frames waiting to go out on one connection, and the loop that sends them."""

    __slots__ = ("_send", "_frames", "_size", "_waiter", "_drained", "_broken")

    def __init__(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        self._send = send  # sends one binary WebSocket message
        self._frames: list[bytes] = []
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None  # the sender's, while there is nothing to send
        self._drained: asyncio.Future[None] | None = None  # `put`'s, while over HIGH_WATER
        self._broken: ConnectionError | None = None

    def post(self, frame: bytes) -> None:
        """Queue `frame` to leave with the others of this turn. Raises ConnectionError once the
        connection has failed."""
        if self._broken is not None:
            raise self._broken
        self._frames.append(frame)
        self._size += len(frame)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def put(self, frame: bytes) -> None:
        """`post`, then wait while more than HIGH_WATER bytes are still to be sent (a peer that reads
        slowly slows the writers down rather than growing this list)."""
        self.post(frame)
        if self._size > HIGH_WATER:
            if self._drained is None:
                self._drained = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._drained)  # shared by every waiting writer

    async def run(self) -> None:
        """Send what is posted, all of a turn's frames in one message, until sending fails (raises
        ConnectionError) or the task is cancelled; frames posted after that raise in `post`."""
        try:
            while True:
                if not self._frames:
                    self._waiter = asyncio.get_running_loop().create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
                frames, self._frames, self._size = self._frames, [], 0
                await self._send(frames[0] if len(frames) == 1 else b"".join(frames))
                self._release()
        except BaseException as exc:
            self._broken = exc if isinstance(exc, ConnectionError) else ConnectionResetError("the link is closed")
            self._release()  # its writers go on, and fail at their next `post`
            raise

    def _release(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)
