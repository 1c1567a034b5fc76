"""Cluster mode's membership sync drives a REAL overlay segment's VXLAN MDB: in a namespace
standing for node-1 (an overlay segment on its underlay eth0), node-1's `MembershipSync` with
the real `Overlay` as the `overlay/<vni>` replicator, node-2's sync with a local membership of
its own, and the controller, all against the API stand-in (run inside the namespace, on its
loopback). node-2 joins a group: node-1's MDB sends the group to node-2's underlay address
only; node-2 leaves: the entry goes (the group is flooded again)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from delegates.overlay import bridge_name, vxlan_name
from testbed.netns import Netns, namespaces

REPO = Path(__file__).resolve().parents[2]
VNI = 0x1001

SCRIPT = """
import json, socket, sys, time
from kubernetes import client
from delegates.fabric import Fabric, FabricConfig, Peer
from delegates.overlay import Overlay, replication
from metaplugin.mcast_sync import MembershipSync, overlay_replicators
from nad_controller.controller import Controller, Settings
from nad_controller.k8s import ClusterApi
from nad_controller.leader import ElectionTiming
from tests.k8s_standin import ApiStandin

VNI = int(sys.argv[1])
DOMAIN = f"overlay/{VNI}"
peers = [Peer("node-1", ("10.99.0.1", "fd00:99::1"), ()), Peer("node-2", ("10.99.0.2",), ())]


class Membership:
    def __init__(self):
        self.groups, self.subscribers = {}, []

    def snapshot(self):
        return dict(self.groups)

    def subscribe(self, callback):
        self.subscribers.append(callback)

    def set(self, *groups):
        self.groups = {DOMAIN: frozenset(groups)} if groups else {}
        for callback in self.subscribers:
            callback(self.snapshot())


def wait(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


fabric = Fabric(FabricConfig(mode="native", node_name="node-1", pod_cidrs=(), interface="eth0"))
fabric.setup()
overlay = Overlay(ipam=None, fabric=fabric)
out = {}
with ApiStandin() as api:
    for name in ("node-1", "node-2"):
        api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
    kube = client.ApiClient(client.Configuration(host=api.url))
    timing = ElectionTiming(lease_duration=2.0, renew_deadline=1.5, retry_period=0.2)
    ctl = Controller(ClusterApi(kube), Settings(identity="ctl", timing=timing, debounce=0.02))
    ctl.start()
    syncs, members = [], {}
    for name in ("node-1", "node-2"):
        members[name] = Membership()
        sync = MembershipSync(kube, name, members[name], peers=lambda: peers,
                              family=lambda: socket.AF_INET, debounce=0.02)
        if name == "node-1":
            sync.register("overlay/", overlay_replicators(overlay))
        sync.start()
        syncs.append(sync)
    members["node-2"].set("239.1.1.1", "ff05::1")
    out["joined"] = wait(lambda: replication(VNI) == {"239.1.1.1": ["10.99.0.2"],
                                                      "ff05::1": ["10.99.0.2"]})
    out["after_join"] = replication(VNI)
    members["node-2"].set("ff05::1")
    out["left"] = wait(lambda: replication(VNI) == {"ff05::1": ["10.99.0.2"]})
    out["after_leave"] = replication(VNI)
    members["node-2"].set()
    out["all_left"] = wait(lambda: replication(VNI) == {})
    out["at_end"] = replication(VNI)
    for sync in syncs:
        sync.stop()
    ctl.stop()
print(json.dumps(out))
"""


@pytest.fixture
def node() -> Iterator[Netns]:
    """node-1: eth0 on the underlay, and overlay segment VNI's bridge with its VXLAN port."""
    with namespaces() as made:
        ns = Netns("mship-node")
        made.append(ns)
        ns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "wire")
        ns.run("ip", "addr", "add", "10.99.0.1/24", "dev", "eth0")
        ns.run("ip", "addr", "add", "fd00:99::1/64", "dev", "eth0", "nodad")
        for link in ("eth0", "wire"):
            ns.run("ip", "link", "set", link, "up")
        vx, br = vxlan_name(VNI), bridge_name(VNI)
        ns.run("ip", "link", "add", br, "type", "bridge", "mcast_snooping", "1")
        ns.run("ip", "link", "set", br, "alias", "plexus-overlay mship")
        ns.run(*("ip", "link", "add", vx, "type", "vxlan", "id", str(VNI), "local", "10.99.0.1"),
               *("dstport", "4789", "dev", "eth0"))  # fmt: skip
        ns.run("ip", "link", "set", vx, "master", br)
        for link in (vx, br):
            ns.run("ip", "link", "set", link, "up")
        yield ns


def test_membership_sync_programs_the_overlay_segments_vxlan_mdb(node: Netns) -> None:
    done = subprocess.run(
        ["ip", "netns", "exec", node.name, "env", f"PYTHONPATH={REPO}", sys.executable,
         "-c", SCRIPT, str(VNI)],
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["after_join"] == {"239.1.1.1": ["10.99.0.2"], "ff05::1": ["10.99.0.2"]}
    assert result["after_leave"] == {"ff05::1": ["10.99.0.2"]}
    assert result["at_end"] == {}
    # what an admin sees: no MDB entry left on the VXLAN port
    mdb = node.run("bridge", "-j", "mdb", "show", "dev", vxlan_name(VNI)).stdout
    assert "10.99.0.2" not in mdb
