"""Every metric the gateway exports, in one place. Prefix `tether_`, unit in the name."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from actors.metrics import LATENCY_BUCKETS
from actors.placement import Placement
from tether.metrics import Counter, Gauge, Histogram

# Label values a client cannot multiply: any other HTTP method is counted as "other" (rule 5).
HTTP_METHODS = frozenset({"GET", "POST", "DELETE"})
# Why a request was refused at the edge: no or bad credentials, over the rate, a forged session id.
REFUSALS = ("unauthorized", "rate_limited", "forged_session_id")


class PlacementCollector(Collector):
    """Reads the route cache and ring at scrape time, so the hot path counts with plain integers."""

    def __init__(self, placement: Placement) -> None:
        self._placement = placement

    def collect(self) -> Iterator[Metric]:
        p = self._placement
        cache = CounterMetricFamily("tether_gateway_route_cache", "Route cache lookups", labels=["result"])
        cache.add_metric(["hit"], p.cache_hits)
        cache.add_metric(["miss"], p.cache_misses)
        yield cache
        yield GaugeMetricFamily("tether_ring_members", "Nodes on the ring", value=len(p.ring))
        yield GaugeMetricFamily("tether_ring_generation", "Membership generation of the ring",
                                value=p.ring.generation)
        yield GaugeMetricFamily("tether_gateway_routes_cached", "Session routes cached", value=len(p.cache))


class GatewayMetrics:
    def __init__(self, placement: Placement, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("tether_gateway_requests_total", "Client requests, by transport, method, status",
                                ["transport", "method", "status"], registry=r)
        self.latency = Histogram("tether_gateway_request_seconds",
                                 "Time to the answer's headers, by transport and method",
                                 ["transport", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.sessions_created = Counter("tether_gateway_sessions_created_total", "Sessions placed on a node",
                                        registry=r)
        self.declines = Counter("tether_gateway_placement_declines_total",
                                "Nodes that declined a new session (full or draining)", registry=r)
        self.streams_open = Gauge("tether_gateway_streams_open", "Client SSE streams open", ["transport"],
                                  registry=r)
        refused = Counter("tether_gateway_refused_total",
                          "Requests refused before any node or store was asked, by reason", ["reason"], registry=r)
        self.refused = {reason: refused.labels(reason) for reason in REFUSALS}
        r.register(PlacementCollector(placement))
        self._bound: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, transport: str, method: str, status: int, seconds: float) -> None:
        """Count and time one request; label children are bound once per combination, not per call."""
        label = method.lower() if method in HTTP_METHODS else "other"
        key = (transport, label, status)
        bound = self._bound.get(key)
        if bound is None:
            bound = (self.requests.labels(transport, label, str(status)), self.latency.labels(transport, label))
            self._bound[key] = bound
        bound[0].inc()
        bound[1].observe(seconds)
