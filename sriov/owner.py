"""The one interface through which the `plexus-sriov` delegate and the VF audit change a VF's
state. `sriov.agent.NodeAgent` implements it; it is the only writer of the VF ledger, so two
attachments can never hold one VF and a VF's restore information is durable before ADD changes
anything."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from cnispec.identity import Holder
from sriov.model import Pf, Vf
from sriov.records import HostState, VfRecord, VfSettings

DeviceType = Literal["netdevice", "vfio-pci"]


@dataclass(frozen=True, slots=True)
class Placement:
    """A VF with its PF and what its pool says about it."""

    vf: Vf
    pf: Pf
    pool: str | None  # resourceName of the pool it belongs to, None when in no pool
    device_type: DeviceType
    mtu: int | None  # the pool's MTU for the VF netdev, None to leave it


class VfOwner(Protocol):
    def lookup(self, pci: str) -> Placement:
        """Raises DeviceNotFound when no VF has this PCI address."""
        ...

    def claim(self, pci: str, holder: Holder) -> VfRecord:
        """free -> reserved for `holder`. A VF already reserved for the same attachment (local
        mode reserves at plan time) is returned as is. Raises DeviceUnavailable when another
        attachment holds it or it is unhealthy/unverified."""
        ...

    def prepare(
        self,
        pci: str,
        holder: Holder,
        *,
        host: HostState | None,
        pf_before: VfSettings,
        pf_applied: tuple[str, ...],
        pf_set: VfSettings | None = None,
    ) -> None:
        """Record (durably, still reserved) what to put back, before ADD changes anything."""
        ...

    def attached(self, pci: str, holder: Holder) -> None:
        """reserved -> attached, durably: ADD is done."""
        ...

    def release_begin(self, pci: str, holder: Holder, *, healing: bool = False) -> VfRecord | None:
        """reserved|attached|releasing -> releasing and the record to restore from; None when
        `holder` does not hold this VF (a stale or repeated DEL must touch nothing), or when
        the audit holds its lease on it (it is putting the VF back itself). The audit passes
        `healing=True`, under its lease."""
        ...

    def let_go(self, pci: str) -> None:
        """An ADD or DEL that failed half-way lets go of the VF; its record stays as it is
        (RELEASING: the runtime's retry or the audit finishes the job)."""
        ...

    def lease(self, pci: str, seen: VfRecord) -> bool:
        """The audit's exclusive hold on a VF: only when no ADD or DEL works on it and its
        record is still `seen`. Released by `unlease`, or by the VF's release or unhealthy."""
        ...

    def unlease(self, pci: str) -> None: ...

    def release_done(self, pci: str) -> None:
        """releasing -> free."""
        ...

    def mark_unhealthy(self, pci: str, reason: str) -> None:
        """reserved|releasing|unhealthy -> unhealthy with the reason; refused (logged) for a VF
        that meanwhile went free or to another holder."""
        ...

    def retry_unhealthy(self, pci: str) -> VfRecord | None:
        """Under the audit's lease, a second chance for an unhealthy VF: RELEASING (to heal
        like a DEL) when it still knows what to restore, FREE when there is nothing to restore
        and the VF is present and fits its pool again, None when it stays unhealthy."""
        ...

    def held_by(self, container_id: str, ifname: str) -> VfRecord | None:
        """The VF this attachment holds (DEL may come without a deviceID)."""
        ...

    def records(self) -> list[VfRecord]: ...
