"""Multicast membership across nodes in cluster mode, end to end: three nodes, each its own
plexusd in cluster mode (NADs, Nodes and Pods from the API stand-in, served on the underlay),
and the controller (`plexus-controller run`) beside the API. A pod on node 3 joins a group; its
plexusd publishes the node's groups (MulticastNodeState), the controller aggregates them and
tells node 1 to replicate to node 3; node 1's sender then reaches node 3 and nothing crosses to
node 2 (counted on node 2's underlay link) — for the routed primary (`fabric.multicast`) and
for a `plexus-overlay` network, IPv4 and IPv6. When the member leaves, node 1's list empties."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from delegates.fabric import MULTICAST_DEVICE
from delegates.overlay import derived_vni, vxlan_name
from kernel.netlink import Netlink
from kernel.netns import run_in_netns
from testbed.cluster import EXTERNAL, NETWORKS, UNDERLAY_V4, UNDERLAY_V6, Cluster, Node, cluster
from testbed.cluster import pod_cidrs as node_pod_cidrs
from testbed.manifests import nad
from testbed.netns import Netns
from tests.k8s_standin import ApiStandin
from tests.netns.test_multicast_attach import received, receiver
from tests.netns.test_overlay import REFERENCE_PLUGINS, run_in, sniffer
from tests.support.require import missing

CONTROLLER = str(Path(sys.executable).with_name("plexus-controller"))
LEASE_NS = "plexus-system"
GROUP = {"4": "239.6.6.6", "6": "ff3e::6:6"}
PORT = 17777  # test_multicast_attach's RECEIVE listens there

SEND = """
import socket, sys, time
family, group, port, count, marker = sys.argv[1:6]
s = socket.socket(socket.AF_INET if family == "4" else socket.AF_INET6, socket.SOCK_DGRAM)
if family == "4":
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 4)
else:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 4)
end = time.monotonic() + 5
while True:  # an overlay pod without IPAM: IPv6 sends from net1's link-local, after its DAD
    try:
        s.sendto(marker.encode() + b"-0", (group, int(port)))
        break
    except OSError:
        if time.monotonic() > end:
            raise
        time.sleep(0.1)
for i in range(1, int(count)):
    time.sleep(0.02)
    s.sendto(marker.encode() + b"-%d" % i, (group, int(port)))
"""


def node_object(i: int) -> dict[str, Any]:
    addresses = [UNDERLAY_V4.format(10 + i), UNDERLAY_V6.format(10 + i)]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": f"node{i}"},
        "spec": {"podCIDRs": node_pod_cidrs(i)},
        "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]},
    }


class ControlPlane:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.api: ApiStandin | None = None
        self.controller: subprocess.Popen[str] | None = None

    def start(self, external: Netns) -> dict[str, Any]:
        address = UNDERLAY_V4.format(EXTERNAL)
        api = self.api = run_in_netns(external.path, lambda: ApiStandin(host=address).start())
        for i in (1, 2, 3):
            api.create(node_object(i))
        for name in ("default", LEASE_NS):
            api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        # An overlay network without IPAM: multicast needs no address on it.
        api.create(nad("ovl", {"cniVersion": "1.0.0", "type": "plexus-overlay", "multicast": True}))
        # IGMPv2: a report goes to the bridge's router ports only, so no other node's bridge
        # hears it; the controller's list alone must make node 1 send the group.
        api.create(
            nad(
                "ovl2",
                {
                    "cniVersion": "1.0.0",
                    "type": "plexus-overlay",
                    "multicast": True,
                    "igmpVersion": 2,
                },
            )
        )
        kubeconfig = api.kubeconfig(self.root / "kubeconfig")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        with (self.root / "controller.log").open("w") as log:
            self.controller = subprocess.Popen(
                ["ip", "netns", "exec", external.name, CONTROLLER, "run",
                 "--kubeconfig", kubeconfig, "--identity", "ctl", "--namespace", LEASE_NS,
                 "--lease-duration", "4", "--renew-deadline", "3", "--retry-period", "0.5",
                 "--metrics-address", f"{address}:19466"],
                stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
            )  # fmt: skip
        return {"kubeconfig": kubeconfig}

    def stop(self) -> None:
        if self.controller is not None and self.controller.poll() is None:
            self.controller.send_signal(signal.SIGTERM)
            try:
                self.controller.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.controller.kill()
                self.controller.wait()
        if self.api is not None:
            self.api.stop()


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, ControlPlane]]:
    if not REFERENCE_PLUGINS.is_dir():
        missing("Debian's containernetworking-plugins are not installed (/usr/lib/cni)")
    root = tmp_path_factory.mktemp("mcast-cluster")
    plane = ControlPlane(root)
    try:
        with cluster(root, "native", fabric_keys={"multicast": True}, api=plane.start) as c:
            yield c, plane
    finally:
        plane.stop()


@pytest.fixture
def clean(bed: tuple[Cluster, ControlPlane]) -> Iterator[tuple[Cluster, ControlPlane]]:
    try:
        yield bed
    finally:
        for node in bed[0].nodes:
            node.remove_pods()
    assert bed[0].leftovers() == {}


def pod(bed: Cluster, plane: ControlPlane, node: Node, role: str, networks: str = "") -> Netns:
    assert plane.api is not None
    annotations = {NETWORKS: networks} if networks else {}
    plane.api.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": role, "namespace": "default", "annotations": annotations},
            "spec": {"nodeName": node.name, "containers": [{"name": "c", "image": "pause"}]},
        }
    )
    ns, out = node.add_pod(bed, role, networks or None)
    out.ok()
    return ns


def mdb(node: Node, device: str) -> dict[str, set[str]]:
    """group -> the VTEPs a VXLAN device's MDB sends it to, on `node` (read over netlink:
    Debian's `bridge mdb` does not print a VXLAN entry's destination)."""

    def read() -> set[tuple[str, str]]:
        with Netlink.open() as nl:
            link = nl.link(device)
            return nl.mdb_remotes(link.index) if link is not None else set()

    groups: dict[str, set[str]] = {}
    for group, remote in run_in_netns(node.ns.path, read):
        groups.setdefault(group, set()).add(remote)
    return groups


def wait_for(check: Any, timeout: float = 15.0) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.05)
    return time.monotonic() - start


def send(sender: Netns, family: str, count: int, marker: str) -> None:
    argv = [family, GROUP[family], str(PORT), str(count), marker]
    subprocess.run(run_in(sender, SEND, *argv), check=True, timeout=30)


def check_replication(
    bed: Cluster,
    plane: ControlPlane,
    family: str,
    device: str,
    networks: str = "",
    *,
    settle: float = 0.0,
) -> None:
    n1, n2, n3 = bed.nodes
    group, third = GROUP[family], UNDERLAY_V4.format(13)
    kind = networks or "rt"
    sender = pod(bed, plane, n1, f"{kind}-snd{family}", networks)
    member = pod(bed, plane, n3, f"{kind}-mem{family}", networks)
    pod(bed, plane, n2, f"{kind}-bys{family}", networks)  # node 2 hosts the network, no member
    time.sleep(settle)
    n = 20
    joined = receiver(member, family, group, n)
    try:
        took = wait_for(lambda: mdb(n1, device).get(group) == {third})
        print(f"membership on node 3 -> node 1's replication list: {took:.2f} s")
        marker = f"mcc{family}{device}"
        wires = [sniffer(node.ns, "eth0", marker, 4) for node in (n2, n3)]
        try:
            send(sender, family, n, marker)
            assert received(joined) == n
            assert [received(w) for w in wires] == [0, n]  # node 2's underlay: nothing
        finally:
            for proc in wires:
                proc.kill()
                proc.communicate()
    finally:
        joined.kill()
        joined.communicate()
    # The member left (its socket closed): node 1 no longer sends the group anywhere — not
    # even through what its bridge learned from node 3's reports — within the querier's
    # interval. (An overlay bridge may flood for a moment while the young segments' querier
    # election settles, README: known; so the wire is checked until it is quiet, 12 s at most.)
    wait_for(lambda: group not in mdb(n1, device))
    deadline = time.monotonic() + 12.0
    for attempt in range(100):
        marker = f"mcl{family}{attempt}{device}"
        wires = [sniffer(node.ns, "eth0", marker, 1.5) for node in (n2, n3)]
        try:
            send(sender, family, 5, marker)
            seen = [received(w) for w in wires]
        finally:
            for proc in wires:
                proc.kill()
                proc.communicate()
        if seen == [0, 0] or time.monotonic() > deadline:
            break
    assert seen == [0, 0]


@pytest.mark.parametrize("family", ["4", "6"])
def test_routed_primary_replicates_to_member_nodes_only(
    clean: tuple[Cluster, ControlPlane], family: str
) -> None:
    check_replication(*clean, family, MULTICAST_DEVICE)


@pytest.mark.parametrize("family", ["4", "6"])
def test_overlay_replicates_to_member_nodes_only(
    clean: tuple[Cluster, ControlPlane], family: str
) -> None:
    # after the new segments' querier election, when a bridge may flood (README: known)
    device = vxlan_name(derived_vni("ovl", avoid=4242))
    check_replication(*clean, family, device, "ovl", settle=3.0)


def test_overlay_with_igmpv2_members_is_served_by_the_controllers_list(
    clean: tuple[Cluster, ControlPlane],
) -> None:
    # after the segments' querier election (test_overlay.settle): no bridge floods then
    device = vxlan_name(derived_vni("ovl2", avoid=4242))
    check_replication(*clean, "4", device, "ovl2", settle=3.0)


@pytest.mark.parametrize("networks", ["", "ovl"], ids=["routed", "overlay"])
def test_a_group_nobody_joined_leaves_no_node(
    clean: tuple[Cluster, ControlPlane], networks: str
) -> None:
    """Cluster mode: without members anywhere a group is sent to no other node (local mode
    floods it)."""
    bed, plane = clean
    n1, n2, n3 = bed.nodes
    kind = "ovl" if networks else "rt"
    sender = pod(bed, plane, n1, f"{kind}-lonely", networks)
    for node in (n2, n3):  # both host the network: a segment, a querier, no member
        pod(bed, plane, node, f"{kind}-idle{node.index}", networks)
    time.sleep(3)  # past the overlay's querier election (see test_overlay.settle)
    marker = f"mcn{kind}"
    wires = [sniffer(node.ns, "eth0", marker, 4) for node in (n2, n3)]
    try:
        send(sender, "4", 20, marker)
        assert [received(w) for w in wires] == [0, 0]
    finally:
        for proc in wires:
            proc.kill()
            proc.communicate()
