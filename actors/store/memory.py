"""The in-memory store: the embedded default, one host, no external service."""

from __future__ import annotations

import time
from collections.abc import Callable

from actors.store.base import Membership, NodeRecord, OwnershipRecord
from tether.errors import OwnershipConflict


class MemoryStore:
    """Membership with lazy TTL expiry, and fenced ownership records, in one process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._nodes: dict[str, tuple[NodeRecord, float]] = {}  # node_id -> (record, deadline)
        self._owners: dict[str, OwnershipRecord] = {}
        self._keys_of: dict[str, set[str]] = {}  # node_id -> keys it owns, to drop them when it goes
        self._generation = 0
        # One counter for every grant: per key it still only grows, and it costs no memory per key.
        self._epoch = 0

    def _expire(self) -> None:
        now = self._clock()
        dead = [node_id for node_id, (_, deadline) in self._nodes.items() if deadline <= now]
        for node_id in dead:
            del self._nodes[node_id]
            self._drop_keys_of(node_id)
        if dead:
            self._generation += 1

    async def heartbeat(self, node: NodeRecord, ttl: float) -> None:
        self._expire()
        previous = self._nodes.get(node.node_id)
        self._nodes[node.node_id] = (node, self._clock() + ttl)
        if previous is None or previous[0].accepting != node.accepting or previous[0].url != node.url:
            self._generation += 1

    async def leave(self, node_id: str) -> None:
        if self._nodes.pop(node_id, None) is not None:
            self._generation += 1
        self._drop_keys_of(node_id)

    def _drop_keys_of(self, node_id: str) -> None:
        """A node that is gone owns nothing: its records go with it (no orphans, rule 4)."""
        for key in self._keys_of.pop(node_id, ()):
            record = self._owners.get(key)
            if record is not None and record.node_id == node_id:
                del self._owners[key]

    async def membership(self) -> Membership:
        self._expire()
        nodes = tuple(sorted((record for record, _ in self._nodes.values()), key=lambda n: n.node_id))
        return Membership(self._generation, nodes)

    async def grant(self, key: str, node_id: str) -> OwnershipRecord:
        self._expire()
        current = self._owners.get(key)
        if current is not None and current.node_id in self._nodes and current.node_id != node_id:
            raise OwnershipConflict(f"Cannot grant {key[:8]}... to {node_id}: {current.node_id} owns it")
        self._epoch += 1
        record = OwnershipRecord(key, node_id, self._epoch)
        if current is not None:
            self._keys_of.get(current.node_id, set()).discard(key)
        self._owners[key] = record
        self._keys_of.setdefault(node_id, set()).add(key)
        return record

    async def lookup(self, key: str) -> OwnershipRecord | None:
        return self._owners.get(key)

    async def release(self, record: OwnershipRecord) -> bool:
        if self._owners.get(record.key) == record:
            del self._owners[record.key]
            self._keys_of.get(record.node_id, set()).discard(record.key)
            return True
        return False

    async def close(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._owners)
