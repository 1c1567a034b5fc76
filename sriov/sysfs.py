"""Reads the node's SR-IOV hardware from a sysfs tree and writes `sriov_numvfs`.

Every path is taken relative to an injected root (`/sys` in production, a synthetic tree built
by `testbed/sriov_bed.py` in tests). Symlinks are resolved *textually* against the link's
own directory, the way the kernel's relative links are meant to be read, and a link whose target
leaves the root is treated as absent: a test tree can never make the daemon read the machine's
real /sys, and a hostile tree cannot point us anywhere else.

Called by `sriov.inventory` (scan on start and on every uevent burst), by the pool manager
(`set_num_vfs`). A device that is half
written (udev still populating it, a VF being removed) yields defaults, never an exception.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
from pathlib import Path
from typing import Final, NamedTuple

from cnispec.errors import (
    DeviceNotFound,
    DeviceSettingUnsupported,
    InvalidConfig,
    PlexusError,
    TryAgainLater,
)
from sriov.model import LinkType, Pf, Snapshot, Vf

PCI_ADDRESS: Final = re.compile(r"^[0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_VIRTFN: Final = re.compile(r"^virtfn(\d+)$")
_MAX_HOPS: Final = 40  # the kernel's own limit on nested symlinks
# ARPHRD_* values of `net/<ifname>/type` (include/uapi/linux/if_arp.h).
_LINK_TYPES: Final[dict[str, LinkType]] = {"1": "ether", "32": "infiniband"}


def _read(path: str) -> str | None:
    """A sysfs attribute's text, or None when it is missing or unreadable right now."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        return os.read(fd, 4096).decode("ascii", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_int(path: str, default: int) -> int:
    text = _read(path)
    try:
        return int(text) if text else default
    except ValueError:
        return default


def _hex_id(path: str) -> str:
    """`vendor`/`device` hold "0x8086"; the model keeps "8086"."""
    text = (_read(path) or "").lower()
    return text.removeprefix("0x")


def _link_name(path: str) -> str | None:
    """The last component of a symlink's target (a driver's or a device's name)."""
    try:
        return posixpath.basename(os.readlink(path).rstrip("/")) or None
    except OSError:
        return None


class _Family(NamedTuple):
    """What every VF of one PF shares with it. A VF's vendor id is its PF's and its device id
    is the PF's `sriov_vf_device` (the kernel copies both when it creates the VF), so they are
    read once per PF rather than twice per VF: a scan of 1,024 VFs is mostly syscalls."""

    pf_pci: str
    vendor: str
    vf_device: str  # "" when the PF does not say (kernels before 4.18): read each VF's
    link_type: LinkType


def _read_vf(pci: str, index: int, dev: str, family: _Family) -> Vf:
    return Vf(
        pci=pci,
        pf_pci=family.pf_pci,
        index=index,
        vendor=family.vendor,
        device=family.vf_device or _hex_id(f"{dev}/device"),
        driver=_link_name(f"{dev}/driver"),
        numa_node=_read_int(f"{dev}/numa_node", -1),
        netdev=_netdev(dev),
        link_type=family.link_type,
    )


def _netdev(dev: str) -> str | None:
    """The device's netdev in this netns (sysfs shows only those); the first by name when a
    device has several (multi-port functions)."""
    try:
        names = sorted(os.listdir(f"{dev}/net"))
    except OSError:
        return None
    return names[0] if names else None


class _Listing:
    """For one scan: which names of a directory exist and which are symlinks, from one scandir
    per directory. A scan's lookups crowd into a few directories (bus/pci/devices, a PF's and
    its parent bridge's), and asking them once instead of one readlink per path component
    halves the cost of a scan."""

    def __init__(self, root: str) -> None:
        self._root = root
        self._dirs: dict[str, dict[str, bool]] = {}

    def entries(self, rel: str) -> dict[str, bool]:
        """name -> is it a symlink, for the directory `rel` (empty when unreadable)."""
        found = self._dirs.get(rel)
        if found is None:
            path = f"{self._root}/{rel}" if rel else self._root
            try:
                with os.scandir(path) as it:
                    found = {e.name: e.is_symlink() for e in it}
            except OSError:
                found = {}
            self._dirs[rel] = found
        return found


class Sysfs:
    """The sysfs tree under `root`, read the way the kernel lays it out."""

    def __init__(self, root: Path = Path("/sys")) -> None:
        self.root = root
        self._root = os.path.normpath(os.fspath(root))

    # --- path handling ----------------------------------------------------------------------
    # Paths below are relative to the root ("" is the root itself) and free of symlinks.

    def _inside(self, rel: str) -> str:
        return f"{self._root}/{rel}" if rel else self._root

    def _walk(self, base: str, tail: str, listing: _Listing | None = None) -> str | None:
        """`base` (already link-free) joined with `tail`, every symlink on the way replaced by
        its target read textually; None when a link is absolute or leads out of the root, a
        component is missing, or links loop. `listing` answers "is it a link" during a scan."""
        parts = [p for p in reversed(tail.split("/")) if p not in ("", ".")]
        done, hops = base, 0
        while parts:
            part = parts.pop()
            if part == "..":
                if not done:
                    return None
                done = posixpath.dirname(done)
                continue
            candidate = f"{done}/{part}" if done else part
            if listing is not None:
                is_link = listing.entries(done).get(part)
                if is_link is None:
                    return None
                if not is_link:
                    done = candidate
                    continue
            try:
                target = os.readlink(self._inside(candidate))
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: a real file or directory
                    return None
                done = candidate
                continue
            hops += 1
            if target.startswith("/") or hops > _MAX_HOPS:
                return None
            parts.extend(p for p in reversed(target.split("/")) if p not in ("", "."))
        return done

    def _device_dir(self, pci: str, listing: _Listing | None = None) -> str | None:
        """The device's directory, relative to the root."""
        if not PCI_ADDRESS.match(pci):
            return None
        return self._walk("", f"bus/pci/devices/{pci}", listing)

    # --- reads ------------------------------------------------------------------------------

    def scan(self) -> Snapshot:
        """Every PF of the node with its VFs."""
        try:
            addresses = sorted(os.listdir(self._inside("bus/pci/devices")))
        except OSError:
            addresses = []
        pfs: dict[str, Pf] = {}
        seen_vfs: set[str] = set()
        listing = _Listing(self._root)
        for pci in addresses:
            # A VF's routing id is its PF's plus a positive offset, so in address order the PF
            # comes first and its VFs, already read through its virtfn links, can be skipped.
            if pci in seen_vfs:
                continue
            pf = self._read_pf(pci, listing)
            if pf is not None:
                pfs[pci] = pf
                seen_vfs.update(vf.pci for vf in pf.vfs)
        return Snapshot(pfs=pfs)

    def _read_pf(self, pf_pci: str, listing: _Listing) -> Pf | None:
        rel = self._device_dir(pf_pci, listing)
        if rel is None:
            return None
        dev = self._inside(rel)
        total = _read_int(f"{dev}/sriov_totalvfs", -1)
        num = _read_int(f"{dev}/sriov_numvfs", -1)
        if total < 0 and num < 0:
            return None
        netdev = _netdev(dev)
        link_type = self._link_type(dev, netdev)
        vendor = _hex_id(f"{dev}/vendor")
        family = _Family(pf_pci, vendor, _hex_id(f"{dev}/sriov_vf_device"), link_type)
        return Pf(
            pci=pf_pci,
            vendor=vendor,
            device=_hex_id(f"{dev}/device"),
            driver=_link_name(f"{dev}/driver"),
            numa_node=_read_int(f"{dev}/numa_node", -1),
            netdev=netdev,
            link_type=link_type,
            total_vfs=max(total, 0),
            num_vfs=max(num, 0),
            vfs=tuple(self._read_vfs(rel, family, listing)),
            # One read per PF; rtnetlink (sriov.linkwatch) says when to read it again.
            operstate=_read(f"{dev}/net/{netdev}/operstate") if netdev else None,
        )

    def _read_vfs(self, pf_rel: str, family: _Family, listing: _Listing) -> list[Vf]:
        names = listing.entries(pf_rel)
        links = sorted((int(m[1]), m[0]) for n in names if (m := _VIRTFN.match(n)))
        vfs = []
        for index, name in links:
            found = self._walk(pf_rel, name, listing)
            pci = posixpath.basename(found) if found else ""
            # A dangling virtfn link is a VF being removed: skip it until the next scan.
            if found is None or not PCI_ADDRESS.match(pci):
                continue
            vfs.append(_read_vf(pci, index, self._inside(found), family))
        return vfs

    @staticmethod
    def _link_type(dev: str, netdev: str | None) -> LinkType:
        if netdev is None:
            return "unknown"
        return _LINK_TYPES.get(_read(f"{dev}/net/{netdev}/type") or "", "unknown")

    # --- writes -----------------------------------------------------------------------------

    def set_num_vfs(self, pf_pci: str, count: int) -> None:
        """Make the PF have `count` VFs. The kernel refuses to go from one nonzero count to
        another (EBUSY: "VFs already enabled"), so a change between two nonzero counts first
        writes 0; that removes every VF, so the caller must make sure none is in use."""
        rel = self._device_dir(pf_pci)
        dev = self._inside(rel) if rel is not None else ""
        if rel is None or not os.path.exists(f"{dev}/sriov_numvfs"):
            raise DeviceNotFound(
                f"{pf_pci} is not an SR-IOV PF on this node (no {self.root}/bus/pci/devices/"
                f"{pf_pci}/sriov_numvfs); check the PCI address with lspci"
            )
        total = _read_int(f"{dev}/sriov_totalvfs", -1)
        if count < 0 or 0 <= total < count:
            raise InvalidConfig(f"PF {pf_pci} supports 0..{total} VFs, not {count}; fix numVfs")
        current = _read_int(f"{dev}/sriov_numvfs", 0)
        if current == count:
            return
        if current != 0 and count != 0:
            self._write_num_vfs(pf_pci, f"{dev}/sriov_numvfs", 0)
        self._write_num_vfs(pf_pci, f"{dev}/sriov_numvfs", count)

    @staticmethod
    def _write_num_vfs(pf_pci: str, path: str, count: int) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
            try:
                os.write(fd, f"{count}\n".encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise _num_vfs_error(pf_pci, path, count, exc) from exc


def _num_vfs_error(pf_pci: str, path: str, count: int, exc: OSError) -> PlexusError:
    what = f"writing {count} to {path} failed ({os.strerror(exc.errno or 0)})"
    if exc.errno == errno.EBUSY:
        return TryAgainLater(
            f"{what}: the PF's VFs are busy (in use by a driver or a VM); release them and retry"
        )
    if exc.errno == errno.ENOENT:
        return DeviceSettingUnsupported(
            f"{what}: the driver of PF {pf_pci} cannot create VFs (no sriov_configure); "
            "bind the PF to its vendor's driver or enable SR-IOV in the firmware"
        )
    if exc.errno == errno.ERANGE:
        return InvalidConfig(f"{what}: more VFs than the PF supports (see sriov_totalvfs)")
    return DeviceSettingUnsupported(
        f"{what}: check dmesg for the driver's reason (firmware limits, IOMMU, BIOS SR-IOV)"
    )
