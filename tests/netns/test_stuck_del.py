"""A DEL that can never succeed (issue 10, item 3), end to end through the shim: an exec'd
reference macvlan whose master is gone fails every DEL (its config no longer loads). While the
pod's netns exists, DEL answers the error so the runtime retries; the runtime's last DEL (no
netns) releases what Plexus can release itself, quarantines the record and succeeds; GC never
answers an error for one stuck container. Each test checks what an operator would: the lease
files, the node's links, the records and the quarantine, the CNI answer, the daemon's log."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kernel.netns import run_in_netns
from metaplugin.salvage import KernelLinks
from testbed.manifests import host_local, macvlan, nad
from testbed.netns import Netns
from testbed.runtime import Outcome
from tests.k8s_standin import ApiStandin
from tests.netns.conftest import NETWORKS, Bed, make_bed
from tests.netns.test_cluster_mode import NODE, pod_object
from tests.netns.test_cluster_mode import wait_for as wait_until
from tests.netns.test_core import wait_for

# Every command but DEL runs the Debian plugin named by `delegate` (macvlan when none); DEL always
# fails, as a plugin whose config no longer loads does.
STICKY = """#!/usr/bin/python3 -IS
import json, os, subprocess, sys
data = sys.stdin.buffer.read()
if os.environ.get("CNI_COMMAND") == "DEL":
    print(json.dumps({"cniVersion": "1.0.0", "code": 11, "msg": "sticky refuses DEL"}))
    sys.exit(1)
delegate = json.loads(data or b"{}").get("delegate", "macvlan")
sys.exit(subprocess.run(["/usr/lib/cni/" + delegate], input=data).returncode)
"""


def add_sticky_nad(bed: Bed, name: str, config: dict[str, Any]) -> None:
    sticky = bed.root / "testbin" / "sticky"
    sticky.write_text(STICKY)
    sticky.chmod(0o755)
    (bed.root / "nads" / f"{name}.yaml").write_text(yaml.safe_dump(nad(name, config)))


def quarantined(bed: Bed) -> list[dict[str, Any]]:
    """The abandoned records the daemon set aside, as plexusd wrote them."""
    qdir = Path(bed.daemon.config["stateDir"]) / "quarantine"
    files = sorted(qdir.iterdir()) if qdir.is_dir() else []
    return [json.loads(p.read_text()) for p in files]


def gc(bed: Bed, *valid: str) -> Outcome:
    return bed.runtime.invoke(
        "GC",
        version="1.1.0",
        extra={"cni.dev/valid-attachments": [{"containerID": c, "ifname": "eth0"} for c in valid]},
    )


def assert_abandoned(bed: Bed, cid: str, *ifnames: str) -> None:
    """Each attachment is in quarantine with why, and the log says so once."""
    found = {
        (q["record"]["holder"]["ifname"], q["abandoned"]["container"]) for q in quarantined(bed)
    }
    assert found == {(i, cid) for i in ifnames}
    logged = bed.daemon.events("teardown_abandoned")
    assert sorted(e["ifname"] for e in logged) == sorted(ifnames)
    assert all(e["container_id"] == cid and e["error"] for e in logged)


def test_a_live_pods_macvlan_master_disappears(bed: Bed) -> None:
    pod = bed.pod("pod1")
    bed.runtime.add("c1", pod.path, annotations={NETWORKS: "net-a"}).ok()
    assert len(bed.reservations()) == 2
    bed.node.run("ip", "link", "del", "pxm0")  # the kernel takes the pod's net1 with it
    assert set(pod.links()) == {"lo", "eth0"}

    first = bed.runtime.delete("c1", pod.path)  # the netns is there: the runtime will retry
    assert (first.returncode, first.body["code"]) == (1, 105)
    assert "default/net-a (net1)" in first.body["msg"]
    assert len(bed.reservations()) == 1  # net1's lease is still held, and still recorded
    assert quarantined(bed) == []

    pod.delete()
    bed.runtime.delete("c1", "", with_prev=False).ok()  # the runtime's last DEL
    bed.assert_nothing_left(pod)  # no lease, no node veth, no record
    assert_abandoned(bed, "c1", "net1")
    gc(bed).ok()


def test_a_crash_mid_add_then_the_master_is_gone(bed: Bed) -> None:
    pod = bed.pod("pod1")
    outcome: list[Outcome] = []
    adder = threading.Thread(
        target=lambda: outcome.append(
            bed.runtime.add("c1", pod.path, annotations={NETWORKS: "net-a, net-gate"})
        )
    )
    adder.start()
    wait_for(bed.gate_dir / "reached")  # eth0 and net1 made, net2's delegate running
    bed.daemon.kill()
    adder.join(30)
    bed.node.run("ip", "link", "del", "pxm0")
    bed.daemon.start()  # kills the orphaned gate: net2 stays planned, never made
    assert len(bed.reservations()) == 2  # eth0's and net1's

    first = bed.runtime.delete("c1", pod.path, with_prev=False)
    assert (first.returncode, first.body["code"]) == (1, 105)
    pod.delete()
    last = bed.runtime.delete("c1", "", with_prev=False)
    last.ok()
    bed.assert_nothing_left(pod)
    assert_abandoned(bed, "c1", "net1", "net2")
    gc(bed).ok()


def test_gc_of_a_stuck_container_succeeds_and_keeps_the_live_one(bed: Bed) -> None:
    keep, stale = bed.pod("keep"), bed.pod("stale")
    bed.runtime.add("keep", keep.path, annotations={}).ok()
    bed.runtime.add("stale", stale.path, annotations={NETWORKS: "net-a"}).ok()
    bed.node.run("ip", "link", "del", "pxm0")
    first = gc(bed, "keep")  # the runtime says `stale` is gone: its DEL is the last one
    first.ok()
    assert set(keep.links()) == {"lo", "eth0"}
    assert set(stale.links()) == {"lo"}  # eth0 went through its DEL, net1 with its master
    assert len(bed.reservations()) == 1  # keep's eth0 only
    assert [c["containerID"] for c in bed.daemon.attachments()] == ["keep"]
    assert_abandoned(bed, "stale", "net1")
    gc(bed, "keep").ok()  # and every GC after it
    bed.runtime.delete("keep", keep.path).ok()
    bed.assert_nothing_left(keep, stale)


def test_a_failed_rollback_del_removes_the_link_and_keeps_the_record(bed: Bed) -> None:
    sticky = {**macvlan("pxm0", "10.93.0.0/24", bed.ipam_dir), "type": "sticky"}
    add_sticky_nad(
        bed, "net-sticky", {"cniVersion": "1.0.0", "plugins": [sticky, {"type": "failer"}]}
    )
    pod = bed.pod("pod1")

    out = bed.runtime.add("c1", pod.path, annotations={NETWORKS: "net-sticky"})
    assert (out.returncode, out.body["code"]) == (1, 101)
    assert "rollback DEL failed for default/net-sticky (net1)" in out.body["msg"]
    assert set(pod.links()) == {"lo"}  # the half-made net1 did not stay in the pod
    listed = {a["containerID"]: a["attachments"] for a in bed.daemon.attachments()}
    assert [(a["ifname"], a["state"]) for a in listed["c1"]] == [("net1", "planned")]

    retry = bed.runtime.delete("c1", pod.path, with_prev=False)  # the runtime's cleanup DEL
    assert (retry.returncode, retry.body["code"]) == (1, 105)
    pod.delete()
    bed.runtime.delete("c1", "", with_prev=False).ok()
    bed.assert_nothing_left(pod)  # net1's lease released by Plexus
    assert_abandoned(bed, "c1", "net1")


def test_gc_of_a_live_netns_removes_the_nodes_veth_and_leaves_the_bridge(bed: Bed) -> None:
    """The stale container's netns still exists and its bridge attachment's DEL fails: GC gives
    it up, removing the node's end of its veth pair (named, with its MAC, in the recorded
    result), never the bridge both share."""
    add_sticky_nad(
        bed,
        "net-sbridge",
        {
            "cniVersion": "1.0.0",
            "type": "sticky",
            "delegate": "bridge",
            "bridge": "pxbr9",
            "ipam": host_local("10.94.0.0/24", bed.ipam_dir),
        },
    )
    keep, stale = bed.pod("keep"), bed.pod("stale")
    bed.runtime.add("keep", keep.path, annotations={}).ok()
    keeps = set(bed.node_veths())
    bed.runtime.add("stale", stale.path, annotations={NETWORKS: "net-sbridge"}).ok()
    (stale_veth,) = [n for n, link in bed.node.links().items() if link.get("master") == "pxbr9"]
    assert len(bed.reservations()) == 3

    gc(bed, "keep").ok()
    assert set(bed.node_veths()) == keeps  # stale's eth0 by its DEL, net1's by Plexus
    assert set(stale.links()) == {"lo"}
    assert "pxbr9" in bed.node.links()  # shared: never touched
    assert len(bed.reservations()) == 1  # keep's eth0 only
    ((entry),) = quarantined(bed)
    assert entry["abandoned"]["removed_links"] == [f"veth {stale_veth} on the node"]
    assert_abandoned(bed, "stale", "net1")
    bed.runtime.delete("keep", keep.path).ok()
    bed.assert_nothing_left(keep, stale)


def test_kernel_links_touch_only_a_veth_with_the_recorded_mac(bed: Bed) -> None:
    node = bed.node
    node.run(
        "ip",
        "link",
        "add",
        "pxk0",
        "address",
        "0a:00:00:00:00:01",
        "type",
        "veth",
        "peer",
        "name",
        "pxk1",
    )
    node.run("ip", "link", "add", "pxkbr", "address", "0a:00:00:00:00:02", "type", "bridge")
    links = KernelLinks()

    def attempt() -> list[bool]:
        return [
            links.remove_host_veth("pxk0", "0a:00:00:00:00:09"),  # another pod's pxk0
            links.remove_host_veth("pxkbr", "0a:00:00:00:00:02"),  # not a veth
            links.remove_host_veth("nothere", "0a:00:00:00:00:01"),
            links.remove_pod_link(node.path, "pxk1"),  # the node is never a pod
            links.remove_host_veth("pxk0", "0A:00:00:00:00:01"),
        ]

    assert run_in_netns(node.path, attempt) == [False, False, False, False, True]
    assert {"pxk0", "pxk1"} & set(node.links()) == set()
    assert "pxkbr" in node.links()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Bed, ApiStandin]]:
    """The bed in cluster mode, the API stand-in served in the node namespace (as
    tests/netns/test_cluster_mode.py does)."""
    holder: list[ApiStandin] = []

    def api_mode(node: Netns, nads: list[dict[str, Any]]) -> dict[str, Any]:
        api = run_in_netns(node.path, lambda: ApiStandin().start())
        holder.append(api)
        for obj in nads:
            api.create(obj)
        return {"kubeconfig": api.kubeconfig(tmp_path / "kubeconfig"), "nodeName": NODE}

    try:
        with make_bed(tmp_path, api_mode) as bed:
            yield bed, holder[0]
    finally:
        for api in holder:
            api.stop()


def test_the_pod_gets_a_warning_event_when_its_del_is_given_up(
    cluster: tuple[Bed, ApiStandin],
) -> None:
    bed, api = cluster
    created = api.create(pod_object("web", {NETWORKS: "net-a"}))
    uid = created["metadata"]["uid"]
    pod = bed.pod("web")
    bed.runtime.add("c1", pod.path, annotations=None, pod=("default", "web"), uid=uid).ok()
    bed.node.run("ip", "link", "del", "pxm0")
    pod.delete()
    bed.runtime.delete("c1", "", with_prev=False).ok()
    bed.assert_nothing_left(pod)
    (event,) = wait_until(lambda: [e for e in api.events() if e["reason"] == "TeardownAbandoned"])
    assert event["type"] == "Warning" and event["involvedObject"]["uid"] == uid
    assert event["message"].startswith(
        "DEL of default/net-a (net1) failed on the runtime's last DEL (the pod's netns is gone)"
    )
    assert "released the host-local leases in" in event["message"]
    assert "quarantine" in event["message"]
