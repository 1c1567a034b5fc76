"""The live VF inventory on the synthetic SR-IOV bed: sysfs tree + real links in a node namespace
+ synthetic uevents, received by a KernelSource opened in that namespace (as the daemon's is when
it runs under `ip netns exec`)."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kernel.linkwatch import LinkWatch
from kernel.netns import run_in_netns
from sriov.inventory import Inventory
from sriov.model import Snapshot
from sriov.sysfs import Sysfs
from sriov.uevents import OVERFLOW, KernelSource, UEvent
from testbed.netns import Netns
from testbed.sriov_bed import SriovBed, running_bed
from tests.support.require import required

PF = "0000:03:00.0"
SECOND = 1.0  # the bound: a removed VF turns unhealthy within a second


@pytest.fixture
def sriov(tmp_path: Path) -> Iterator[SriovBed]:
    with required(running_bed(tmp_path)) as bed:
        yield bed


def node_of(bed: SriovBed) -> Netns:
    assert bed.node is not None
    return bed.node


def without(vf: str) -> Callable[[Snapshot], bool]:
    return lambda s: vf not in s.vfs


class Watcher:
    """A subscriber that records each snapshot with the time it arrived."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.seen: list[tuple[float, Snapshot]] = []

    def __call__(self, snapshot: Snapshot) -> None:
        with self._cond:
            self.seen.append((time.monotonic(), snapshot))
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[Snapshot], bool], since: float, timeout: float) -> float:
        """Seconds from `since` to the first notification whose snapshot satisfies `pred`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for at, snap in self.seen:
                    if at >= since and pred(snap):
                        return at - since
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching snapshot within {timeout}s")
                self._cond.wait(left)


@contextmanager
def inventory(bed: SriovBed, rescan_interval: float = 30.0) -> Iterator[tuple[Inventory, Watcher]]:
    node = node_of(bed)
    inv = Inventory(
        sysfs=Sysfs(bed.root),
        source_factory=lambda: run_in_netns(node.path, KernelSource),
        rescan_interval=rescan_interval,
    )
    watcher = Watcher()
    inv.subscribe(watcher)
    inv.start()
    try:
        yield inv, watcher
    finally:
        inv.stop()


def test_a_new_pf_with_vfs_appears_through_uevents(sriov: SriovBed) -> None:
    with inventory(sriov) as (inv, watcher):
        assert inv.snapshot.pfs == {}
        since = time.monotonic()
        vfs = sriov.add_pf(PF, ifname="ens1f0", num_vfs=4)

        took = watcher.wait_for(lambda s: len(s.vfs) == 4, since, timeout=2 * SECOND)

    assert took < SECOND
    assert [vf.netdev for vf in inv.snapshot.pfs[PF].vfs] == [f"ens1f0v{i}" for i in range(4)]
    assert sorted(inv.snapshot.vfs) == vfs
    # the netdevs are real: veths in the node, their far ends up in the wire namespace
    wire = sriov.wire()
    assert wire is not None
    node_links, wire_links = sriov.node.links(), wire.links()  # type: ignore[union-attr]
    for name in ["ens1f0", *(f"ens1f0v{i}" for i in range(4))]:
        assert node_links[name]["linkinfo"]["info_kind"] == "veth"
        assert "UP" in wire_links[name]["flags"]
    assert "UP" in node_links["ens1f0"]["flags"]
    assert "UP" not in node_links["ens1f0v0"]["flags"]


def test_uevent_to_subscriber_latency(sriov: SriovBed) -> None:
    with inventory(sriov) as (inv, watcher):
        sriov.add_pf(PF, ifname="p", num_vfs=2, make_links=False, announce=False)
        time.sleep(0.2)
        assert inv.snapshot.pfs == {}  # the tree alone is not noticed before the next rescan
        latencies = []
        since = time.monotonic()
        sriov.uevent("add", "pci", sriov.devpath(PF))
        latencies.append(watcher.wait_for(lambda s: PF in s.pfs, since, SECOND))
        for vf in list(inv.snapshot.vfs):
            since = time.monotonic()
            sriov.remove_vf(vf)
            latencies.append(watcher.wait_for(without(vf), since, SECOND))
    print(f"uevent -> subscriber: {[round(x * 1000, 1) for x in latencies]} ms")
    assert max(latencies) < 0.25, latencies  # ~10 ms coalescing + one scan


def test_a_removed_vf_is_gone_within_a_second(sriov: SriovBed) -> None:
    vfs = sriov.add_pf(PF, ifname="ens1f0", num_vfs=3)
    with inventory(sriov) as (inv, watcher):
        assert len(inv.snapshot.vfs) == 3
        since = time.monotonic()
        sriov.remove_vf(vfs[1])

        took = watcher.wait_for(lambda s: vfs[1] not in s.vfs, since, timeout=2 * SECOND)

    assert took < SECOND
    assert sorted(inv.snapshot.vfs) == [vfs[0], vfs[2]]
    assert "ens1f0v1" not in node_of(sriov).links()


def test_binding_to_vfio_changes_driver_and_takes_the_netdev(sriov: SriovBed) -> None:
    vfs = sriov.add_pf(PF, ifname="ens1f0", num_vfs=2)
    with inventory(sriov) as (inv, watcher):
        since = time.monotonic()
        sriov.bind(vfs[0], "vfio-pci")

        took = watcher.wait_for(lambda s: s.vfs[vfs[0]].is_vfio, since, timeout=2 * SECOND)
        vf = inv.snapshot.vfs[vfs[0]]
        assert took < SECOND
        assert (vf.driver, vf.netdev) == ("vfio-pci", None)
        assert "ens1f0v0" not in node_of(sriov).links()

        since = time.monotonic()
        sriov.bind(vfs[0], "iavf")
        watcher.wait_for(lambda s: s.vfs[vfs[0]].netdev == "ens1f0v0", since, 2 * SECOND)
        assert inv.snapshot.vfs[vfs[0]].driver == "iavf"
        assert "ens1f0v0" in node_of(sriov).links()


def test_a_vf_netdev_moved_away_is_hidden_when_the_bed_is_told(sriov: SriovBed) -> None:
    node = node_of(sriov)
    (vf,) = sriov.add_pf(PF, ifname="ens1f0", num_vfs=1)
    with inventory(sriov) as (inv, watcher):
        pod = Netns("sriov-pod")
        try:
            node.run("ip", "link", "set", "ens1f0v0", "netns", pod.name)
            assert sriov.vf_netdev(vf) == "ens1f0v0"  # the tree says what the bed wrote
            since = time.monotonic()
            sriov.set_vf_netdev(vf, None)
            watcher.wait_for(lambda s: s.vfs[vf].netdev is None, since, 2 * SECOND)
            since = time.monotonic()
            sriov.set_vf_netdev(vf, "net1")  # found back in the node under the pod's name
            watcher.wait_for(lambda s: s.vfs[vf].netdev == "net1", since, 2 * SECOND)
        finally:
            pod.delete()
        assert inv.snapshot.vfs[vf].link_type == "ether"


def test_vfs_made_through_sriov_numvfs_appear(sriov: SriovBed) -> None:
    sriov.add_pf(PF, ifname="ens1f0", num_vfs=0, total_vfs=8)
    with inventory(sriov) as (inv, watcher):
        since = time.monotonic()
        inv_sysfs = Sysfs(sriov.root)
        inv_sysfs.set_num_vfs(PF, 3)
        sriov.apply_num_vfs(PF)  # the kernel's part
        watcher.wait_for(lambda s: len(s.vfs) == 3, since, 2 * SECOND)
        assert inv.snapshot.pfs[PF].num_vfs == 3
    assert {"ens1f0v0", "ens1f0v1", "ens1f0v2"} <= set(node_of(sriov).links())


def test_the_periodic_rescan_catches_a_lost_uevent(sriov: SriovBed) -> None:
    with inventory(sriov, rescan_interval=0.3) as (_inv, watcher):
        since = time.monotonic()
        sriov.add_pf(PF, ifname="p", num_vfs=2, make_links=False, announce=False)
        took = watcher.wait_for(lambda s: len(s.vfs) == 2, since, timeout=2 * SECOND)
    assert took < 0.3 + 0.25


def test_remove_pf_removes_everything(sriov: SriovBed) -> None:
    sriov.add_pf(PF, ifname="ens1f0", num_vfs=2)
    sriov.add_pf("0000:05:00.0", ifname="ens2f0", num_vfs=1)
    with inventory(sriov) as (inv, watcher):
        since = time.monotonic()
        sriov.remove_pf(PF)
        watcher.wait_for(lambda s: PF not in s.pfs, since, 2 * SECOND)
        assert sorted(inv.snapshot.pfs) == ["0000:05:00.0"]
    links = node_of(sriov).links()
    assert not any(name.startswith("ens1f0") for name in links)
    assert "ens2f0v0" in links
    assert sorted(p.name for p in (sriov.root / "bus/pci/devices").iterdir()) == [
        "0000:05:00.0",
        "0000:05:02.0",
    ]


def test_cleanup_removes_every_link(sriov: SriovBed) -> None:
    sriov.add_pf(PF, ifname="ens1f0", num_vfs=2)
    wire = sriov.wire()
    assert wire is not None
    sriov.cleanup()
    assert not wire.exists()
    assert set(sriov.node.links()) == {"lo"}  # type: ignore[union-attr]
    sriov.cleanup()  # idempotent


# --- KernelSource -----------------------------------------------------------------------------


def test_kernel_source_sees_the_beds_uevents_and_keeps_pci_and_net(sriov: SriovBed) -> None:
    node = node_of(sriov)
    source = run_in_netns(node.path, KernelSource)
    try:
        sriov.uevent("add", "block", "/devices/virtual/block/loop9")
        sriov.uevent("bind", "pci", "/devices/pci0000:00/0000:03:02.0", DRIVER="vfio-pci")
        sriov.uevent("move", "net", "/devices/pci0000:00/0000:03:02.0/net/net1")
        first, second = source.receive(SECOND), source.receive(SECOND)
        nothing = source.receive(0.05)
    finally:
        source.close()
    assert first is not None and second is not None
    assert (first.action, first.subsystem, first.properties["DRIVER"]) == (
        "bind",
        "pci",
        "vfio-pci",
    )
    assert (second.action, second.devpath) == ("move", "/devices/pci0000:00/0000:03:02.0/net/net1")
    assert nothing is None


def test_kernel_source_reports_an_overflow(sriov: SriovBed) -> None:
    node = node_of(sriov)
    source = run_in_netns(node.path, lambda: KernelSource(rcvbuf=4096))
    try:
        for i in range(500):
            sriov.uevent("add", "pci", f"/devices/pci0000:00/0000:03:{i // 8 % 32:02x}.{i % 8}")
        got = []
        while (event := source.receive(0.1)) is not None:
            got.append(event.action)
    finally:
        source.close()
    assert OVERFLOW in got, got
    assert len(got) < 500  # some were lost, and the reader was told


# --- LinkWatch --------------------------------------------------------------------------------


def test_link_watch_reports_operstate_changes_only(sriov: SriovBed) -> None:
    node = node_of(sriov)
    node.run("ip", "link", "add", "pxa", "type", "veth", "peer", "name", "pxb")
    watch = run_in_netns(node.path, LinkWatch)
    try:
        node.run("ip", "link", "set", "pxa", "mtu", "1400")  # first sight of pxa: a change
        assert watch.receive(SECOND) == ("pxa", "down")
        node.run("ip", "link", "set", "pxa", "mtu", "1300")  # RTM_NEWLINK, same operstate
        node.run("ip", "link", "set", "pxa", "alias", "pod veth churn")
        assert watch.receive(0.1) is None
        node.run("ip", "link", "set", "pxb", "up")
        node.run("ip", "link", "set", "pxa", "up")
        got: dict[str, list[str]] = {}
        while (change := watch.receive(0.2)) is not None:
            got.setdefault(change.ifname, []).append(change.operstate)
        # Each report is a change (the steps on the way, e.g. lowerlayerdown, vary by kernel).
        assert {name: states[-1] for name, states in got.items()} == {"pxa": "up", "pxb": "up"}
        assert all(a != b for states in got.values() for a, b in itertools.pairwise(states)), got
    finally:
        watch.close()


# --- Inventory mechanics, with a scripted source ----------------------------------------------


class ScriptedSource:
    """A UeventSource fed by the test; receive() waits on a queue."""

    def __init__(self) -> None:
        self.events: queue.Queue[UEvent] = queue.Queue()
        self.closed = False

    def fileno(self) -> int:
        return -1

    def receive(self, timeout: float) -> UEvent | None:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.closed = True


def test_subscribers_hear_only_of_changes(sriov: SriovBed) -> None:
    source = ScriptedSource()
    inv = Inventory(sysfs=Sysfs(sriov.root), source_factory=lambda: source)
    calls: list[Snapshot] = []

    def broken(_snapshot: Snapshot) -> None:
        raise RuntimeError("a broken subscriber does not starve the others")

    inv.subscribe(broken)
    inv.subscribe(calls.append)
    inv.start()
    try:
        assert calls == []  # an empty tree at start is no change
        sriov.add_pf(PF, ifname="p", num_vfs=1, make_links=False, announce=False)
        first = inv.refresh()
        inv.refresh()
        assert calls == [first]
        source.events.put(UEvent("change", "block", "/devices/virtual/block/loop0"))
        source.events.put(UEvent(OVERFLOW, "", ""))
        sriov.bind("0000:03:02.0", None, announce=False)
        deadline = time.monotonic() + SECOND
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) == 2
        assert calls[1].vfs["0000:03:02.0"].driver is None
    finally:
        inv.stop()
        inv.stop()
    assert source.closed


@pytest.mark.parametrize("events", [1, 300])
def test_a_burst_of_uevents_is_one_rescan(sriov: SriovBed, events: int) -> None:
    source = ScriptedSource()
    sysfs = Sysfs(sriov.root)
    scans = []

    class CountingSysfs(Sysfs):
        def scan(self) -> Snapshot:
            scans.append(time.monotonic())
            return sysfs.scan()

    inv = Inventory(sysfs=CountingSysfs(sriov.root), source_factory=lambda: source)
    inv.start()
    try:
        sriov.add_pf(PF, ifname="p", num_vfs=4, make_links=False, announce=False)
        for _ in range(events):
            source.events.put(UEvent("add", "pci", sriov.devpath(PF)))
        deadline = time.monotonic() + SECOND
        while len(inv.snapshot.vfs) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
    finally:
        inv.stop()
    assert len(inv.snapshot.vfs) == 4
    assert len(scans) == 2  # the first scan at start, then one for the whole burst
