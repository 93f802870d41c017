"""Every metric a node exports, in one place. Prefix `tether_`, unit in the name. Lock-free
(`tether.metrics`): the hot path counts with plain numbers."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from actors.mcp import Kind
from tether.metrics import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
END_REASONS = ("deleted", "idle", "upstream_exit", "drained", "owner_lost", "start_failed")


class NodeMetrics:
    """The node's metrics, on a registry of its own (no process-wide globals)."""

    def __init__(self, node_id: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.sessions_active = Gauge(
            "tether_node_sessions_active", "Sessions this node owns now", ["node"], registry=r
        ).labels(node_id)
        self.sessions_started = Counter(
            "tether_node_sessions_started_total", "Sessions started on this node", ["node"], registry=r
        ).labels(node_id)
        ended = Counter("tether_node_sessions_ended_total", "Sessions ended, by reason",
                        ["node", "reason"], registry=r)
        self.sessions_ended = {reason: ended.labels(node_id, reason) for reason in END_REASONS}
        self.sessions_attached = Counter(
            "tether_node_sessions_attached_total", "Initializes answered from a live named session",
            ["node"], registry=r).labels(node_id)
        self.sessions_declined = Counter(
            "tether_node_sessions_declined_total", "New sessions declined because the node was full",
            ["node"], registry=r).labels(node_id)
        messages = Counter("tether_actor_messages_total", "Client messages forwarded upstream, by kind",
                           ["node", "kind"], registry=r)
        self.messages = {kind: messages.labels(node_id, kind.value) for kind in Kind}
        self.request_seconds = Histogram(
            "tether_actor_request_seconds", "From a request reaching the actor to its last answer",
            ["node"], buckets=LATENCY_BUCKETS, registry=r).labels(node_id)
        self.upstream_start_seconds = Histogram(
            "tether_upstream_start_seconds", "From spawning the upstream to its initialize answer",
            ["node"], buckets=START_BUCKETS, registry=r).labels(node_id)
        self.streams_open = Gauge("tether_node_streams_open", "Client SSE streams open on this node",
                                  ["node"], registry=r).labels(node_id)
        self.events_dropped = Counter(
            "tether_node_events_dropped_total", "Server messages pushed out of a full event log before any "
            "client read them", ["node"], registry=r).labels(node_id)
        self.events_replayed = Counter(
            "tether_node_events_replayed_total", "Events sent again to clients that resumed with Last-Event-ID",
            ["node"], registry=r).labels(node_id)
        self.lease_renewals = Counter("tether_node_lease_renewals_total", "Membership heartbeats sent",
                                      ["node", "result"], registry=r)
        self.lease_losses = Counter("tether_node_lease_losses_total",
                                    "Times this node could not prove its lease and fenced itself",
                                    ["node"], registry=r).labels(node_id)
        self.draining = Gauge("tether_node_draining", "1 while this node drains", ["node"],
                              registry=r).labels(node_id)
        self.node_id = node_id
