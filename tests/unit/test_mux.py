"""The link's frames: what the gateway encodes the node decodes, and a broken frame is refused."""

from __future__ import annotations

import struct

import pytest

from actors import mux


def test_a_request_round_trips_with_its_head_and_body() -> None:
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}'
    [frame] = mux.decode(mux.encode(mux.REQUEST, 7, ["POST", "sid-1", {"X-Tether-Response": "sse"}], body))
    assert (frame.kind, frame.xid, frame.fin) == (mux.REQUEST, 7, False)
    assert frame.head == ["POST", "sid-1", {"X-Tether-Response": "sse"}]
    assert frame.body == body


def test_fin_rides_on_the_kind_and_a_whole_answer_is_one_frame() -> None:
    [frame] = mux.decode(mux.encode(mux.RESPONSE, 2**32 - 1, [200, {"Content-Type": "application/json"}], b"{}",
                                    fin=True))
    assert (frame.kind, frame.xid, frame.fin, frame.body) == (mux.RESPONSE, 2**32 - 1, True, b"{}")
    [data] = mux.decode(mux.encode(mux.DATA, 3, body=b"data: x\n\n"))
    assert (data.kind, data.fin, data.head, data.body) == (mux.DATA, False, None, b"data: x\n\n")
    [cancel] = mux.decode(mux.encode(mux.CANCEL, 3))
    assert (cancel.kind, cancel.body) == (mux.CANCEL, b"")


def test_the_frames_of_one_message_come_out_in_order_with_their_own_bodies() -> None:
    sent = [mux.encode(mux.REQUEST, 1, ["POST", "a", {}], b"first"), mux.encode(mux.CANCEL, 2),
            mux.encode(mux.DATA, 3, body=b"third", fin=True)]
    frames = mux.decode(b"".join(sent))
    assert [(f.kind, f.xid, f.fin, f.body) for f in frames] == [
        (mux.REQUEST, 1, False, b"first"), (mux.CANCEL, 2, False, b""), (mux.DATA, 3, True, b"third")]


@pytest.mark.parametrize(("data", "says"), [
    (b"\x01\x00\x00", "shorter than"),
    (struct.pack("!BIII", 9, 1, 0, 0), "unknown frame kind 9"),
    (struct.pack("!BIII", mux.REQUEST, 1, 50, 0) + b"[]", "overruns"),
    (struct.pack("!BIII", mux.DATA, 1, 0, 10) + b"short", "overruns"),
    (struct.pack("!BIII", mux.RESPONSE, 1, 3, 0) + b"{x]", "not JSON"),
    (struct.pack("!BIII", mux.REQUEST, 1, 2, 0) + b"[]", "malformed head"),
    (struct.pack("!BIII", mux.RESPONSE, 1, 14, 0) + b'["200",{"a":1}]'[:14], "not JSON"),
    (struct.pack("!BIII", mux.RESPONSE, 1, 15, 0) + b'["200",{"a":1}]', "malformed head"),
    (mux.encode(mux.CANCEL, 1) + b"\x04\x00", "shorter than"),  # a whole frame, then half of one
])
def test_a_broken_frame_is_refused_with_what_is_wrong(data: bytes, says: str) -> None:
    with pytest.raises(mux.FrameError, match=says):
        mux.decode(data)
