"""sriov.sysfs on synthetic trees (testbed/sriov_bed.py without a namespace: files only),
the parsing of the kernel's uevent and rtnetlink link messages, and how the event sources are
put together."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from cnispec.errors import DeviceNotFound, DeviceSettingUnsupported, InvalidConfig
from kernel.linkwatch import parse_link_messages
from sriov.inventory import Inventory
from sriov.model import Snapshot
from sriov.sysfs import Sysfs
from sriov.uevents import (
    OVERFLOW,
    KernelSource,
    LinkSource,
    MergedSource,
    UdevSource,
    UEvent,
    open_source,
    parse_kernel_uevent,
)
from testbed.sriov_bed import SriovBed, vf_address

PF = "0000:03:00.0"


@pytest.fixture
def bed(tmp_path: Path) -> SriovBed:
    return SriovBed(tmp_path / "sys")


def dev(bed: SriovBed, pci: str) -> Path:
    return bed.root / "devices/pci0000:00" / pci


def test_scan_reads_pf_and_vfs_with_the_kernel_layout(bed: SriovBed) -> None:
    vfs = bed.add_pf(PF, ifname="ens1f0", num_vfs=3, total_vfs=8, numa_node=1)
    bed.add_pf("0000:03:00.1", ifname="ens1f1", num_vfs=0, total_vfs=4, link_type=32)

    snap = Sysfs(bed.root).scan()

    assert sorted(snap.pfs) == [PF, "0000:03:00.1"]
    pf = snap.pfs[PF]
    assert (pf.vendor, pf.device, pf.driver, pf.numa_node) == ("8086", "1572", "i40e", 1)
    assert (pf.netdev, pf.link_type, pf.total_vfs, pf.num_vfs) == ("ens1f0", "ether", 8, 3)
    assert [vf.pci for vf in pf.vfs] == vfs == ["0000:03:02.0", "0000:03:02.1", "0000:03:02.2"]
    vf = snap.vfs["0000:03:02.1"]
    assert (vf.pf_pci, vf.index, vf.vendor, vf.device) == (PF, 1, "8086", "154c")
    assert (vf.driver, vf.numa_node, vf.netdev, vf.link_type) == ("iavf", 1, "ens1f0v1", "ether")
    empty = snap.pfs["0000:03:00.1"]
    assert (empty.vfs, empty.num_vfs, empty.total_vfs, empty.link_type) == ((), 0, 4, "infiniband")


def test_pf_operstate_is_read_once_per_pf(bed: SriovBed) -> None:
    (vf,) = bed.add_pf(PF, ifname="ens1f0", num_vfs=1)
    sysfs = Sysfs(bed.root)
    assert (sysfs.scan().pfs[PF].operstate, sysfs.scan().pfs[PF].link_up) == ("up", True)
    assert (bed.root / "class/net/ens1f0v0/operstate").read_text() == "down\n"  # a fresh VF

    bed.set_pf_link(PF, False)  # no namespace: the tree only
    pf = sysfs.scan().pfs[PF]
    assert (pf.operstate, pf.link_up) == ("lowerlayerdown", False)
    (bed.root / "class/net/ens1f0/operstate").unlink()
    assert (sysfs.scan().pfs[PF].operstate, sysfs.scan().pfs[PF].link_up) == (None, None)
    with pytest.raises(ValueError, match="not a PF"):
        bed.set_pf_link(vf, False)


def test_vf_link_type_comes_from_its_pf_even_without_a_vf_netdev(bed: SriovBed) -> None:
    (vf,) = bed.add_pf(PF, ifname="ib0", num_vfs=1, link_type=32)
    bed.set_vf_netdev(vf, None)  # the VF's netdev is in a pod

    got = Sysfs(bed.root).scan().vfs[vf]

    assert (got.netdev, got.link_type) == (None, "infiniband")


def test_vf_addresses_follow_the_documented_rule() -> None:
    assert vf_address("0000:03:00.0", 0) == "0000:03:02.0"
    assert vf_address("0000:03:00.0", 9) == "0000:03:03.1"
    assert vf_address("0000:03:00.1", 0) == "0000:03:12.0"
    assert vf_address("0000:03:00.0", 255) == "0000:04:01.7"


def test_add_pf_refuses_colliding_addresses(bed: SriovBed) -> None:
    bed.add_pf(PF, ifname="a", num_vfs=129)  # VF 128 is where 0000:03:00.1's VF 0 goes
    with pytest.raises(ValueError, match="already in the synthetic tree"):
        bed.add_pf("0000:03:00.1", ifname="b", num_vfs=2)


def test_vfio_vf_has_no_netdev_and_unbound_vf_no_driver(bed: SriovBed) -> None:
    a, b, _ = bed.add_pf(PF, ifname="p", num_vfs=3)
    bed.bind(a, "vfio-pci")
    bed.bind(b, None)

    snap = Sysfs(bed.root).scan()

    assert (snap.vfs[a].driver, snap.vfs[a].netdev, snap.vfs[a].is_vfio) == ("vfio-pci", None, True)
    assert (snap.vfs[b].driver, snap.vfs[b].netdev) == (None, None)
    bed.bind(a, "iavf")
    assert Sysfs(bed.root).scan().vfs[a].netdev == "pv0"


def test_half_written_devices_give_defaults(bed: SriovBed) -> None:
    vfs = bed.add_pf(PF, ifname="p", num_vfs=4)
    (dev(bed, vfs[0]) / "numa_node").write_text("garbage\n")
    (dev(bed, vfs[1]) / "numa_node").unlink()
    (dev(bed, vfs[1]) / "driver").unlink()
    shutil.rmtree(dev(bed, vfs[2]) / "net")
    shutil.rmtree(dev(bed, vfs[3]))  # virtfn3 now dangles: a VF being removed
    (dev(bed, PF) / "sriov_vf_device").unlink()  # older kernels: read each VF's `device`
    (dev(bed, PF) / "sriov_totalvfs").write_text("")

    pf = Sysfs(bed.root).scan().pfs[PF]

    assert [vf.pci for vf in pf.vfs] == vfs[:3]
    assert pf.vfs[0].numa_node == -1
    assert (pf.vfs[1].numa_node, pf.vfs[1].driver) == (-1, None)
    assert pf.vfs[2].netdev is None
    assert pf.vfs[0].device == "154c"
    assert (pf.total_vfs, pf.num_vfs) == (0, 4)


def test_a_device_without_sriov_files_is_not_a_pf(bed: SriovBed) -> None:
    bed.add_pf(PF, ifname="p", num_vfs=1)
    assert set(Sysfs(bed.root).scan().pfs) == {PF}  # its VF is read as a VF, not as a PF


def test_symlinks_leading_out_of_the_root_are_not_followed(bed: SriovBed, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sriov_totalvfs").write_text("8\n")
    devices = bed.root / "bus/pci/devices"
    (devices / "0000:aa:00.0").symlink_to(outside)  # absolute
    (devices / "0000:bb:00.0").symlink_to("../../../../outside")  # relative, escaping
    (bed.root / "class/net/evil").symlink_to("../../../outside")

    sysfs = Sysfs(bed.root)

    assert sysfs.scan().pfs == {}


def numvfs(bed: SriovBed) -> Path:
    return dev(bed, PF) / "sriov_numvfs"


def test_set_num_vfs_writes_the_count(bed: SriovBed) -> None:
    bed.add_pf(PF, ifname="p", num_vfs=0, total_vfs=8)
    Sysfs(bed.root).set_num_vfs(PF, 6)
    assert numvfs(bed).read_text() == "6\n"


def test_set_num_vfs_goes_through_zero_between_nonzero_counts(bed: SriovBed) -> None:
    # The kernel answers EBUSY to nonzero -> other nonzero. A named pipe stands in for the
    # attribute: it holds the current count for the read, then collects every write in order.
    bed.add_pf(PF, ifname="p", num_vfs=4, total_vfs=8)
    numvfs(bed).unlink()
    os.mkfifo(numvfs(bed))
    fd = os.open(numvfs(bed), os.O_RDWR | os.O_NONBLOCK)  # both ends: no open ever blocks
    try:
        os.write(fd, b"4\n")
        Sysfs(bed.root).set_num_vfs(PF, 8)
        written = os.read(fd, 4096)
    finally:
        os.close(fd)
    assert written == b"0\n8\n"


@pytest.mark.parametrize(
    ("current", "wanted", "writes"), [(4, 4, ""), (4, 0, "0\n"), (0, 2, "2\n")]
)
def test_set_num_vfs_writes_only_what_is_needed(
    bed: SriovBed, current: int, wanted: int, writes: str
) -> None:
    bed.add_pf(PF, ifname="p", num_vfs=current, total_vfs=8)
    numvfs(bed).unlink()
    os.mkfifo(numvfs(bed))
    fd = os.open(numvfs(bed), os.O_RDWR | os.O_NONBLOCK)
    try:
        os.write(fd, f"{current}\n".encode())
        Sysfs(bed.root).set_num_vfs(PF, wanted)
        try:
            written = os.read(fd, 4096).decode()
        except BlockingIOError:
            written = ""
    finally:
        os.close(fd)
    assert written == writes


def test_the_bed_applies_a_num_vfs_write_like_the_kernel(bed: SriovBed) -> None:
    bed.add_pf(PF, ifname="p", num_vfs=2, total_vfs=8)
    sysfs = Sysfs(bed.root)

    sysfs.set_num_vfs(PF, 5)
    assert bed.apply_num_vfs(PF) == [vf_address(PF, i) for i in range(5)]
    pf = sysfs.scan().pfs[PF]
    assert (pf.num_vfs, [vf.netdev for vf in pf.vfs]) == (5, [f"pv{i}" for i in range(5)])

    sysfs.set_num_vfs(PF, 1)
    bed.apply_num_vfs(PF)
    assert [vf.pci for vf in sysfs.scan().pfs[PF].vfs] == [vf_address(PF, 0)]


def test_set_num_vfs_errors_tell_the_admin_what_to_do(bed: SriovBed) -> None:
    (vf,) = bed.add_pf(PF, ifname="p", num_vfs=1, total_vfs=8)
    sysfs = Sysfs(bed.root)
    with pytest.raises(DeviceNotFound, match="not an SR-IOV PF"):
        sysfs.set_num_vfs(vf, 2)
    with pytest.raises(InvalidConfig, match=r"0\.\.8 VFs, not 9"):
        sysfs.set_num_vfs(PF, 9)
    numvfs(bed).unlink()
    numvfs(bed).mkdir()  # the write fails (EISDIR): stands in for a driver refusing
    with pytest.raises(DeviceSettingUnsupported, match="sriov_numvfs failed") as err:
        sysfs.set_num_vfs(PF, 3)
    assert "dmesg" in err.value.msg


def test_scan_of_1024_vfs_is_fast(tmp_path: Path) -> None:
    bed = SriovBed(tmp_path / "sys")
    for i, bus in enumerate(["03", "05", "07", "09"]):
        bed.add_pf(f"0000:{bus}:00.0", ifname=f"ens{i}", num_vfs=256, total_vfs=256)
    sysfs = Sysfs(bed.root)
    took = []
    for _ in range(5):
        started = time.perf_counter()
        snap = sysfs.scan()
        took.append(time.perf_counter() - started)
    assert len(snap.vfs) == 1024
    # ~30 ms here, where one readlink costs 3-6 us; the bound leaves room for a busy CI box.
    assert min(took) < 0.2, took


# --- the kernel's uevent wire format --------------------------------------------------------


def test_parse_kernel_uevent() -> None:
    data = (
        b"add@/devices/pci0000:00/0000:03:02.0\0ACTION=add\0"
        b"DEVPATH=/devices/pci0000:00/0000:03:02.0\0SUBSYSTEM=pci\0"
        b"PCI_SLOT_NAME=0000:03:02.0\0SEQNUM=42\0"
    )
    event = parse_kernel_uevent(data)
    assert event is not None
    assert (event.action, event.subsystem) == ("add", "pci")
    assert event.devpath == "/devices/pci0000:00/0000:03:02.0"
    assert event.properties["SEQNUM"] == "42"
    assert event.properties["PCI_SLOT_NAME"] == "0000:03:02.0"


@pytest.mark.parametrize(
    "data",
    [
        b"libudev\0\xfe\xed\xca\xfe" + b"\0" * 32,  # udevd's own format, on group 2
        b"garbage",
        b"",
        b"add@/devices/x\0ACTION=add\0",  # no SUBSYSTEM
    ],
)
def test_parse_kernel_uevent_ignores_other_messages(data: bytes) -> None:
    assert parse_kernel_uevent(data) is None


def test_open_source_uses_udevd_only_for_the_real_sys_with_udevd_running(tmp_path: Path) -> None:
    control = tmp_path / "control"
    cases = [(Path("/sys"), False, KernelSource), (tmp_path, True, KernelSource)]
    cases.append((Path("/sys"), True, UdevSource))
    for root, udevd, kind in cases:
        if udevd:
            control.touch()
        source = open_source(root, udev_control=control)
        try:  # always merged with the link state changes (rtnetlink): they have no uevents
            assert isinstance(source, MergedSource)
            assert [type(s) for s in source.sources] == [kind, LinkSource]
            assert source.fileno() >= 0
        finally:
            source.close()


# --- rtnetlink link messages ----------------------------------------------------------------


def _link_message(kind: int, index: int, attrs: list[tuple[str, object]]) -> bytes:
    """An RTM_NEWLINK/RTM_DELLINK as pyroute2 encodes it (an encoder independent of ours)."""
    msg = ifinfmsg()
    msg["header"]["type"] = kind
    msg["index"] = index
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data)


def test_parse_link_messages_reads_name_and_operstate() -> None:
    data = (
        _link_message(16, 7, [("IFLA_IFNAME", "ens1f0"), ("IFLA_MTU", 9000),
                              ("IFLA_OPERSTATE", "LOWERLAYERDOWN")])
        + _link_message(16, 8, [("IFLA_IFNAME", "veth1"), ("IFLA_OPERSTATE", "UP")])
        + _link_message(17, 9, [("IFLA_IFNAME", "gone")])
        + _link_message(16, 10, [("IFLA_IFNAME", "quiet")])
    )  # fmt: skip
    got = [(m.deleted, m.ifindex, m.ifname, m.operstate) for m in parse_link_messages(data)]
    assert got == [
        (False, 7, "ens1f0", "lowerlayerdown"),
        (False, 8, "veth1", "up"),
        (True, 9, "gone", ""),
        (False, 10, "quiet", ""),
    ]


@pytest.mark.parametrize("cut", [0, 3, 16, 40, 50])
def test_parse_link_messages_stops_at_a_truncated_message(cut: int) -> None:
    whole = _link_message(16, 7, [("IFLA_IFNAME", "ens1f0"), ("IFLA_OPERSTATE", "UP")])
    assert parse_link_messages(whole[:cut]) == []
    assert len(parse_link_messages(whole + whole[:cut])) == 1


class _PipeSource:
    """A source whose fd is readable while `events` is not empty."""

    def __init__(self, *events: UEvent) -> None:
        self.events = list(events)
        self.read_end, self.write_end = os.pipe()
        os.write(self.write_end, b"x" * len(events))
        self.closed = False

    def fileno(self) -> int:
        return self.read_end

    def receive(self, timeout: float) -> UEvent | None:
        if not self.events:
            return None
        os.read(self.read_end, 1)
        return self.events.pop(0)

    def close(self) -> None:
        os.close(self.read_end)
        os.close(self.write_end)
        self.closed = True


def test_merged_source_hands_out_whichever_source_has_an_event() -> None:
    link = UEvent("operstate", "net", "/class/net/p", {"OPERSTATE": "down"})
    quiet, busy = _PipeSource(), _PipeSource(link, UEvent(OVERFLOW, "", ""))
    merged = MergedSource(quiet, busy)
    try:
        assert merged.receive(1.0) == link
        assert merged.receive(1.0) is not None
        started = time.monotonic()
        assert merged.receive(0.05) is None
        assert time.monotonic() - started >= 0.04
    finally:
        merged.close()
    assert quiet.closed and busy.closed


class _Counting(Sysfs):
    """Counts scans (our own adaptor; the tree under it is real)."""

    scans = 0

    def scan(self) -> Snapshot:
        self.scans += 1
        return super().scan()


class _Script:
    """A uevent source that plays a list of events, then stays quiet."""

    def __init__(self, events: list[UEvent]) -> None:
        self.events = events

    def fileno(self) -> int:
        return -1

    def receive(self, timeout: float) -> UEvent | None:
        if self.events:
            return self.events.pop(0)
        time.sleep(min(timeout, 0.02))
        return None

    def close(self) -> None:
        return None


def test_pod_link_churn_costs_no_rescan(bed: SriovBed) -> None:
    # A busy node's pod veths come and go all the time: only hardware events rescan.
    bed.add_pf("0000:03:00.0", ifname="ens1f0", num_vfs=2, announce=False)
    sysfs = _Counting(bed.root)
    churn = [
        UEvent("add", "net", "/devices/virtual/net/veth1a2b", {"INTERFACE": "veth1a2b"}),
        UEvent("operstate", "net", "/class/net/veth1a2b", {"INTERFACE": "veth1a2b"}),
        UEvent("remove", "net", "/devices/virtual/net/veth1a2b", {"INTERFACE": "veth1a2b"}),
    ]
    inventory = Inventory(sysfs=sysfs, source_factory=lambda: _Script(list(churn)))
    inventory.start()
    try:
        time.sleep(0.3)
        assert sysfs.scans == 1  # the start-up scan only
        pf_down = UEvent("operstate", "net", "/class/net/ens1f0", {"INTERFACE": "ens1f0"})
        assert inventory._matters(pf_down)
        assert inventory._matters(UEvent("add", "pci", bed.devpath("0000:03:02.0"), {}))
    finally:
        inventory.stop()
