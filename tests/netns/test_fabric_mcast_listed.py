"""The routed primary's replicator in cluster mode (`listed`: the member nodes come from the
controller's aggregate through `set_group_members`), on three node namespaces of our own with
the fabric in native mode: a group goes to exactly the nodes listed — the node without a
member sees none of it on its underlay link — and to no node at all once the list is empty.
The pods are plain veth pairs named as plexus-routed names them. Native and VXLAN fabric."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from delegates.fabric import Fabric, FabricConfig, Peer
from delegates.fabric_mcast import FabricMulticast, clear
from delegates.routed import host_veth_name
from kernel.netns import run_in_netns
from testbed.netns import Netns, namespaces
from tests.netns.test_multicast_attach import received, receiver
from tests.netns.test_overlay import sniffer

GROUP = "239.7.7.7"
MARKER = "listed"
SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 4)
for i in range(int(sys.argv[2])):
    s.sendto(b"%s-%d" % (sys.argv[1].encode(), i), ("239.7.7.7", 17777))
    time.sleep(0.02)
"""


def underlay(i: int) -> str:
    return f"192.168.150.{10 + i}"


def cidr(i: int) -> str:
    return f"10.150.{i}.0/24"


@dataclass
class BedNode:
    index: int
    ns: Netns
    fabric: Fabric
    mcast: FabricMulticast
    pods: dict[str, Netns]

    def run(self, fn):  # type: ignore[no-untyped-def]
        return run_in_netns(self.ns.path, fn)


@pytest.fixture(params=["native", "vxlan"])
def bed(request: pytest.FixtureRequest) -> Iterator[list[BedNode]]:
    with namespaces() as made:
        lan = Netns("lan")
        made.append(lan)
        lan.run("ip", "link", "add", "br0", "type", "bridge")
        lan.run("ip", "link", "set", "br0", "up")
        peers = [Peer(f"n{i}", (underlay(i),), (cidr(i),)) for i in (1, 2, 3)]
        nodes: list[BedNode] = []
        for i in (1, 2, 3):
            ns = Netns(f"node{i}")
            made.append(ns)
            lan.run(
                "ip",
                "link",
                "add",
                f"l{i}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns.name,
            )
            lan.run("ip", "link", "set", f"l{i}", "master", "br0", "up")
            ns.run("ip", "link", "set", "eth0", "up")
            ns.run("ip", "addr", "add", f"{underlay(i)}/24", "dev", "eth0")
            config = FabricConfig(
                mode="native",
                node_name=f"n{i}",
                pod_cidrs=(cidr(i),),
                interface="eth0",
                multicast=True,
            )
            fabric = Fabric(config)
            run_in_netns(ns.path, fabric.setup)
            run_in_netns(ns.path, lambda f=fabric: f.reconcile(peers))
            nodes.append(BedNode(i, ns, fabric, FabricMulticast(fabric, listed=True), {}))
        for node in nodes:
            for role in ("snd", "rcv"):
                pod = Netns(f"n{node.index}-{role}")
                made.append(pod)
                host = host_veth_name(pod.name, "eth0")
                address = f"10.150.{node.index}.{10 + len(node.pods)}"
                node.ns.run(
                    "ip",
                    "link",
                    "add",
                    host,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    pod.name,
                )
                node.ns.run("ip", "link", "set", host, "up")
                node.ns.run("ip", "route", "add", f"{address}/32", "dev", host)
                pod.run("ip", "link", "set", "eth0", "up")
                pod.run("ip", "addr", "add", f"{address}/32", "dev", "eth0")
                pod.run("ip", "route", "add", "default", "dev", "eth0")
                node.pods[role] = pod
        yield nodes


def host(pod: Netns) -> str:
    return host_veth_name(pod.name, "eth0")


def send(pod: Netns, count: int) -> None:
    subprocess.run(
        ["ip", "netns", "exec", pod.name, sys.executable, "-I", "-c", SEND, MARKER, str(count)],
        check=True,
        timeout=30,
    )


def test_a_group_goes_to_the_listed_nodes_only(bed: list[BedNode]) -> None:
    n1, n2, n3 = bed
    # What each node's membership says: receivers on node 1 and node 3 joined; node 2 has none.
    for node in bed:
        ports = [host(p) for p in node.pods.values()]
        members = {} if node is n2 else {GROUP: frozenset({host(node.pods["rcv"])})}
        node.run(lambda n=node, m=members, p=ports: n.mcast.set_local(m, p))
    # The controller's aggregate, as node 1 gets it: the other member node is node 3.
    assert n1.run(lambda: n1.mcast.set_group_members(GROUP, [underlay(1), underlay(3)]))
    assert n1.mcast.replication() == {GROUP: [underlay(3)]}
    n = 20
    joined = [receiver(node.pods["rcv"], "4", GROUP, n) for node in (n1, n3)]
    on_wire = [sniffer(node.ns, "eth0", MARKER, 4) for node in (n2, n3)]
    try:
        send(n1.pods["snd"], n)
        assert [received(p) for p in joined] == [n, n]
        assert [received(p) for p in on_wire] == [0, n]  # node 2's underlay: nothing
    finally:
        for proc in [*joined, *on_wire]:
            proc.kill()
            proc.communicate()
    # Node 3's member left: the list is empty, and the group leaves node 1 for no one.
    n1.run(lambda: n1.mcast.set_group_members(GROUP, []))
    assert n1.mcast.replication() == {}
    on_wire = [sniffer(node.ns, "eth0", MARKER, 3) for node in (n2, n3)]
    local = receiver(n1.pods["rcv"], "4", GROUP, n)
    try:
        send(n1.pods["snd"], n)
        assert received(local) == n  # the member on the sender's own node still gets it
        assert [received(p) for p in on_wire] == [0, 0]
    finally:
        for proc in [*on_wire, local]:
            proc.kill()
            proc.communicate()


def test_clear_takes_the_filters_off(bed: list[BedNode]) -> None:
    """Multicast turned off (plexusd starts without it): the pods' veths carry no filter."""
    n1 = bed[0]
    hosts = [host(p) for p in n1.pods.values()]
    n1.run(lambda: n1.mcast.set_local({GROUP: frozenset(hosts[:1])}, hosts))
    assert "mirred" in n1.ns.run("tc", "filter", "show", "dev", hosts[1], "ingress").stdout
    assert n1.run(lambda: clear([*hosts, "nosuchveth0"])) == 2
    for name in hosts:
        assert n1.ns.run("tc", "filter", "show", "dev", name, "ingress").stdout == ""
        assert "clsact" not in n1.ns.run("tc", "qdisc", "show", "dev", name).stdout


def test_a_restarted_replicator_keeps_the_lists_it_finds(bed: list[BedNode]) -> None:
    """plexusd restarted in cluster mode: until the controller's lists arrive, node 1 goes on
    sending the group where the MDB says (a fresh replicator reads the MDB back)."""
    n1 = bed[0]
    hosts = [host(p) for p in n1.pods.values()]
    n1.run(lambda: n1.mcast.set_local({}, hosts))
    assert n1.run(lambda: n1.mcast.set_group_members(GROUP, [underlay(3)]))
    fresh = FabricMulticast(n1.fabric, listed=True)
    n1.run(lambda: fresh.set_local({}, hosts))
    assert fresh.replication() == {GROUP: [underlay(3)]}
    out = n1.ns.run("tc", "filter", "show", "dev", hosts[0], "ingress").stdout
    assert "Egress Redirect to device" in out  # the group still goes to the VXLAN device
