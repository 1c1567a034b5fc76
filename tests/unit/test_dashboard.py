"""The Grafana dashboard is built on exactly the metrics Plexus exports: every metric name in
every PromQL expression (panels and template variables) exists in plexusd's or the controller's
registry, with the suffix its type gives it (_total, _bucket, _sum, _count)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from metaplugin.metrics import DaemonMetrics, LiveSources, PolicyReadout
from nad_controller.metrics import ControllerMetrics

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "plexus-dashboard.json"
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
}
IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
            "or", "unless", "offset", "inf", "nan"}  # fmt: skip


def exported(registry: CollectorRegistry) -> dict[str, set[str]]:
    """Every series name a scrape can show -> its label names (from every family's type)."""
    names: dict[str, set[str]] = {}
    for family in registry.collect():
        for suffix in SUFFIXES[family.type]:
            labels = {k for s in family.samples for k in s.labels}
            names[family.name + suffix] = labels
    return names


def registries() -> dict[str, set[str]]:
    daemon = DaemonMetrics()
    # every live source present, as on a node with SR-IOV pools and the fabric
    pool = {"resourceName": "p", "total": 1, "healthy": 1, "free": 1, "inUse": 0}
    daemon.watch(
        LiveSources(
            admitted=lambda: 0,
            spool_depth=lambda: 0,
            spool_replays=lambda: 0,
            gc_stats=lambda: dict.fromkeys(
                ("runs", "stale_containers", "container_failures", "network_failures"), 0
            ),
            vf_pools=lambda: [pool],
            vf_healed=lambda: {"healed": 0},
            fabric_peers=lambda: 0,
            policy=lambda: PolicyReadout(
                enforced=0, apply_failures=0, dropped={("ns", "NetworkPolicy", "ingress"): 0}
            ),
        )
    )
    # one observation per labelled metric, so its label names show
    daemon.observe_request("ADD", "ok", 0.01)
    daemon.observe_error("ADD", 7)
    daemon.delegate_observer(frozenset())("x", True, "ADD", 0.01)
    daemon.policy_apply_seconds.observe(0.01)
    controller = ControllerMetrics()
    controller.watch(leader=lambda: True, writes=lambda: 0)
    controller.reconcile_seconds.observe(0.01)
    controller.observe_admission("VFPool", "allowed", 0.01)
    return exported(daemon.registry) | exported(controller.registry)


def expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
    return exprs


def metric_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names used in by/without) of one PromQL expression."""
    grouped = {
        label.strip()
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
        for label in group.split(",")
        if label.strip()
    }
    text = re.sub(r'"[^"]*"', '""', expr)  # label values and strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(?:by|without)\s*\([^)]*\)", "", text)  # grouping labels
    text = re.sub(r"label_values\(([^,]+),[^)]*\)", r"\1", text)  # Grafana's template query
    names = set()
    for match in IDENT.finditer(text):
        word = match.group()
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or word.lower() in KEYWORDS or word.startswith("$"):
            continue  # a function, a keyword
        if text[: match.start()].endswith("$"):
            continue  # a Grafana variable ($__rate_interval)
        names.add(word)
    return names, grouped


def test_every_query_names_an_exported_metric_and_its_labels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    known = registries()
    exprs = expressions(dashboard)
    assert len(exprs) >= 20
    used: set[str] = set()
    for expr in exprs:
        names, grouped = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        for name in names:
            assert name in known, f"{name} (in {expr!r}) is not exported"
            # le is the histogram's, node and pod are the scrape's target labels
            allowed = known[name] | {"le", "node", "pod"}
            assert grouped <= allowed, f"{expr!r} groups by {grouped - allowed}"
        used |= names
    # the views the issue asks for are all there
    for needed in (
        "plexus_cni_request_duration_seconds_bucket",
        "plexus_delegate_duration_seconds_bucket",
        "plexus_cni_errors_total",
        "plexus_vf_pool_in_use",
        "plexus_gc_healed_total",
        "plexus_vf_audit_healed_total",
        "plexus_queue_refusals_total",
        "plexus_controller_leader",
        "plexus_webhook_admission_requests_total",
        "plexus_policy_dropped_packets_total",
    ):
        assert needed in used


def test_the_extraction_sees_metric_names_and_not_functions() -> None:
    names, grouped = metric_names(
        'histogram_quantile(0.99, sum by (verb, le) (rate(plexus_x_bucket{node=~"$node"}'
        "[$__rate_interval]))) / on() group_left plexus_y"
    )
    assert names == {"plexus_x_bucket", "plexus_y"}
    assert grouped == {"verb", "le"}
    assert metric_names("label_values(plexus_requests_admitted, node)")[0] == {
        "plexus_requests_admitted"
    }
