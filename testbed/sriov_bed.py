"""SR-IOV without SR-IOV hardware (the issue's test bed 1): a synthetic sysfs tree with the
kernel's layout, whose "netdevs" are real links in the test's node namespace, announced by
synthetic uevents in the kernel's wire format.

The tree under `root` (relative symlinks, like the kernel's):

    devices/pci0000:00/<addr>/{vendor,device,numa_node,driver->,net/<ifname>/{type,operstate,device->}}
    devices/pci0000:00/<pf>/{sriov_totalvfs,sriov_numvfs,sriov_vf_device,virtfnN -> ../<vf>}
    devices/pci0000:00/<vf>/physfn -> ../<pf>
    bus/pci/devices/<addr> -> ../../../devices/pci0000:00/<addr>
    bus/pci/drivers/<driver>/<addr> -> ../../../../devices/pci0000:00/<addr>
    class/net/<ifname> -> ../../devices/pci0000:00/<addr>/net/<ifname>

VF addresses: VF i of the PF at `D:B:S.F` has the PCI routing id `(B<<8 | S<<3) + 16 + 128*F + i`,
so PF 0000:03:00.0 has VFs 0000:03:02.0, 03:02.1, ... and PF 0000:03:00.1 has 0000:03:12.0, ...
Up to 128 VFs per function fit on one bus without colliding; `add_pf` refuses an address that is
already in the tree, so put big PFs on separate buses (0000:03:00.0, 0000:05:00.0, ...).

Real links (when the bed has a node namespace and `make_links`): every netdev, PF or VF, is one
end of a veth pair in the node namespace, named as the tree names it; the other end, with the
same name, is in the bed's "wire" namespace and up, so packets a pod sends on its VF can be
captured there. Deleting the wire end deletes the pair wherever code under test moved the VF.

Link state: `net/<ifname>/operstate` says "up" for a PF (its link is up, and so is the wire end)
and "down" for a VF (fresh VFs are down; the bed does not follow what code under test does to
them). `set_pf_link(pf, False)` pulls a PF's cable: the tree says "lowerlayerdown" (what the
kernel says of a veth whose peer is down), then the wire end goes down, so the kernel really
changes the node end's operstate and sends RTM_NEWLINK in the node namespace (no uevent: the
kernel sends none for carrier changes).

Moving a VF netdev away: when code under test moves a VF's link into a pod, the tree still
says `net/<ifname>` as the bed wrote it (the real kernel would hide it from the node's sysfs).
Call `set_vf_netdev(vf, None)` to hide it, or `set_vf_netdev(vf, "net1")` for a VF found back
in the node under another name; each announces the net uevent the kernel would send.

Writes to `sriov_numvfs` (by `Sysfs.set_num_vfs` in code under test) only change the file; call
`apply_num_vfs(pf)` to have the bed do the kernel's part (VFs added or removed, with uevents).

Uevents go out on a NETLINK_KOBJECT_UEVENT socket made in the node namespace, kernel group 1:
they stay in that namespace, so only listeners there (a `KernelSource`, a daemon run under
`ip netns exec`) see them. A bed without a node namespace writes the tree only.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kernel.netns import run_in_netns
from sriov.model import USERSPACE_DRIVERS
from sriov.uevents import UEvent
from testbed import BedUnavailable
from testbed.netns import Netns, is_root

_PCI_ROOT = "devices/pci0000:00"
_NETLINK_KOBJECT_UEVENT = 15
# NOTE: each netns numbers its links from 1, so a PF's veth ends (the first link of the node and
# of the wire namespace) would share an ifindex. The kernel tells a device with a lower one by
# `iflink != ifindex`, and a veth's iflink is its peer's ifindex: with equal ones it reports
# carrier loss as "down", not "lowerlayerdown", and only through linkwatch's non-urgent path, up
# to a second late (net/core/link_watch.c: default_operstate, linkwatch_urgent_event). So PF
# node ends get ifindexes from here on.
_PF_IFINDEX_BASE = 1 << 16


def vf_address(pf_pci: str, index: int) -> str:
    """The bed's address of VF `index` of the PF at `pf_pci` (see the module docstring)."""
    domain, bus, slot_fn = pf_pci.split(":")
    slot, fn = slot_fn.split(".")
    rid = (int(bus, 16) << 8 | int(slot, 16) << 3) + 16 + 128 * int(fn) + index
    if rid > 0xFFFF:
        raise ValueError(f"VF {index} of {pf_pci} would fall off the last PCI bus")
    return f"{domain}:{rid >> 8:02x}:{(rid >> 3) & 0x1F:02x}.{rid & 7}"


class QuietSource:
    """A uevent source that reports nothing, for tests whose tree is complete before the agent
    starts (or that call `refresh()` themselves): they are about something other than discovery.
    """

    def fileno(self) -> int:
        return -1

    def receive(self, timeout: float) -> UEvent | None:
        time.sleep(min(timeout, 0.05))
        return None

    def close(self) -> None:
        return None


@dataclass
class _Device:
    pci: str
    ifname: str | None  # the netdev's name whenever the device is bound to a netdev driver
    link_type: int
    real: bool  # its netdev is made a real veth in the node namespace
    pf: str | None = None  # for a VF
    index: int = -1  # for a VF: the N of the PF's virtfnN
    linked: bool = False  # its veth pair exists right now
    borrowed: bool = False  # a PF whose netdev the node already had (pf_netdev_exists)


@dataclass(frozen=True)
class _VfFamily:
    """What a PF's VFs are made with (by add_pf, and again by apply_num_vfs)."""

    vendor: str
    device: str
    driver: str | None
    numa: int


class SriovBed:
    def __init__(self, root: Path, node: Netns | None = None) -> None:
        self.root = root
        self.node = node
        root.mkdir(parents=True, exist_ok=True)
        for sub in (_PCI_ROOT, "bus/pci/devices", "bus/pci/drivers", "class/net"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self._devices: dict[str, _Device] = {}
        self._vfs_real: dict[str, bool] = {}  # PF -> whether its VFs get real links
        self._families: dict[str, _VfFamily] = {}
        self._seqnum = itertools.count(1)
        self._groups = itertools.count(10)
        self._pf_ifindexes = itertools.count(_PF_IFINDEX_BASE)
        self._wire: Netns | None = None
        self._sock: socket.socket | None = None
        if node is not None:
            self._wire = Netns(f"sriov-wire-{secrets.token_hex(2)}")
            self._sock = run_in_netns(node.path, _uevent_socket)

    # --- PFs and VFs ----------------------------------------------------------------------

    def add_pf(
        self,
        pci: str,
        *,
        ifname: str,
        num_vfs: int = 4,
        total_vfs: int = 8,
        vendor: str = "8086",
        device: str = "1572",
        vf_device: str = "154c",
        driver: str = "i40e",
        vf_driver: str = "iavf",
        numa_node: int = 0,
        link_type: int = 1,
        make_links: bool = True,
        announce: bool = True,
        pf_netdev_exists: bool = False,
    ) -> list[str]:
        """Write a PF with `num_vfs` VFs (netdevs `{ifname}v{i}`); returns the VF addresses.
        `pf_netdev_exists`: the node already has a netdev `ifname` to stand for the PF (a
        netdevsim port in the VM tier, whose driver really takes PF-side VF settings), so only
        the VFs get veths."""
        for addr in [pci, *(vf_address(pci, i) for i in range(num_vfs))]:
            if addr in self._devices or (self.root / "bus/pci/devices" / addr).is_symlink():
                raise ValueError(f"{addr} is already in the synthetic tree")
        real = make_links and self.node is not None
        self._devices[pci] = _Device(
            pci, ifname, link_type, real and not pf_netdev_exists, borrowed=pf_netdev_exists
        )
        self._vfs_real[pci] = real
        self._families[pci] = _VfFamily(vendor, vf_device, vf_driver, numa_node)
        self._write_device(pci, vendor, device, driver, numa_node)
        pf_dir = self._dir(pci)
        _put(pf_dir / "sriov_totalvfs", str(total_vfs))
        _put(pf_dir / "sriov_numvfs", str(num_vfs))
        _put(pf_dir / "sriov_vf_device", vf_device)
        vfs = self._write_vfs(pci, range(num_vfs))
        # Links and uevents only once the whole tree is written: making a veth sends the kernel's
        # own uevents, and a scan they trigger must not see a half-made PF.
        self._link_and_announce([pci, *vfs], announce=announce)
        return vfs

    def apply_num_vfs(self, pf_pci: str, announce: bool = True) -> list[str]:
        """Do what the kernel does after a write to the PF's `sriov_numvfs` (by code under
        test, e.g. `Sysfs.set_num_vfs`): remove or add VFs until there are that many, with
        uevents. Returns the PF's VF addresses."""
        want = int((self._dir(pf_pci) / "sriov_numvfs").read_text())
        have = sorted((d.index, d.pci) for d in self._devices.values() if d.pf == pf_pci)
        for index, vf in have:
            if index >= want:
                self.remove_vf(vf, announce=announce)
        present = {index for index, _ in have}
        added = self._write_vfs(pf_pci, [i for i in range(want) if i not in present])
        self._link_and_announce(added, announce=announce)
        return [vf_address(pf_pci, i) for i in range(want)]

    def _write_vfs(self, pf: str, indices: Iterable[int]) -> list[str]:
        parent, family = self._devices[pf], self._families[pf]
        vfs = []
        for i in indices:
            vf = vf_address(pf, i)
            ifname = f"{parent.ifname}v{i}"
            real = self._vfs_real.get(pf, parent.real)
            self._devices[vf] = _Device(vf, ifname, parent.link_type, real, pf, i)
            self._write_device(vf, family.vendor, family.device, family.driver, family.numa)
            (self._dir(vf) / "physfn").symlink_to(f"../{pf}")
            (self._dir(pf) / f"virtfn{i}").symlink_to(f"../{vf}")
            vfs.append(vf)
        return vfs

    def _link_and_announce(self, pcis: list[str], *, announce: bool) -> None:
        """Give the freshly written devices their netdevs (tree, then real links: PFs up, VFs
        down like fresh VFs), then send their `add` uevents, pci before net."""
        with_netdev = [p for p in pcis if self._has_netdev_driver(p)]
        for p in with_netdev:
            self._write_netdev(p)
        real = [p for p in with_netdev if self._devices[p].real]
        self._make_links([p for p in real if self._devices[p].pf is None], up=True)
        self._make_links([p for p in real if self._devices[p].pf is not None], up=False)
        if announce:
            for p in pcis:
                self._announce_pci("add", p)
            for p in with_netdev:
                self._announce_net("add", p, self._devices[p].ifname or "")

    def remove_vf(self, vf_pci: str, announce: bool = True) -> None:
        """The VF disappears (as after `echo 1 > .../remove`): its tree, its PF's virtfn link
        and its real link go; the PF's `sriov_numvfs` is left as it was, like the kernel does."""
        dev = self._devices[vf_pci]
        netdev = self.vf_netdev(vf_pci)
        self._drop_netdev(vf_pci)
        self._drop_link(vf_pci)
        del self._devices[vf_pci]
        if dev.pf is not None:
            (self._dir(dev.pf) / f"virtfn{dev.index}").unlink(missing_ok=True)
        self._drop_device(vf_pci)
        if announce:
            if netdev is not None:
                self._announce_net("remove", vf_pci, netdev)
            self._announce_pci("remove", vf_pci)

    def remove_pf(self, pf_pci: str, announce: bool = True) -> None:
        for vf in [d.pci for d in self._devices.values() if d.pf == pf_pci]:
            self.remove_vf(vf, announce=announce)
        netdev = self.vf_netdev(pf_pci)
        self._drop_netdev(pf_pci)
        self._drop_link(pf_pci)
        del self._devices[pf_pci]
        del self._families[pf_pci]
        self._drop_device(pf_pci)
        if announce:
            if netdev is not None:
                self._announce_net("remove", pf_pci, netdev)
            self._announce_pci("remove", pf_pci)

    def bind(self, pci: str, driver: str | None, announce: bool = True) -> None:
        """Rebind `pci` to `driver` (None: unbind). A netdev driver gives the device its netdev
        back (a new real link); vfio-pci and other userspace drivers take it away."""
        link = self._dir(pci) / "driver"
        old = os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None
        if old is not None:
            netdev = self.vf_netdev(pci)
            self._drop_netdev(pci)
            self._drop_link(pci)
            link.unlink()
            (self.root / "bus/pci/drivers" / old / pci).unlink(missing_ok=True)
            if announce and netdev is not None:
                self._announce_net("remove", pci, netdev)
            if announce:
                self._announce_pci("unbind", pci, DRIVER=old)
        if driver is None:
            return
        self._link_driver(pci, driver)
        if announce:
            self._announce_pci("bind", pci, DRIVER=driver)
        dev = self._devices[pci]
        if self._has_netdev_driver(pci) and dev.ifname:
            self._write_netdev(pci)
            if dev.real:
                self._make_links([pci], up=dev.pf is None)
            if announce:
                self._announce_net("add", pci, dev.ifname)

    def vf_netdev(self, vf_pci: str) -> str | None:
        """The netdev the tree shows for `vf_pci` (works for a PF too)."""
        net = self._dir(vf_pci) / "net"
        names = sorted(os.listdir(net)) if net.is_dir() else []
        return names[0] if names else None

    def set_vf_netdev(self, vf_pci: str, name: str | None, announce: bool = True) -> None:
        """Rewrite the VF's `net/<ifname>` entry without touching real links: None hides it
        (its netdev went into a pod), a name shows it under that name (renamed in the node)."""
        old = self.vf_netdev(vf_pci)
        self._drop_netdev(vf_pci)
        if name is not None:
            self._write_netdev(vf_pci, name)
        if not announce:
            return
        if old is not None and name is not None and old != name:
            devpath = f"/{_PCI_ROOT}/{vf_pci}/net/{old}"
            self._announce_net("move", vf_pci, name, DEVPATH_OLD=devpath)
        elif old is not None and name is None:
            self._announce_net("remove", vf_pci, old)
        elif old is None and name is not None:
            self._announce_net("add", vf_pci, name)

    def set_pf_link(self, pf_pci: str, up: bool, announce: bool = True) -> None:
        """Pull the PF's cable (`up=False`) or plug it back: the tree's `operstate` first, then
        the wire end of its link down or up, so a rescan that the kernel's RTM_NEWLINK triggers
        reads the new state. `announce=False`, or a PF netdev the bed did not make
        (`pf_netdev_exists`), changes the tree only."""
        dev = self._devices[pf_pci]
        netdev = self.vf_netdev(pf_pci)
        if dev.pf is not None or netdev is None:
            raise ValueError(f"{pf_pci} is not a PF with a netdev in the tree")
        _put(self._dir(pf_pci) / "net" / netdev / "operstate", "up" if up else "lowerlayerdown")
        if announce and dev.linked and self._wire is not None and dev.ifname:
            self._wire.run("ip", "link", "set", dev.ifname, "up" if up else "down")

    def wire(self) -> Netns | None:
        return self._wire

    def devpath(self, pci: str) -> str:
        """A device's DEVPATH as its uevents carry it."""
        return f"/{_PCI_ROOT}/{pci}"

    # --- uevents ----------------------------------------------------------------------------

    def uevent(self, action: str, subsystem: str, devpath: str, **props: str) -> None:
        """Send one uevent in the kernel's wire format to the node namespace's listeners."""
        if self._sock is None:
            return
        fields = {
            "ACTION": action,
            "DEVPATH": devpath,
            "SUBSYSTEM": subsystem,
            **props,
            "SEQNUM": str(next(self._seqnum)),
        }
        body = "".join(f"{k}={v}\0" for k, v in fields.items())
        self._sock.sendto(f"{action}@{devpath}\0{body}".encode(), (0, 1))

    def cleanup(self) -> None:
        """Remove every real link (deleting the wire namespace deletes the veth pairs, wherever
        their node ends went) and close the uevent socket. Idempotent."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._wire is not None:
            # Deleting the links first makes their removal synchronous: a namespace's own
            # teardown runs later, in a kernel work queue.
            linked = [d for d in self._devices.values() if d.linked and d.ifname]
            for dev in linked:
                dev.linked = False
            _ip_batch(self._wire.name, [f"link del {d.ifname}" for d in linked], check=False)
            self._wire.delete()
            self._wire = None

    # --- tree writing -----------------------------------------------------------------------

    def _dir(self, pci: str) -> Path:
        return self.root / _PCI_ROOT / pci

    def _has_netdev_driver(self, pci: str) -> bool:
        link = self._dir(pci) / "driver"
        return link.is_symlink() and os.readlink(link).rsplit("/", 1)[-1] not in USERSPACE_DRIVERS

    def _write_device(
        self, pci: str, vendor: str, device: str, driver: str | None, numa: int
    ) -> None:
        d = self._dir(pci)
        d.mkdir()
        _put(d / "vendor", f"0x{vendor}")
        _put(d / "device", f"0x{device}")
        _put(d / "numa_node", str(numa))
        (self.root / "bus/pci/devices" / pci).symlink_to(f"../../../{_PCI_ROOT}/{pci}")
        # Every device in its own IOMMU group, as on a platform with ACS: the group number is
        # what vfio-pci users open as /dev/vfio/<group>.
        group = self.root / "kernel/iommu_groups" / str(next(self._groups))
        group.mkdir(parents=True)
        (d / "iommu_group").symlink_to(f"../../../kernel/iommu_groups/{group.name}")
        if driver is not None:
            self._link_driver(pci, driver)

    def _link_driver(self, pci: str, driver: str) -> None:
        drv = self.root / "bus/pci/drivers" / driver
        drv.mkdir(exist_ok=True)
        (self._dir(pci) / "driver").symlink_to(f"../../../bus/pci/drivers/{driver}")
        (drv / pci).symlink_to(f"../../../../{_PCI_ROOT}/{pci}")

    def _drop_device(self, pci: str) -> None:
        link = self._dir(pci) / "driver"
        if link.is_symlink():
            (self.root / "bus/pci/drivers" / os.readlink(link).rsplit("/", 1)[-1] / pci).unlink(
                missing_ok=True
            )
        (self.root / "bus/pci/devices" / pci).unlink(missing_ok=True)
        shutil.rmtree(self._dir(pci), ignore_errors=True)

    def _write_netdev(self, pci: str, name: str | None = None) -> None:
        dev = self._devices[pci]
        ifname = name or dev.ifname
        assert ifname, pci
        net = self._dir(pci) / "net" / ifname
        net.mkdir(parents=True)
        _put(net / "type", str(dev.link_type))
        _put(net / "operstate", self._operstate(dev, ifname))
        (net / "device").symlink_to(f"../../../{pci}")
        (self.root / "class/net" / ifname).symlink_to(f"../../{_PCI_ROOT}/{pci}/net/{ifname}")

    def _operstate(self, dev: _Device, ifname: str) -> str:
        """What the tree says of a fresh netdev: VFs start down, PFs up (their links are made
        up), a borrowed PF netdev whatever the kernel says of it."""
        if dev.pf is not None:
            return "down"
        if dev.borrowed and self.node is not None:
            (link,) = self.node.ip("link", "show", "dev", ifname)
            return str(link["operstate"]).lower()
        return "up"

    def _drop_netdev(self, pci: str) -> None:
        """Remove the tree's netdev of `pci` (not its real link)."""
        name = self.vf_netdev(pci)
        if name is not None:
            shutil.rmtree(self._dir(pci) / "net" / name)
            (self.root / "class/net" / name).unlink(missing_ok=True)

    def _drop_link(self, pci: str) -> None:
        """Delete the veth pair of `pci` through its wire end, wherever the other end is."""
        dev = self._devices[pci]
        if dev.linked and self._wire is not None and dev.ifname:
            self._wire.run("ip", "link", "del", dev.ifname, check=False)
        dev.linked = False

    def _make_links(self, pcis: list[str], *, up: bool) -> None:
        """veth pairs `ifname` (node) <-> `ifname` (wire), in two `ip -batch` runs for speed;
        with `up`, the node ends are set up too (PFs are up, fresh VFs are down)."""
        if not pcis:
            return
        assert self.node is not None and self._wire is not None
        names = [self._devices[p].ifname or "" for p in pcis]
        wire = self._wire.name
        node_cmds = [
            f"link add {n}{self._ifindex(p)} type veth peer name {n} netns {wire}"
            for p, n in zip(pcis, names, strict=True)
        ]
        node_cmds += [f"link set {n} up" for n in names] if up else []
        _ip_batch(self.node.name, node_cmds)
        _ip_batch(wire, [f"link set {n} up" for n in names])
        for p in pcis:
            self._devices[p].linked = True

    def _ifindex(self, pci: str) -> str:
        """` index N` for a PF's node end (see _PF_IFINDEX_BASE), "" for a VF's."""
        return f" index {next(self._pf_ifindexes)}" if self._devices[pci].pf is None else ""

    def _announce_pci(self, action: str, pci: str, **props: str) -> None:
        props.setdefault("PCI_SLOT_NAME", pci)
        self.uevent(action, "pci", self.devpath(pci), **props)

    def _announce_net(self, action: str, pci: str, ifname: str, **props: str) -> None:
        self.uevent(action, "net", f"{self.devpath(pci)}/net/{ifname}", INTERFACE=ifname, **props)


def _put(path: Path, text: str) -> None:
    path.write_text(text + "\n")


def _ip_batch(netns: str, commands: list[str], *, check: bool = True) -> None:
    if commands:
        subprocess.run(
            ["ip", "-n", netns, "-force", "-batch", "-"],
            input="\n".join(commands) + "\n",
            capture_output=True,
            text=True,
            check=check,
            timeout=60,
        )


def _uevent_socket() -> socket.socket:
    return socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_KOBJECT_UEVENT
    )


@contextmanager
def running_bed(tmp_path: Path) -> Iterator[SriovBed]:
    """A SriovBed on `tmp_path/sys` with its own node namespace (`bed.node`), removed after."""
    if not is_root():
        raise BedUnavailable("the SR-IOV test bed makes network namespaces and needs root")
    node = Netns(f"sriov-node-{secrets.token_hex(2)}")
    bed: SriovBed | None = None
    try:
        bed = SriovBed(tmp_path / "sys", node)
        yield bed
    finally:
        if bed is not None:
            bed.cleanup()
        node.delete()
