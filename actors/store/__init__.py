"""Where membership and ownership live: one protocol, several implementations."""

from actors.store.base import Membership, NodeRecord, OwnershipRecord, Store
from actors.store.memory import MemoryStore

__all__ = ["Membership", "MemoryStore", "NodeRecord", "OwnershipRecord", "Store"]
