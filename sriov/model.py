"""The node's SR-IOV hardware as read from sysfs: physical functions (PFs) and their virtual
functions (VFs), identified by PCI address, never by netdev name (names change with firmware
updates and udev rules; PCI addresses do not).

Read by `sriov.sysfs`, kept live by `sriov.inventory`, matched to pools by `sriov.pools`, and
used by the `plexus-sriov` delegate to find a VF's PF and netdev.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

VFIO_DRIVER: Final = "vfio-pci"
# Drivers that take a VF away from the kernel's network stack: such a VF has no netdev.
USERSPACE_DRIVERS: Final = frozenset({"vfio-pci", "uio_pci_generic", "igb_uio"})

LinkType = Literal["ether", "infiniband", "unknown"]
# A netdev's `operstate` (RFC 2863, as sysfs spells it) -> does it have link. Only these are
# known; "unknown" (drivers that never report carrier, e.g. netdevsim on 6.1), "dormant",
# "testing" and a missing file say nothing, and must never take a VF out of service.
_LINK_BY_OPERSTATE: Final[dict[str, bool]] = {
    "up": True,
    "down": False,
    "lowerlayerdown": False,
    "notpresent": False,
}


def link_up(operstate: str | None) -> bool | None:
    """True/False when `operstate` says whether the netdev has link, None when it cannot tell."""
    return _LINK_BY_OPERSTATE.get(operstate or "")


@dataclass(frozen=True, slots=True)
class Vf:
    pci: str  # "0000:03:02.3"
    pf_pci: str
    index: int  # the N of the PF's virtfnN link
    vendor: str  # "8086" (no 0x)
    device: str  # "154c"
    driver: str | None  # "iavf", "vfio-pci"; None while unbound
    numa_node: int  # -1 when the platform does not say
    netdev: str | None  # its netdev's name in the node's netns, when it has one there
    link_type: LinkType  # taken from the PF: a VF inside a pod has no netdev to ask

    @property
    def is_vfio(self) -> bool:
        return self.driver == VFIO_DRIVER


@dataclass(frozen=True, slots=True)
class Pf:
    pci: str
    vendor: str
    device: str
    driver: str | None
    numa_node: int
    netdev: str | None  # its netdev's name in the node's netns
    link_type: LinkType
    total_vfs: int
    num_vfs: int
    vfs: tuple[Vf, ...] = ()
    operstate: str | None = None  # its netdev's `operstate`; None without a netdev or file

    @property
    def link_up(self) -> bool | None:
        """Whether the PF has link (cable in, switch port up); None when unknown."""
        return link_up(self.operstate)

    @property
    def name(self) -> str:
        """How an admin knows the PF: its netdev, else its PCI address."""
        return self.netdev or self.pci


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every PF and VF at one moment; lookups by PCI address."""

    pfs: Mapping[str, Pf] = field(default_factory=dict)
    vfs: Mapping[str, Vf] = field(init=False)

    def __post_init__(self) -> None:
        index = {vf.pci: vf for pf in self.pfs.values() for vf in pf.vfs}
        object.__setattr__(self, "vfs", index)

    def vf(self, pci: str) -> Vf | None:
        return self.vfs.get(pci)

    def pf_of(self, vf: Vf) -> Pf | None:
        return self.pfs.get(vf.pf_pci)
