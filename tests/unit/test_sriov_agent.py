"""The node agent over a synthetic sysfs tree (no links, no root): pool membership, health as a
device plugin would report it, local-mode allocation, the one-holder rule, numVfs, and reloading
the pools file without a restart."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest

from cnispec.errors import DeviceNotFound, DeviceUnavailable, TryAgainLater
from cnispec.identity import Holder
from sriov import vfstate
from sriov.agent import NodeAgent
from sriov.health import givable, vf_health
from sriov.model import Pf, Vf
from sriov.pools_source import PoolsFileSource
from sriov.records import HostState, VfRecord, VfSettings, VfState
from sriov.sysfs import Sysfs
from testbed.sriov_bed import QuietSource, SriovBed

POOL = "plexus.dev/intel_vf"
PF = "0000:03:00.0"


def _pools(path: Path, body: str) -> Path:
    path.write_text(dedent(body))
    return path


@pytest.fixture
def tree(tmp_path: Path) -> SriovBed:
    bed = SriovBed(tmp_path / "sys")
    bed.add_pf(PF, ifname="ens1f0", num_vfs=4, announce=False)
    return bed


@pytest.fixture
def pools_file(tmp_path: Path) -> Path:
    return _pools(
        tmp_path / "pools.yaml",
        f"""
        pools:
          - resourceName: {POOL}
            selectors:
              rootDevices: ["{PF}#0-2"]
        """,
    )


@contextmanager
def started(tree: SriovBed, pools: Path, state: Path, **extra: Any) -> Iterator[NodeAgent]:
    a = NodeAgent(
        sysfs=Sysfs(tree.root), pools=PoolsFileSource(pools), state_dir=state, source_factory=QuietSource,
        **extra,
    )  # fmt: skip
    a.start()
    try:
        yield a
    finally:
        a.stop()


@pytest.fixture
def agent(tree: SriovBed, pools_file: Path, tmp_path: Path) -> Iterator[NodeAgent]:
    with started(tree, pools_file, tmp_path / "state") as a:
        yield a


def _holder(cid: str, ifname: str = "net1") -> Holder:
    return Holder(container_id=cid, ifname=ifname, pod_namespace="default", pod_name=cid)


def test_nothing_is_given_out_before_the_audit(agent: NodeAgent) -> None:
    views = agent.membership.pool_devices(POOL)
    assert [v.pci for v in views] == ["0000:03:02.0", "0000:03:02.1", "0000:03:02.2"]
    assert not any(v.healthy for v in views)
    assert {v.reason for v in views} == {"not yet verified by the audit"}
    with pytest.raises(DeviceUnavailable, match="not verified"):
        agent.vfs.allocate(POOL, _holder("c1"))

    agent.audit_finished()
    assert all(v.healthy for v in agent.membership.pool_devices(POOL))


def test_allocate_takes_each_vf_once_and_says_when_the_pool_is_empty(agent: NodeAgent) -> None:
    agent.audit_finished()
    got = [agent.vfs.allocate(POOL, _holder(f"c{i}")) for i in range(3)]
    assert got == ["0000:03:02.0", "0000:03:02.1", "0000:03:02.2"]
    assert agent.vfs.allocate(POOL, _holder("c0")) == got[0]  # a retried ADD keeps its VF
    with pytest.raises(DeviceUnavailable, match="no free VF") as err:
        agent.vfs.allocate(POOL, _holder("c9"))
    assert err.value.code == 111
    with pytest.raises(DeviceNotFound) as missing:
        agent.vfs.allocate("plexus.dev/nope", _holder("c9"))
    assert missing.value.code == 112 and POOL in missing.value.msg

    assert agent.vfs.release_unattached("c1") == [got[1]]
    assert agent.vfs.allocate(POOL, _holder("c9")) == got[1]


def test_one_holder_per_vf_and_stale_del_touches_nothing(agent: NodeAgent) -> None:
    agent.audit_finished()
    vf = "0000:03:02.0"
    first = agent.vfs.claim(vf, _holder("c1"))
    assert first.state == VfState.RESERVED
    with pytest.raises(DeviceUnavailable, match="default/c1"):
        agent.vfs.claim(vf, _holder("c2"))
    agent.vfs.prepare(
        vf,
        _holder("c1"),
        host=HostState(name="ens1f0v0", mac="02:00:00:00:00:01", mtu=1500),
        pf_before=VfSettings(vlan=0),
        pf_applied=("vlan",),
    )
    agent.vfs.attached(vf, _holder("c1"))
    assert agent.vfs.held_by("c1", "net1") is not None
    assert agent.vfs.release_begin(vf, _holder("c2")) is None  # not its VF
    record = agent.vfs.release_begin(vf, _holder("c1"))
    assert record is not None and record.host is not None and record.host.name == "ens1f0v0"
    agent.vfs.release_done(vf)
    assert agent.vfs.held_by("c1", "net1") is None
    view = {v.pci: v for v in agent.membership.vfs_view()}[vf]
    assert (view.state, view.healthy, view.holder) == ("free", True, "")
    assert agent.vfs.allocate(POOL, _holder("c3")) == vf  # back in the pool at once


def test_state_survives_a_restart(
    tree: SriovBed, pools_file: Path, tmp_path: Path, agent: NodeAgent
) -> None:
    agent.audit_finished()
    vf = agent.vfs.allocate(POOL, _holder("c1"))
    agent.stop()
    with started(tree, pools_file, tmp_path / "state") as again:
        again.audit_finished()
        assert again.vfs.held_by("c1", "net1") is not None
        assert vf not in {again.vfs.allocate(POOL, _holder(f"n{i}")) for i in range(2)}


def test_a_vanished_vf_stays_listed_unhealthy(tree: SriovBed, agent: NodeAgent) -> None:
    agent.audit_finished()
    tree.remove_vf("0000:03:02.1", announce=False)
    agent.refresh()
    views = {v.pci: v for v in agent.membership.pool_devices(POOL)}
    assert views["0000:03:02.1"].healthy is False
    assert views["0000:03:02.1"].reason == "gone from sysfs"
    assert views["0000:03:02.0"].healthy is True


def test_a_vf_bound_to_vfio_does_not_serve_a_netdevice_pool(
    tree: SriovBed, agent: NodeAgent
) -> None:
    agent.audit_finished()
    tree.bind("0000:03:02.2", "vfio-pci", announce=False)
    agent.refresh()
    view = {v.pci: v for v in agent.membership.pool_devices(POOL)}["0000:03:02.2"]
    assert view.healthy is False and "wants a netdevice" in view.reason
    got = {agent.vfs.allocate(POOL, _holder(f"c{i}")) for i in range(2)}
    assert "0000:03:02.2" not in got
    with pytest.raises(DeviceUnavailable):
        agent.vfs.allocate(POOL, _holder("c7"))


def test_a_pf_without_link_takes_its_free_vfs_out_of_service(
    tree: SriovBed, agent: NodeAgent
) -> None:
    agent.audit_finished()
    held = agent.vfs.allocate(POOL, _holder("c1"))
    agent.vfs.attached(held, _holder("c1"))
    tree.set_pf_link(PF, False, announce=False)
    agent.refresh()
    views = {v.pci: v for v in agent.membership.pool_devices(POOL)}
    assert views.pop(held).healthy is True  # the pod keeps it: kubelet evicts nothing for it
    assert {(v.healthy, v.reason) for v in views.values()} == {
        (False, "PF ens1f0 has no link (operstate lowerlayerdown)")
    }
    with pytest.raises(DeviceUnavailable, match="no free VF"):
        agent.vfs.allocate(POOL, _holder("c2"))

    tree.set_pf_link(PF, True, announce=False)
    agent.refresh()
    assert all(v.healthy for v in agent.membership.pool_devices(POOL))
    assert agent.vfs.allocate(POOL, _holder("c2")) != held


_VF = Vf("0000:03:02.0", PF, 0, "8086", "154c", "iavf", 0, "ens1f0v0", "ether")


def _pf(operstate: str | None) -> Pf:
    return Pf(PF, "8086", "1572", "i40e", 0, "ens1f0", "ether", 8, 1, (_VF,), operstate)


@pytest.mark.parametrize(
    ("operstate", "link_up"),
    [("up", True), ("down", False), ("lowerlayerdown", False), ("notpresent", False),
     ("unknown", None), ("dormant", None), ("testing", None), (None, None)],
)  # fmt: skip
def test_health_follows_the_pf_link_only_when_the_operstate_says_so(
    operstate: str | None, link_up: bool | None
) -> None:
    pf = _pf(operstate)
    free, held = VfRecord(pci=_VF.pci), VfRecord(pci=_VF.pci, state=VfState.ATTACHED)

    assert pf.link_up is link_up
    healthy, reason = vf_health(_VF, pf, free, "netdevice", verified=True)
    assert (healthy, reason) == (
        (False, f"PF ens1f0 has no link (operstate {operstate})")
        if link_up is False
        else (True, "")
    )
    assert givable(_VF, pf, VfState.FREE, "netdevice", verified=True) is healthy
    assert vf_health(_VF, pf, held, "netdevice", verified=True) == (True, "")
    assert givable(_VF, pf, VfState.ATTACHED, "netdevice", verified=True) is True


def test_reload_applies_an_edited_file_and_keeps_the_old_one_when_broken(
    pools_file: Path, agent: NodeAgent
) -> None:
    agent.audit_finished()
    _pools(
        pools_file,
        f"""
        pools:
          - resourceName: {POOL}
            selectors: {{rootDevices: ["{PF}#0"]}}
          - resourceName: plexus.dev/other
            selectors: {{rootDevices: ["{PF}#1-3"]}}
        """,
    )
    wanted = {POOL: 1, "plexus.dev/other": 3}
    deadline = time.monotonic() + 5  # the watcher notices within about a second
    while {p["resourceName"]: p["total"] for p in agent.membership.pools_view()} != wanted:
        assert time.monotonic() < deadline, "the edited pools file was not picked up"
        time.sleep(0.05)

    pools_file.write_text("pools:\n  - resourceName: [broken\n")
    assert agent.reload() is False
    assert agent.membership.pools.pool("plexus.dev/other") is not None


def test_num_vfs_is_applied_but_never_under_vfs_in_use(
    tree: SriovBed, pools_file: Path, agent: NodeAgent
) -> None:
    agent.audit_finished()
    numvfs = tree.root / "bus/pci/devices" / PF / "sriov_numvfs"
    agent.vfs.claim("0000:03:02.0", _holder("c1"))
    _pools(
        pools_file,
        f"""
        pools:
          - resourceName: {POOL}
            numVfs: 2
            selectors: {{rootDevices: ["{PF}"]}}
        """,
    )
    assert agent.reload() is True
    assert numvfs.read_text().strip() == "4"  # a pod holds a VF of this PF: not now

    agent.vfs.release_begin("0000:03:02.0", _holder("c1"))
    agent.vfs.release_done("0000:03:02.0")
    deadline = time.monotonic() + 5  # the deferred change goes in once nothing holds a VF
    while numvfs.read_text().strip() != "2":
        assert time.monotonic() < deadline, "the deferred numVfs was never applied"
        time.sleep(0.05)


def test_the_audit_lease_keeps_del_and_heal_apart(
    agent: NodeAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent.audit_finished()
    vf, holder = "0000:03:02.0", _holder("c1")
    agent.vfs.claim(vf, holder)
    agent.vfs.attached(vf, holder)
    seen = agent.vfs.held_by("c1", "net1")
    assert seen is not None

    assert agent.vfs.lease(vf, seen)
    assert not agent.vfs.lease(vf, seen)  # one lease at a time
    # A DEL meanwhile waits for the audit to let go, then releases the VF itself (the audit
    # found it still attached and left it alone).
    got: list[VfRecord | None] = []
    deleter = threading.Thread(target=lambda: got.append(agent.vfs.release_begin(vf, holder)))
    deleter.start()
    time.sleep(0.2)
    assert deleter.is_alive() and got == []
    agent.vfs.unlease(vf)
    deleter.join(5)
    assert got and got[0] is not None and got[0].state == VfState.RELEASING
    agent.vfs.release_done(vf)

    # Under a lease that outlasts the wait, DEL says "try again" rather than "done".
    vf2 = agent.vfs.allocate(POOL, _holder("c2"))
    agent.vfs.attached(vf2, _holder("c2"))
    held = agent.vfs.held_by("c2", "net1")
    assert held is not None and agent.vfs.lease(vf2, held)
    monkeypatch.setattr(vfstate, "HEAL_WAIT", 0.1)
    with pytest.raises(TryAgainLater):
        agent.vfs.release_begin(vf2, _holder("c2"))
    healing = agent.vfs.release_begin(vf2, _holder("c2"), healing=True)
    assert healing is not None and healing.state == VfState.RELEASING
    agent.vfs.release_done(vf2)
    agent.vfs.unlease(vf2)

    stale = agent.vfs.held_by("c2", "net1")
    assert stale is None
    agent.vfs.claim(vf, _holder("c3"))  # the record moves on after the audit read it
    assert not agent.vfs.lease(vf, seen)


def test_mark_unhealthy_never_takes_a_vf_from_its_new_holder(agent: NodeAgent) -> None:
    agent.audit_finished()
    vf = agent.vfs.allocate(POOL, _holder("c1"))
    agent.vfs.attached(vf, _holder("c1"))
    agent.vfs.mark_unhealthy(vf, "a late heal of an older attachment")
    record = agent.vfs.held_by("c1", "net1")
    assert record is not None and record.state == VfState.ATTACHED


def test_lookup_reads_sysfs_again_when_a_netdev_seems_missing(
    tree: SriovBed, agent: NodeAgent
) -> None:
    # A VF's netdev hides from the node's sysfs while in a pod; right after DEL brings it back
    # the uevent saying so may still be on its way, and an ADD must not fail meanwhile.
    agent.audit_finished()
    vf = "0000:03:02.0"
    tree.set_vf_netdev(vf, None, announce=False)
    agent.refresh()
    assert agent.snapshot.vf(vf).netdev is None  # type: ignore[union-attr]
    tree.set_vf_netdev(vf, "ens1f0v0", announce=False)  # back; no uevent seen yet
    assert agent.vfs.lookup(vf).vf.netdev == "ens1f0v0"


def test_a_num_vfs_write_takes_the_pf_out_without_stalling_the_agent(
    pools_file: Path, agent: NodeAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Writing sriov_numvfs takes seconds on real NICs: meanwhile the PF's VFs are not given
    # out, and everything else (ListAndWatch, other pools) goes on.
    agent.audit_finished()
    writing, done = threading.Event(), threading.Event()
    real = agent.sysfs.set_num_vfs

    def slow(pf: str, count: int) -> None:
        writing.set()
        done.wait(5)
        real(pf, count)

    monkeypatch.setattr(agent.sysfs, "set_num_vfs", slow)
    _pools(pools_file, f"pools:\n  - resourceName: {POOL}\n    numVfs: 2\n"
           f"    selectors: {{rootDevices: ['{PF}']}}\n")  # fmt: skip
    reloader = threading.Thread(target=agent.reload)
    reloader.start()
    try:
        assert writing.wait(5)
        started = time.monotonic()
        agent.membership.pool_devices(POOL)
        assert time.monotonic() - started < 0.5  # not behind the write
        with pytest.raises(TryAgainLater, match="numVfs"):
            agent.vfs.claim("0000:03:02.1", _holder("c1"))
        with pytest.raises(DeviceUnavailable):
            agent.vfs.allocate(POOL, _holder("c2"))
    finally:
        done.set()
        reloader.join(10)
    assert agent.vfs.allocate(POOL, _holder("c3")) == "0000:03:02.0"


@pytest.mark.parametrize(
    ("granted", "written"),
    [
        (lambda: {"0000:03:02.1"}, False),  # a DPDK pod has a VF of the PF straight from kubelet
        (lambda: {"0000:99:02.0"}, True),  # kubelet granted only VFs of other PFs
        (None, True),  # local mode: no kubelet, the ledger knows every VF in use
    ],
)
def test_num_vfs_waits_for_vfs_kubelet_granted(
    tree: SriovBed, pools_file: Path, tmp_path: Path, granted: Any, written: bool
) -> None:
    _pools(pools_file, f"pools:\n  - resourceName: {POOL}\n    numVfs: 2\n"
           f"    selectors: {{rootDevices: ['{PF}']}}\n")  # fmt: skip
    with started(tree, pools_file, tmp_path / "state", granted=granted):
        numvfs = (tree.root / "bus/pci/devices" / PF / "sriov_numvfs").read_text().strip()
        assert numvfs == ("2" if written else "4")


def test_num_vfs_waits_when_kubelet_cannot_say(
    tree: SriovBed, pools_file: Path, tmp_path: Path
) -> None:
    def unreachable() -> set[str]:
        raise TryAgainLater("kubelet's PodResources socket does not exist")

    _pools(pools_file, f"pools:\n  - resourceName: {POOL}\n    numVfs: 2\n"
           f"    selectors: {{rootDevices: ['{PF}']}}\n")  # fmt: skip
    with started(tree, pools_file, tmp_path / "state", granted=unreachable):
        assert (tree.root / "bus/pci/devices" / PF / "sriov_numvfs").read_text().strip() == "4"
