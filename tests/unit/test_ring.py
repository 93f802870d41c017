from __future__ import annotations

import secrets
from collections import Counter

import pytest

from actors.ring import POINTS_PER_NODE, Ring

IDS = [secrets.token_urlsafe(24) for _ in range(10_000)]


@pytest.mark.parametrize("count", [2, 5])
def test_placement_is_within_15_percent_of_even(count: int) -> None:
    ring = Ring([f"node-{i}" for i in range(count)])
    spread = Counter(ring.owner(key) for key in IDS)
    even = len(IDS) / count
    assert set(spread) == ring.nodes
    assert all(abs(n - even) / even <= 0.15 for n in spread.values()), spread


@pytest.mark.parametrize("count", [2, 4])
def test_adding_a_node_moves_about_one_nth_of_placements(count: int) -> None:
    before = Ring([f"node-{i}" for i in range(count)])
    after = before.with_nodes([*before.nodes, "node-new"], generation=1)
    moved = [key for key in IDS if before.owner(key) != after.owner(key)]
    share = len(moved) / len(IDS)
    expected = 1 / (count + 1)
    assert abs(share - expected) <= 0.05, share
    assert all(after.owner(key) == "node-new" for key in moved)  # keys only ever move to the newcomer


def test_preference_starts_at_the_owner_and_names_each_node_once() -> None:
    ring = Ring(["a", "b", "c"])
    for key in IDS[:200]:
        order = list(ring.preference(key))
        assert order[0] == ring.owner(key)
        assert sorted(order) == ["a", "b", "c"]


def test_empty_ring_places_nothing() -> None:
    assert Ring().owner("x") is None
    assert list(Ring().preference("x")) == []


def test_ring_refuses_too_few_points() -> None:
    with pytest.raises(ValueError, match=f">= {POINTS_PER_NODE}"):
        Ring(["a"], points=10)


def test_placement_depends_only_on_node_identity() -> None:
    assert [Ring(["b", "a"]).owner(k) for k in IDS[:100]] == [Ring(["a", "b"]).owner(k) for k in IDS[:100]]
    assert repr(Ring(["b", "a"], generation=3)) == "Ring(generation=3, nodes=['a', 'b'])"
