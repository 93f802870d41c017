"""Tether's lock-free metrics expose exactly what prometheus_client's own would for the same updates."""

from __future__ import annotations

from typing import Any

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tether import metrics

BUCKETS = (0.001, 0.01, 0.5, 1, 30)


def _exposed(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample by name and labels, without the `_created` samples only prometheus_client writes."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for s in family.samples if not s.name.endswith("_created")}


def _update(lib: Any, registry: CollectorRegistry) -> None:
    counter = lib.Counter("t_requests_total", "Requests", ["method"], registry=registry)
    plain = lib.Counter("t_plain_total", "Unlabelled", registry=registry)
    gauge = lib.Gauge("t_open", "Open", ["node"], registry=registry)
    histogram = lib.Histogram("t_seconds", "Latency", ["node"], buckets=BUCKETS,
                              registry=registry)
    counter.labels("get").inc()
    counter.labels("post").inc(2.5)
    counter.labels("get").inc()
    plain.inc()
    gauge.labels("a").inc()
    gauge.labels("a").inc()
    gauge.labels("a").dec()
    gauge.labels("b").set(7)
    for value in (0.0001, 0.001, 0.0011, 0.4, 1, 29.9, 30, 31, 1000):  # on, below and above the bounds
        histogram.labels("a").observe(value)
    histogram.labels("b").observe(0.02)


def test_the_same_updates_expose_the_same_samples_as_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    _update(metrics, ours)
    _update(prometheus_client, theirs)
    assert _exposed(ours) == _exposed(theirs)
    assert _exposed(ours)[("t_seconds_bucket", (("le", "1.0"), ("node", "a")))] == 5.0


def test_two_metrics_cannot_share_a_name_and_labels_must_match() -> None:
    registry = CollectorRegistry()
    counter = metrics.Counter("t_requests_total", "Requests", ["method"], registry=registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        metrics.Gauge("t_requests_total", "Again", registry=registry)
    with pytest.raises(ValueError, match="takes labels"):
        counter.labels("get", "extra")
