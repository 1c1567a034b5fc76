"""sriov.sysfs on synthetic trees (tests/support/sriov_bed.py without a namespace: files only),
and the parsing of the kernel's uevent wire format."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from metaplugin.errors import DeviceNotFound, DeviceSettingUnsupported, InvalidConfig
from sriov.sysfs import Sysfs
from sriov.uevents import KernelSource, UdevSource, open_source, parse_kernel_uevent
from tests.support.sriov_bed import SriovBed, vf_address

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
    (vf,) = bed.add_pf(PF, ifname="p", num_vfs=1)
    sysfs = Sysfs(bed.root)
    assert sysfs.read_pf(vf) is None
    assert sysfs.read_pf("0000:99:00.0") is None
    assert sysfs.read_pf("../../etc") is None
    assert sysfs.read_pf(PF) == sysfs.scan().pfs[PF]


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
    assert sysfs.read_pf("0000:aa:00.0") is None
    assert sysfs.read_pf("0000:bb:00.0") is None
    assert sysfs.pci_of_netdev("evil") is None


def test_pci_of_netdev(bed: SriovBed) -> None:
    bed.add_pf(PF, ifname="ens1f0", num_vfs=2)
    virtual = bed.root / "devices/virtual/net/veth0"
    virtual.mkdir(parents=True)
    (bed.root / "class/net/veth0").symlink_to("../../devices/virtual/net/veth0")
    sysfs = Sysfs(bed.root)

    assert sysfs.pci_of_netdev("ens1f0") == PF
    assert sysfs.pci_of_netdev("ens1f0v1") == "0000:03:02.1"
    assert sysfs.pci_of_netdev("veth0") is None
    assert sysfs.pci_of_netdev("nosuch") is None
    assert sysfs.pci_of_netdev("../..") is None


@pytest.mark.parametrize(
    ("devpath", "pci"),
    [
        ("/devices/pci0000:00/0000:00:02.0/0000:03:02.3", "0000:03:02.3"),
        ("/devices/pci0000:00/0000:00:02.0/0000:03:02.3/net/eth5", "0000:03:02.3"),
        ("/devices/pci0000:00/0000:03:00.0", "0000:03:00.0"),
        ("/devices/pci0000:00", None),
        ("/devices/virtual/net/veth0", None),
        ("", None),
    ],
)
def test_pci_from_devpath(devpath: str, pci: str | None) -> None:
    assert Sysfs.pci_from_devpath(devpath) == pci


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
    pf = sysfs.read_pf(PF)
    assert pf is not None
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
        try:
            assert isinstance(source, kind)
            assert source.fileno() >= 0
        finally:
            source.close()
