"""The in-memory store: the embedded default, one host, no external service."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable

from actors.store.base import Membership, NodeRecord, OwnershipRecord, Quota, quota_exceeded
from tether.errors import LeaseLost, OwnershipConflict


class MemoryStore:
    """Membership with lazy TTL expiry, and fenced ownership records, in one process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._nodes: dict[str, tuple[NodeRecord, float]] = {}  # node_id -> (record, deadline)
        self._owners: dict[str, OwnershipRecord] = {}
        self._keys_of: dict[str, set[str]] = {}  # node_id -> keys it owns, to drop them when it goes
        self._keys_for: dict[str, set[str]] = {}  # principal -> keys granted under a quota
        self._generation = 0
        # One counter for every grant: per key it still only grows, and it costs no memory per key.
        self._epoch = 0
        self._changed: asyncio.Event | None = None
        self.store_id = secrets.token_hex(8)
        self._lapsed: dict[str, float] = {}  # incarnations that lapsed or left -> when; they never return

    def _bump(self) -> None:
        self._generation += 1
        if self._changed is not None:
            self._changed.set()

    def _expire(self) -> None:
        now = self._clock()
        dead = [node_id for node_id, (_, deadline) in self._nodes.items() if deadline <= now]
        for node_id in dead:
            self._retire(self._nodes.pop(node_id)[0].incarnation, now)
            self._drop_keys_of(node_id)
        if dead:
            self._bump()

    def _retire(self, incarnation: str, now: float) -> None:
        if incarnation:
            self._lapsed[incarnation] = now
        for old in [i for i, when in self._lapsed.items() if when < now - 3600]:
            del self._lapsed[old]

    async def heartbeat(self, node: NodeRecord, ttl: float) -> bool:
        now = self._clock()
        if node.incarnation in self._lapsed:
            raise LeaseLost(f"Cannot renew {node.node_id}: its lease lapsed; rejoin as a new incarnation")
        entry = self._nodes.get(node.node_id)
        if entry is not None:
            previous, deadline = entry
            if deadline > now and previous.incarnation != node.incarnation:
                raise LeaseLost(f"Cannot renew {node.node_id}: a live node holds this id")
            if deadline <= now and previous.incarnation == node.incarnation:
                raise LeaseLost(f"Cannot renew {node.node_id}: its lease lapsed; rejoin as a new incarnation")
        self._expire()
        previous_record = self._nodes.get(node.node_id, (None, 0.0))[0]
        self._nodes[node.node_id] = (node, now + ttl)
        if previous_record is None or (previous_record.accepting, previous_record.url) != (node.accepting, node.url):
            self._bump()
        return previous_record is not None

    async def leave(self, node_id: str, incarnation: str = "") -> None:
        entry = self._nodes.get(node_id)
        if entry is not None and incarnation and entry[0].incarnation != incarnation:
            return
        if (gone := self._nodes.pop(node_id, None)) is not None:
            self._retire(gone[0].incarnation, self._clock())
            self._bump()
        self._drop_keys_of(node_id)

    async def wait_for_change(self, timeout: float) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        self._changed.clear()

    def _drop_keys_of(self, node_id: str) -> None:
        """A node that is gone owns nothing: its records go with it (no orphans, rule 4)."""
        for key in self._keys_of.pop(node_id, ()):
            record = self._owners.get(key)
            if record is not None and record.node_id == node_id:
                del self._owners[key]
                self._unquota(record)

    async def membership(self) -> Membership:
        self._expire()
        nodes = tuple(sorted((record for record, _ in self._nodes.values()), key=lambda n: n.node_id))
        # No store_age: an in-process store is born with its gateway, so there is nothing to wait for.
        return Membership(self._generation, nodes, self.store_id)

    async def grant(self, key: str, node_id: str, incarnation: str = "",
                    quota: Quota | None = None) -> OwnershipRecord:
        self._expire()
        current = self._owners.get(key)
        holder = self._nodes.get(current.node_id) if current is not None else None
        if current is not None and holder is not None and holder[0].incarnation == current.incarnation:
            raise OwnershipConflict(f"Cannot grant {key[:8]}... to {node_id}: {current.node_id} owns it")
        if quota is not None:
            held = self._keys_for.setdefault(quota.principal, set())
            held -= {k for k in held if k not in self._owners or k == key}  # keys whose owner died
            if len(held) >= quota.limit:
                raise quota_exceeded(quota)
            held.add(key)
        self._epoch += 1
        record = OwnershipRecord(key, node_id, self._epoch, incarnation, quota.principal if quota else "")
        if current is not None:
            self._keys_of.get(current.node_id, set()).discard(key)
        self._owners[key] = record
        self._keys_of.setdefault(node_id, set()).add(key)
        return record

    async def reassert(self, record: OwnershipRecord) -> bool:
        current = self._owners.get(record.key)
        if current is not None:
            return (current.node_id, current.incarnation) == (record.node_id, record.incarnation)
        self._owners[record.key] = record
        self._keys_of.setdefault(record.node_id, set()).add(record.key)
        self._epoch = max(self._epoch, record.epoch)
        return True

    async def lookup(self, key: str) -> OwnershipRecord | None:
        return self._owners.get(key)

    async def release(self, record: OwnershipRecord) -> bool:
        if self._owners.get(record.key) == record:
            del self._owners[record.key]
            self._keys_of.get(record.node_id, set()).discard(record.key)
            self._unquota(record)
            return True
        return False

    def _unquota(self, record: OwnershipRecord) -> None:
        held = self._keys_for.get(record.principal)
        if held is not None:
            held.discard(record.key)
            if not held:
                del self._keys_for[record.principal]

    async def close(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._owners)
