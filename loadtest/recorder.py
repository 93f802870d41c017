"""What a run saw, as numbers: latencies in HDR histograms (the whole run and each second),
errors and violations by kind, sessions active over time, and scenario counters.

No I/O and no clock of its own: every call says when (`now`, seconds since the run began),
so the same events always give the same summary.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

MICROS = 1_000_000  # histograms count microseconds
HIGHEST = 3600 * MICROS  # an hour: anything slower is recorded as an hour
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
EXAMPLES = 20  # violations kept with their details, to show what went wrong


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, HIGHEST, 3)


def percentile_key(p: float) -> str:
    return f"p{p:g}"


@dataclass
class Second:
    """One second of the run."""

    requests: int = 0
    errors: int = 0
    violations: int = 0
    sessions: int = 0
    latency: HdrHistogram = field(default_factory=new_histogram)


class Recorder:
    def __init__(self) -> None:
        self.latency = new_histogram()
        self.seconds: dict[int, Second] = {}
        self.errors: Counter[str] = Counter()
        self.violations: Counter[str] = Counter()
        self.examples: list[dict[str, Any]] = []
        self.answered_wrong = 0
        self.losses: list[float] = []  # when sessions were found gone (404 or a closed socket)
        self.violation_times: list[tuple[float, str]] = []
        self.counters: Counter[str] = Counter()
        self.sessions_active = 0
        self.sessions_peak = 0
        self.events: list[dict[str, Any]] = []  # marks on the timeline: a node added, drained, killed

    def _second(self, now: float) -> Second:
        second = self.seconds.setdefault(int(now), Second())
        second.sessions = max(second.sessions, self.sessions_active)
        return second

    def ok(self, now: float, latency: float) -> None:
        """A request answered as it should have been, `latency` seconds after it was due."""
        micros = min(HIGHEST, max(1, round(latency * MICROS)))
        self.latency.record_value(micros)
        second = self._second(now)
        second.requests += 1
        second.latency.record_value(micros)

    def error(self, now: float, kind: str) -> None:
        """A request that failed: no answer, or an answer that is an error (a status, a JSON-RPC code)."""
        self.errors[kind] += 1
        second = self._second(now)
        second.requests += 1
        second.errors += 1

    def violation(self, now: float, kind: str, detail: str) -> None:
        """An answer that breaks what the session must see: another session's state, a lost event."""
        self.violations[kind] += 1
        self.violation_times.append((now, kind))
        self._second(now).violations += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append({"at": round(now, 3), "kind": kind, "detail": detail})

    def wrong_answer(self, now: float, kind: str, detail: str) -> None:
        """A request answered, but not as this session must see it: a violation, and a request."""
        self.answered_wrong += 1
        self._second(now).requests += 1
        self.violation(now, kind, detail)

    def session_opened(self, now: float) -> None:
        self.sessions_active += 1
        self.sessions_peak = max(self.sessions_peak, self.sessions_active)
        self._second(now)

    def session_closed(self, now: float) -> None:
        self.sessions_active -= 1
        self._second(now)

    def sessions_seen(self, now: float, active: int) -> None:
        """The target's own count of live sessions (churn reads it from the target's metrics)."""
        self.sessions_active = active
        self.sessions_peak = max(self.sessions_peak, active)
        self._second(now)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def mark(self, now: float, event: str, **detail: Any) -> None:
        self.events.append({"at": round(now, 3), "event": event, **detail})

    @property
    def requests(self) -> int:
        return int(self.latency.get_total_count()) + sum(self.errors.values()) + self.answered_wrong

    def latency_summary(self, histogram: HdrHistogram | None = None) -> dict[str, float]:
        h = histogram or self.latency
        if h.get_total_count() == 0:
            return {percentile_key(p): math.nan for p in PERCENTILES} | {"max": math.nan, "mean": math.nan}
        out = {percentile_key(p): h.get_value_at_percentile(p) / MICROS for p in PERCENTILES}
        return out | {"max": h.get_max_value() / MICROS, "mean": h.get_mean_value() / MICROS}

    def timeline(self) -> list[dict[str, Any]]:
        """Per second: requests, errors, violations, sessions active, latency p50 and p99."""
        rows = []
        for t in range(max(self.seconds, default=-1) + 1):
            s = self.seconds.get(t, Second())
            lat = self.latency_summary(s.latency)
            rows.append({"second": t, "requests": s.requests, "errors": s.errors, "violations": s.violations,
                         "sessions": s.sessions, "p50": lat["p50"], "p99": lat["p99"]})
        return rows

    def summary(self, seconds: float) -> dict[str, Any]:
        answered = int(self.latency.get_total_count())
        return {
            "requests": self.requests,
            "errors": sum(self.errors.values()),
            "violations": sum(self.violations.values()),
            "errors_by_kind": dict(sorted(self.errors.items())),
            "violations_by_kind": dict(sorted(self.violations.items())),
            "violation_examples": self.examples,
            # Correct answers a second; answered_rps adds the wrong ones (a violation is still an answer).
            "throughput_rps": round(answered / seconds, 1) if seconds > 0 else 0.0,
            "answered_rps": round((answered + self.answered_wrong) / seconds, 1) if seconds > 0 else 0.0,
            "latency_seconds": self.latency_summary(),
            "sessions_peak": self.sessions_peak,
            "counters": dict(sorted(self.counters.items())),
            "events": self.events,
            "timeline": self.timeline(),
        }
