"""The orchestrator over a FakeExec: ordering, rollback, durable replay, GC, STATUS."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from cnispec.annotations import NETWORKS_ANNOTATION, RESOURCE_NAME_ANNOTATION
from cnispec.cni import CniRequest
from cnispec.errors import (
    AttachmentConflict,
    DecodeFailure,
    DelegateFailed,
    InvalidConfig,
    NetworkNotFound,
    NotReady,
    TeardownIncomplete,
    UnknownContainer,
)
from cnispec.identity import PodInfo
from metaplugin.orchestrator import Orchestrator, _Undo
from metaplugin.podwide import Applied, DefaultRoute
from metaplugin.store import Attachment, file_name
from sriov.devices import DeviceRequest
from tests.support.world import World, nad_manifest, simple_net

NETNS = "/proc/self/ns/net"


def request(
    command: str,
    cid: str = "c1",
    *,
    networks: str | None = None,
    netns: str = NETNS,
    ifname: str = "eth0",
    version: str = "1.0.0",
    extra_config: dict[str, Any] | None = None,
) -> CniRequest:
    config: dict[str, Any] = {"cniVersion": version, "name": "plexus", "type": "plexus"}
    if networks is not None:
        config["runtimeConfig"] = {
            "io.kubernetes.cri.pod-annotations": {"k8s.v1.cni.cncf.io/networks": networks}
        }
    config.update(extra_config or {})
    args = {
        "IgnoreUnknown": "1",
        "K8S_POD_NAMESPACE": "default",
        "K8S_POD_NAME": "pod-" + cid,
        "K8S_POD_UID": "uid-" + cid,
    }
    return CniRequest(
        command=command,
        container_id=cid,
        netns=netns,
        ifname=ifname,
        args=args,
        raw_args=";".join(f"{k}={v}" for k, v in args.items()),
        path=("/fake",),
        config=config,
        cni_version=version,
    )


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    w.add_nads(
        nad_manifest("net-a", simple_net("net-a")),
        nad_manifest("net-b", simple_net("net-b")),
        nad_manifest("net-x", simple_net("net-x", "broken")),
        nad_manifest(
            "chained",
            {
                "cniVersion": "1.1.0",
                "name": "chained",
                "plugins": [{"type": "ipvlan"}, {"type": "tuning"}],
            },
        ),
    )
    return w


def records(world: World, cid: str = "c1") -> list[tuple[str, str]]:
    return [(r.ifname, r.state) for r in world.store.load(cid).records]


def test_add_attaches_everything_and_answers_with_the_primary_result(world: World) -> None:
    out = world.orchestrator.add(request("ADD", networks="net-a, net-b@data0"))
    assert out["cniVersion"] == "1.0.0"
    assert out["ips"][0]["address"].startswith("10.0.0.")
    assert world.exec.commands("ADD") == [
        ("cluster", "ADD", "eth0"),
        ("macvlan", "ADD", "net1"),
        ("macvlan", "ADD", "data0"),
    ]
    assert records(world) == [("eth0", "added"), ("net1", "added"), ("data0", "added")]
    ((pod, status, messages),) = world.sink.attached_calls
    assert pod.ref == "default/pod-c1"
    assert [(e["name"], e["interface"], e["default"]) for e in status] == [
        ("cluster", "eth0", True),
        ("default/net-a", "net1", False),
        ("default/net-b", "data0", False),
    ]
    assert status[1]["ips"] == ["10.1.0.2"] and status[1]["mac"] == "0a:58:00:00:00:01"
    assert messages[1] == "Add net1 [10.1.0.2/24] from default/net-a"


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_result_in_the_callers_version(world: World, version: str) -> None:
    out = world.orchestrator.add(request("ADD", version=version))
    assert out["cniVersion"] == version
    assert ("version" in out["ips"][0]) == version.startswith("0.")


def test_delegates_get_the_pods_cni_args_with_ignore_unknown(world: World) -> None:
    world.orchestrator.add(request("ADD", networks="net-a"))
    args = {c.env["CNI_ARGS"] for c in world.exec.calls if c.command == "ADD"}
    assert len(args) == 1
    pairs = set(args.pop().split(";"))
    assert {"IgnoreUnknown=1", "K8S_POD_NAME=pod-c1", "K8S_POD_UID=uid-c1"} <= pairs


def test_failure_of_the_third_delegate_rolls_back_in_reverse_and_leaves_nothing(
    world: World,
) -> None:
    with pytest.raises(DelegateFailed) as err:
        world.orchestrator.add(request("ADD", networks="net-a, net-x, net-b"))
    assert err.value.code == 101
    assert "network default/net-x (net2)" in err.value.msg
    assert '"code":7' in err.value.details  # the delegate's own error JSON
    assert world.exec.commands() == [
        ("cluster", "ADD", "eth0"),
        ("macvlan", "ADD", "net1"),
        ("broken", "ADD", "net2"),
        ("broken", "DEL", "net2"),
        ("macvlan", "DEL", "net1"),
        ("cluster", "DEL", "eth0"),
    ]
    assert world.exec.live() == {}
    assert not world.store.load("c1")
    assert world.store.container_ids() == []
    # The pod gets the failure (its AddFailed Event): the very error the runtime got.
    ((pod, error),) = world.sink.add_failures
    assert pod.ref == "default/pod-c1" and error.code == 101 and error.msg == err.value.msg


def test_rollback_failure_keeps_the_record_for_a_later_del(world: World) -> None:
    world.exec.plugins["macvlan"].fail = {"DEL"}
    with pytest.raises(DelegateFailed) as err:
        world.orchestrator.add(request("ADD", networks="net-a, net-x"))
    assert "rollback DEL failed for default/net-a (net1)" in err.value.msg
    assert "rollback DEL failed" in err.value.details
    assert records(world) == [("net1", "added")]  # failed net-x and rolled-back eth0 gone
    world.exec.plugins["macvlan"].fail = set()
    world.orchestrator.delete(request("DEL", netns=""))
    assert world.exec.live() == {}
    assert world.store.container_ids() == []


def test_add_refuses_a_container_that_still_has_attachments(world: World) -> None:
    world.orchestrator.add(request("ADD"))
    with pytest.raises(AttachmentConflict) as err:
        world.orchestrator.add(request("ADD"))
    assert err.value.code == 107


def test_add_refuses_to_take_over_an_existing_interface(world: World) -> None:
    world.existing_interfaces.add((NETNS, "net1"))
    with pytest.raises(InvalidConfig, match="net1 already exists"):
        world.orchestrator.add(request("ADD", networks="net-a"))
    assert world.exec.commands() == []  # nothing ran, so nothing can touch the foreign net1
    assert world.store.container_ids() == []


def test_del_replays_recorded_configs_in_reverse_with_results_and_twice_is_fine(
    world: World,
) -> None:
    world.orchestrator.add(request("ADD", networks="net-a, chained"))
    world.exec.calls.clear()
    world.orchestrator.delete(request("DEL"))
    assert world.exec.commands() == [
        ("tuning", "DEL", "net2"),
        ("ipvlan", "DEL", "net2"),
        ("macvlan", "DEL", "net1"),
        ("cluster", "DEL", "eth0"),
    ]
    dels = [c for c in world.exec.calls if c.command == "DEL"]
    assert all("prevResult" in c.config for c in dels)
    assert world.exec.live() == {}
    world.exec.calls.clear()
    world.orchestrator.delete(request("DEL", netns=""))
    assert world.exec.commands() == []


def test_del_needs_neither_netns_nor_prev_result_nor_nads(world: World) -> None:
    world.orchestrator.add(request("ADD", networks="net-a"))
    for f in world.nad_dir.iterdir():  # the NADs are deleted before the pod
        f.unlink()
    world.orchestrator.delete(request("DEL", netns="/run/netns/long-gone"))
    assert world.exec.live() == {}
    assert {c.env["CNI_NETNS"] for c in world.exec.calls if c.command == "DEL"} == {""}


def test_del_failure_keeps_what_failed_and_reports_it(world: World) -> None:
    world.orchestrator.add(request("ADD", networks="net-a"))
    world.exec.plugins["macvlan"].fail = {"DEL"}
    with pytest.raises(TeardownIncomplete) as err:
        world.orchestrator.delete(request("DEL"))
    assert err.value.code == 105 and "default/net-a (net1)" in err.value.msg
    assert records(world) == [("net1", "added")]
    world.exec.plugins["macvlan"].fail = set()
    world.orchestrator.delete(request("DEL"))
    assert world.store.container_ids() == []


def test_del_for_another_runtime_interface_is_ignored(world: World) -> None:
    world.orchestrator.add(request("ADD"))
    world.orchestrator.delete(request("DEL", ifname="eth1"))
    assert records(world) == [("eth0", "added")]


def test_crash_between_delegates_is_undone_by_del(world: World) -> None:
    """What a SIGKILL mid-ADD leaves: the full plan recorded, only the first one added."""
    plan = world.resolver.plan(ifname="eth0", pod=None, runtime_config={})
    req = request("ADD")
    undo = _Undo()  # the crash: its undos never run
    recs = world.orchestrator._record_plan(req, None, plan, undo)
    world.orchestrator._attach(recs[0], req.netns, undo)
    world.orchestrator.delete(request("DEL", netns=""))
    assert world.exec.live() == {}
    assert world.store.container_ids() == []


def test_a_torn_record_is_read_from_the_plan_journal_and_deleted(world: World) -> None:
    # A power cut after ADD may tear a record written without fsync; the journal has its plan.
    world.orchestrator.add(request("ADD", networks="net-a, net-b"))
    victim = world.state / "attachments" / "c1" / file_name("default/net-a", "net1")
    victim.write_text('{"version": 2, "holder": {"container_id": "c1", "ifn')  # a torn write
    world.exec.calls.clear()
    world.orchestrator.delete(request("DEL"))
    assert ("macvlan", "DEL", "net1") in world.exec.commands()
    assert world.exec.live() == {}
    assert world.store.quarantined() == []
    assert world.store.container_ids() == []


def test_corrupt_record_is_quarantined_and_the_rest_still_deleted(world: World) -> None:
    world.orchestrator.add(request("ADD", networks="net-a, net-b"))
    victim = world.state / "attachments" / "c1" / file_name("default/net-a", "net1")
    victim.write_text('{"version": 2, "holder": {"container_id": "c1", "ifn')  # a torn write
    (victim.parent / ".journal").write_text("[{torn")  # and no journal to read it from
    world.orchestrator.delete(request("DEL"))
    assert world.exec.live() == {"macvlan": {("c1", "net1"): "10.1.0.2/24"}}
    assert len(world.store.quarantined()) == 1
    assert world.store.container_ids() == []


def test_check_runs_check_on_every_delegate(world: World) -> None:
    world.orchestrator.add(request("ADD", networks="net-a"))
    world.exec.calls.clear()
    world.orchestrator.check(request("CHECK"))
    assert world.exec.commands() == [("cluster", "CHECK", "eth0"), ("macvlan", "CHECK", "net1")]
    world.exec.plugins["macvlan"].live.clear()  # someone deleted net1 behind our back
    with pytest.raises(DelegateFailed, match=r"network default/net-a \(net1\): .*net1 missing"):
        world.orchestrator.check(request("CHECK"))


def test_check_of_an_unknown_container_is_code_3(world: World) -> None:
    with pytest.raises(UnknownContainer) as err:
        world.orchestrator.check(request("CHECK", "nobody"))
    assert err.value.code == 3


def test_gc_removes_stale_attachments_on_every_network(world: World) -> None:
    world.orchestrator.add(request("ADD", "keep", networks="chained"))
    world.orchestrator.add(request("ADD", "stale", networks="net-a, chained"))
    world.exec.calls.clear()
    valid = [{"containerID": "keep", "ifname": "eth0"}]
    world.collector.gc(
        request("GC", "", version="1.1.0", extra_config={"cni.dev/valid-attachments": valid})
    )
    assert sorted(world.store.container_ids()) == ["keep"]
    assert ("macvlan", "DEL", "net1") in world.exec.commands()
    assert world.exec.live().get("macvlan") is None
    gcs = {
        c.config["name"]: c.config["cni.dev/valid-attachments"]
        for c in world.exec.calls
        if c.command == "GC"
    }
    # GC reached every 1.1.0 plugin of every network seen, with that network's valid list
    assert gcs["chained"] == [{"containerID": "keep", "ifname": "net1"}]
    assert "net-a" not in gcs  # a 1.0.0 network never gets GC
    assert gcs["cluster"] == [{"containerID": "keep", "ifname": "eth0"}]


def test_gc_needs_valid_attachments(world: World) -> None:
    with pytest.raises(InvalidConfig, match="valid-attachments"):
        world.collector.gc(request("GC", "", version="1.1.0"))


def test_status(world: World, tmp_path: Path) -> None:
    world.orchestrator.status(request("STATUS", "", version="1.1.0"))
    assert ("cluster", "STATUS", "") in world.exec.commands()
    w2 = World(tmp_path / "two", clusterNetwork="missing")
    with pytest.raises(NotReady) as err:
        w2.orchestrator.status(request("STATUS", "", version="1.1.0"))
    assert err.value.code == 50
    w3 = World(tmp_path / "three", readinessIndicatorFile=str(tmp_path / "ready"))
    with pytest.raises(NotReady, match="readiness indicator"):
        w3.orchestrator.status(request("STATUS", "", version="1.1.0"))
    (tmp_path / "ready").touch()
    w3.orchestrator.status(request("STATUS", "", version="1.1.0"))


def test_missing_nad_tells_the_pod(world: World) -> None:
    with pytest.raises(NetworkNotFound):
        world.orchestrator.add(request("ADD", networks="ghost"))
    assert world.sink.not_found and "ghost" in world.sink.not_found[0][1]
    assert world.store.container_ids() == []


def test_pod_network_status_for_plexusctl(world: World) -> None:
    world.orchestrator.add(request("ADD", networks="net-a"))
    status = world.orchestrator.pod_network_status("default", "pod-c1")
    assert status is not None
    assert [e["interface"] for e in status] == ["eth0", "net1"]
    assert sum(e["default"] for e in status) == 1
    assert world.orchestrator.pod_network_status("default", "nobody") is None


def test_same_nad_twice_gives_two_attachments(world: World) -> None:
    world.orchestrator.add(request("ADD", networks="net-a, net-a"))
    assert records(world) == [("eth0", "added"), ("net1", "added"), ("net2", "added")]
    status = world.orchestrator.pod_network_status("default", "pod-c1")
    assert [e["name"] for e in status or []] == ["cluster", "default/net-a", "default/net-a"]


def test_record_holds_the_exact_config_that_ran(world: World) -> None:
    world.orchestrator.add(request("ADD", networks="net-a"))
    rec = world.store.load("c1").records[1]
    ran = next(c.config for c in world.exec.calls if c.command == "ADD" and c.plugin == "macvlan")
    assert ran == rec.prepared.plugins[0].config


def test_a_malformed_delegate_result_rolls_back(world: World) -> None:
    real = world.exec.plugins["macvlan"].respond

    def bad_result(command: str, env: Any, config: dict[str, Any]) -> Any:
        out = real(command, env, config)
        if command == "ADD":
            return type(out)(0, out.stdout.replace(b"/24", b"/99"), b"")
        return out

    world.exec.plugins["macvlan"].respond = bad_result  # type: ignore[method-assign]
    with pytest.raises(DecodeFailure):
        world.orchestrator.add(request("ADD", networks="net-a"))
    assert world.exec.live() == {}
    assert world.store.container_ids() == []


def test_a_status_sink_failure_never_fails_the_pod(world: World) -> None:
    def broken(*_: Any) -> None:
        raise RuntimeError("API client bug")

    world.sink.attached = broken  # type: ignore[method-assign]
    out = world.orchestrator.add(request("ADD", networks="net-a"))
    assert out["ips"]
    assert records(world) == [("eth0", "added"), ("net1", "added")]


def test_default_route_moves_to_the_requesting_attachment(world: World) -> None:
    networks = json.dumps([{"name": "net-a"}, {"name": "net-b", "default-route": ["10.1.0.1"]}])
    out = world.orchestrator.add(request("ADD", networks=networks))
    assert world.moved_routes == [(NETNS, "net2", ["10.1.0.1"])]
    assert out.get("routes", []) == []  # eth0's default route is gone from what kubelet sees
    by_if = {r.ifname: r.result for r in world.store.load("c1").records}
    assert [rt.dst for rt in by_if["eth0"].routes] == []
    assert [rt.dst for rt in by_if["net1"].routes] == []
    assert [(rt.dst, rt.gw) for rt in by_if["net2"].routes] == [("0.0.0.0/0", "10.1.0.1")]
    status = world.orchestrator.pod_network_status("default", "pod-c1") or []
    assert status[2]["default-route"] == ["10.1.0.1"]


class RefusingStep:
    """A pod-wide step after the default route that fails (policy that cannot be applied)."""

    name = "refusing"

    def apply(self, netns: str, attachments: list[Attachment]) -> Applied:
        raise InvalidConfig("pod-wide step refused the pod")


def test_a_failing_pod_step_undoes_the_steps_before_it_and_every_attachment(
    world: World,
) -> None:
    orchestrator = Orchestrator(
        config=world.config,
        resolver=world.resolver,
        store=world.store,
        runner=world.runner,
        sink=world.sink,
        existing=lambda netns, names: [],
        pod_steps=(DefaultRoute(routes=world), RefusingStep()),
        reap_links=lambda netns: None,
    )
    networks = json.dumps([{"name": "net-a"}, {"name": "net-b", "default-route": ["10.1.0.1"]}])
    with pytest.raises(InvalidConfig, match="pod-wide step refused the pod"):
        orchestrator.add(request("ADD", networks=networks))
    ((netns, moved),) = world.routes_put_back  # the default route went back where it was
    assert netns == NETNS and moved.families == {socket.AF_INET}
    assert world.exec.live() == {}
    assert world.store.container_ids() == []


def test_a_default_route_that_cannot_be_set_undoes_the_pod(world: World) -> None:
    networks = json.dumps([{"name": "net-a", "default-route": ["10.66.0.1"]}])
    with pytest.raises(InvalidConfig, match=r"network default/net-a \(net1\): gateway 10\.66"):
        world.orchestrator.add(request("ADD", networks=networks))
    assert world.exec.live() == {}
    assert world.store.container_ids() == []


def test_a_del_that_fails_on_a_half_made_attachment_keeps_it_for_the_retry(
    world: World,
) -> None:
    """A crash mid-ADD leaves net1 planned; its DEL fails once while the pod's netns is there:
    the record must survive, so the next DEL runs the plugin's DEL again instead of forgetting
    what the half-made ADD left."""
    req = request("ADD", networks="net-a")
    pod = PodInfo("default", "pod-c1", "uid-c1", {NETWORKS_ANNOTATION: "net-a"})
    plan = world.resolver.plan(ifname="eth0", pod=pod, runtime_config={})
    undo = _Undo()  # the crash: its undos never run
    recs = world.orchestrator._record_plan(req, None, plan, undo)
    world.orchestrator._attach(recs[0], req.netns, undo)
    world.exec.plugins["macvlan"].live[("c1", "net1")] = "10.1.0.9/24"  # what the ADD half-made
    world.exec.plugins["macvlan"].fail = {"DEL"}
    with pytest.raises(TeardownIncomplete, match="default/net-a"):
        world.orchestrator.delete(request("DEL"))
    assert records(world) == [("net1", "planned")]
    world.exec.plugins["macvlan"].fail = set()
    world.orchestrator.delete(request("DEL", netns=""))
    assert ("macvlan", "DEL", "net1") in world.exec.commands()[-2:]
    assert world.exec.live() == {}
    assert world.store.container_ids() == []


class FakeDevices:
    """A DeviceSource: hands out 0000:3b:02.N in order and remembers what it was asked."""

    def __init__(self) -> None:
        self.requests: list[DeviceRequest] = []
        self.released: list[str] = []

    def assign(self, pod: PodInfo | None, requests: list[DeviceRequest]) -> list[str]:
        first = len(self.requests)
        self.requests += requests
        return [f"0000:3b:02.{first + i}" for i in range(len(requests))]

    def release_unattached(self, container_id: str) -> None:
        self.released.append(container_id)

    def device_info(self, pci: str) -> dict[str, str]:
        return {"pci-address": pci, "pf-pci-address": "0000:3b:00.0"}


@pytest.fixture
def with_devices(world: World) -> tuple[World, FakeDevices, Orchestrator]:
    pool = {RESOURCE_NAME_ANNOTATION: "plexus.dev/vf"}
    world.add_nads(
        nad_manifest("net-a", simple_net("net-a")),
        nad_manifest("vf", simple_net("vf", capabilities={"deviceID": True}), annotations=pool),
        nad_manifest(
            "vf-x",
            {
                "cniVersion": "1.0.0",
                "name": "vf-x",
                "plugins": [{"type": "macvlan"}, {"type": "broken"}],
            },
            annotations=pool,
        ),
        nad_manifest("pinned", simple_net("pinned", deviceID="0000:3b:09.0"), annotations=pool),
    )
    devices = FakeDevices()
    orchestrator = Orchestrator(
        config=world.config,
        resolver=world.resolver,
        store=world.store,
        runner=world.runner,
        sink=world.sink,
        devices=devices,
        existing=lambda netns, names: [],
        reap_links=lambda netns: None,
    )
    return world, devices, orchestrator


def test_each_attachment_of_a_pool_gets_its_device_as_deviceid(
    with_devices: tuple[World, FakeDevices, Orchestrator],
) -> None:
    world, devices, orchestrator = with_devices
    orchestrator.add(request("ADD", networks="vf, net-a, vf@sriov1, pinned"))
    assert [(r.holder.ifname, r.network, r.resource) for r in devices.requests] == [
        ("net1", "default/vf", "plexus.dev/vf"),
        ("sriov1", "default/vf", "plexus.dev/vf"),
    ]  # net-a names no pool; pinned already has its deviceID
    ran = {c.env["CNI_IFNAME"]: c.config for c in world.exec.calls if c.command == "ADD"}
    assert ran["net1"]["deviceID"] == "0000:3b:02.0"
    assert ran["net1"]["runtimeConfig"] == {"deviceID": "0000:3b:02.0"}
    assert ran["sriov1"]["deviceID"] == "0000:3b:02.1"
    assert ran["net4"]["deviceID"] == "0000:3b:09.0"
    assert "deviceID" not in ran["net2"]
    assert devices.released == []


def test_devices_go_back_when_the_add_fails(
    with_devices: tuple[World, FakeDevices, Orchestrator],
) -> None:
    world, devices, orchestrator = with_devices
    with pytest.raises(DelegateFailed, match=r"network default/vf-x \(net1\)"):
        orchestrator.add(request("ADD", networks="vf-x"))
    assert devices.released == ["c1"]
    assert world.exec.live() == {}
    assert world.store.container_ids() == []
