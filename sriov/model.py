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
