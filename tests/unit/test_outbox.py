"""The link's outbox: the frames of one turn of the loop leave in one message, in order; a slow peer
slows writers down; a broken connection is reported to the next writer."""

from __future__ import annotations

import asyncio

import pytest

from actors.outbox import HIGH_WATER, Outbox
from tether.tasks import TaskSet


class Peer:
    """Records each message; `stall` holds sends until `go` is set, as a socket that is full."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.sent = asyncio.Event()
        self.go = asyncio.Event()
        self.go.set()
        self.fail = False

    async def send(self, data: bytes) -> None:
        if self.fail:
            raise ConnectionResetError("the peer went away")
        self.messages.append(data)
        self.sent.set()
        await self.go.wait()


async def _until_sent(peer: Peer, count: int) -> None:
    async with asyncio.timeout(5):
        while len(peer.messages) < count:
            peer.sent.clear()
            await peer.sent.wait()


async def _turns(count: int) -> None:
    """Let the loop run `count` turns: a count of steps, not a time."""
    for _ in range(count):
        await asyncio.sleep(0)


async def test_frames_of_one_turn_leave_in_one_message_in_order() -> None:
    peer, tasks = Peer(), TaskSet("test")
    outbox = Outbox(peer.send)
    tasks.spawn(outbox.run(), "writer")
    for frame in (b"a", b"b", b"c"):
        outbox.post(frame)
    await _until_sent(peer, 1)
    outbox.post(b"d")  # a later turn: a message of its own
    await _until_sent(peer, 2)
    assert peer.messages == [b"abc", b"d"]
    await tasks.close()


async def test_a_writer_over_the_high_water_mark_waits_until_the_peer_takes_it() -> None:
    peer, tasks = Peer(), TaskSet("test")
    peer.go.clear()  # the peer's socket is full: the first send does not return
    outbox = Outbox(peer.send)
    tasks.spawn(outbox.run(), "writer")
    await outbox.put(b"x")
    await _until_sent(peer, 1)
    big = tasks.spawn(outbox.put(b"y" * (HIGH_WATER + 1)), "big")
    await _turns(3)
    assert not big.done()  # held: over the mark while the peer is stuck
    peer.go.set()
    async with asyncio.timeout(5):
        await big
    await _until_sent(peer, 2)
    assert peer.messages[1] == b"y" * (HIGH_WATER + 1)
    await tasks.close()


async def test_after_a_failed_send_the_next_writer_gets_connection_error() -> None:
    peer, tasks = Peer(), TaskSet("test")
    peer.fail = True
    outbox = Outbox(peer.send)
    writer = tasks.spawn(outbox.run(), "writer")
    outbox.post(b"lost")
    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(5):
            await writer
    with pytest.raises(ConnectionError):
        outbox.post(b"next")
    await tasks.close()
