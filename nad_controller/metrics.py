"""plexus-controller's Prometheus metrics, in a registry of its own (tests run several
replicas in one process), served on `--metrics-address` (default :9466, next to plexusd's
:9465).

Label values are bounded: the webhook's kinds are the ones it checks (anything else is
"other"), decisions are allowed/denied/error. What the controller already keeps (leadership,
the reconciler's write count) is read at scrape time, never copied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Reconcile passes and admission reviews: milliseconds normally, seconds on a big cluster.
BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
KINDS = frozenset({"NetworkAttachmentDefinition", "VFPool", "Pod"})
DECISIONS = frozenset({"allowed", "denied", "error"})


def kind_label(kind: object) -> str:
    return kind if isinstance(kind, str) and kind in KINDS else "other"


class ControllerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.reconcile_seconds = Histogram(
            "plexus_controller_reconcile_duration_seconds",
            "Time one reconcile pass over every VFPool took (on the leader).",
            buckets=BUCKETS,
            registry=r,
        )
        self.admissions = Counter(
            "plexus_webhook_admission_requests",
            "Admission reviews answered, by the reviewed object's kind and the decision "
            "(allowed, denied, error: a malformed review or one refused before it was read).",
            ["kind", "decision"],
            registry=r,
        )
        self.admission_seconds = Histogram(
            "plexus_webhook_admission_duration_seconds",
            "Time from an admission review's body being read to its answer being written.",
            ["kind"],
            buckets=BUCKETS,
            registry=r,
        )

    def observe_admission(self, kind: object, decision: str, seconds: float) -> None:
        label = kind_label(kind)
        self.admissions.labels(label, decision if decision in DECISIONS else "error").inc()
        self.admission_seconds.labels(label).observe(max(seconds, 0.0))

    def watch(self, *, leader: Callable[[], bool], writes: Callable[[], int]) -> None:
        """Read leadership and the status write count at every scrape."""
        self.registry.register(_Live(leader, writes))

    def watch_multicast(self, reconciler: _MulticastFigures) -> None:
        """The membership reconciler's pass time (observed) and, read at every scrape, its
        status write count and what it last aggregated."""
        self.multicast_reconcile_seconds = Histogram(
            "plexus_controller_multicast_reconcile_duration_seconds",
            "Time one multicast membership pass over every MulticastNodeState took (on the "
            "leader).",
            buckets=BUCKETS,
            registry=self.registry,
        )
        reconciler.observe_pass = self.multicast_reconcile_seconds.observe
        self.registry.register(_MulticastLive(reconciler))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Live(Collector):
    def __init__(self, leader: Callable[[], bool], writes: Callable[[], int]) -> None:
        self._leader, self._writes = leader, writes

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "plexus_controller_leader",
            "1 on the replica holding the Lease (the one that writes status), 0 elsewhere.",
            value=1 if self._leader() else 0,
        )
        yield CounterMetricFamily(
            "plexus_controller_status_writes",
            "VFPool status writes made by this replica.",
            value=self._writes(),
        )


class _MulticastFigures(Protocol):
    writes: int
    groups: int
    members: int
    observe_pass: Callable[[float], None] | None


class _MulticastLive(Collector):
    def __init__(self, reconciler: _MulticastFigures) -> None:
        self._r = reconciler

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "plexus_controller_multicast_status_writes",
            "MulticastNodeState status (replicateTo) writes made by this replica.",
            value=self._r.writes,
        )
        yield GaugeMetricFamily(
            "plexus_controller_multicast_groups",
            "Multicast groups (per replication domain) with a member pod on some node, as of "
            "the last membership pass on this replica (0 on a replica that does not lead).",
            value=self._r.groups,
        )
        yield GaugeMetricFamily(
            "plexus_controller_multicast_member_nodes",
            "Nodes whose MulticastNodeState counted in the last membership pass (their Node "
            "exists).",
            value=self._r.members,
        )
