"""The link's frames: what the gateway encodes the node decodes, and a broken frame is refused."""

from __future__ import annotations

import struct

import pytest

from actors import mux


def test_a_request_round_trips_with_its_head_and_body() -> None:
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}'
    frame = mux.decode(mux.encode(mux.REQUEST, 7, ["POST", "sid-1", {"X-Tether-Response": "sse"}], body))
    assert (frame.kind, frame.xid, frame.fin) == (mux.REQUEST, 7, False)
    assert frame.head == ["POST", "sid-1", {"X-Tether-Response": "sse"}]
    assert frame.body == body


def test_fin_rides_on_the_kind_and_a_whole_answer_is_one_frame() -> None:
    frame = mux.decode(mux.encode(mux.RESPONSE, 2**32 - 1, [200, {"Content-Type": "application/json"}], b"{}",
                                  fin=True))
    assert (frame.kind, frame.xid, frame.fin, frame.body) == (mux.RESPONSE, 2**32 - 1, True, b"{}")
    data = mux.decode(mux.encode(mux.DATA, 3, body=b"data: x\n\n"))
    assert (data.kind, data.fin, data.head, data.body) == (mux.DATA, False, None, b"data: x\n\n")
    cancel = mux.decode(mux.encode(mux.CANCEL, 3))
    assert (cancel.kind, cancel.body) == (mux.CANCEL, b"")


@pytest.mark.parametrize(("data", "says"), [
    (b"\x01\x00\x00", "shorter than"),
    (struct.pack("!BII", 9, 1, 0), "unknown frame kind 9"),
    (struct.pack("!BII", mux.REQUEST, 1, 50) + b"[]", "overruns"),
    (struct.pack("!BII", mux.RESPONSE, 1, 3) + b"{x]", "not JSON"),
    (struct.pack("!BII", mux.REQUEST, 1, 2) + b"[]", "malformed head"),
    (struct.pack("!BII", mux.RESPONSE, 1, 14) + b'["200",{"a":1}]'[:14], "not JSON"),
    (struct.pack("!BII", mux.RESPONSE, 1, 15) + b'["200",{"a":1}]', "malformed head"),
])
def test_a_broken_frame_is_refused_with_what_is_wrong(data: bytes, says: str) -> None:
    with pytest.raises(mux.FrameError, match=says):
        mux.decode(data)
