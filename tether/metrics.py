"""Counters, gauges and histograms for the hot path: plain numbers, read at scrape time.

prometheus_client's metrics take a lock on every `inc` and `observe` and check
their arguments in Python: about a microsecond each, several times a request on
both hops. Tether updates its metrics from one event loop thread, so these keep
plain floats and lists instead, and prometheus_client still does what it does
well: each metric here is a collector on a `CollectorRegistry`, exposed by
`generate_latest` as before. The constructors take the subset of
prometheus_client's arguments Tether uses; a metric with labels hands out one
child per label values (`labels`), made once and kept.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

C = TypeVar("C", "_Value", "_Buckets")


class _Value:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class _Buckets:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket whose bound is >= value
        self.sum += value


class _Metric(Collector, Generic[C]):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], C] = {}
        self._unlabelled: C | None = None if self.labelnames else self._child()
        registry.register(self)

    def _child(self) -> C:
        raise NotImplementedError

    def labels(self, *values: str) -> C:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._child()
        return child

    def _samples(self) -> Iterator[tuple[list[str], C]]:
        if self._unlabelled is not None:
            yield [], self._unlabelled
        for values, child in self._children.items():
            yield list(values), child

    def collect(self) -> Iterator[Metric]:
        raise NotImplementedError

    def describe(self) -> Iterator[Metric]:
        return self.collect()  # the registry learns the names, so that two metrics cannot share one


class _Scalar(_Metric[_Value]):
    family: type[CounterMetricFamily] | type[GaugeMetricFamily]

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: CollectorRegistry) -> None:
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> _Value:
        return _Value()

    def collect(self) -> Iterator[Metric]:
        family = self.family(self.name, self.documentation, labels=self.labelnames)
        for values, child in self._samples():
            family.add_metric(values, child.value)
        yield family


class Counter(_Scalar):
    family = CounterMetricFamily

    def inc(self, amount: float = 1.0) -> None:
        assert self._unlabelled is not None, f"{self.name} has labels"
        self._unlabelled.value += amount


class Gauge(_Scalar):
    family = GaugeMetricFamily


class Histogram(_Metric[_Buckets]):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.bounds = tuple(sorted(float(b) for b in buckets))
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> _Buckets:
        return _Buckets(self.bounds)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        edges = [repr(b) for b in self.bounds] + ["+Inf"]  # 1.0, 0.0005: as prometheus_client writes them
        for values, child in self._samples():
            total, cumulative = 0, []
            for edge, count in zip(edges, child.counts, strict=True):
                total += count
                cumulative.append((edge, total))
            family.add_metric(values, cumulative, child.sum)
        yield family
