"""The node's VFPool side without a daemon: which VFPools a node serves (labels, priority,
invalid and clashing pools named), and the VFPoolNodeState writer against the API stand-in with
a node agent over a synthetic sysfs tree: created owner-referenced to the Node, a burst of
changes written once, failures retried, never before the Node is known."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as kclient

from cnispec.errors import InvalidConfig
from cnispec.identity import Holder
from cnispec.vfpool_api import NodeStateStatus
from metaplugin.config import build
from metaplugin.k8s_pools import NodeStateWriter, NodeWatch, pool_object, select_pools
from sriov.agent import NodeAgent
from sriov.pools_source import PoolsFileSource
from sriov.sysfs import Sysfs
from testbed.sriov_bed import QuietSource, SriovBed
from tests.k8s_standin import ApiStandin

PF = "0000:03:00.0"
NODE = "n1"
STATUS_PATH = f"/apis/plexus.dev/v1alpha1/vfpoolnodestates/{NODE}/status"


def vfpool(name: str, resource: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("nicSelector", {"rootDevices": [PF]})
    return {
        "apiVersion": "plexus.dev/v1alpha1",
        "kind": "VFPool",
        "metadata": {"name": name, "generation": 3},
        "spec": {"resourceName": resource, **spec},
    }


# --- select_pools ---------------------------------------------------------------------------


def test_a_node_serves_the_pools_its_labels_select_by_priority_then_name() -> None:
    objs = [
        pool_object(vfpool("b", "x.io/b")),  # no nodeSelector: every node
        pool_object(vfpool("a", "x.io/a", nodeSelector={"matchLabels": {"gpu": "yes"}})),
        pool_object(vfpool("c", "x.io/c", priority=10)),
        pool_object(
            vfpool(
                "d",
                "x.io/d",
                nodeSelector={
                    "matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["edge"]}]
                },
            )
        ),
    ]
    got = select_pools(objs, {"zone": "edge"})
    assert [p.resource_name for p in got.pools.pools] == ["x.io/c", "x.io/b"]
    assert [(r.name, r.resource_name, r.generation) for r in got.refs] == [
        ("c", "x.io/c", 3),
        ("b", "x.io/b", 3),
    ]
    assert got.problems == ()
    assert [r.name for r in select_pools(objs, {"gpu": "yes"}).refs] == ["c", "a", "b", "d"]


def test_an_invalid_vfpool_is_skipped_and_named() -> None:
    objs = [
        pool_object(vfpool("good", "x.io/good")),
        pool_object(vfpool("bad", "no-prefix")),
        pool_object(vfpool("vendor-numvfs", "x.io/v", nicSelector={"vendors": ["8086"]}, numVfs=4)),
        pool_object(vfpool("elsewhere", "oops", nodeSelector={"matchLabels": {"no": "pe"}})),
        pool_object(vfpool("unreadable", "x.io/u", nodeSelector={"matchExpressions": "zone"})),
    ]
    got = select_pools(objs, {})
    assert [r.name for r in got.refs] == ["good"]
    problems = dict(p.split(": ", 1) for p in got.problems)
    assert set(problems) == {"VFPool bad", "VFPool vendor-numvfs", "VFPool unreadable"}
    assert "is not a resource name like plexus.dev/intel_vf" in problems["VFPool bad"]
    assert "numVfs needs rootDevices or pfNames" in problems["VFPool vendor-numvfs"]
    assert problems["VFPool bad"].startswith("skipped, its spec is invalid: ")


def test_a_clash_keeps_the_pool_in_force_else_the_first() -> None:
    objs = [
        pool_object(vfpool("old", "x.io/vf")),
        pool_object(vfpool("new", "x.io/vf", priority=50)),
        pool_object(vfpool("env", "x.io/vf.other")),
        pool_object(vfpool("env2", "x.io/vf-other")),  # same PCIDEVICE_X_IO_VF_OTHER
    ]
    fresh = select_pools(objs, {})
    assert [r.name for r in fresh.refs] == ["new", "env"]
    assert any(p.startswith("VFPool old: skipped, resourceName x.io/vf clashes with VFPool new")
               for p in fresh.problems)  # fmt: skip
    assert any("PCIDEVICE_X_IO_VF_OTHER" in p and "VFPool env2" in p for p in fresh.problems)
    # A newcomer never takes a pool away from the node that serves it already.
    kept = select_pools(objs, {}, in_force=["old", "env"])
    assert [r.name for r in kept.refs] == ["env", "old"]
    assert any(p.startswith("VFPool new: skipped") for p in kept.problems)


# --- the state writer -------------------------------------------------------------------------


@pytest.fixture
def api() -> Iterator[ApiStandin]:
    with ApiStandin() as standin:
        yield standin


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[NodeAgent]:
    tree = SriovBed(tmp_path / "sys")
    tree.add_pf(PF, ifname="ens1f0", num_vfs=4, announce=False)
    pools = tmp_path / "pools.yaml"
    pools.write_text(f"pools: [{{resourceName: x.io/vf, selectors: {{rootDevices: ['{PF}']}}}}]")
    a = NodeAgent(
        sysfs=Sysfs(tree.root), pools=PoolsFileSource(pools), state_dir=tmp_path / "state",
        source_factory=QuietSource,
    )  # fmt: skip
    a.start()
    a.audit_finished()
    try:
        yield a
    finally:
        a.stop()


def writer_for(
    api: ApiStandin, agent: NodeAgent, debounce: float = 0.05
) -> tuple[NodeStateWriter, NodeWatch]:
    client = kclient.ApiClient(kclient.Configuration(host=api.url))
    nodes = NodeWatch(kclient.CoreV1Api(client), NODE)
    nodes.start()
    writer = NodeStateWriter(
        kclient.CustomObjectsApi(client), NODE, agent=agent, nodes=nodes, source=None,
        debounce=debounce,
    )  # fmt: skip
    writer.start()
    return writer, nodes


def eventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return value


def status_of(api: ApiStandin) -> NodeStateStatus | None:
    obj = api.get("VFPoolNodeState", None, NODE)
    if not obj or "status" not in obj:
        return None
    return NodeStateStatus.model_validate(obj["status"])


def patches(api: ApiStandin) -> int:
    return sum(1 for m, p in api.requests if m == "PATCH" and p == STATUS_PATH)


def test_the_state_waits_for_the_node_then_is_owned_by_it(
    api: ApiStandin, agent: NodeAgent
) -> None:
    writer, nodes = writer_for(api, agent)
    try:
        eventually(lambda: any(m == "GET" and "vfpoolnodestates" in p for m, p in api.requests))
        assert api.get("VFPoolNodeState", None, NODE) is None  # no Node: no owner, not made
        node = api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
        status = eventually(lambda: status_of(api), timeout=15.0)
        obj = api.get("VFPoolNodeState", None, NODE)
        assert obj is not None and obj["spec"] == {"nodeName": NODE}
        (owner,) = obj["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == (
            "Node",
            NODE,
            node["metadata"]["uid"],
        )
        assert [v.pool for v in status.vfs] == ["x.io/vf"] * 4
        assert [p.pci for p in status.pfs] == [PF]
    finally:
        writer.stop()
        nodes.stop()


def test_a_burst_of_changes_is_one_write_and_failures_are_retried(
    api: ApiStandin, agent: NodeAgent
) -> None:
    api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
    writer, nodes = writer_for(api, agent, debounce=1.0)  # a wide window: no race with the burst
    try:
        eventually(lambda: status_of(api))
        before = patches(api)
        for i in range(4):  # four reservations in a row: one write shows them all
            agent.vfs.allocate("x.io/vf", Holder(container_id=f"c{i}", ifname="net1",
                                                pod_namespace="team", pod_name=f"p{i}"))  # fmt: skip
        status = eventually(
            lambda: (s := status_of(api)) and all(v.state == "reserved" for v in s.vfs) and s
        )
        assert patches(api) == before + 1
        assert sorted(v.pod for v in status.vfs) == ["team/p0", "team/p1", "team/p2", "team/p3"]

        api.fail_next("PATCH", STATUS_PATH, 503, times=2)  # the API has a bad moment
        agent.vfs.release_unattached("c0")
        status = eventually(
            lambda: (s := status_of(api)) and s.vfs[0].state == "free" and s, timeout=15.0
        )
        assert status.vfs[0].pod == ""
        assert writer.writes >= 2
    finally:
        writer.stop()
        nodes.stop()


# --- which source the daemon takes ------------------------------------------------------------


def test_the_pool_source_key() -> None:
    assert build({}).pools_from == "vfpools"  # cluster mode, no file: the VFPools
    assert build({"vfPools": "/p.yaml"}).pools_from == "file"  # an explicit file stays in force
    assert build({"vfPools": "/p.yaml", "vfPoolSource": "vfpools"}).pools_from == "vfpools"
    assert build({"localDir": "/n"}).pools_from is None  # local mode without a file: off
    assert build({"localDir": "/n", "vfPools": "/p.yaml"}).pools_from == "file"
    with pytest.raises(InvalidConfig, match="vfPoolSource vfpools needs the Kubernetes API"):
        build({"localDir": "/n", "vfPoolSource": "vfpools"})
    with pytest.raises(InvalidConfig, match="vfPoolSource is file but no vfPools file is set"):
        build({"vfPoolSource": "file"})
