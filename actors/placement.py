"""The placement API the gateway routes with.

New sessions are placed by the ring; once placed, the ownership record routes
them (cached here, so a stable ring with a warm cache costs no store call).
The ring is rebuilt off the request path, when the membership generation moves.
"""

from __future__ import annotations

from actors.ring import Ring
from actors.store.base import Membership, NodeRecord, OwnershipRecord, Store
from tether.errors import SessionNotFound


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

    def __init__(self, store: Store, cache_size: int = 100_000) -> None:
        self.store = store
        self.ring = Ring()
        self.members: dict[str, NodeRecord] = {}
        self.cache = RouteCache(cache_size)
        self.cache_hits = 0
        self.cache_misses = 0
        self._generation = -1

    async def refresh(self) -> bool:
        """Re-read membership; rebuild the ring if it changed. True if it did."""
        return self.apply(await self.store.membership())

    def apply(self, membership: Membership) -> bool:
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

    async def locate(self, key: str) -> tuple[OwnershipRecord, NodeRecord]:
        """The owner of a live session. Raises `SessionNotFound` if it has none that lives."""
        record = self.cache.get(key)
        if record is None:
            self.cache_misses += 1
            record = await self.store.lookup(key)
            if record is None:
                raise SessionNotFound("Session not found")
            self.cache.put(record)
        else:
            self.cache_hits += 1
        node = self.members.get(record.node_id)
        if node is None:
            self.cache.drop(key)
            raise SessionNotFound("Session not found: its node is gone")
        return record, node
