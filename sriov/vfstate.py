"""The VF state machine: the one writer of the VF ledger, and the `VfOwner` the `plexus-sriov`
delegate and the audit change VFs through.

A VF goes free -> reserved -> attached -> releasing -> free (plus unhealthy, which only an audit
that heals it leaves). While something changes a VF it holds a lease on it, of one of two kinds
(`Lease`): an ADD or DEL at work (`OP`), or the audit healing it (`HEAL`). The audit only takes a
VF no ADD or DEL is working on; a DEL that meets the audit's lease waits for it (or answers
"try again"), so the two never race over one VF. Transitions are compare-and-set on the durable
ledger (`sriov.ledger`), under the node agent's lock, so two attachments can never hold one VF
and what to put back is on disk before ADD changes anything.
"""

from __future__ import annotations

import threading
from enum import StrEnum

import structlog

from cnispec.errors import DeviceNotFound, DeviceUnavailable, TryAgainLater
from cnispec.identity import Holder
from sriov.health import misfit
from sriov.inventory import Inventory
from sriov.ledger import HELD, Ledger
from sriov.membership import Membership
from sriov.numvfs import NumVfs
from sriov.owner import DeviceType, Placement
from sriov.records import HostState, VfRecord, VfSettings, VfState

log = structlog.get_logger(__name__)
HEAL_WAIT = 5.0  # how long a DEL waits for the audit to let go of its VF


class Lease(StrEnum):
    OP = "op"  # an ADD or DEL is changing the VF
    HEAL = "heal"  # the audit is healing it


class VfStates:
    """`VfOwner` over the ledger, plus local mode's allocation from a pool."""

    def __init__(
        self,
        *,
        inventory: Inventory,
        ledger: Ledger,
        membership: Membership,
        num_vfs: NumVfs,
        lock: threading.RLock,
    ) -> None:
        self._inventory = inventory
        self._ledger = ledger
        self._membership = membership
        self._num_vfs = num_vfs
        self._lock = lock
        self._leases: dict[str, Lease] = {}  # PCI -> who is changing it now
        self._lease_over = threading.Condition(lock)  # a heal let go of a VF

    # --- allocation (local mode: no kubelet picks devices) ------------------------------------

    def allocate(self, resource_name: str, holder: Holder) -> str:
        self._membership.spec(resource_name)  # DeviceNotFound names the pools there are
        if not self._membership.verified:
            raise DeviceUnavailable(
                f"pool {resource_name}: VFs are not verified yet (the start-up audit is running)"
            )
        with self._lock:
            record = self._ledger.reserve(resource_name, holder)
            self._leases[record.pci] = Lease.OP
        log.info("vf_reserved", pci=record.pci, pool=resource_name, container=holder.container_id)
        return record.pci

    def release_unattached(self, container_id: str) -> list[str]:
        """Free what a failed ADD reserved but never reached (local mode reserves at plan time)."""
        freed = []
        for record in self._ledger.records():
            holder = record.holder
            if (
                record.state == VfState.RESERVED
                and holder is not None
                and holder.container_id == container_id
                and record.host is None
            ):
                self._ledger.transition(record.pci, expect={VfState.RESERVED}, to=VfState.FREE)
                self._done(record.pci)
                freed.append(record.pci)
        return freed

    # --- VfOwner ------------------------------------------------------------------------------

    def lookup(self, pci: str) -> Placement:
        snapshot = self._inventory.snapshot
        vf = snapshot.vf(pci)
        hidden = vf is not None and vf.netdev is None and not vf.is_vfio
        if vf is None or (hidden and self._ledger.get(pci).state == VfState.FREE):
            # A VF netdev hides from the node's sysfs while in a pod and shows again when DEL
            # brings it back; the uevent saying so may still be on its way: read afresh. (A
            # held VF's netdev is in its pod: no point reading sysfs again for it.)
            snapshot = self._inventory.refresh()
            vf = snapshot.vf(pci)
        if vf is None:
            raise DeviceNotFound(
                f"deviceID {pci} is not a VF of this node (no such PCI device with a physfn in "
                "sysfs); `plexusctl vfs` lists the node's VFs"
            )
        pf = snapshot.pf_of(vf)
        assert pf is not None  # a VF is only read through its PF
        pool, spec = self._membership.pool_of(pci)
        device_type: DeviceType = (
            spec.device_type if spec else ("vfio-pci" if vf.is_vfio else "netdevice")
        )
        return Placement(
            vf=vf, pf=pf, pool=pool, device_type=device_type, mtu=spec.mtu if spec else None
        )

    def claim(self, pci: str, holder: Holder) -> VfRecord:
        with self._lock:
            vf = self._inventory.snapshot.vf(pci)
            if vf is not None and self._num_vfs.resizing(vf.pf_pci):
                raise TryAgainLater(
                    f"VF {pci}: its PF {vf.pf_pci} is changing its number of VFs (numVfs)"
                )
            record = self._ledger.get(pci)
            if record.state == VfState.RESERVED and _same(record.holder, holder):
                self._leases[pci] = Lease.OP
                return self._ledger.put(record.model_copy(update={"holder": holder}))
            if not self._membership.verified:
                raise DeviceUnavailable(f"VF {pci} is not verified yet (start-up audit running)")
            pool, _ = self._membership.pool_of(pci)
            record = self._ledger.transition(
                pci, expect={VfState.FREE}, to=VfState.RESERVED, holder=holder, pool=pool
            )
            self._leases[pci] = Lease.OP
        return record

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
        self._ledger.transition(
            pci,
            expect={VfState.RESERVED},
            to=VfState.RESERVED,
            holder=holder,
            host=host,
            pf_before=pf_before,
            pf_applied=pf_applied,
            pf_set=pf_set,
        )

    def attached(self, pci: str, holder: Holder) -> None:
        self._ledger.transition(pci, expect={VfState.RESERVED}, to=VfState.ATTACHED, holder=holder)
        self._done(pci)
        log.info("vf_attached", pci=pci, container=holder.container_id, ifname=holder.ifname)

    def release_begin(self, pci: str, holder: Holder, *, healing: bool = False) -> VfRecord | None:
        with self._lock:
            if healing:
                if self._leases.get(pci) != Lease.HEAL:
                    return None  # the lease is gone
            elif not self._lease_over.wait_for(
                lambda: self._leases.get(pci) != Lease.HEAL, timeout=HEAL_WAIT
            ):
                # The audit is on this VF (it may be putting it back itself): a DEL must not
                # report done while the VF may still sit in the pod. The runtime retries.
                raise TryAgainLater(f"VF {pci} is being audited; DEL again in a moment")
            record = self._ledger.get(pci)
            if record.state not in HELD or not _same(record.holder, holder):
                return None
            released = self._ledger.transition(pci, expect=set(HELD), to=VfState.RELEASING)
            self._leases[pci] = Lease.HEAL if healing else Lease.OP
            return released

    def let_go(self, pci: str) -> None:
        """An ADD or DEL that failed half-way lets go of the VF: its record stays as it is
        (RELEASING: the audit or the runtime's retry finishes the job)."""
        self._done(pci)

    def lease(self, pci: str, seen: VfRecord) -> bool:
        """The audit's exclusive hold on a VF, granted only when no ADD or DEL is working on
        it and its record is still exactly what the audit read."""
        with self._lock:
            if pci in self._leases or self._ledger.get(pci) != seen:
                return False
            self._leases[pci] = Lease.HEAL
            return True

    def unlease(self, pci: str) -> None:
        with self._lock:
            if self._leases.get(pci) == Lease.HEAL:
                del self._leases[pci]
                self._lease_over.notify_all()

    def release_done(self, pci: str) -> None:
        self._ledger.transition(pci, expect={VfState.RELEASING, VfState.RESERVED}, to=VfState.FREE)
        self._done(pci)
        log.info("vf_freed", pci=pci)

    def mark_unhealthy(self, pci: str, reason: str) -> None:
        with self._lock:
            record = self._ledger.get(pci)
            if record.state not in (VfState.RESERVED, VfState.RELEASING, VfState.UNHEALTHY):
                # Only what is being put back (or already out) goes out of circulation: never
                # a VF that meanwhile went free or to another pod.
                log.error("vf_unhealthy_refused", pci=pci, state=record.state.value, reason=reason)
                return
            again = record.state == VfState.UNHEALTHY and record.reason == reason
            self._ledger.put(
                record.model_copy(update={"state": VfState.UNHEALTHY, "reason": reason})
            )
            self._done(pci)
            if not again:  # the periodic audit retries: say it once, not every minute
                log.warning("vf_unhealthy", pci=pci, reason=reason)
            self._membership.reconcile("unhealthy")

    def retry_unhealthy(self, pci: str) -> VfRecord | None:
        with self._lock:
            record = self._ledger.get(pci)
            if record.state != VfState.UNHEALTHY or self._leases.get(pci) != Lease.HEAL:
                return None  # only under the audit's lease
            if record.holder is not None and (record.host or record.pf_applied):
                return self._ledger.transition(
                    pci, expect={VfState.UNHEALTHY}, to=VfState.RELEASING
                )
            vf = self._inventory.snapshot.vf(pci)
            _, spec = self._membership.pool_of(pci)
            dtype: DeviceType = spec.device_type if spec else "netdevice"
            if vf is None or misfit(vf, dtype) is not None:
                return None
            freed = self._ledger.transition(pci, expect={VfState.UNHEALTHY}, to=VfState.FREE)
        log.info("vf_recovered", pci=pci, was=record.reason)
        self._membership.reconcile("recovered")
        return freed

    def held_by(self, container_id: str, ifname: str) -> VfRecord | None:
        return self._ledger.held_by(container_id, ifname)

    def records(self) -> list[VfRecord]:
        return self._ledger.records()

    def _done(self, pci: str) -> None:
        with self._lock:
            if self._leases.pop(pci, None) == Lease.HEAL:
                self._lease_over.notify_all()


def _same(a: Holder | None, b: Holder) -> bool:
    return a is not None and a.same_attachment(b)
