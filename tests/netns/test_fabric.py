"""The node side of the fabric against the kernel, in a namespace standing for a node: it owns
only its own routes (a route someone else put there survives, and wins), one peer that cannot
be reached never stops the others, the node's own pod subnets are refused rather than bounced,
VXLAN peer entries follow the set of nodes both ways, a damaged VTEP is made again, and IPv6
forwarding never costs the node its RA-learned default route."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from delegates.fabric import VXLAN_DEVICE, Fabric, FabricConfig, Peer, vtep_mac
from delegates.forwarding import ensure_forwarding
from kernel.netns import run_in_netns
from testbed.netns import Netns, namespaces

OWN = ("10.1.0.0/24", "fd00:1::/64")
P2 = Peer("node-2", ("192.0.2.2", "2001:db8::2"), ("10.2.0.0/24", "fd00:2::/64"))
P3 = Peer("node-3", ("192.0.2.3",), ("10.3.0.0/24",))
FAR = Peer("far", ("198.51.100.5",), ("10.5.0.0/24",))  # not on the node's segment


@pytest.fixture
def node() -> Iterator[Netns]:
    """A node namespace whose eth0 sits on a segment (192.0.2.0/24, 2001:db8::/64)."""
    with namespaces() as made:
        ns = Netns("fabric-node")
        made.append(ns)
        ns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "wire")
        ns.run("ip", "addr", "add", "192.0.2.1/24", "dev", "eth0")
        ns.run("ip", "addr", "add", "2001:db8::1/64", "dev", "eth0", "nodad")
        for link in ("eth0", "wire"):
            ns.run("ip", "link", "set", link, "up")
        yield ns


def fabric_in(ns: Netns, mode: str, **overrides: Any) -> Fabric:
    config = FabricConfig(
        mode=mode,  # type: ignore[arg-type]
        node_name="node-1",
        pod_cidrs=OWN,
        interface="eth0",
        address="192.0.2.1",
        **overrides,
    )
    fabric = Fabric(config)
    run_in_netns(ns.path, fabric.setup)
    return fabric


def reconcile(ns: Netns, fabric: Fabric, peers: list[Peer]) -> list[str]:
    return run_in_netns(ns.path, lambda: fabric.reconcile(peers))


def routes(ns: Netns, *families: str) -> dict[str, dict[str, Any]]:
    out = {}
    for family in families or ("-4", "-6"):
        for route in ns.ip(family, "route", "show", "table", "main"):
            out[f"{route['dst']}|{route.get('protocol', '')}"] = route
    return out


def test_reconcile_touches_only_its_own_routes(node: Netns) -> None:
    fabric = fabric_in(node, "native")
    node.run("ip", "route", "add", "10.9.0.0/24", "via", "192.0.2.9", "proto", "static")
    # Left by an earlier run: one route of ours under a foreign one, one for a departed peer.
    node.run("ip", "route", "add", "10.9.0.0/24", "via", "192.0.2.7", "proto", "80", "metric", "50")
    node.run("ip", "route", "add", "10.8.0.0/24", "via", "192.0.2.8", "proto", "80")
    p9 = Peer("node-9", ("192.0.2.9",), ("10.9.0.0/24",))

    problems = reconcile(node, fabric, [P2, P3, p9, FAR])

    have = routes(node)
    assert have["10.2.0.0/24|80"]["gateway"] == "192.0.2.2"
    assert have["fd00:2::/64|80"]["gateway"] == "2001:db8::2"
    assert have["10.3.0.0/24|80"]["gateway"] == "192.0.2.3"
    assert have["10.9.0.0/24|static"]["gateway"] == "192.0.2.9"  # the admin's, untouched
    assert "10.9.0.0/24|80" not in have and "10.8.0.0/24|80" not in have
    assert "10.5.0.0/24|80" not in have  # FAR has no on-link next hop ...
    assert have["10.1.0.0/24|80"]["type"] == "unreachable"  # our own subnets
    assert have["fd00:1::/64|80"]["type"] == "unreachable"
    assert len(problems) == 2  # ... and both problems are reported, the rest is done
    assert any("10.9.0.0/24" in p and "another route" in p for p in problems)
    assert any("10.5.0.0/24 (far)" in p for p in problems)

    assert reconcile(node, fabric, []) == []
    left = {k for k in routes(node) if "|80" in k or "|static" in k}
    assert left == {"10.9.0.0/24|static", "10.1.0.0/24|80", "fd00:1::/64|80"}


def test_an_unknown_address_in_the_own_subnet_is_refused(node: Netns) -> None:
    fabric = fabric_in(node, "native")
    reconcile(node, fabric, [])
    answer = node.run("ip", "route", "get", "10.1.0.77", check=False)
    assert answer.returncode != 0 and "No route to host" in answer.stderr  # ICMP unreachable
    wire = node.run(
        "ip", "route", "get", "10.1.0.77", "from", "192.0.2.50", "iif", "eth0", check=False
    )
    assert "No route to host" in wire.stderr  # for a forwarded packet too: no bounce


def fdb(ns: Netns) -> set[tuple[str, str]]:
    entries = json.loads(ns.run("bridge", "-j", "fdb", "show", "dev", VXLAN_DEVICE).stdout)
    return {(e["mac"], e["dst"]) for e in entries if e.get("dst") and "permanent" in e["state"]}


def neighbours(ns: Netns) -> dict[str, str]:
    return {
        n["dst"]: n.get("lladdr", "")
        for n in ns.ip("neigh", "show", "dev", VXLAN_DEVICE)
        if "PERMANENT" in n.get("state", [])
    }


def test_vxlan_peers_follow_the_set_of_nodes(node: Netns) -> None:
    fabric = fabric_in(node, "vxlan")
    assert reconcile(node, fabric, [P2, P3]) == []
    assert fdb(node) == {(vtep_mac("node-2"), "192.0.2.2"), (vtep_mac("node-3"), "192.0.2.3")}
    assert neighbours(node) == {
        "10.2.0.0": vtep_mac("node-2"),
        "fd00:2::": vtep_mac("node-2"),
        "10.3.0.0": vtep_mac("node-3"),
    }
    assert routes(node)["10.3.0.0/24|80"]["dev"] == VXLAN_DEVICE

    assert reconcile(node, fabric, [P2]) == []  # node-3 left the cluster
    assert fdb(node) == {(vtep_mac("node-2"), "192.0.2.2")}
    assert set(neighbours(node)) == {"10.2.0.0", "fd00:2::"}
    assert "10.3.0.0/24|80" not in routes(node)


def test_a_damaged_vtep_is_made_again(node: Netns) -> None:
    fabric = fabric_in(node, "vxlan")
    reconcile(node, fabric, [P2])
    node.run("ip", "link", "del", VXLAN_DEVICE)
    assert reconcile(node, fabric, [P2]) == []
    vtep = node.links()[VXLAN_DEVICE]
    assert vtep["address"] == vtep_mac("node-1")
    assert vtep["linkinfo"]["info_data"]["id"] == 4242
    assert routes(node)["10.2.0.0/24|80"]["dev"] == VXLAN_DEVICE
    assert fdb(node) == {(vtep_mac("node-2"), "192.0.2.2")}

    fabric.config.vni = 4343  # as after a config change and restart
    reconcile(node, fabric, [P2])
    assert node.links()[VXLAN_DEVICE]["linkinfo"]["info_data"]["id"] == 4343
    assert sorted(node.addresses(VXLAN_DEVICE)) == ["10.1.0.0/32", "fd00:1::/128"]


def test_ipv6_forwarding_keeps_the_ra_learned_default_route(node: Netns) -> None:
    node.run("ip", "link", "add", "other", "type", "veth", "peer", "name", "other-peer")
    for link in ("eth0", "other"):
        node.run("sysctl", "-qw", f"net.ipv6.conf.{link}.accept_ra=1")
    node.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=0")
    node.run("ip", "-6", "route", "add", "default", "via", "fe80::9", "dev", "eth0", "proto", "ra")

    run_in_netns(node.path, lambda: ensure_forwarding({6}))

    def sysctl(key: str) -> str:
        return node.run("sysctl", "-n", key).stdout.strip()

    assert sysctl("net.ipv6.conf.all.forwarding") == "1"
    assert sysctl("net.ipv6.conf.eth0.accept_ra") == "2"  # still takes RAs while forwarding
    assert sysctl("net.ipv6.conf.other.accept_ra") == "1"  # not an RA-fed link: left alone
    assert sysctl("net.ipv4.ip_forward") == "0"  # only the family asked for
