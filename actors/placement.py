"""The placement API the gateway routes with.

New sessions are placed by the ring; once placed, the ownership record routes
them (cached here, so a stable ring with a warm cache costs no store call).
The ring is rebuilt off the request path, when the membership generation moves.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from actors.ring import Ring
from actors.store.base import Membership, NodeRecord, OwnershipRecord, Store
from tether.errors import Overloaded, SessionNotFound, StoreError


class RouteCache:
    """Bounded key -> ownership cache; the oldest entry goes first when full."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._routes: dict[str, OwnershipRecord] = {}

    def get(self, key: str) -> OwnershipRecord | None:
        return self._routes.get(key)

    def put(self, record: OwnershipRecord) -> None:
        if len(self._routes) >= self._size and record.key not in self._routes:
            del self._routes[next(iter(self._routes))]
        self._routes[record.key] = record

    def drop(self, key: str) -> None:
        self._routes.pop(key, None)

    def __len__(self) -> int:
        return len(self._routes)


class Placement:
    """Where a key lives now, and where a new one should go."""

    def __init__(self, store: Store, cache_size: int = 100_000, *, stale_after: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.stale_after = stale_after  # membership older than this is not trusted to route
        self.clock = clock
        self.read_at = -float("inf")
        self.store_id = ""
        self.recovering_until = -float("inf")  # after a store reset: unknown owners are 503, not 404
        self.young_until = -float("inf")  # a store younger than a lease: named sessions wait
        self.ring = Ring()
        self.members: dict[str, NodeRecord] = {}
        self.cache = RouteCache(cache_size)
        self.cache_hits = 0
        self.cache_misses = 0
        self._generation = -1

    async def refresh(self) -> bool:
        """Re-read membership; rebuild the ring if it changed. True if it did. Raises `StoreError`."""
        changed = self.apply(await self.store.membership())
        self.read_at = self.clock()
        return changed

    @property
    def fresh(self) -> bool:
        """The store confirmed this view of membership within `stale_after`."""
        return self.clock() - self.read_at <= self.stale_after

    def check_fresh(self) -> None:
        """Refuse to route on a view of membership the store has not confirmed lately (503)."""
        if not self.fresh:
            raise Overloaded("Service Unavailable: the store cannot be reached to confirm session owners",
                             retry_after=1.0)

    def apply(self, membership: Membership) -> bool:
        if self.store_id and membership.store_id != self.store_id:
            # The store lost its data: give nodes a lease TTL to re-register and re-assert before
            # a missing record or owner is taken to mean the session ended.
            self.recovering_until = self.clock() + self.stale_after
        if membership.store_age < self.stale_after:
            # Perhaps reset before this gateway started: a named session's old owner may not have
            # re-asserted it yet, so activating it elsewhere now could make two owners.
            self.young_until = self.clock() + self.stale_after - membership.store_age
        self.store_id = membership.store_id
        self.members = membership.by_id()
        if membership.generation == self._generation:
            return False
        self._generation = membership.generation
        accepting = [n.node_id for n in membership.nodes if n.accepting]
        self.ring = Ring(accepting, generation=membership.generation)
        return True

    def candidates(self, key: str) -> list[NodeRecord]:
        """Accepting nodes in the order a new session with `key` should try them."""
        return [self.members[n] for n in self.ring.preference(key) if n in self.members]

    def remember(self, record: OwnershipRecord) -> None:
        self.cache.put(record)

    def forget(self, key: str) -> None:
        self.cache.drop(key)

    def known(self, key: str) -> NodeRecord | None:
        """The owner of a live session when the route cache holds it and fresh membership confirms it:
        no store call, no wait. None otherwise; `locate` then finds out."""
        record = self.cache.get(key)
        if record is None or self.clock() - self.read_at > self.stale_after:  # not `fresh`: one call fewer
            return None
        node = self.members.get(record.node_id)
        if node is None or (record.incarnation and node.incarnation != record.incarnation):
            return None
        self.cache_hits += 1
        return node

    async def locate(self, key: str) -> tuple[OwnershipRecord, NodeRecord]:
        """The owner of a live session. Raises `SessionNotFound` if it has none that lives,
        `Overloaded` if the store cannot confirm it."""
        self.check_fresh()
        record = self.cache.get(key)
        if record is None:
            self.cache_misses += 1
            try:
                record = await self.store.lookup(key)
            except StoreError as exc:
                raise Overloaded(f"Service Unavailable: {exc.message}", retry_after=1.0) from exc
            if record is None:
                self._not_found_unless_recovering()
                raise SessionNotFound("Session not found")
            self.cache.put(record)
        else:
            self.cache_hits += 1
        node = self.members.get(record.node_id)
        if node is None:  # a node we have not heard of yet, or one that is gone: ask once more
            try:
                await self.refresh()
            except StoreError as exc:
                raise Overloaded(f"Service Unavailable: {exc.message}", retry_after=1.0) from exc
            node = self.members.get(record.node_id)
        if node is None or (record.incarnation and node.incarnation != record.incarnation):
            self.cache.drop(key)  # its owner is gone, or came back as someone new: the session ended
            self._not_found_unless_recovering()
            raise SessionNotFound("Session not found: its node is gone")
        return record, node

    @property
    def recovering(self) -> bool:
        return self.clock() < self.recovering_until

    @property
    def settling(self) -> bool:
        """Not yet safe to activate a named session: the store was reset, or is younger than a lease."""
        return self.recovering or self.clock() < self.young_until

    def _not_found_unless_recovering(self) -> None:
        if self.recovering:
            raise Overloaded("Service Unavailable: the store is recovering; nodes are re-registering",
                             retry_after=1.0)
