"""Idle leases: when an abandoned session may be ended. Pure decisions, time passed in."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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


def reap_idle(leases: Iterable[tuple[str, IdleLease]], now: float) -> Iterator[str]:
    """The keys whose lease has run out at `now`."""
    return (key for key, lease in leases if lease.expired(now))
