"""plexusd's Prometheus metrics as a scraper sees them: a real daemon in its node namespace,
its TCP metrics port on that namespace's loopback, fetched and parsed with prometheus_client's
own parser after an ADD, a DEL and a failed ADD."""

from __future__ import annotations

import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

from kernel.netns import run_in_netns
from testbed.daemon import METRICS_PORT
from tests.netns.conftest import NETWORKS, Bed

VERBS = {"ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION", "other"}
BUILTIN_OR_EXEC = {"plexus-macvlan", "plexus-ipvlan", "plexus-routed", "plexus-sbr",
                   "plexus-sriov", "exec"}  # fmt: skip


def scrape(bed: Bed) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample by name, fetched from the daemon's TCP port inside its node namespace."""

    def fetch() -> bytes:
        url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain")
            return bytes(reply.read())

    text = run_in_netns(bed.node.path, fetch).decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def value(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    return sum(v for got, v in samples.get(name, []) if labels.items() <= got.items())


def test_the_tcp_port_serves_parseable_metrics_that_move_with_requests(bed: Bed) -> None:
    before = scrape(bed)
    assert value(before, "plexus_cni_request_duration_seconds_count", verb="ADD") == 0
    assert value(before, "plexus_requests_admitted") == 0

    pod = bed.pod("pod1")
    bed.runtime.add("c1", pod.path, annotations={NETWORKS: "net-a"}).ok()
    bed.runtime.delete("c1", pod.path).ok()
    failed = bed.runtime.add("c2", pod.path, annotations={NETWORKS: "net-a, net-fail"})
    assert failed.returncode == 1 and failed.body["code"] == 101
    bed.runtime.delete("c2", pod.path, with_prev=False).ok()

    after = scrape(bed)
    count = "plexus_cni_request_duration_seconds_count"
    assert value(after, count, verb="ADD", outcome="ok") == 1
    assert value(after, count, verb="ADD", outcome="error") == 1
    assert value(after, count, verb="DEL", outcome="ok") == 2
    # every ADD landed in a bucket: the +Inf bucket counts them all, the sum is real time
    assert value(after, "plexus_cni_request_duration_seconds_bucket", verb="ADD", le="+Inf") == 2
    assert value(after, "plexus_cni_request_duration_seconds_sum", verb="ADD") > 0
    # the failed ADD is counted by its CNI code
    assert value(after, "plexus_cni_errors_total", verb="ADD", code="101") == 1
    # each delegate call was timed, under a bounded type label
    delegate = after["plexus_delegate_duration_seconds_count"]
    assert {labels["delegate"] for labels, _ in delegate} <= BUILTIN_OR_EXEC
    assert value(after, "plexus_delegate_duration_seconds_count", verb="ADD") >= 2
    assert value(after, "plexus_delegate_duration_seconds_count", verb="DEL") >= 1
    # bounded label values everywhere: verbs, outcomes and codes from fixed sets
    for name in ("plexus_cni_request_duration_seconds_count", "plexus_cni_errors_total"):
        for labels, _ in after[name]:
            assert labels["verb"] in VERBS
            assert labels.get("outcome", "ok") in {"ok", "error", "deadline", "saturated"}
            assert labels.get("code", "0").isdigit() or labels["code"] == "other"
    # the live state: nothing admitted now, an empty spool, GC never ran
    assert value(after, "plexus_requests_admitted") == 0
    assert value(after, "plexus_spool_depth") == 0
    assert value(after, "plexus_gc_runs_total") == 0


def test_only_get_metrics_is_served(bed: Bed) -> None:
    def fetch(path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}{path}", timeout=10) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    assert run_in_netns(bed.node.path, lambda: fetch("/v1/attachments")) == 404
    assert run_in_netns(bed.node.path, lambda: fetch("/metrics")) == 200
