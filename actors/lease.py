"""Idle leases: when an abandoned session may be ended. Pure decisions, time passed in."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class IdleLease:
    """Tracks the last client activity of one session on a monotonic clock."""

    idle_timeout: float
    last_activity: float

    def touch(self, now: float) -> None:
        if now > self.last_activity:
            self.last_activity = now

    def expired(self, now: float) -> bool:
        return now - self.last_activity >= self.idle_timeout

    def remaining(self, now: float) -> float:
        return max(0.0, self.idle_timeout - (now - self.last_activity))


@dataclass
class NodeLease:
    """A node's membership lease, as the node itself must judge it (rule 1).

    The deadline is measured from *before* a renewal was sent, less a safety
    margin, so the node stops serving before the store could consider the
    lease lapsed and grant its keys to anyone else.
    """

    ttl: float
    deadline: float = 0.0  # monotonic; 0 until the first renewal succeeds

    @property
    def margin(self) -> float:
        return min(1.0, self.ttl / 10)

    def renewed(self, sent_at: float) -> None:
        self.deadline = max(self.deadline, sent_at + self.ttl - self.margin)

    def held(self, now: float) -> bool:
        return now < self.deadline

    def lose(self) -> None:
        self.deadline = 0.0
