"""Per-principal request rate: a token bucket. Sans-IO.

The rate is enforced per gateway: with N gateways behind a load balancer a
principal may make up to N times `rate_limit`; size `rate_limit` for that.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class RateLimiter:
    """A token bucket per key: `rate` tokens a second, at most `burst` saved up.

    Buckets are kept least-recently-used first and the oldest dropped past
    `max_keys`; a bucket idle that long would be full again anyway.
    """

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 100_000) -> None:
        self.rate = rate
        self.enabled = rate > 0  # else `take` always finds a token
        self.burst = float(burst)
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, when)

    def take(self, key: str) -> float:
        """Spend one token of `key`'s bucket: 0.0 if there was one, else the seconds until there is."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        tokens, when = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - when) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)
