"""Device uevents for the `pci` and `net` subsystems, from udevd or straight from the kernel.

`sriov.inventory` opens one source through `open_source` and rescans sysfs when a uevent says a
PCI device or netdev came, went, moved or changed driver, or a link's operstate changed (the
kernel sends no uevent for that: `LinkSource` turns `sriov.linkwatch`'s rtnetlink reports into
`net` events with the action `OPERSTATE`). `open_source` merges the link source with one of:

- `UdevSource` (pyudev, udevd's "udev" group): used on nodes where udevd runs, so the inventory
  sees devices only once udev rules have renamed them.
- `KernelSource` (a raw NETLINK_KOBJECT_UEVENT socket, the kernel's group 1): used where udevd
  does not run (containers, this build machine), and by the SR-IOV test bed, whose synthetic
  uevents can only arrive this way (see the NOTE on `KernelSource`).
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import pyudev  # type: ignore[import-untyped]

from kernel.linkwatch import LOST, LinkWatch
from kernel.poll import readable

SUBSYSTEMS: Final = frozenset({"pci", "net"})
NETLINK_KOBJECT_UEVENT: Final = 15
KERNEL_GROUP: Final = 1  # udevd re-broadcasts on group 2 with a "libudev" header
RCVBUF: Final = 8 * 1024 * 1024  # enabling 256 VFs emits ~1,000 uevents at once
UDEV_CONTROL: Final = Path("/run/udev/control")
OVERFLOW: Final = "overflow"
OPERSTATE: Final = "operstate"  # the action of a `net` event for a link's operstate change
SO_RCVBUFFORCE: Final = 33  # Linux; missing from Python's socket module before 3.12


@dataclass(frozen=True)
class UEvent:
    action: str  # add, remove, bind, unbind, change, move; "overflow" when events were lost
    subsystem: str
    devpath: str  # "/devices/pci0000:00/0000:03:02.3", relative to the sysfs root
    properties: Mapping[str, str] = field(default_factory=dict)


def overflow() -> UEvent:
    """Events were dropped (receive buffer full): the reader must rescan everything."""
    return UEvent(action=OVERFLOW, subsystem="", devpath="")


class UeventSource(Protocol):
    def fileno(self) -> int: ...

    def receive(self, timeout: float) -> UEvent | None:
        """The next pci/net uevent, or None when none came within `timeout` seconds."""
        ...

    def close(self) -> None: ...


def parse_kernel_uevent(data: bytes) -> UEvent | None:
    """One message of the kernel's uevent wire format:
    `action@devpath\\0ACTION=..\\0DEVPATH=..\\0SUBSYSTEM=..\\0SEQNUM=..\\0...`.
    None for anything else (udevd's "libudev" messages, truncated or foreign data)."""
    head, _, rest = data.partition(b"\0")
    if b"@" not in head or head.startswith(b"libudev"):
        return None
    text = rest.decode("utf-8", "replace")
    props = dict(kv.split("=", 1) for kv in text.split("\0") if "=" in kv)
    action, _, devpath = head.decode("utf-8", "replace").partition("@")
    subsystem = props.get("SUBSYSTEM", "")
    if not subsystem or not devpath:
        return None
    return UEvent(
        action=props.get("ACTION", action),
        subsystem=subsystem,
        devpath=props.get("DEVPATH", devpath),
        properties=props,
    )


class KernelSource:
    """The kernel's uevents, read from a NETLINK_KOBJECT_UEVENT socket in the network namespace
    of the thread that creates it (to follow another netns, create it on a thread that setns'd
    there, e.g. through `delegates.netns.run_in_netns`).

    NOTE: this exists besides `UdevSource` because libudev (hence pyudev) drops every message on
    the kernel group whose sender port id is not 0, i.e. anything not sent by the kernel itself;
    the SR-IOV test bed's synthetic uevents come from a userspace socket, so only a raw socket
    sees them. Sending on this group needs CAP_NET_ADMIN over the namespace, so a sender that is
    not the kernel is root in our own netns.
    """

    def __init__(self, *, rcvbuf: int = RCVBUF) -> None:
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_KOBJECT_UEVENT
        )
        try:
            self._set_rcvbuf(rcvbuf)
            self._sock.bind((0, KERNEL_GROUP))
        except OSError:
            self._sock.close()
            raise

    def _set_rcvbuf(self, size: int) -> None:
        # SO_RCVBUFFORCE (root) goes past net.core.rmem_max, which is often only 208 KiB.
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        except PermissionError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)

    def fileno(self) -> int:
        return self._sock.fileno()

    def receive(self, timeout: float) -> UEvent | None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if not readable(self._sock, left):
                return None
            try:
                data = self._sock.recv(65536)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    return overflow()
                raise
            event = parse_kernel_uevent(data)
            if event is not None and event.subsystem in SUBSYSTEMS:
                return event

    def close(self) -> None:
        self._sock.close()


class UdevSource:
    """udevd's uevents for pci and net devices, through pyudev (libudev)."""

    def __init__(self, *, rcvbuf: int = RCVBUF) -> None:
        self._monitor: Any = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
        for subsystem in sorted(SUBSYSTEMS):
            self._monitor.filter_by(subsystem)
        # Not root: the default buffer, and an overflow event if it ever fills.
        with contextlib.suppress(OSError):
            self._monitor.set_receive_buffer_size(rcvbuf)
        self._monitor.start()

    def fileno(self) -> int:
        return int(self._monitor.fileno())

    def receive(self, timeout: float) -> UEvent | None:
        try:
            device = self._monitor.poll(timeout)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                return overflow()
            raise
        if device is None:
            return None
        return UEvent(
            action=str(device.action or "change"),
            subsystem=str(device.subsystem or ""),
            devpath=str(device.device_path),
            properties={str(k): str(v) for k, v in device.properties.items()},
        )

    def close(self) -> None:
        # pyudev has no close(): the monitor's last reference going away unrefs it in libudev,
        # which closes the socket. Closing the fd ourselves would close it twice.
        self._monitor = None


class LinkSource:
    """`LinkWatch`'s operstate changes as `net` events (action `OPERSTATE`), in the network
    namespace of the thread that creates it."""

    def __init__(self) -> None:
        self._watch = LinkWatch()

    def fileno(self) -> int:
        return self._watch.fileno()

    def receive(self, timeout: float) -> UEvent | None:
        change = self._watch.receive(timeout)
        if change is None:
            return None
        if change.operstate == LOST:
            return overflow()
        return UEvent(
            action=OPERSTATE,
            subsystem="net",
            devpath=f"/class/net/{change.ifname}",
            properties={"INTERFACE": change.ifname, "OPERSTATE": change.operstate},
        )

    def close(self) -> None:
        self._watch.close()


class MergedSource:
    """Several sources read as one: whichever has an event first. Owns (and closes) them."""

    def __init__(self, *sources: UeventSource) -> None:
        self.sources = sources

    def fileno(self) -> int:
        return self.sources[0].fileno()

    def receive(self, timeout: float) -> UEvent | None:
        deadline = time.monotonic() + timeout
        poller = select.poll()  # not select(): it cannot watch descriptors numbered >= 1024
        by_fd = {source.fileno(): source for source in self.sources}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            ready = poller.poll(max(left, 0.0) * 1000)
            if not ready:
                return None
            for fd, _mask in ready:
                # A ready source may still have nothing for us (a subsystem we skip).
                event = by_fd[fd].receive(0)
                if event is not None:
                    return event

    def close(self) -> None:
        for source in self.sources:
            source.close()


def open_source(sysfs_root: Path, *, udev_control: Path = UDEV_CONTROL) -> UeventSource:
    """udevd's events when udevd runs and we watch the real /sys; the kernel's otherwise (no
    udevd, or a synthetic tree whose events only the kernel group carries); either merged
    with the link state changes of the caller's network namespace."""
    if Path(sysfs_root) == Path("/sys") and udev_control.exists():
        devices: UeventSource = UdevSource()
    else:
        devices = KernelSource()
    try:
        return MergedSource(devices, LinkSource())
    except OSError:
        devices.close()
        raise
