"""plexusd's Prometheus metrics: one registry per daemon (never the process-wide default, so a
test can run several daemons), served on the unix socket (plexusctl) and on a TCP port.

Label values are bounded: verbs are the CNI verbs (anything else is "other"), outcomes a fixed
set, codes the CNI error codes, delegate types the built-in types (an exec'd plugin is "exec"),
pools the node's configured pools. Nothing a pod or a NAD writes becomes a label value.

What the daemon already keeps (the scheduler's admitted count, the spool directory, the GC
stats, the VF ledger, the fabric's peers) is read at scrape time by `LiveCollector`, never
copied into gauges that could go stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cnispec import cni

log = structlog.get_logger(__name__)

VERBS = frozenset({cni.ADD, cni.DEL, cni.CHECK, cni.GC, cni.STATUS, cni.VERSION})
OUTCOMES = frozenset({"ok", "error", "deadline", "saturated"})
# Resolve 1-100 ms, where a pod's interfaces are made, and still see a stuck exec'd plugin.
BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
MAX_CODE = 999  # CNI codes are small integers; reserved ranges go up to 999
MAX_POOLS = 256  # VF pools exported per node (a node configures a handful)
MAX_NAMESPACES = 256  # pod namespaces a node's drop counters are exported for; more: "other"
# Applying one pod's nft table: ~1 ms for a small one, tens of ms for thousands of rules.
APPLY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip


def verb_label(command: str) -> str:
    return command if command in VERBS else "other"


def code_label(code: object) -> str:
    return str(code) if isinstance(code, int) and 0 <= code <= MAX_CODE else "other"


class DaemonMetrics:
    """The metrics plexusd updates as it works; `LiveCollector` adds what is read at scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_seconds = Histogram(
            "plexus_cni_request_duration_seconds",
            "Time from a CNI request's arrival at plexusd to its answer, by verb and outcome "
            "(ok, error, deadline, saturated).",
            ["verb", "outcome"],
            buckets=BUCKETS,
            registry=r,
        )
        self.delegate_seconds = Histogram(
            "plexus_delegate_duration_seconds",
            "Time one delegate plugin call took, by delegate type (a built-in's type, or exec "
            "for an exec'd plugin) and verb.",
            ["delegate", "verb"],
            buckets=BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "plexus_cni_errors",
            "CNI requests answered with an error, by verb and CNI error code.",
            ["verb", "code"],
            registry=r,
        )
        self.refusals = Counter(
            "plexus_queue_refusals",
            "CNI requests refused at once with code 11 because maxConcurrent + maxQueue "
            "requests were already admitted.",
            registry=r,
        )

        self.policy_apply_seconds = Histogram(
            "plexus_policy_apply_seconds",
            "Time one pod's network policy table took to apply (one nft transaction in the "
            "pod's netns).",
            buckets=APPLY_BUCKETS,
            registry=r,
        )

    def observe_request(self, command: str, outcome: str, seconds: float) -> None:
        self.request_seconds.labels(
            verb_label(command), outcome if outcome in OUTCOMES else "error"
        ).observe(max(seconds, 0.0))
        if outcome == "saturated":
            self.refusals.inc()

    def observe_error(self, command: str, code: object) -> None:
        self.errors.labels(verb_label(command), code_label(code)).inc()

    def watch(self, sources: LiveSources) -> None:
        """Read the daemon's live state at every scrape."""
        self.registry.register(LiveCollector(sources))

    def delegate_observer(self, builtin_types: frozenset[str]) -> DelegateObserver:
        return DelegateObserver(self.delegate_seconds, builtin_types)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(frozen=True)
class DelegateObserver:
    """What the chain runner calls after each plugin call (delegates/ cannot import this)."""

    histogram: Histogram
    builtin_types: frozenset[str]

    def __call__(self, plugin_type: str, exec_: bool, verb: str, seconds: float) -> None:
        kind = plugin_type if not exec_ and plugin_type in self.builtin_types else "exec"
        self.histogram.labels(kind, verb_label(verb)).observe(max(seconds, 0.0))


@dataclass
class LiveSources:
    """Where `LiveCollector` reads the daemon's state at scrape time (None: not running)."""

    admitted: Callable[[], int]
    spool_depth: Callable[[], int] | None = None
    spool_replays: Callable[[], int] | None = None
    gc_stats: Callable[[], dict[str, int]] | None = None
    vf_pools: Callable[[], list[dict[str, Any]]] | None = None
    vf_healed: Callable[[], dict[str, int]] | None = None
    fabric_peers: Callable[[], int | None] | None = None
    policy: Callable[[], PolicyReadout] | None = None


@dataclass(frozen=True)
class PolicyReadout:
    """The policy engine's numbers at scrape time (metaplugin.policy_engine)."""

    enforced: int  # local pods with at least one isolated interface direction
    apply_failures: int
    # (pod namespace, policy kinds, direction) -> packets dropped; see docs/metrics.md
    dropped: dict[tuple[str, str, str], int]


class LiveCollector(Collector):
    def __init__(self, sources: LiveSources) -> None:
        self._s = sources

    def describe(self) -> Iterable[Metric]:
        return []  # collected only when scraped: describing must not read the live state

    def collect(self) -> Iterator[Metric]:
        s = self._s
        yield GaugeMetricFamily(
            "plexus_requests_admitted",
            "CNI requests admitted (running or queued) right now.",
            value=s.admitted(),
        )
        if s.spool_depth is not None:
            yield GaugeMetricFamily(
                "plexus_spool_depth", "Spooled DELs waiting for a replay.", value=s.spool_depth()
            )
        if s.spool_replays is not None:
            yield CounterMetricFamily(
                "plexus_spool_replays", "Spooled DELs replayed (done).", value=s.spool_replays()
            )
        if s.gc_stats is not None:
            yield from _gc_families(s.gc_stats())
        if s.vf_healed is not None:
            healed = CounterMetricFamily(
                "plexus_vf_audit_healed",
                "VFs the audit healed, by kind: healed (rolled back and freed), corrected "
                "(attached, PF-side settings put back), unhealthy (marked unhealthy).",
                labels=["kind"],
            )
            for kind, n in sorted(s.vf_healed().items()):
                healed.add_metric([kind], n)
            yield healed
        if s.vf_pools is not None:
            yield from _pool_families(s.vf_pools())
        if s.policy is not None:
            yield from _policy_families(s.policy())
        if s.fabric_peers is not None and (peers := s.fabric_peers()) is not None:
            yield GaugeMetricFamily(
                "plexus_fabric_peers", "Fabric peers this node routes to.", value=peers
            )


def _gc_families(stats: dict[str, int]) -> Iterator[Metric]:
    yield CounterMetricFamily("plexus_gc_runs", "CNI GC collections run.", value=stats["runs"])
    leaks = CounterMetricFamily(
        "plexus_gc_healed",
        "What GC cleaned up, by kind: stale_container (recorded attachments of a container "
        "the runtime no longer knows, torn down).",
        labels=["kind"],
    )
    leaks.add_metric(["stale_container"], stats["stale_containers"])
    yield leaks
    failures = CounterMetricFamily(
        "plexus_gc_failures",
        "Failures a GC logged and went past, by kind (container, network).",
        labels=["kind"],
    )
    failures.add_metric(["container"], stats["container_failures"])
    failures.add_metric(["network"], stats["network_failures"])
    yield failures


def _policy_families(readout: PolicyReadout) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "plexus_policy_pods_enforced",
        "Local pods whose network policy table isolates at least one interface direction.",
        value=readout.enforced,
    )
    yield CounterMetricFamily(
        "plexus_policy_apply_failures",
        "Pod policy tables nft refused or could not apply (retried; an ADD's own fails it).",
        value=readout.apply_failures,
    )
    dropped = CounterMetricFamily(
        "plexus_policy_dropped_packets",
        "Packets the network policy dropped, by the pod's namespace, the kinds of the "
        "policies selecting that interface direction (NetworkPolicy, MultiNetworkPolicy, "
        "Isolation, or several joined by +) and direction (ingress, egress).",
        labels=["namespace", "policy_kind", "direction"],
    )
    totals: dict[tuple[str, str, str], int] = {}
    namespaces: set[str] = set()
    for (pod_namespace, kind, direction), packets in sorted(readout.dropped.items()):
        namespace = pod_namespace
        if namespace not in namespaces and len(namespaces) >= MAX_NAMESPACES:
            namespace = "other"
        else:
            namespaces.add(namespace)
        key = (namespace, kind, direction)
        totals[key] = totals.get(key, 0) + packets
    for key, packets in totals.items():
        dropped.add_metric(list(key), packets)
    yield dropped


def _pool_families(pools: list[dict[str, Any]]) -> Iterator[Metric]:
    families = {
        key: GaugeMetricFamily(f"plexus_vf_pool_{name}", help_, labels=["pool"])
        for key, name, help_ in (
            ("total", "total", "VFs in the pool."),
            ("healthy", "healthy", "Healthy VFs in the pool."),
            ("free", "free", "Healthy VFs free to give out."),
            ("inUse", "in_use", "VFs held by pods (or being set up or released)."),
        )
    }
    for pool in pools[:MAX_POOLS]:
        for key, family in families.items():
            family.add_metric([str(pool["resourceName"])], int(pool[key]))
    yield from families.values()
