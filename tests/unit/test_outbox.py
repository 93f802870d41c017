"""Client streams are bounded: a reader that stalls cannot make a node hold messages without limit."""

from __future__ import annotations

from actors.session import Outbox


def note(n: int) -> dict[str, object]:
    return {"jsonrpc": "2.0", "method": "notifications/message", "params": {"n": n}}


def test_notifications_past_the_limit_are_dropped_and_counted() -> None:
    dropped: list[int] = []
    box = Outbox(limit=3, on_dropped=dropped.append)
    for n in range(5):
        box.put(note(n))
    assert box.queue.qsize() == 3
    assert len(dropped) == 2


def test_responses_are_never_dropped() -> None:
    box = Outbox(limit=1, expected=2)
    box.put(note(0))
    box.put({"jsonrpc": "2.0", "id": 1, "result": {}})
    box.put({"jsonrpc": "2.0", "id": 2, "result": {}})
    assert [box.queue.get_nowait() for _ in range(3)][1:] == [
        {"jsonrpc": "2.0", "id": 1, "result": {}}, {"jsonrpc": "2.0", "id": 2, "result": {}}]


def test_a_closed_outbox_takes_nothing_more() -> None:
    box = Outbox(limit=5)
    box.close()
    box.put(note(1))
    assert box.queue.get_nowait() is None and box.queue.empty()
