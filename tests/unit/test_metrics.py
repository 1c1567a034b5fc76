"""The metrics' own promises: bounded label values whatever a request or a NAD says, live state
read at scrape time, a metrics port a stuck scraper cannot wedge, and the controller's metrics
from a real Controller against the API stand-in and a real webhook server. (The daemon's metrics
as Prometheus scrapes them, after real requests: tests/netns/test_metrics.py.)"""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from cnispec.httpserve import MetricsServer, parse_address
from metaplugin.metrics import DaemonMetrics, LiveSources
from nad_controller import certs, webhook
from nad_controller.controller import Controller
from nad_controller.metrics import ControllerMetrics
from tests.k8s_standin import ApiStandin
from tests.unit.test_controller import create_pool, replica, three_nodes, wait_until
from tests.unit.test_webhook import BAD, GOOD, Served, nad_body, review, start

Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse(text: bytes) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for got, v in samples.get(name, []) if labels.items() <= got.items())


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {got[label] for got, _ in samples.get(name, [])}


# --- plexusd -----------------------------------------------------------------------------------


def test_label_values_stay_bounded_whatever_the_request_says() -> None:
    metrics = DaemonMetrics()
    metrics.observe_request("ADD", "ok", 0.004)
    metrics.observe_request('ADD\n{evil="1"}', "ok", 0.004)  # a runtime's garbage verb
    metrics.observe_request("DEL", "whatever", 0.002)
    metrics.observe_error("x" * 300, 7)
    metrics.observe_error("ADD", "not a code")
    metrics.observe_error("ADD", 10**9)
    observe = metrics.delegate_observer(frozenset({"plexus-macvlan"}))
    observe("plexus-macvlan", False, "ADD", 0.001)
    observe("my-own-plugin-from-a-nad", True, "ADD", 0.02)
    observe("plexus-macvlan", True, "DEL", 0.01)  # a binary named like a built-in: exec'd
    samples = parse(metrics.render())
    count = "plexus_cni_request_duration_seconds_count"
    assert label_values(samples, count, "verb") == {"ADD", "DEL", "other"}
    assert label_values(samples, count, "outcome") == {"ok", "error"}
    assert label_values(samples, "plexus_cni_errors_total", "verb") == {"ADD", "other"}
    assert label_values(samples, "plexus_cni_errors_total", "code") == {"7", "other"}
    delegate = "plexus_delegate_duration_seconds_count"
    assert label_values(samples, delegate, "delegate") == {"plexus-macvlan", "exec"}
    assert value(samples, delegate, delegate="exec") == 2
    # 4 ms lands in the 5 ms bucket, not the 10 ms one: the buckets resolve milliseconds
    bucket = "plexus_cni_request_duration_seconds_bucket"
    assert value(samples, bucket, verb="ADD", outcome="ok", le="0.0025") == 0
    assert value(samples, bucket, verb="ADD", outcome="ok", le="0.005") == 1


def test_saturation_refusals_are_counted() -> None:
    metrics = DaemonMetrics()
    metrics.observe_request("?", "saturated", 0.0)
    samples = parse(metrics.render())
    assert value(samples, "plexus_queue_refusals_total") == 1
    assert value(samples, "plexus_cni_request_duration_seconds_count", outcome="saturated") == 1


def test_live_state_is_read_at_every_scrape() -> None:
    pools = [{"resourceName": "plexus.dev/fast", "total": 4, "healthy": 4, "free": 4, "inUse": 0}]
    healed = {"healed": 0, "corrected": 0, "unhealthy": 0}
    admitted = [0]
    metrics = DaemonMetrics()
    metrics.watch(
        LiveSources(
            admitted=lambda: admitted[0],
            spool_depth=lambda: 2,
            spool_replays=lambda: 5,
            gc_stats=lambda: {
                "runs": 3,
                "stale_containers": 1,
                "container_failures": 0,
                "network_failures": 2,
            },
            vf_pools=lambda: pools,
            vf_healed=lambda: healed,
            fabric_peers=lambda: None,  # before the fabric's first pass: no sample at all
        )
    )
    first = parse(metrics.render())
    assert value(first, "plexus_vf_pool_free", pool="plexus.dev/fast") == 4
    assert value(first, "plexus_spool_depth") == 2
    assert value(first, "plexus_spool_replays_total") == 5
    assert value(first, "plexus_gc_runs_total") == 3
    assert value(first, "plexus_gc_healed_total", kind="stale_container") == 1
    assert value(first, "plexus_gc_failures_total", kind="network") == 2
    assert "plexus_fabric_peers" not in first
    pools[0].update(free=1, inUse=2, healthy=3)
    healed["healed"] += 2
    admitted[0] = 7
    second = parse(metrics.render())
    assert value(second, "plexus_vf_pool_free", pool="plexus.dev/fast") == 1
    assert value(second, "plexus_vf_pool_in_use", pool="plexus.dev/fast") == 2
    assert value(second, "plexus_vf_pool_healthy", pool="plexus.dev/fast") == 3
    assert value(second, "plexus_vf_pool_total", pool="plexus.dev/fast") == 4
    assert value(second, "plexus_vf_audit_healed_total", kind="healed") == 2
    assert value(second, "plexus_requests_admitted") == 7


def test_two_daemons_in_one_process_have_their_own_registries() -> None:
    a, b = DaemonMetrics(), DaemonMetrics()
    a.observe_request("ADD", "ok", 0.01)
    assert value(parse(a.render()), "plexus_cni_request_duration_seconds_count") == 1
    assert value(parse(b.render()), "plexus_cni_request_duration_seconds_count") == 0


@pytest.mark.parametrize(
    ("address", "parsed"),
    [(":9465", ("", 9465)), ("127.0.0.1:9", ("127.0.0.1", 9)), ("[::1]:9465", ("::1", 9465))],
)
def test_metrics_addresses(address: str, parsed: tuple[str, int]) -> None:
    assert parse_address(address) == parsed


@pytest.mark.parametrize("address", ["9465", "host:", ":99999", ":http"])
def test_bad_metrics_addresses_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="not \\[host\\]:port"):
        parse_address(address)


@pytest.fixture
def metrics_server() -> Iterator[MetricsServer]:
    metrics = DaemonMetrics()
    metrics.observe_request("ADD", "ok", 0.01)
    server = MetricsServer("127.0.0.1:0", metrics.render)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return int(reply.status), bytes(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def test_a_scraper_that_never_sends_its_request_does_not_block_the_next(
    metrics_server: MetricsServer,
) -> None:
    idle = [socket.create_connection(("127.0.0.1", metrics_server.port)) for _ in range(3)]
    try:
        status, body = get(metrics_server.port, "/metrics")
        assert status == 200
        assert value(parse(body), "plexus_cni_request_duration_seconds_count", verb="ADD") == 1
        assert get(metrics_server.port, "/v1/attachments")[0] == 404
    finally:
        for s in idle:
            s.close()


# --- plexus-controller -------------------------------------------------------------------------


@pytest.fixture
def controllers() -> Iterator[list[Controller]]:
    running: list[Controller] = []
    yield running
    for c in running:
        c.stop()


def test_the_leader_reports_itself_its_passes_and_its_writes(
    standin: ApiStandin, kube: client.ApiClient, controllers: list[Controller]
) -> None:
    controllers.append(replica(kube, "ctl-a"))
    create_pool(kube)
    three_nodes(standin, kube)
    leader = controllers[0]
    assert value(parse(leader.metrics.render()), "plexus_controller_leader") == 0
    leader.start()
    passes = "plexus_controller_reconcile_duration_seconds_count"
    # a pass is counted when it ends, after the writes it made
    assert wait_until(lambda: value(parse(leader.metrics.render()), passes) >= 1)
    samples = parse(leader.metrics.render())
    assert value(samples, "plexus_controller_leader") == 1
    assert value(samples, "plexus_controller_status_writes_total") == leader.reconciler.writes
    assert leader.reconciler.writes >= 1
    leader.stop()
    assert value(parse(leader.metrics.render()), "plexus_controller_leader") == 0


@pytest.fixture
def counted(tmp_path: Path) -> Iterator[tuple[Served, ControllerMetrics]]:
    generated = certs.generate(certs.service_names("plexus-controller", "plexus-system"))
    cert, key = certs.write_pair(tmp_path / "tls", generated)
    metrics = ControllerMetrics()
    server = webhook.WebhookServer(
        ("127.0.0.1", 0),
        context=certs.CertSource(str(cert), str(key)).context,
        lookups=None,
        metrics=metrics,
    )
    stop = start(server)
    try:
        yield Served(server, generated.ca_pem), metrics
    finally:
        stop()


def test_webhook_admissions_by_kind_and_decision(
    counted: tuple[Served, ControllerMetrics],
) -> None:
    served, metrics = counted
    assert not served.review(review(nad_body("mv", BAD)))["response"]["allowed"]
    assert served.review(review(nad_body("mv", GOOD)))["response"]["allowed"]
    other: dict[str, Any] = {"kind": "ConfigMap", "metadata": {"name": "x"}}
    body = review(other)
    body["request"]["kind"]["kind"] = "Some\nFreeText"  # never a label value
    assert served.review(body)["response"]["allowed"]
    status, _ = served.request("POST", "/validate", b"{not json")
    assert status == 400
    samples = parse(metrics.render())
    name = "plexus_webhook_admission_requests_total"
    nad = "NetworkAttachmentDefinition"
    assert value(samples, name, kind=nad, decision="denied") == 1
    assert value(samples, name, kind=nad, decision="allowed") == 1
    assert value(samples, name, kind="other", decision="allowed") == 1
    assert value(samples, name, kind="other", decision="error") == 1
    assert label_values(samples, name, "kind") == {nad, "other"}
    assert value(samples, "plexus_webhook_admission_duration_seconds_count", kind=nad) == 2


def test_a_flood_of_idle_connections_is_hung_up_on_not_given_threads(
    metrics_server: MetricsServer,
) -> None:
    port = metrics_server.port
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
    try:
        with pytest.raises((ConnectionError, urllib.error.URLError, OSError)):
            get(port, "/metrics")  # the ninth: accepted and closed at once
    finally:
        for s in idle:
            s.close()
    # the idle ones gone, their threads see EOF and the slots come back
    assert wait_until(lambda: _scrapes(port), timeout=10)


def _scrapes(port: int) -> bool:
    try:
        return get(port, "/metrics")[0] == 200
    except OSError:
        return False


def test_the_controller_refuses_a_bad_metrics_address_and_a_port_in_use() -> None:
    from nad_controller.cli import _serve_metrics
    from nad_controller.metrics import ControllerMetrics

    assert _serve_metrics("nonsense", ControllerMetrics()) is False
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        assert _serve_metrics(f"127.0.0.1:{port}", ControllerMetrics()) is False
    finally:
        taken.close()
