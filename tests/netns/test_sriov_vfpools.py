"""VFPools in cluster mode with a real plexusd: the pools come from the VFPool objects whose
nodeSelector matches the Node (API stand-in), not from a file, and the daemon writes its
VFPoolNodeState. VFs from the synthetic sysfs bed (real links in the node namespace), kubelet's
side from the kubelet stand-in. What an admin checks: `plexusctl pools`, the VFPoolNodeState
object (`kubectl get vfpoolnodestate node-1 -o yaml`), a clashing VFPool named in its
problems; what a pod sees: its VF, with the API down too."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from metaplugin.client import get
from testbed.manifests import nad
from tests.k8s_standin import ApiStandin
from tests.netns.conftest import NETWORKS
from tests.netns.test_cluster_mode import NODE, add, pod_object
from tests.support.sriov_world import PF, SriovWorld, sriov_world

PLEXUSCTL = str(Path(sys.executable).with_name("plexusctl"))
POOL = "plexus.dev/intel_vf"
OTHER = "plexus.dev/edge_vf"
V1 = "plexus.dev/v1alpha1"


def vfpool(name: str, resource: str, pf_range: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": V1,
        "kind": "VFPool",
        "metadata": {"name": name},
        "spec": {"resourceName": resource, "nicSelector": {"rootDevices": [pf_range]}, **spec},
    }


class World(SriovWorld):
    def pools(self) -> dict[str, dict[str, Any]]:
        status, body = get(self.bed.daemon.socket, "/v1/pools")
        assert status == 200, body
        return {p["resourceName"]: p for p in json.loads(body)}

    def state(self) -> dict[str, Any] | None:
        return self.api.get("VFPoolNodeState", None, NODE)

    def vf_rows(self) -> dict[str, dict[str, Any]]:
        status = (self.state() or {}).get("status") or {}
        return {v["pci"]: v for v in status.get("vfs", [])}

    def label_node(self, **labels: str) -> None:
        node = self.api.get("Node", None, NODE)
        assert node is not None
        node["metadata"]["labels"] = {**node["metadata"].get("labels", {}), **labels}
        self.api.update(node)


def wait(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.05)
    return value


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    def seed(api: ApiStandin) -> None:
        api.create(
            {"apiVersion": "v1", "kind": "Node",
             "metadata": {"name": NODE, "labels": {"plexus.dev/sriov": "true"}}}
        )  # fmt: skip
        sriov_selector = {"matchLabels": {"plexus.dev/sriov": "true"}}
        api.create(vfpool("intel", POOL, f"{PF}#0-1", nodeSelector=sriov_selector))
        edge = {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["edge"]}]}
        api.create(vfpool("edge", OTHER, f"{PF}#2-3", nodeSelector=edge))
        # The cluster network as a NAD without spec.config (its conf is in net.d): in the
        # daemon's NAD cache, so an ADD needs no API call for it (see the API-down test).
        api.create(nad("cluster", None, namespace="kube-system"))

    # no vfPools file: cluster mode takes the VFPools
    with sriov_world(tmp_path, pool=POOL, subnet="10.56.221.0/24", seed=seed) as w:
        yield World(w.bed, w.api, w.kubelet, w.hw, w.vfs)


def test_the_node_serves_the_vfpools_that_select_it(world: World) -> None:
    pools = wait(world.pools, "no pools served")
    assert set(pools) == {POOL}  # "edge" selects zone=edge, which this node is not
    assert (pools[POOL]["total"], pools[POOL]["free"]) == (2, 2)
    assert world.kubelet.wait_for(lambda k: k.registered(POOL) == 1, 10.0)
    out = subprocess.run(
        [PLEXUSCTL, "--socket", world.bed.daemon.socket, "pools"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert POOL in out.stdout and OTHER not in out.stdout

    world.label_node(zone="edge")  # the admin labels the node: the edge pool comes to it
    wait(lambda: OTHER in world.pools(), "the label did not bring the edge pool")
    assert world.pools()[OTHER]["total"] == 2
    assert world.kubelet.wait_for(lambda k: k.registered(OTHER) == 1, 10.0)

    edited = world.api.get("VFPool", None, "intel")
    assert edited is not None
    edited["spec"]["nicSelector"] = {"rootDevices": [f"{PF}#0"]}
    edited["metadata"]["generation"] = 2
    world.api.update(edited)  # an edit applies live, like an edited pools file
    wait(lambda: world.pools()[POOL]["total"] == 1, "the edited VFPool was not applied")

    def served() -> dict[str, int] | None:
        status = (world.state() or {}).get("status") or {}
        found = {p["name"]: p["generation"] for p in status.get("pools", [])}
        return found if found == {"intel": 2, "edge": 1} else None

    wait(served, "the node state does not list the pools served with their generations")


def test_the_node_state_object_shows_every_pf_and_vf(world: World) -> None:
    state = wait(lambda: world.state() if world.vf_rows() else None, "no VFPoolNodeState")
    node = world.api.get("Node", None, NODE)
    assert node is not None
    assert state["spec"] == {"nodeName": NODE}
    assert state["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": node["metadata"]["uid"]}
    ]
    status = state["status"]
    (pf,) = status["pfs"]
    assert (pf["pci"], pf["name"], pf["numVfs"], pf["totalVfs"], pf["linkUp"]) == (
        PF, "pxpf0", 4, 8, True,
    )  # fmt: skip
    assert pf["vendor"] and pf["driver"] and pf["linkType"] == "ether"
    rows = world.vf_rows()
    assert sorted(rows) == sorted(world.vfs)
    assert [rows[v].get("pool") for v in world.vfs] == [POOL, POOL, None, None]
    assert [rows[v]["index"] for v in world.vfs] == [0, 1, 2, 3]
    assert all(r["state"] == "free" and r["healthy"] and r["pod"] == "" for r in rows.values())
    assert status["problems"] == [] and status["updated"].endswith("Z")


def test_a_pod_add_and_del_show_in_the_node_state(world: World) -> None:
    wait(world.vf_rows, "no VFPoolNodeState")
    granted = world.vfs[1]
    world.kubelet.set_pod("default", "web", {POOL: [granted]})
    created = world.api.create(pod_object("web", {NETWORKS: "sriov-net"}))
    pod = world.bed.pod("web")
    add(world.bed, "c1", pod.path, "web", created["metadata"]["uid"]).ok()
    assert "net1" in pod.links()
    row = wait(
        lambda: (r := world.vf_rows()[granted])["state"] == "attached" and r,
        "the attached VF does not show in the node state",
        timeout=5.0,
    )
    assert (row["pod"], row["pool"], row["healthy"]) == ("default/web", POOL, True)

    world.bed.runtime.delete("c1", pod.path).ok()
    row = wait(
        lambda: (r := world.vf_rows()[granted])["state"] == "free" and r,
        "the released VF does not show free",
        timeout=5.0,
    )
    assert row["pod"] == ""


def test_an_unhealthy_vf_shows_with_its_reason_within_seconds(world: World) -> None:
    wait(world.vf_rows, "no VFPoolNodeState")
    world.hw.set_pf_link(PF, False)  # the cable is pulled
    started = time.monotonic()
    rows = wait(
        lambda: (r := world.vf_rows()) and not r[world.vfs[0]]["healthy"] and r,
        "the PF's link loss does not show in the node state",
        timeout=5.0,
    )
    took = time.monotonic() - started
    assert rows[world.vfs[0]]["reason"].startswith("PF pxpf0 has no link"), rows[world.vfs[0]]
    assert (world.state() or {})["status"]["pfs"][0]["linkUp"] is False
    print(f"link loss -> node state: {took:.2f}s")

    world.hw.set_pf_link(PF, True)
    wait(lambda: world.vf_rows()[world.vfs[0]]["healthy"], "the link's return does not show")


def test_a_clashing_vfpool_is_skipped_and_named_in_problems(world: World) -> None:
    wait(lambda: POOL in world.pools(), "no pools served")
    world.api.create(vfpool("copycat", POOL, f"{PF}#2-3"))  # same resourceName, every node

    def problems() -> list[str]:
        return list(((world.state() or {}).get("status") or {}).get("problems") or [])

    (problem,) = wait(problems, "the clash is not reported")
    assert problem.startswith("VFPool copycat: skipped, resourceName plexus.dev/intel_vf")
    assert "VFPool intel" in problem
    assert world.pools()[POOL]["total"] == 2  # intel keeps serving its VFs
    world.api.create(
        {"apiVersion": V1, "kind": "VFPool", "metadata": {"name": "broken"},
         "spec": {"resourceName": "no-prefix", "nicSelector": {"vendors": ["8086"]}}}
    )  # fmt: skip
    wait(lambda: len(problems()) == 2, "the invalid VFPool is not reported")
    assert any(p.startswith("VFPool broken: skipped, its spec is invalid") for p in problems())
    assert set(world.pools()) == {POOL}


def test_api_down_add_still_works_and_the_state_catches_up(world: World) -> None:
    wait(world.vf_rows, "no VFPoolNodeState")
    granted = world.vfs[0]
    world.kubelet.set_pod("default", "db", {POOL: [granted]})
    created = world.api.create(pod_object("db", {NETWORKS: "sriov-net"}))
    wait(lambda: world.api.wait_for_watches(3, 0.1), "the daemon's watches are not open")
    time.sleep(0.5)  # the pod reached the daemon's cache
    port = urlsplit(world.api.url).port
    reject = ["OUTPUT", "-p", "tcp", "--dport", str(port), "-j", "REJECT", "--reject-with",
              "tcp-reset"]  # fmt: skip
    world.bed.node.run("iptables", "-A", *reject)  # the API is unreachable from the node
    try:
        pod = world.bed.pod("db")
        started = time.monotonic()
        add(world.bed, "c1", pod.path, "db", created["metadata"]["uid"]).ok()
        assert time.monotonic() - started < 5.0  # never waited on the state write
        assert "net1" in pod.links()
        time.sleep(1.0)
        assert world.vf_rows()[granted]["state"] == "free"  # the API has not heard yet
    finally:
        world.bed.node.run("iptables", "-D", *reject)
    row = wait(
        lambda: (r := world.vf_rows()[granted])["state"] == "attached" and r,
        "the node state did not catch up once the API was back",
        timeout=40.0,
    )
    assert row["pod"] == "default/db"
    world.bed.runtime.delete("c1", pod.path).ok()


def test_a_restart_while_the_api_is_down_serves_the_pools_last_read(world: World) -> None:
    wait(lambda: POOL in world.pools(), "no pools served")
    wait(lambda: (world.state() or {}).get("status", {}).get("pools"), "no node state")
    port = urlsplit(world.api.url).port
    reject = ["OUTPUT", "-p", "tcp", "--dport", str(port), "-j", "REJECT", "--reject-with",
              "tcp-reset"]  # fmt: skip
    daemon = world.bed.daemon
    registered = world.kubelet.registered(POOL)
    daemon.stop()
    world.kubelet.restart()  # a kubelet that forgot the plugins: they must register again
    world.bed.node.run("iptables", "-A", *reject)
    failed: list[BaseException] = []

    def start() -> None:
        try:
            daemon.start(timeout=60.0)  # ready once the API answers again
        except BaseException as exc:
            failed.append(exc)

    starting = threading.Thread(target=start, daemon=True)
    try:
        starting.start()

        def pools() -> dict[str, dict[str, Any]] | None:
            try:
                return world.pools()
            except OSError:  # not serving yet
                return None

        served = wait(pools, "the restarted daemon serves no pools", timeout=30.0)
        assert set(served) == {POOL} and served[POOL]["total"] == 2
        assert world.kubelet.wait_for(lambda k: k.registered(POOL) == registered + 1, 10.0)
        assert daemon.events("vfpools_from_cache")
    finally:
        world.bed.node.run("iptables", "-D", *reject)
    starting.join(timeout=60.0)
    assert not failed and not starting.is_alive()
    wait(
        lambda: (s := (world.state() or {}).get("status", {})).get("pools") and not s["problems"],
        "the node state did not catch up once the API was back",
        timeout=40.0,
    )


def test_a_numvfs_change_waits_for_the_pod_and_the_state_says_why(world: World) -> None:
    wait(world.vf_rows, "no VFPoolNodeState")
    granted = world.vfs[0]
    world.kubelet.set_pod("default", "web", {POOL: [granted]})
    created = world.api.create(pod_object("web", {NETWORKS: "sriov-net"}))
    pod = world.bed.pod("web")
    add(world.bed, "c1", pod.path, "web", created["metadata"]["uid"]).ok()

    edited = world.api.get("VFPool", None, "intel")
    assert edited is not None
    edited["spec"]["numVfs"] = 6
    world.api.update(edited)

    def problems() -> list[str]:
        return list(((world.state() or {}).get("status") or {}).get("problems") or [])

    (problem,) = wait(problems, "the deferred numVfs change is not reported")
    assert problem == f"PF pxpf0: numVfs 4 -> 6 waits until pods release 1 VF(s) ({granted})"
    numvfs = world.hw.root / "bus/pci/devices" / PF / "sriov_numvfs"
    assert numvfs.read_text().strip() == "4"  # the pod's VF was not pulled away
    assert "net1" in pod.links()

    world.bed.runtime.delete("c1", pod.path).ok()
    world.kubelet.set_pod("default", "web", {})  # the pod is gone for kubelet too
    wait(lambda: not problems(), "the problem stays after the change went in")
    assert numvfs.read_text().strip() == "6"
