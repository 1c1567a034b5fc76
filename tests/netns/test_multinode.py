"""The flat, routable pod network across three nodes, native and VXLAN: pods reach pods on other
nodes and are reached from outside with no NAT, macvlan pods on two nodes share a segment,
dual-stack everywhere, the VXLAN MTU is exact, and failed ADDs leave nothing behind."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.cluster import (
    Cluster,
    cluster,
    observed_source,
    ping,
    primary_address,
)
from tests.support.require import missing

REFERENCE_PLUGINS = Path("/usr/lib/cni")


@pytest.fixture(scope="module", params=["native", "vxlan"])
def bed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    if not REFERENCE_PLUGINS.is_dir():
        missing("Debian's containernetworking-plugins are not installed (/usr/lib/cni)")
    with cluster(tmp_path_factory.mktemp(f"cluster-{request.param}"), request.param) as c:
        yield c


@pytest.fixture
def clean(bed: Cluster) -> Iterator[Cluster]:
    """Every test's pods are removed afterwards, and the nodes must then hold nothing."""
    try:
        yield bed
    finally:
        for node in bed.nodes:
            node.remove_pods()
    assert bed.leftovers() == {}


@pytest.mark.parametrize("version", [4, 6])
def test_pod_to_pod_across_nodes_without_nat(clean: Cluster, version: int) -> None:
    a, _ = clean.nodes[0].add_pod(clean, "a")
    b, _ = clean.nodes[1].add_pod(clean, "b")
    target = primary_address(b, version)
    assert ping(a, target).returncode == 0
    assert observed_source(b, target, a) == primary_address(a, version)


@pytest.mark.parametrize("version", [4, 6])
def test_external_reaches_a_pod_directly_through_the_node_routes(
    clean: Cluster, version: int
) -> None:
    pod, _ = clean.nodes[2].add_pod(clean, "web")
    target = primary_address(pod, version)
    assert ping(clean.external, target).returncode == 0
    external = "192.168.100.100" if version == 4 else "fd00:100::100"
    assert observed_source(pod, target, clean.external) == external


def test_pod_addresses_routes_and_mtu(clean: Cluster) -> None:
    pod, out = clean.nodes[0].add_pod(clean, "probe")
    result = out.ok()
    link = pod.links()["eth0"]
    expected_mtu = 1450 if clean.mode == "vxlan" else 1500
    assert link["mtu"] == expected_mtu
    assert sorted(pod.addresses("eth0")) == sorted(
        f"{ip['address'].split('/')[0]}/{32 if ':' not in ip['address'] else 128}"
        for ip in result["ips"]
    )
    assert {(r["dst"], r.get("gateway")) for r in pod.ip("-4", "route", "show")} >= {
        ("default", "169.254.1.1")
    }
    assert {(r["dst"], r.get("gateway")) for r in pod.ip("-6", "route", "show")} >= {
        ("default", "fe80::1")
    }
    assert [i["name"] for i in result["interfaces"] if i.get("sandbox")] == ["eth0"]


@pytest.mark.parametrize(("version", "headers"), [(4, 20 + 8), (6, 40 + 8)])
def test_vxlan_mtu_is_exact(clean: Cluster, version: int, headers: int) -> None:
    if clean.mode != "vxlan":
        pytest.skip("an overlay-only property")
    a, _ = clean.nodes[0].add_pod(clean, f"mtu{version}-a")
    b, _ = clean.nodes[1].add_pod(clean, f"mtu{version}-b")
    target = primary_address(b, version)
    full = ping(a, target, "-M", "do", "-s", str(1450 - headers))
    assert full.returncode == 0, full.stdout + full.stderr
    one_more = ping(a, target, "-M", "do", "-s", str(1450 - headers + 1))
    assert one_more.returncode != 0


@pytest.mark.parametrize(("version", "prefix"), [(4, "10.50.0.2"), (6, "fd00:50::2:")])
def test_macvlan_pods_on_two_nodes_share_a_segment(
    clean: Cluster, version: int, prefix: str
) -> None:
    a, out_a = clean.nodes[0].add_pod(clean, f"seg{version}-a", "segment")
    b, out_b = clean.nodes[1].add_pod(clean, f"seg{version}-b", "segment")
    out_a.ok(), out_b.ok()
    assert a.links()["net1"]["linkinfo"]["info_kind"] == "macvlan"
    target = next(c.split("/")[0] for c in b.addresses("net1") if (":" in c) == (version == 6))
    assert target.startswith(prefix)  # node2's range of the shared subnet
    assert ping(a, target).returncode == 0


def test_check_and_double_del(clean: Cluster) -> None:
    node = clean.nodes[0]
    pod, out = node.add_pod(clean, "checked", "segment")
    out.ok()
    node.runtime.check(pod.name, pod.path).ok()
    pod.run("ip", "addr", "flush", "dev", "net1")
    broken = node.runtime.check(pod.name, pod.path)
    assert broken.returncode == 1 and "lost its address" in broken.body["msg"]
    node.runtime.delete(pod.name, pod.path, with_prev=False).ok()
    node.runtime.delete(pod.name, pod.path, with_prev=False).ok()  # DEL twice: still fine
    node.pods.clear()
    assert clean.leftovers() == {}


def test_check_notices_a_lost_node_route(clean: Cluster) -> None:
    node = clean.nodes[0]
    pod, out = node.add_pod(clean, "routed-check")
    out.ok()
    address = primary_address(pod, 4)
    node.ns.run("ip", "route", "del", f"{address}/32")
    broken = node.runtime.check(pod.name, pod.path)
    assert broken.body["code"] == 110
    assert f"the node has no route to the pod's {address}" in broken.body["msg"]


def test_a_failed_routed_add_leaves_no_veth(clean: Cluster) -> None:
    """The node end fails after the veth pair exists (a new link without IPv6 cannot take
    fe80::1): the pair, the lease and the record must all go."""
    node = clean.nodes[0]
    node.ns.run("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
    try:
        pod = clean.new_ns("no-v6")
        out = node.runtime.add(pod.name, pod.path, annotations={})
    finally:
        node.ns.run("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=0")
    assert out.returncode == 1 and "fe80::1" in out.body["msg"]
    assert set(pod.links()) == {"lo"}
    assert clean.leftovers() == {}
    node.runtime.delete(pod.name, pod.path, with_prev=False).ok()


def test_own_pod_subnet_is_unreachable_not_bounced(clean: Cluster) -> None:
    """An address of node1's pod subnet that no pod holds is refused at node1."""
    node = clean.nodes[0]
    routes = {r["dst"]: r for r in node.ns.ip("-4", "route", "show", "proto", "80")}
    assert routes["10.244.1.0/24"]["type"] == "unreachable"
    probe = ping(clean.external, "10.244.1.250")
    assert probe.returncode != 0 and "Unreachable" in probe.stdout


IPVLAN_FAILURE = (
    # Where the kernel has ipvlan, ADD succeeds (tests/kernel covers it): exhaust a range instead.
    ("ipv", 109, "no ipvlan support")
    if not Path("/sys/module/ipvlan").exists()
    else ("tiny, tiny, tiny", None, "tiny")
)


@pytest.mark.parametrize(
    ("networks", "code", "fragment"),
    [
        ("nomaster", 7, "master interface ghost0 does not exist"),
        IPVLAN_FAILURE,
        (json.dumps([{"name": "tiny"}, {"name": "tiny"}, {"name": "tiny"}]), None, "tiny"),
    ],
)
def test_failed_adds_leave_nothing(
    clean: Cluster, networks: str, code: int | None, fragment: str
) -> None:
    node = clean.nodes[0]
    pod = clean.new_ns("doomed")
    out = node.runtime.add(
        pod.name, pod.path, annotations={"k8s.v1.cni.cncf.io/networks": networks}
    )
    assert out.returncode == 1, out.stdout
    if code is not None:
        assert out.body["code"] == code
    assert fragment in out.body["msg"]
    assert set(pod.links()) == {"lo"}
    assert clean.leftovers() == {}
    node.runtime.delete(pod.name, pod.path, with_prev=False).ok()


def test_an_interface_already_in_the_pod_is_never_taken_over(clean: Cluster) -> None:
    node = clean.nodes[0]
    pod = clean.new_ns("squatted")
    pod.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other")
    out = node.runtime.add("squatted", pod.path, annotations={})
    assert out.returncode == 1 and "eth0 already exists" in out.body["msg"]
    assert set(pod.links()) == {"lo", "eth0", "other"}
    assert clean.leftovers() == {}
