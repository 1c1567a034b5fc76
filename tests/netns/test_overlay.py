"""`plexus-overlay` on the three-node bed (each node its own plexusd, the fabric in local mode):
pods of one overlay network on every node reach each other over L2 (ARP, unicast, IPv4 and
IPv6) with an exact MTU; multicast reaches every member and no pod that did not join, and a
member that leaves stops receiving within the query interval; the VXLAN MDB API sends a group
to the listed nodes only (counted on the underlay); the segment exists while a pod uses it; a
failed ADD leaves nothing; two networks on one VNI are refused."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from delegates.overlay import QUERY_INTERVAL_S, bridge_name, derived_vni, vxlan_name
from metaplugin.client import get
from testbed.cluster import Cluster, Node, cluster, ping
from testbed.manifests import host_local, nad
from testbed.netns import Netns
from tests.netns.test_multicast_attach import received, receiver
from tests.support.require import missing

REFERENCE_PLUGINS = Path("/usr/lib/cni")
REPO = Path(__file__).resolve().parents[2]
NETWORKS = "k8s.v1.cni.cncf.io/networks"
GROUP = {"4": "239.8.8.8", "6": "ff3e::8:8"}
PORT = 17777  # RECEIVE's port is given on its command line: the same here
MTU = 1450  # the bed's underlay MTU 1500, minus 50 (IPv4 underlay)
FABRIC_VNI = 4242

SEND = """
import socket, sys, time
family, group, port, count, marker = sys.argv[1:6]
s = socket.socket(socket.AF_INET if family == "4" else socket.AF_INET6, socket.SOCK_DGRAM)
for i in range(int(count)):  # no IP_MULTICAST_IF: the group route picks the overlay
    s.sendto(marker.encode() + b"-%d" % i, (group, int(port)))
    time.sleep(0.02)
"""

# Frames arriving on an interface that carry `marker` anywhere (a pod's own frames, or the
# VXLAN-encapsulated ones on a node's underlay: the inner payload is in the clear).
SNIFF = """
import socket, sys, time
ifname, marker, seconds = sys.argv[1], sys.argv[2].encode(), float(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((ifname, 0))
s.settimeout(0.2)
print("ready", flush=True)
count, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    try:
        data, where = s.recvfrom(65535)
    except TimeoutError:
        continue
    if where[2] != socket.PACKET_OUTGOING and marker in data:
        count += 1
print(count, flush=True)
"""

# The MDB API, called as cluster mode's controller will: on a node, in its namespace.
MEMBERS = """
import sys
from delegates.fabric import Fabric, FabricConfig
from delegates.overlay import Overlay
node, network, group = sys.argv[1:4]
fabric = Fabric(FabricConfig(mode="native", node_name=node, pod_cidrs=(), interface="eth0"))
fabric.setup()
overlay = Overlay(ipam=None, fabric=fabric)
print(overlay.set_group_members(network, group, sys.argv[4:]))
"""


# The fabric's peer set changes (a node leaves, comes back): the same reconcile plexusd runs,
# on a node, in its namespace; the overlay hears of it through the fabric.
RECONCILE = """
import sys
from delegates.fabric import Fabric, FabricConfig, Peer
from delegates.overlay import Overlay
me, keep = int(sys.argv[1]), [int(j) for j in sys.argv[2:]]
def cidrs(j):
    return (f"10.244.{j}.0/24", f"fd00:244:{j}::/64")
peers = [
    Peer(f"node{j}", (f"192.168.100.{10 + j}", f"fd00:100::{10 + j}"), cidrs(j)) for j in keep
]
config = FabricConfig(mode="native", node_name=f"node{me}", pod_cidrs=cidrs(me), interface="eth0")
fabric = Fabric(config)
fabric.setup()
Overlay(ipam=None, fabric=fabric)
print(fabric.reconcile(peers))
"""


def _ipam(home: Path, i: int, v4: str, v6: str) -> dict[str, Any]:
    """Each node its own part of the subnet: host-local is per node."""
    return host_local(
        f"{v4}.0/24",
        home / "leases",
        ranges=[
            [{"subnet": f"{v4}.0/24", "rangeStart": f"{v4}.{i}1", "rangeEnd": f"{v4}.{i}9"}],
            [{"subnet": f"{v6}::/64", "rangeStart": f"{v6}::{i}:1", "rangeEnd": f"{v6}::{i}:9"}],
        ],
    )


def _overlay(name: str, ipam: dict[str, Any], **keys: Any) -> dict[str, Any]:
    return nad(name, {"cniVersion": "1.0.0", "type": "plexus-overlay", **keys, "ipam": ipam})


def write_nads(bed: Cluster, *extra: str) -> None:
    for node in bed.nodes:
        home = bed.root / node.name
        i = node.index
        docs = [
            _overlay("ovl", _ipam(home, i, "10.70.0", "fd00:70"), multicast=True),
            _overlay("ovl-a", _ipam(home, i, "10.73.0", "fd00:73"), vni=5000),
            _overlay("ovl-big", _ipam(home, i, "10.74.0", "fd00:74"), mtu=MTU + 1),
            # host-local's only address is the gateway's: every ADD fails at IPAM
            _overlay(
                "ovl-full",
                host_local(
                    "10.76.0.0/24",
                    home / "leases",
                    ranges=[
                        [
                            {
                                "subnet": "10.76.0.0/24",
                                "rangeStart": "10.76.0.1",
                                "rangeEnd": "10.76.0.1",
                                "gateway": "10.76.0.1",
                            }
                        ]
                    ],
                ),
            ),
        ]
        if "ovl-b" in extra:
            docs.append(_overlay("ovl-b", _ipam(home, i, "10.75.0", "fd00:75"), vni=5000))
        if "twin" in extra:  # another namespace's NAD whose config has the same name as ovl-t
            for namespace in ("default", "other"):
                docs.append(
                    nad(
                        "ovl-t",
                        {
                            "cniVersion": "1.0.0",
                            "type": "plexus-overlay",
                            "ipam": _ipam(home, i, "10.77.0", "fd00:77"),
                        },
                        namespace=namespace,
                    )
                )
        (home / "nads" / "overlay.yaml").write_text(yaml.safe_dump_all(docs))


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not REFERENCE_PLUGINS.is_dir():
        missing("Debian's containernetworking-plugins are not installed (/usr/lib/cni)")
    with cluster(tmp_path_factory.mktemp("overlay"), "native") as c:
        write_nads(c)
        yield c


@pytest.fixture
def clean(bed: Cluster) -> Iterator[Cluster]:
    """Every test's pods are removed afterwards; the nodes must then hold nothing, no segment
    either (the bed's leftovers list every px* link)."""
    try:
        yield bed
    finally:
        for node in bed.nodes:
            node.remove_pods()
        write_nads(bed)
    assert bed.leftovers() == {}


def attach(bed: Cluster, node: Node, role: str, network: str = "ovl") -> Netns:
    pod, out = node.add_pod(bed, role, network)
    out.ok()
    return pod


def overlay_address(pod: Netns, version: int) -> str:
    for cidr in pod.addresses("net1"):
        if (":" in cidr) == (version == 6):
            return cidr.split("/")[0]
    raise AssertionError(f"pod {pod.name} has no IPv{version} address on net1")


def segments(node: Node) -> set[str]:
    return {n for n in node.ns.links() if n.startswith(("pxo", "pxv"))}


def run_in(ns: Netns, code: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns.name, sys.executable, "-I", "-c", code, *argv]


def sniffer(ns: Netns, ifname: str, marker: str, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        run_in(ns, SNIFF, ifname, marker, str(seconds)), stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def settle() -> None:
    """Wait out what a fresh segment does on its own. Each node's bridge is a querier; when one
    first hears a querier with a lower address (another node's new segment, within a startup
    query interval of its creation), it stands down and, for one query response interval,
    treats every group as unregistered and floods it (the kernel's other-querier delay
    timer). Then the joins' reports have crossed the segment and snooping holds."""
    time.sleep(2.5)


def join(pod: Netns, family: str, count: int) -> subprocess.Popen[str]:
    return receiver(pod, family, GROUP[family], count)


def send(pod: Netns, family: str, count: int, marker: str) -> None:
    argv = [family, GROUP[family], str(PORT), str(count), marker]
    subprocess.run(run_in(pod, SEND, *argv), check=True, timeout=30)


def product_code(node: Node, code: str, *argv: str) -> str:
    """Run `code` (importing this checkout's packages) in a node's namespace; its last line."""
    out = subprocess.run(
        [
            *("ip", "netns", "exec", node.ns.name, "env", f"PYTHONPATH={REPO}", sys.executable),
            *("-c", code, *argv),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]  # after the log lines


def set_members(node: Node, network: str, group: str, *addresses: str) -> str:
    return product_code(node, MEMBERS, node.name, network, group, *addresses)


@pytest.mark.parametrize("version", [4, 6])
def test_pods_on_three_nodes_share_one_l2_segment(clean: Cluster, version: int) -> None:
    pods = [attach(clean, node, f"u{version}") for node in clean.nodes]
    vni = derived_vni("ovl", avoid=FABRIC_VNI)
    for node in clean.nodes:
        assert segments(node) == {bridge_name(vni), vxlan_name(vni)}
        vx = node.ns.ip("link", "show", vxlan_name(vni))[0]["linkinfo"]["info_data"]
        assert vx["id"] == vni and vx["local"] == node.address and vx["link"] == "eth0"
        flood = {e["dst"] for e in _fdb(node, vxlan_name(vni))}
        assert flood == {n.address for n in clean.nodes if n is not node}
    for pod in pods:
        assert pod.links()["net1"]["mtu"] == MTU
    a, b, c = pods
    for target in (b, c):
        address = overlay_address(target, version)
        # the first packet needs the neighbour resolved: ARP / NDP across the overlay
        assert ping(a, address).returncode == 0
    neighbours = a.ip(f"-{version}", "neigh", "show", "dev", "net1")
    assert {n["dst"] for n in neighbours} >= {overlay_address(p, version) for p in (b, c)}


def _fdb(node: Node, device: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["bridge", "-n", node.ns.name, "-j", "fdb", "show", "dev", device],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [e for e in json.loads(out or "[]") if e["mac"] == "00:00:00:00:00:00"]


@pytest.mark.parametrize("version", [4, 6])
def test_mtu_is_exact(clean: Cluster, version: int) -> None:
    a = attach(clean, clean.nodes[0], "m1")
    b = attach(clean, clean.nodes[1], "m2")
    target = overlay_address(b, version)
    header = 28 if version == 4 else 48
    assert ping(a, target).returncode == 0
    assert ping(a, target, "-M", "do", "-s", str(MTU - header)).returncode == 0
    assert ping(a, target, "-M", "do", "-s", str(MTU - header + 1)).returncode != 0


@pytest.mark.parametrize("family", ["4", "6"])
def test_multicast_reaches_members_only_and_stops_after_a_leave(
    clean: Cluster, family: str
) -> None:
    n1, n2, n3 = clean.nodes
    sender = attach(clean, n1, "snd")
    members = [attach(clean, n1, "r1"), attach(clean, n2, "r2"), attach(clean, n3, "r3")]
    bystander = attach(clean, n1, "bys")  # on a node that has a member: the bridge prunes it
    n = 20
    joined = [join(pod, family, n) for pod in members]
    settle()  # the joins' reports cross the segment; the querier election is over
    idle = sniffer(bystander, "net1", f"mc{family}-a", 4)
    try:
        # `plexusctl multicast` on node 2: its member, and the flood (local mode, no MDB)
        status, body = get(n2.daemon.socket, "/v1/multicast")
        assert status == 200
        assert [(r["network"], r["group"], r["sentTo"]) for r in json.loads(body)] == [
            ("default/ovl", GROUP[family], ["every fabric node"])
        ]
        send(sender, family, n, f"mc{family}-a")
        assert [received(proc) for proc in joined] == [n, n, n]
        assert received(idle) == 0
    finally:
        for proc in [*joined, idle]:
            proc.kill()
    # Every receiver closed its socket on exit (a leave). r1 and r3 join again; r2 does not,
    # and within the query interval frames for the group stop reaching it.
    time.sleep(QUERY_INTERVAL_S)
    joined = [join(members[0], family, n), join(members[2], family, n)]
    settle()
    left = sniffer(members[1], "net1", f"mc{family}-b", 4)
    try:
        send(sender, family, n, f"mc{family}-b")
        assert [received(proc) for proc in joined] == [n, n]
        assert received(left) == 0
    finally:
        for proc in [*joined, left]:
            proc.kill()


@pytest.mark.parametrize("family", ["4", "6"])
def test_group_members_api_prunes_replication_to_listed_nodes(clean: Cluster, family: str) -> None:
    n1, n2, n3 = clean.nodes
    sender = attach(clean, n1, "snd")
    members = [attach(clean, n2, "r2"), attach(clean, n3, "r3")]
    n = 20
    # Local mode floods a group with remote members to every node: node 2 gets it too.
    joined = [join(members[1], family, n)]
    settle()
    wire2 = sniffer(n2.ns, "eth0", f"mdb{family}-a", 4)
    try:
        send(sender, family, n, f"mdb{family}-a")
        assert received(joined[0]) == n
        assert received(wire2) == n
    finally:
        for proc in [*joined, wire2]:
            proc.kill()
    # The controller says only node 3 has members: node 2's underlay sees none of it.
    assert set_members(n1, "ovl", GROUP[family], n3.address) == "True"
    mdb = subprocess.run(
        ["bridge", "-n", n1.ns.name, "mdb", "show", "dev", vxlan_name(_vni())],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"grp {GROUP[family]} permanent" in mdb  # (this iproute2 does not show the dst)
    joined = [join(members[1], family, n)]
    settle()
    wire2, wire3 = (
        sniffer(n2.ns, "eth0", f"mdb{family}-b", 4),
        sniffer(n3.ns, "eth0", f"mdb{family}-b", 4),
    )
    try:
        send(sender, family, n, f"mdb{family}-b")
        assert received(joined[0]) == n
        assert received(wire3) == n
        assert received(wire2) == 0
    finally:
        for proc in [*joined, wire2, wire3]:
            proc.kill()
    # An empty list gives the group back to the flood list.
    assert set_members(n1, "ovl", GROUP[family]) == "True"
    assert (
        GROUP[family]
        not in subprocess.run(
            ["bridge", "-n", n1.ns.name, "mdb", "show", "dev", vxlan_name(_vni())],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    # A network with no segment on the node: nothing to program.
    assert set_members(n1, "ovl-a", GROUP[family], n3.address) == "False"


def _vni() -> int:
    return derived_vni("ovl", avoid=FABRIC_VNI)


def test_segment_lives_while_a_pod_uses_it(clean: Cluster) -> None:
    node = clean.nodes[2]
    vni = _vni()
    # Two first pods at once: one segment, both attached (the per-network lock).
    pods = [clean.new_ns(f"c{i}") for i in range(2)]
    outs: list[Any] = [None, None]

    def add(i: int) -> None:
        outs[i] = node.runtime.add(f"cc{i}", pods[i].path, annotations={NETWORKS: "ovl"})

    threads = [threading.Thread(target=add, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, pod in enumerate(pods):
        outs[i].ok()
        node.pods.append((f"cc{i}", pod))
    ports = node.ns.ip("link", "show", "master", bridge_name(vni))
    assert len(ports) == 3  # the VXLAN port and both pods
    assert node.runtime.check("cc0", pods[0].path).returncode == 0
    node.runtime.delete("cc0", pods[0].path).ok()
    assert segments(node) == {bridge_name(vni), vxlan_name(vni)}  # cc1 still uses it
    node.runtime.delete("cc1", pods[1].path).ok()
    assert segments(node) == set()  # the last pod took it away
    node.pods.clear()


def test_flood_list_follows_the_fabrics_nodes(clean: Cluster) -> None:
    n1, n2, n3 = clean.nodes
    attach(clean, n1, "p1")
    vx = vxlan_name(_vni())

    def reconcile(*keep: int) -> None:
        problems = product_code(n1, RECONCILE, str(n1.index), *(str(j) for j in keep))
        assert problems == "[]"

    assert {e["dst"] for e in _fdb(n1, vx)} == {n2.address, n3.address}
    try:
        reconcile(1, 2)  # node 3 left the fabric
        assert {e["dst"] for e in _fdb(n1, vx)} == {n2.address}
    finally:
        reconcile(1, 2, 3)  # and is back (as plexusd had it)
    assert {e["dst"] for e in _fdb(n1, vx)} == {n2.address, n3.address}


def test_del_after_the_pod_namespace_is_gone_removes_the_segment(clean: Cluster) -> None:
    node = clean.nodes[1]
    pod = clean.new_ns("gone")
    node.runtime.add("gone", pod.path, annotations={NETWORKS: "ovl"}).ok()
    pod.delete()  # the pair dies with it; the segment waits for the DEL
    assert segments(node) == {bridge_name(_vni()), vxlan_name(_vni())}
    node.runtime.delete("gone", "").ok()
    assert segments(node) == set()


def test_check_notices_a_pod_port_taken_off_the_bridge(clean: Cluster) -> None:
    node = clean.nodes[0]
    pod = clean.new_ns("chk")
    node.runtime.add("chk", pod.path, annotations={NETWORKS: "ovl"}).ok()
    node.pods.append(("chk", pod))
    assert node.runtime.check("chk", pod.path).returncode == 0
    port = next(
        p["ifname"]
        for p in node.ns.ip("link", "show", "master", bridge_name(_vni()))
        if not p["ifname"].startswith("pxv")
    )
    node.ns.run("ip", "link", "set", port, "nomaster")
    out = node.runtime.check("chk", pod.path)
    assert out.returncode == 1 and "is not a port of bridge" in out.body["msg"]


def test_failed_add_leaves_no_segment(clean: Cluster) -> None:
    node = clean.nodes[1]
    pod = clean.new_ns("fail")
    out = node.runtime.add("fail", pod.path, annotations={NETWORKS: "ovl-full"})
    # IPAM fails after the segment and the pod's pair were made: both are rolled back
    assert out.returncode == 1 and "no IP addresses available" in out.body["msg"]
    assert segments(node) == set()
    assert [n for n in node.ns.links() if n.startswith("px")] == []
    assert list(Netns.links(pod)) == ["lo"]
    node.runtime.delete("fail", pod.path).ok()  # the runtime's DEL after a failed ADD


def test_mtu_above_the_underlay_is_refused(clean: Cluster) -> None:
    node = clean.nodes[0]
    pod = clean.new_ns("big")
    out = node.runtime.add("big", pod.path, annotations={NETWORKS: "ovl-big"})
    assert out.returncode == 1 and out.body["code"] == 7
    assert f"mtu {MTU + 1} is above what the overlay carries" in out.body["msg"]
    assert segments(node) == set()
    node.runtime.delete("big", pod.path).ok()


def test_two_networks_on_one_vni_are_refused(clean: Cluster) -> None:
    n1, n2 = clean.nodes[0], clean.nodes[1]
    attach(clean, n1, "first", "ovl-a")  # ovl-a's segment (VNI 5000) on node 1
    write_nads(clean, "ovl-b")  # a second network on VNI 5000
    time.sleep(0.5)
    for node, what in ((n1, "already the segment of overlay network ovl-a"), (n2, "ovl-a")):
        pod = clean.new_ns(f"second-{node.index}")
        out = node.runtime.add(f"b{node.index}", pod.path, annotations={NETWORKS: "ovl-b"})
        assert out.returncode == 1 and out.body["code"] == 7, out.body
        assert "ovl-b" in out.body["msg"] and what in out.body["msg"]
        assert "VNI 5000" in out.body["msg"]
        node.runtime.delete(f"b{node.index}", pod.path).ok()
    assert segments(n2) == set()
    # The network already on node 1 keeps working there.
    attach(clean, n1, "again", "ovl-a")


def test_a_nad_of_another_namespace_cannot_join_a_segment_by_its_name(clean: Cluster) -> None:
    """default/ovl-t and other/ovl-t derive the same VNI from their configs' name: neither
    makes a segment (a tenant must not reach another namespace's L2 by copying a name)."""
    write_nads(clean, "twin")
    time.sleep(0.5)
    node = clean.nodes[0]
    for namespace in ("default", "other"):
        pod = clean.new_ns(f"twin-{namespace}")
        cid = f"twin-{namespace}"
        out = node.runtime.add(cid, pod.path, annotations={NETWORKS: "ovl-t"}, pod=(namespace, cid))
        assert out.returncode == 1 and out.body["code"] == 7, out.body
        assert "default/ovl-t, other/ovl-t" in out.body["msg"]
        node.runtime.delete(cid, pod.path).ok()
    assert segments(node) == set()
    write_nads(clean)


def test_vni_derivation_avoids_the_fabric_vni() -> None:
    vni = derived_vni("ovl", avoid=0)
    assert 0x010000 <= vni <= 0xFFFFFF
    assert derived_vni("ovl", avoid=vni) != vni
    assert derived_vni("ovl", avoid=0) == vni  # stable: every node derives the same one
