"""The `Store` protocol and the records it keeps.

Shaped for both the in-memory store (one host) and Redis (many): membership is
a set of node records that live only while heartbeats renew them; ownership is
one record per session key, granted with an epoch that only ever grows, and
released only by the holder of that epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from tether.errors import QuotaExceeded

QUOTA_RETRY = 5.0  # seconds a principal at its session quota is told to wait


@dataclass(frozen=True)
class NodeRecord:
    """One actor node as the ring sees it."""

    node_id: str
    url: str
    accepting: bool = True
    sessions: int = 0
    incarnation: str = ""  # new each time the node (re)joins; a lapsed incarnation never comes back

    def to_dict(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "url": self.url, "accepting": self.accepting, "sessions": self.sessions,
                "incarnation": self.incarnation}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeRecord:
        return cls(str(data["node_id"]), str(data["url"]), bool(data.get("accepting", True)),
                   int(data.get("sessions", 0)), str(data.get("incarnation", "")))


@dataclass(frozen=True)
class Membership:
    """The live nodes, and a generation that changes whenever the set or their acceptance does."""

    generation: int
    nodes: tuple[NodeRecord, ...]
    store_id: str = ""  # changes when the store lost its data (e.g. Redis restarted empty)
    store_age: float = float("inf")  # seconds since this data set was born

    def by_id(self) -> dict[str, NodeRecord]:
        return {node.node_id: node for node in self.nodes}


@dataclass(frozen=True)
class OwnershipRecord:
    """Who serves a key, fenced by an epoch that grows on every grant."""

    key: str
    node_id: str
    epoch: int
    incarnation: str = ""  # of the owning node when it was granted
    principal: str = ""  # whose session quota it counts against ("" when none is kept)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "node_id": self.node_id, "epoch": self.epoch, "incarnation": self.incarnation,
                "principal": self.principal}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OwnershipRecord:
        return cls(str(data["key"]), str(data["node_id"]), int(data["epoch"]), str(data.get("incarnation", "")),
                   str(data.get("principal", "")))


@dataclass(frozen=True)
class Quota:
    """At most `limit` live keys granted for `principal` (a tag), across every node."""

    principal: str
    limit: int


def quota_exceeded(quota: Quota) -> QuotaExceeded:
    return QuotaExceeded(f"Too Many Requests: this principal already holds {quota.limit} live sessions, its "
                         "limit (max_sessions_per_principal); end one first", retry_after=QUOTA_RETRY, status=429)


class Store(Protocol):
    """Membership and ownership. Implementations raise `StoreError` when unreachable."""

    async def heartbeat(self, node: NodeRecord, ttl: float) -> bool:
        """Add or renew `node` for `ttl` seconds. True if it renewed a registration the store had.

        False means the store did not know this node: new, or the store lost its
        data, in which case the node must `reassert` what it owns. Raises
        `LeaseLost` when this incarnation's lease already lapsed, or a live node
        with another incarnation holds the id.
        """

    async def leave(self, node_id: str, incarnation: str = "") -> None:
        """Remove a node at once (a clean shutdown); its ownership records go with it."""

    async def membership(self) -> Membership:
        """The nodes whose heartbeat has not lapsed. Records of lapsed nodes are removed."""

    async def wait_for_change(self, timeout: float) -> None:
        """Return when membership may have changed, or after `timeout` seconds."""

    async def grant(self, key: str, node_id: str, incarnation: str = "",
                    quota: Quota | None = None) -> OwnershipRecord:
        """Make `node_id` the owner of `key` with a fresh epoch, counted against `quota` if given.

        Raises `OwnershipConflict` if a live node already owns the key, `QuotaExceeded`
        if the quota's principal already holds `limit` live keys.
        """

    async def reassert(self, record: OwnershipRecord) -> bool:
        """Put back a record the store lost, epoch kept. False if another owner holds the key now."""

    async def lookup(self, key: str) -> OwnershipRecord | None:
        """The current owner of `key`, or None."""

    async def release(self, record: OwnershipRecord) -> bool:
        """Delete the record if it is still this owner's at this epoch; True if it was."""

    async def close(self) -> None:
        """Release connections."""
