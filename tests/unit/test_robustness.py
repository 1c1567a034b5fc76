"""What must hold when things go wrong: exact replay of what ran, hard deadlines, orphans,
stale and broken spool entries, unreadable records, GC racing requests."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cnispec.cni import Result
from cnispec.errors import (
    AttachmentConflict,
    DelegateFailed,
    DelegateTimeout,
    IOFailure,
    TeardownIncomplete,
)
from cnispec.identity import PodInfo
from delegates.external import ChildTracker, RawExec
from delegates.ipam import HostLocalIpam
from delegates.ipam.paths import IpamPaths
from delegates.plugin import PluginRequest
from metaplugin.install import conflist
from metaplugin.salvage import Salvage
from metaplugin.scheduler import Scheduler
from metaplugin.spool import SpoolReplayer
from metaplugin.store import file_name
from testbed.manifests import reservations
from tests.support.fake_exec import FakePlugin
from tests.support.world import World, nad_manifest, simple_net
from tests.unit.test_orchestrator import NETNS, request


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    w.add_nads(
        nad_manifest("net-a", simple_net("net-a")),
        nad_manifest("net-b", {**simple_net("net-b"), "cniVersion": "1.1.0"}),
    )
    return w


def test_del_replays_exactly_what_add_ran_even_after_a_plugin_upgrade(world: World) -> None:
    world.orchestrator.add(request("ADD", networks="net-a"))
    ran = next(c.config for c in world.exec.calls if c.command == "ADD" and c.plugin == "macvlan")
    recorded = world.store.load("c1").records[1].prepared.plugins[0]
    assert recorded.config == ran  # byte for byte what ran (prevResult aside)
    assert recorded.path == "/fake/macvlan" and recorded.version == "1.0.0"
    world.exec.plugins["macvlan"].versions = ("1.0.0", "1.1.0")  # upgraded in between
    world.exec.calls.clear()
    world.orchestrator.delete(request("DEL"))
    deleted = next(
        c.config for c in world.exec.calls if c.command == "DEL" and c.plugin == "macvlan"
    )
    assert deleted["cniVersion"] == "1.0.0"
    assert {k: v for k, v in deleted.items() if k != "prevResult"} == ran


def test_a_missing_plugin_fails_before_anything_runs(world: World) -> None:
    world.add_nads(
        nad_manifest("ghost-plugin", simple_net("ghost-plugin", "nope")), file="more.yaml"
    )
    with pytest.raises(Exception, match="no CNI plugin 'nope'") as err:
        world.orchestrator.add(request("ADD", networks="net-a, ghost-plugin"))
    assert "network default/ghost-plugin (net2)" in str(err.value)
    assert world.exec.commands() == []  # not even eth0 was made
    assert world.store.container_ids() == []


def test_unreadable_recorded_result_still_gets_its_del(world: World) -> None:
    world.orchestrator.add(request("ADD", networks="net-a"))
    path = world.state / "attachments" / "c1" / file_name("default/net-a", "net1")
    data = json.loads(path.read_text())
    data["result"]["ips"][0]["address"] = "not-an-address"
    path.write_text(json.dumps(data))
    world.orchestrator.delete(request("DEL"))
    assert world.exec.live() == {}
    dels = [c for c in world.exec.calls if c.command == "DEL" and c.plugin == "macvlan"]
    assert "prevResult" not in dels[0].config


def test_io_error_on_a_record_fails_del_instead_of_forgetting_it(world: World) -> None:
    world.orchestrator.add(request("ADD", networks="net-a"))
    path = world.state / "attachments" / "c1" / file_name("default/net-a", "net1")
    data = path.read_bytes()
    path.unlink()
    path.mkdir()  # reading a directory is an I/O error, not a decode error
    with pytest.raises(IOFailure) as err:
        world.orchestrator.delete(request("DEL"))
    assert err.value.code == 5
    assert world.store.quarantined() == []
    path.rmdir()
    path.write_bytes(data)
    world.orchestrator.delete(request("DEL"))
    assert world.exec.live() == {}


def test_a_record_from_a_newer_plexusd_is_left_alone(world: World) -> None:
    world.orchestrator.add(request("ADD"))
    path = world.state / "attachments" / "c1" / file_name("cluster", "eth0")
    data = json.loads(path.read_text())
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(IOFailure, match="version 99"):
        world.orchestrator.delete(request("DEL"))
    assert path.exists() and world.store.quarantined() == []


def test_views_never_quarantine(world: World) -> None:
    world.orchestrator.add(request("ADD", networks="net-a"))
    (world.state / "attachments" / "c1" / file_name("default/net-a", "net1")).write_text("{torn")
    assert world.orchestrator.pod_network_status("default", "pod-c1") is not None
    assert world.store.quarantined() == []


def test_gc_collects_a_network_that_has_no_record_left(world: World) -> None:
    valid: list[dict[str, str]] = []
    world.collector.gc(
        request("GC", "", version="1.1.0", extra_config={"cni.dev/valid-attachments": valid})
    )
    gcs = {c.config["name"] for c in world.exec.calls if c.command == "GC"}
    assert "net-b" in gcs  # a 1.1.0 NAD nobody uses right now


def test_gc_leaves_a_network_that_opted_out_alone_even_when_its_plugin_is_gone(
    world: World,
) -> None:
    retired = simple_net("retired", "uninstalled", cniVersion="1.1.0", disableGC=True)
    world.add_nads(nad_manifest("retired", retired), file="more.yaml")
    world.collector.gc(  # no plugin "uninstalled" anywhere: GC must not even look for it
        request("GC", "", version="1.1.0", extra_config={"cni.dev/valid-attachments": []})
    )
    gcs = {c.config["name"] for c in world.exec.calls if c.command == "GC"}
    assert "net-b" in gcs and "retired" not in gcs


# --- spool ------------------------------------------------------------------------------------


def spool_entry(
    spool: Path, name: str, cid: str, spooled_at: float, attempts: int = 0, **env: str
) -> None:
    full_env = {
        "CNI_COMMAND": "DEL",
        "CNI_CONTAINERID": cid,
        "CNI_IFNAME": "eth0",
        "CNI_NETNS": "",
        "CNI_ARGS": "",
        **env,
    }
    conf = json.dumps({"cniVersion": "1.0.0", "name": "plexus", "type": "plexus"})
    spool.mkdir(exist_ok=True)
    entry: dict[str, Any] = {"env": full_env, "config": conf, "spooledAt": spooled_at}
    if attempts:
        entry["attempts"] = attempts  # what the replayer counted before
    (spool / name).write_text(json.dumps(entry))


def test_a_late_spooled_del_never_touches_a_newer_add(world: World, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool_entry(spool, "1-c1-eth0.json", "c1", time.time() - 60)  # issued a minute ago
    world.orchestrator.add(request("ADD", networks="net-a"))  # same container id, made now
    replayer = SpoolReplayer(
        str(spool),
        orchestrator=world.orchestrator,
        scheduler=Scheduler(max_concurrent=1, max_queue=0),
    )
    assert replayer.replay() == 0
    assert len(world.store.load("c1").records) == 2  # untouched
    assert list(spool.glob("*.json")) == []


def test_a_spooled_del_for_another_pod_uid_is_ignored(world: World, tmp_path: Path) -> None:
    world.orchestrator.add(request("ADD"))
    spool = tmp_path / "spool"
    spool_entry(spool, "1-c1-eth0.json", "c1", time.time(), CNI_ARGS="K8S_POD_UID=someone-else")
    SpoolReplayer(
        str(spool),
        orchestrator=world.orchestrator,
        scheduler=Scheduler(max_concurrent=1, max_queue=0),
    ).replay()
    assert world.store.load("c1")


def test_a_malformed_spool_entry_is_set_aside_not_fatal(world: World, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "1-x.json").write_text(json.dumps({"env": "not-a-dict", "config": ""}))
    (spool / "2-y.json").write_text("[]")
    replayer = SpoolReplayer(
        str(spool),
        orchestrator=world.orchestrator,
        scheduler=Scheduler(max_concurrent=1, max_queue=0),
    )
    assert replayer.replay() == 0
    assert sorted(p.name for p in (spool / "bad").iterdir()) == ["1-x.json", "2-y.json"]


# --- processes --------------------------------------------------------------------------------


def test_delegate_timeout_is_a_hard_deadline(tmp_path: Path) -> None:
    plugin = tmp_path / "slow"
    plugin.write_text("#!/bin/sh\n( sleep 30 ) &\nsleep 30\n")  # a child keeps stdout open
    plugin.chmod(0o755)
    started = time.monotonic()
    with pytest.raises(DelegateTimeout):
        RawExec().run(str(plugin), {"CNI_COMMAND": "ADD"}, b"{}", timeout=0.5)
    assert time.monotonic() - started < 5
    out = subprocess.run(["pgrep", "-f", str(plugin)], capture_output=True, text=True, check=False)
    assert out.stdout.strip() == ""  # the whole process group is gone


def test_orphaned_delegates_are_killed_by_the_next_daemon(tmp_path: Path) -> None:
    tracker = ChildTracker(tmp_path / "running")
    orphan = subprocess.Popen(["sleep", "60"], start_new_session=True)
    tracker.started(orphan.pid)  # what a daemon that then died had recorded
    assert ChildTracker(tmp_path / "running").kill_orphans() == [orphan.pid]
    assert orphan.wait(5) == -9
    assert list((tmp_path / "running").iterdir()) == []


def test_a_reused_pid_is_not_killed(tmp_path: Path) -> None:
    running = tmp_path / "running"
    running.mkdir()
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (running / str(bystander.pid)).write_text("1")  # recorded for another process
        assert ChildTracker(running).kill_orphans() == []
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


# --- GC beside requests -----------------------------------------------------------------------


def test_gc_delegate_phase_waits_for_container_work() -> None:
    sched = Scheduler(max_concurrent=4, max_queue=4)
    order: list[str] = []
    inside = threading.Event()

    def request_work() -> None:
        with sched.slot("c1"):
            inside.set()
            time.sleep(0.2)
            order.append("request done")

    def gc_phase() -> None:
        inside.wait(5)
        with sched.exclusive():
            order.append("gc delegates")

    threads = [threading.Thread(target=request_work), threading.Thread(target=gc_phase)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert order == ["request done", "gc delegates"]


# --- config -----------------------------------------------------------------------------------


def test_isolation_keeps_default_global_when_global_namespaces_is_unset(tmp_path: Path) -> None:
    w = World(tmp_path, namespaceIsolation=True)
    w.add_nads(
        nad_manifest("shared", simple_net("shared")),
        nad_manifest("other", simple_net("other"), namespace="team-b"),
    )
    from cnispec.errors import NetworkNotPermitted
    from cnispec.identity import PodInfo

    pod = PodInfo("team-a", "p", "", {"k8s.v1.cni.cncf.io/networks": "default/shared"})
    assert len(w.resolver.plan(ifname="eth0", pod=pod, runtime_config={})) == 2
    pod = PodInfo("team-a", "p", "", {"k8s.v1.cni.cncf.io/networks": "team-b/other"})
    with pytest.raises(NetworkNotPermitted):
        w.resolver.plan(ifname="eth0", pod=pod, runtime_config={})


def test_conflist_asks_for_what_the_primary_declares(world: World) -> None:
    out: dict[str, Any] = conflist(world.config, frozenset({"ipRanges", "portMappings"}))
    caps = out["plugins"][0]["capabilities"]
    assert caps["ipRanges"] is True and caps["io.kubernetes.cri.pod-annotations"] is True


# --- a DEL that can never succeed -------------------------------------------------------------


def lease_net(
    world: World, name: str, subnet: str = "10.66.0.0/24", **extra: Any
) -> dict[str, Any]:
    """A macvlan NAD config with host-local IPAM in the world's lease dir (the FakePlugin
    ignores it; `hold_lease` makes the lease host-local would have made)."""
    ipam = {"type": "host-local", "dataDir": str(world.root / "leases"), "subnet": subnet}
    return simple_net(name, ipam=ipam, **extra)


def hold_lease(world: World, config: dict[str, Any], cid: str, ifname: str) -> str:
    """Reserve an address for (cid, ifname) as the exec'd host-local would have."""
    req = PluginRequest(container_id=cid, ifname=ifname, config={**config, "cniVersion": "1.0.0"})
    allocator = HostLocalIpam(paths=IpamPaths(data_roots=(str(world.root),)))
    return allocator.add(req).ips[0].address


def leases(world: World) -> list[str]:
    return reservations(world.root / "leases")


def quarantined(world: World) -> list[dict[str, Any]]:
    return [json.loads(Path(p).read_text()) for p in world.store.quarantined()]


@pytest.fixture
def stuck(world: World) -> World:
    """net-a's macvlan, whose master is gone: its DEL fails for ever."""
    world.add_nads(nad_manifest("leased", lease_net(world, "leased")), file="leased.yaml")
    world.orchestrator.add(request("ADD", networks="leased"))
    hold_lease(world, lease_net(world, "leased"), "c1", "net1")
    world.exec.plugins["macvlan"].fail = {"DEL"}
    return world


def test_a_del_with_the_netns_there_keeps_the_failed_attachment(stuck: World) -> None:
    with pytest.raises(TeardownIncomplete) as err:
        stuck.orchestrator.delete(request("DEL"))
    assert err.value.code == 105 and "default/leased (net1)" in err.value.msg
    assert [r.ifname for r in stuck.store.load("c1").records] == ["net1"]
    assert len(leases(stuck)) == 1 and stuck.store.quarantined() == []
    assert stuck.sink.abandoned == []


@pytest.mark.parametrize("netns", ["", "/run/netns/long-gone"])
def test_the_last_del_gives_up_what_cannot_be_deleted(stuck: World, netns: str) -> None:
    stuck.orchestrator.delete(request("DEL", netns=netns))  # answers success
    assert stuck.store.container_ids() == []
    assert leases(stuck) == []  # released by Plexus from the recorded IPAM config
    assert stuck.exec.live() == {"macvlan": {("c1", "net1"): "10.1.0.2/24"}}  # the plugin's
    ((entry),) = quarantined(stuck)
    assert entry["record"]["holder"]["ifname"] == "net1"
    assert entry["record"]["prepared"]["plugins"][0]["config"]["ipam"]["type"] == "host-local"
    note = entry["abandoned"]
    assert (note["container"], note["network"], note["ifname"]) == ("c1", "default/leased", "net1")
    assert note["why"] == "the runtime's last DEL (the pod's netns is gone)"
    assert note["error"] == "plugin macvlan failed: macvlan says no; DEL refused"
    assert note["released"] == [str(stuck.root / "leases" / "leased")]
    ((pod, message),) = stuck.sink.abandoned
    assert pod == PodInfo("default", "pod-c1", "uid-c1")
    assert message.startswith("DEL of default/leased (net1) failed on the runtime's last DEL")
    assert "macvlan says no" in message and "released the host-local leases" in message
    assert str(stuck.root / "state" / "quarantine") in message
    stuck.orchestrator.delete(request("DEL", netns=""))  # and a DEL after it finds nothing


def test_a_record_that_cannot_be_set_aside_stays_and_the_del_says_so(stuck: World) -> None:
    (stuck.state / "quarantine").write_text("a file where the quarantine dir should be")
    with pytest.raises(TeardownIncomplete, match="giving it up failed: cannot quarantine") as err:
        stuck.orchestrator.delete(request("DEL", netns=""))
    assert err.value.code == 105
    assert [r.ifname for r in stuck.store.load("c1").records] == ["net1"]  # nothing lost


def test_an_ipam_plexus_cannot_release_is_named_not_guessed(world: World) -> None:
    world.add_nads(
        nad_manifest("dhcp", simple_net("dhcp", ipam={"type": "dhcp"})), file="dhcp.yaml"
    )
    world.orchestrator.add(request("ADD", networks="dhcp"))
    world.exec.plugins["macvlan"].fail = {"DEL"}
    world.orchestrator.delete(request("DEL", netns=""))
    ((entry),) = quarantined(world)
    assert entry["abandoned"]["left"] == ["the leases of IPAM dhcp (plugin macvlan)"]
    assert "could not release the leases of IPAM dhcp" in world.sink.abandoned[0][1]


def test_an_event_that_cannot_be_sent_does_not_fail_the_del(stuck: World) -> None:
    def broken(*_: Any) -> None:
        raise RuntimeError("API client bug")

    stuck.sink.teardown_abandoned = broken  # type: ignore[method-assign]
    stuck.orchestrator.delete(request("DEL", netns=""))
    assert stuck.store.container_ids() == [] and len(stuck.store.quarantined()) == 1


def test_a_failed_rollback_del_keeps_the_record_and_removes_the_link(world: World) -> None:
    world.exec.plugins["stuck"] = FakePlugin("stuck", fail={"ADD", "DEL"})
    world.add_nads(nad_manifest("stuck", simple_net("stuck", "stuck")), file="stuck.yaml")
    world.links.present.add((NETNS, "net2"))  # what the failed ADD half-made
    with pytest.raises(DelegateFailed) as err:
        world.orchestrator.add(request("ADD", networks="net-a, stuck"))
    assert err.value.code == 101
    assert (
        "rollback DEL failed for default/stuck (net2): plugin stuck failed: stuck says no; DEL "
        "refused (the record stays for the runtime's DEL; Plexus removed net2 in the pod)"
        in err.value.msg
    )
    assert world.links.removed == [(NETNS, "net2")]
    assert [(r.ifname, r.state) for r in world.store.load("c1").records] == [("net2", "planned")]
    assert world.exec.live() == {}  # eth0 and net1 were rolled back
    with pytest.raises(AttachmentConflict):  # ADD again only after the runtime's DEL
        world.orchestrator.add(request("ADD", networks="net-a"))
    with pytest.raises(TeardownIncomplete):
        world.orchestrator.delete(request("DEL"))
    world.orchestrator.delete(request("DEL", netns=""))
    assert world.store.container_ids() == []
    assert [q["record"]["state"] for q in quarantined(world)] == ["planned"]


def test_salvage_removes_only_the_nodes_veth_named_with_its_mac(world: World) -> None:
    result = Result.from_wire(
        {
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "br0"},  # a bridge: no MAC recorded, shared, never touched
                {"name": "veth1234", "mac": "0a:00:00:00:00:01"},
                {"name": "eth0", "mac": "0a:00:00:00:00:02", "sandbox": "/run/netns/p"},
            ],
            "ips": [{"address": "10.0.0.5/24", "interface": 2}],
        }
    )
    world.orchestrator.add(request("ADD"))
    record = world.store.load("c1").records[0].model_copy(update={"result": result})
    world.links.present |= {("node", "br0"), ("node", "veth1234"), ("/run/netns/p", "eth0")}
    salvage = Salvage(
        host_local_data_dir=str(world.root),
        paths=IpamPaths(data_roots=(str(world.root),)),
        links=world.links,
    )
    done = salvage.everything(record, "")
    assert world.links.removed == [("node", "veth1234")]
    assert done.removed_links == ["veth veth1234 on the node"]


# --- GC: one stuck container or broken network never fails it ---------------------------------


def gc(world: World, *valid: str) -> None:
    entries = [{"containerID": c, "ifname": "eth0"} for c in valid]
    world.collector.gc(
        request("GC", "", version="1.1.0", extra_config={"cni.dev/valid-attachments": entries})
    )


def gc_calls(world: World) -> list[tuple[str, list[dict[str, str]]]]:
    return [
        (c.config["name"], c.config["cni.dev/valid-attachments"])
        for c in world.exec.calls
        if c.command == "GC"
    ]


def test_gc_gives_up_a_stale_container_whose_del_fails(stuck: World) -> None:
    stuck.orchestrator.add(request("ADD", "keep"))
    gc(stuck, "keep")  # no error, now or after
    assert stuck.store.container_ids() == ["keep"]
    assert leases(stuck) == []
    ((entry),) = quarantined(stuck)
    assert entry["abandoned"]["why"] == "GC (the runtime no longer knows the container)"
    assert stuck.sink.abandoned[0][0].name == "pod-c1"
    assert stuck.collector.stats.stale_containers == 1
    assert stuck.collector.stats.container_failures == 0
    gc(stuck, "keep")


def test_gc_goes_on_past_a_container_it_cannot_read(world: World) -> None:
    world.orchestrator.add(request("ADD", "newer"))
    world.orchestrator.add(request("ADD", "stale", networks="net-b"))
    path = world.state / "attachments" / "newer" / file_name("cluster", "eth0")
    path.write_text(json.dumps({**json.loads(path.read_text()), "version": 99}))
    gc(world)
    assert world.store.container_ids() == ["newer"]  # left alone, and stale still collected
    assert world.collector.stats.container_failures == 1
    assert world.exec.live().get("macvlan") is None
    # No plugin collects: it would not be told of newer's attachments and release theirs.
    assert gc_calls(world) == []


def test_gc_goes_on_past_a_broken_network(world: World) -> None:
    world.add_nads(
        nad_manifest("ghost", simple_net("ghost", "uninstalled", cniVersion="1.1.0")),
        file="ghost.yaml",
    )
    world.exec.plugins["cluster"].fail = {"GC"}
    gc(world)  # no error
    assert "net-b" in {name for name, _ in gc_calls(world)}
    assert world.collector.stats.network_failures == 2  # ghost's plugin, cluster's GC


def test_gc_collects_the_recorded_networks_when_the_nads_cannot_be_listed(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.orchestrator.add(request("ADD", "keep", networks="net-b"))

    def broken() -> None:
        raise RuntimeError("NAD source bug")

    monkeypatch.setattr(world.resolver, "known_networks", broken)
    gc(world, "keep")
    assert ("net-b", [{"containerID": "keep", "ifname": "net1"}]) in gc_calls(world)
    assert world.collector.stats.network_failures == 1


def test_a_nad_of_another_namespace_cannot_turn_gc_off_for_a_network(world: World) -> None:
    """GC keys networks by NAD: `evil/x`, whose config is also called net-b, opts itself out
    of GC, not default/net-b; and its config never runs in net-b's place."""
    evil = simple_net("net-b", "uninstalled", cniVersion="1.1.0", disableGC=True)
    world.add_nads(
        nad_manifest("x", evil, namespace="evil"), file="zz-evil.yaml"
    )  # read after net-b
    world.orchestrator.add(request("ADD", "keep", networks="net-b"))
    gc(world, "keep")
    assert ("net-b", [{"containerID": "keep", "ifname": "net1"}]) in gc_calls(world)
    assert world.collector.stats.network_failures == 0


def test_networks_sharing_a_config_name_are_told_every_attachment_of_it(world: World) -> None:
    """Two NADs whose configs are both called `shared` may share host-local's lease directory
    (<dataDir>/shared): each GC keeps every attachment of that name, so neither releases the
    other's leases."""
    shared = simple_net("shared", cniVersion="1.1.0")
    world.add_nads(
        nad_manifest("shared", shared),
        nad_manifest("shared", shared, namespace="team-b"),
        file="shared.yaml",
    )
    world.orchestrator.add(request("ADD", "a", networks="shared"))
    world.orchestrator.add(request("ADD", "b", networks="team-b/shared"))
    gc(world, "a", "b")
    both = [{"containerID": "a", "ifname": "net1"}, {"containerID": "b", "ifname": "net1"}]
    assert [valid for name, valid in gc_calls(world) if name == "shared"] == [both, both]


# --- a spooled DEL that keeps failing ---------------------------------------------------------


def test_a_spooled_del_is_given_up_after_its_retries(stuck: World, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool_entry(spool, "1-c1-eth0.json", "c1", time.time())
    replayer = SpoolReplayer(
        str(spool),
        orchestrator=stuck.orchestrator,
        scheduler=Scheduler(max_concurrent=1, max_queue=0),
        max_attempts=3,
    )
    (pending,) = spool.glob("*.json")
    assert replayer.replay() == 1
    assert json.loads(pending.read_text())["attempts"] == 1  # counted in the file
    assert replayer.replay() == 1 and stuck.store.quarantined() == []
    assert replayer.replay() == 0  # the third is the last: what still fails is given up
    assert list(spool.glob("*.json")) == [] and not (spool / "bad").exists()
    assert stuck.store.container_ids() == [] and leases(stuck) == []
    ((entry),) = quarantined(stuck)
    assert entry["abandoned"]["why"] == "a spooled DEL that failed on every retry"


def test_a_spooled_del_that_cannot_even_be_given_up_is_set_aside(
    world: World, tmp_path: Path
) -> None:
    world.orchestrator.add(request("ADD"))
    path = world.state / "attachments" / "c1" / file_name("cluster", "eth0")
    path.write_text(json.dumps({**json.loads(path.read_text()), "version": 99}))
    spool = tmp_path / "spool"
    spool_entry(spool, "1-c1-eth0.json", "c1", time.time(), attempts=1)
    replayer = SpoolReplayer(
        str(spool),
        orchestrator=world.orchestrator,
        scheduler=Scheduler(max_concurrent=1, max_queue=0),
        max_attempts=2,
    )
    assert replayer.replay() == 0
    assert [p.name for p in (spool / "bad").iterdir()] == ["1-c1-eth0.json"]
    assert path.exists()  # the record stays for GC or the runtime's next DEL
