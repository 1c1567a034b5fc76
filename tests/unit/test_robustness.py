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

from cnispec.errors import DelegateTimeout, IOFailure
from delegates.external import ChildTracker, RawExec
from metaplugin.install import conflist
from metaplugin.scheduler import Scheduler
from metaplugin.spool import SpoolReplayer
from metaplugin.store import file_name
from tests.support.world import World, nad_manifest, simple_net
from tests.unit.test_orchestrator import request


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


def spool_entry(spool: Path, name: str, cid: str, spooled_at: float, **env: str) -> None:
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
    (spool / name).write_text(
        json.dumps({"env": full_env, "config": conf, "spooledAt": spooled_at})
    )


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
