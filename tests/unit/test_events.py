"""The event log and SSE framing: ids, bounded replay, gaps refused. No event loop."""

from __future__ import annotations

import pytest

from actors.events import EventId, EventLog
from actors.sse import Event, Parser, event, priming
from tether.errors import BadRequest, CursorExpired


def msg(n: int) -> dict[str, object]:
    return {"jsonrpc": "2.0", "method": "notifications/message", "params": {"n": n}}


def test_ids_name_their_stream_and_count_from_one() -> None:
    log = EventLog(10)
    post = log.open()
    get = log.get_stream()
    ids = [str(EventId(stream.stream, log.append(stream, msg(n)))) for n, stream in enumerate((post, get, post))]
    assert ids == ["1-1", "0-1", "1-2"]
    assert log.open().stream == 2  # every POST stream gets a number of its own


def test_resume_replays_only_that_streams_later_events_in_order() -> None:
    log = EventLog(10)
    a, b = log.open(), log.open()
    for n in range(1, 5):
        log.append(a, msg(n))
        log.append(b, msg(100 + n))
    stream, events = log.resume(EventId.parse("1-2"))
    assert stream is a
    assert [m["params"]["n"] for _, m in events] == [3, 4]
    assert log.resume(EventId(1, 4))[1] == []  # up to date: nothing again


def test_an_undecided_answer_is_outside_the_bound_until_it_becomes_a_stream() -> None:
    log = EventLog(3)
    kept = log.open()
    log.append(kept, msg(1))
    auto = log.open(undecided=True)
    log.append(auto, msg(2))
    log.append(auto, msg(3))
    assert log.size == 1  # not counted: it may still leave as a JSON body and be forgotten
    log.log_stream(auto)  # something came before its answer: it streams, resumably
    assert log.size == 3 and auto.logged and not auto.undecided
    log.append(auto, msg(4))  # over the bound: the oldest event goes
    assert log.size == 3 and kept.evicted_through == 1
    assert [m["params"]["n"] for _, m in log.resume(EventId(auto.stream, 1))[1]] == [3, 4]


def test_a_forgotten_undecided_answer_leaves_nothing_behind() -> None:
    log = EventLog(3)
    auto = log.open(undecided=True)
    log.append(auto, msg(1))
    log.finish(auto)
    log.discard(auto)
    assert auto.stream not in log.streams and log.size == 0


def test_a_cursor_past_the_bound_is_refused_never_short() -> None:
    log = EventLog(3)
    a, b = log.open(), log.open()
    log.append(a, msg(1))
    log.append(a, msg(2))
    for n in range(3):
        log.append(b, msg(n))  # pushes both of a's events out
    with pytest.raises(CursorExpired) as caught:
        log.resume(EventId(1, 1))
    assert caught.value.status == 410
    assert "1-1" in caught.value.message
    assert log.resume(EventId(2, 0))[1] != []  # b's cursor is still whole


def test_a_finished_stream_is_forgotten_once_its_events_are_gone() -> None:
    log = EventLog(2)
    a, b = log.open(), log.open()
    log.append(a, msg(1))
    log.finish(a)
    assert 1 in log.streams  # its answer can still be replayed
    log.append(b, msg(2))
    log.append(b, msg(3))
    assert 1 not in log.streams
    with pytest.raises(CursorExpired):
        log.resume(EventId(1, 0))


def test_json_answers_are_never_counted_or_replayed() -> None:
    log = EventLog(1)
    json_answer = log.open(logged=False)
    log.append(json_answer, msg(1))
    log.append(json_answer, msg(2))
    assert log.size == 0 and log.lost == 0
    with pytest.raises(BadRequest):
        log.resume(EventId(json_answer.stream, 0))


def test_lost_counts_only_events_no_reader_had() -> None:
    log = EventLog(1)
    get = log.get_stream()
    log.append(get, msg(1))
    get.delivered = 1
    log.append(get, msg(2))  # pushes out 1, which a reader had
    log.append(get, msg(3))  # pushes out 2, which nobody had
    assert log.lost == 1


@pytest.mark.parametrize("text", ["", "x", "1-", "-1", "1-2-3", "a-1", "9" * 50])
def test_bad_cursors_are_bad_requests(text: str) -> None:
    log = EventLog(5)
    with pytest.raises(BadRequest):
        log.resume(EventId.parse(text))


def test_cursors_for_unknown_or_future_events_are_bad_requests() -> None:
    log = EventLog(5)
    log.append(log.get_stream(), msg(1))
    with pytest.raises(BadRequest, match="names no stream"):
        log.resume(EventId(7, 0))
    with pytest.raises(BadRequest, match="ahead of the stream"):
        log.resume(EventId(0, 5))
    assert EventId.parse("3", default_stream=0) == EventId(0, 3)  # a WebSocket client's message count


def test_parser_reads_what_the_framing_writes_in_any_chunking() -> None:
    wire = priming("4-0", 1500) + event(msg(1), event_id="4-1") + b": ping\n\n" + event(msg(2), event_id="4-2")
    for size in (1, 3, 7, len(wire)):
        parser = Parser()
        found: list[Event] = []
        for i in range(0, len(wire), size):
            found += parser.feed(wire[i:i + size])
        assert [(e.id, e.data[:8]) for e in found] == [("4-0", ""), ("4-1", '{"jsonrp'), ("4-2", '{"jsonrp')]
        assert found[0].retry == 1500
        assert parser.last_id == "4-2"


def test_parser_joins_data_lines_and_bounds_an_event() -> None:
    parser = Parser(max_event_bytes=64)
    assert parser.feed(b"event: endpoint\r\ndata: /messages\r\ndata: ?x=1\r\n\r\n") == [
        Event("/messages\n?x=1", "endpoint")]
    with pytest.raises(ValueError, match="over 64 bytes"):
        parser.feed(b"data: " + b"x" * 100)
