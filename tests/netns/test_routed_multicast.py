"""Multicast on the routed primary (`fabric.multicast: true`) on the three-node bed, native and
VXLAN fabric, IPv4 and IPv6, local mode (each node floods group traffic to the others, which
deliver to their own members only): members in pods on all three nodes receive every datagram
of a sender on node 1, a pod that did not join gets none at its link, a datagram with TTL 1
leaves no pod's link, and a receiver that leaves stops receiving. Replication is tc on the
pods' veths (delegates.fabric_mcast): checked here through what arrives, and the filters
themselves once."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest

from delegates.fabric import MULTICAST_DEVICE, VXLAN_DEVICE
from delegates.routed import host_veth_name
from metaplugin.client import get
from testbed.cluster import Cluster, Node, cluster
from testbed.netns import Netns
from tests.netns.test_multicast_attach import received, receiver
from tests.netns.test_overlay import REFERENCE_PLUGINS, run_in, sniffer
from tests.support.require import missing

GROUP = {"4": "239.9.9.9", "6": "ff3e::9:9"}
PORT = 17777  # test_multicast_attach's RECEIVE listens there

SEND = """
import socket, sys, time
family, group, port, count, marker, ttl = sys.argv[1:7]
s = socket.socket(socket.AF_INET if family == "4" else socket.AF_INET6, socket.SOCK_DGRAM)
if family == "4":
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, int(ttl))
else:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, int(ttl))
for i in range(int(count)):  # no interface named: the default route's, eth0
    s.sendto(marker.encode() + b"-%d" % i, (group, int(port)))
    time.sleep(0.02)
"""


@pytest.fixture(scope="module", params=["native", "vxlan"])
def bed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    if not REFERENCE_PLUGINS.is_dir():
        missing("Debian's containernetworking-plugins are not installed (/usr/lib/cni)")
    root = tmp_path_factory.mktemp(f"rmc-{request.param}")
    with cluster(root, request.param, fabric_keys={"multicast": True}) as c:
        yield c


@pytest.fixture
def clean(bed: Cluster) -> Iterator[Cluster]:
    try:
        yield bed
    finally:
        for node in bed.nodes:
            node.remove_pods()
    assert bed.leftovers() == {}


def pod(bed: Cluster, node: Node, role: str) -> Netns:
    ns, out = node.add_pod(bed, role)
    out.ok()
    return ns


def send(sender: Netns, family: str, count: int, marker: str, ttl: int = 4) -> None:
    argv = [family, GROUP[family], str(PORT), str(count), marker, str(ttl)]
    subprocess.run(run_in(sender, SEND, *argv), check=True, timeout=30)


def wait_for_members(node: Node, count: int, timeout: float = 5.0) -> None:
    """Until node's replication lists `count` member veths for some group (the reports were
    seen and the pods' membership read): the filters on the VXLAN device say so."""
    device = VXLAN_DEVICE if _mode(node) == "vxlan" else MULTICAST_DEVICE
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = node.ns.run("tc", "filter", "show", "dev", device, "ingress").stdout
        if (out.count("Egress") >= count > 0) or (count == 0 and "Egress" not in out):
            return
        time.sleep(0.05)
    raise AssertionError(f"{node.name}: {count} member veths never showed on {device}")


def _mode(node: Node) -> str:
    return str(node.daemon.config["fabric"]["mode"])


@pytest.mark.parametrize("family", ["4", "6"])
def test_members_on_every_node_get_every_datagram_others_none(clean: Cluster, family: str) -> None:
    n1, n2, n3 = clean.nodes
    sender = pod(clean, n1, "snd")
    members = [pod(clean, n1, "m1"), pod(clean, n2, "m2"), pod(clean, n3, "m3")]
    bystanders = [pod(clean, n1, "b1"), pod(clean, n2, "b2")]
    n = 20
    joined = [receiver(p, family, GROUP[family], n) for p in members]
    for node in clean.nodes:
        wait_for_members(node, 1)
    marker = f"rmc{family}-a"
    idle = [sniffer(p, "eth0", marker, 4) for p in bystanders]
    try:
        # `plexusctl multicast` on node 2: its member on the primary, flooded (local mode)
        status, body = get(n2.daemon.socket, "/v1/multicast")
        assert status == 200
        assert json.loads(body) == [
            {
                "network": "pods",
                "group": GROUP[family],
                "members": ["default/m2 (eth0)"],
                "sentTo": ["every fabric node"],
            }
        ]
        send(sender, family, n, marker)
        assert [received(proc) for proc in joined] == [n, n, n]
        assert [received(proc) for proc in idle] == [0, 0]
    finally:
        for proc in [*joined, *idle]:
            proc.kill()


@pytest.mark.parametrize("family", ["4", "6"])
def test_ttl_one_stays_in_the_pod_and_a_leave_stops_delivery(clean: Cluster, family: str) -> None:
    n1, n2, _ = clean.nodes
    sender = pod(clean, n1, "snd")
    near, far = pod(clean, n1, "near"), pod(clean, n2, "far")
    n = 10
    joined = [receiver(p, family, GROUP[family], n) for p in (near, far)]
    wait_for_members(n1, 1)
    wait_for_members(n2, 1)
    try:
        send(sender, family, n, f"rmc{family}-t", ttl=1)  # the default: link-local scope
        assert [received(proc) for proc in joined] == [0, 0]
    finally:
        for proc in joined:
            proc.kill()
    # Both receivers exited (their sockets closed: a leave). The nodes drop them at once.
    wait_for_members(n1, 0)
    wait_for_members(n2, 0)
    marker = f"rmc{family}-l"
    gone = [sniffer(p, "eth0", marker, 3) for p in (near, far)]
    try:
        send(sender, family, n, marker)
        assert [received(proc) for proc in gone] == [0, 0]
    finally:
        for proc in gone:
            proc.kill()


def test_a_deleted_member_pod_drops_out(clean: Cluster) -> None:
    """A member whose pod is deleted while its socket is still joined: its DEL takes it out."""
    n2 = clean.nodes[1]
    member = pod(clean, n2, "doomed")
    proc = receiver(member, "4", GROUP["4"], 1000)
    try:
        wait_for_members(n2, 1)
        cid, path = n2.pods.pop()
        n2.runtime.delete(cid, path.path).ok()
        wait_for_members(n2, 0)
    finally:
        proc.kill()
        proc.communicate()


def test_the_filters_are_the_pods_and_go_with_them(clean: Cluster) -> None:
    """On the sender's veth: local-only traffic passes, the group goes to the other member's
    veth and the VXLAN device (flood, local mode), any other group to the VXLAN device; after
    the pods are deleted, nothing of theirs is left (the bed's leftovers check)."""
    n1 = clean.nodes[0]
    sender = pod(clean, n1, "snd")
    member = pod(clean, n1, "mem")
    proc = receiver(member, "4", GROUP["4"], 1)
    try:
        wait_for_members(n1, 1)
        cid = sender.name
        host = host_veth_name(cid, "eth0")
        out = n1.ns.run("tc", "filter", "show", "dev", host, "ingress").stdout
        device = VXLAN_DEVICE if _mode(n1) == "vxlan" else MULTICAST_DEVICE
        member_host = host_veth_name(member.name, "eth0")
        assert "match 00000000/fe000000 at 8" in out  # TTL <= 1: not forwarded
        assert "match ef090909/ffffffff at 16" in out  # the group
        assert f"Egress Mirror to device {member_host}" in out
        assert f"Egress Redirect to device {device}" in out
    finally:
        proc.kill()
        proc.communicate()
