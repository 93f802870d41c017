"""Session ids, idle leases and upstream message routing: pure functions, time passed by hand."""

from __future__ import annotations

import string

from actors.ids import is_named, is_valid_session_id, is_visible_ascii, mint_session_id, session_id_for_key
from actors.lease import IdleLease, NodeLease
from actors.mcp import GET_STREAM, Destination, progress_token, route_upstream


def test_minted_ids_are_long_random_visible_ascii() -> None:
    ids = {mint_session_id() for _ in range(1000)}
    assert len(ids) == 1000
    for sid in ids:
        assert len(sid) == 32  # 24 bytes = 192 bits, base64url
        assert set(sid) <= set(string.ascii_letters + string.digits + "-_")
        assert is_valid_session_id(sid) and is_visible_ascii(sid)


def test_foreign_ids_are_recognised() -> None:
    assert not is_valid_session_id("short")
    assert not is_valid_session_id("A" * 31 + "!")
    assert not is_visible_ascii("has space")
    assert not is_visible_ascii("tab\there")
    assert is_visible_ascii("!~")


def test_idle_lease_expires_only_after_the_timeout_without_activity() -> None:
    lease = IdleLease(idle_timeout=10.0, last_activity=100.0)
    assert not lease.expired(109.9)
    lease.touch(105.0)
    assert not lease.expired(114.9)
    assert lease.remaining(112.0) == 3.0
    assert lease.expired(115.0)
    lease.touch(90.0)  # a clock that goes back does not move the lease back
    assert lease.last_activity == 105.0


def test_upstream_messages_are_routed_to_exactly_one_stream() -> None:
    pending = {1: object(), "x": object()}
    tokens = {"tok": 1}
    assert route_upstream({"jsonrpc": "2.0", "id": 1, "result": {}}, pending, tokens) == Destination(1, True)
    assert route_upstream({"jsonrpc": "2.0", "id": 9, "result": {}}, pending, tokens) == GET_STREAM
    progress = {"jsonrpc": "2.0", "method": "notifications/progress",
                "params": {"progressToken": "tok", "progress": 1}}
    assert route_upstream(progress, pending, tokens) == Destination(1)
    stray = {**progress, "params": {"progressToken": "other", "progress": 1}}
    assert route_upstream(stray, pending, tokens) == GET_STREAM
    cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "x"}}
    assert route_upstream(cancel, pending, tokens) == Destination("x")
    sampling = {"jsonrpc": "2.0", "id": 0, "method": "sampling/createMessage", "params": {}}
    assert route_upstream(sampling, pending, tokens) == GET_STREAM
    assert route_upstream({"jsonrpc": "2.0", "id": [1], "result": {}}, pending, tokens) == GET_STREAM


def test_progress_token_is_read_from_meta() -> None:
    assert progress_token({"params": {"_meta": {"progressToken": 7}}}) == 7
    assert progress_token({"params": {}}) is None
    assert progress_token({}) is None


def test_node_lease_counts_from_before_the_renewal_was_sent() -> None:
    lease = NodeLease(ttl=10.0)
    assert not lease.held(0.0)  # nothing is held before the first renewal
    lease.renewed(sent_at=100.0)  # the store answered later; the clock started when we asked
    assert lease.held(108.9)
    assert not lease.held(109.0)  # 1 s of margin before the store's own deadline at 110
    lease.renewed(sent_at=95.0)  # a late answer to an older renewal never shortens the lease
    assert lease.deadline == 109.0
    lease.lose()
    assert not lease.held(101.0)
    assert NodeLease(ttl=3.0).margin == 0.3


def test_named_session_ids_are_stable_secret_keyed_and_distinct_from_minted() -> None:
    first = session_id_for_key("workspace-1", "secret")
    assert first == session_id_for_key("workspace-1", "secret")
    assert first != session_id_for_key("workspace-2", "secret")
    assert first != session_id_for_key("workspace-1", "another secret")
    assert is_named(first) and is_valid_session_id(first) and len(first) == 40
    assert not is_named(mint_session_id())
