"""How many VFs each PF has: the pools' `numVfs`, written to `sriov_numvfs` when it differs.

The kernel goes through 0 VFs to change the count, which would pull every VF out of whatever pod
holds it: a change waits until no pod holds a VF of that PF (in our ledger, or, in cluster mode,
granted by kubelet; when kubelet cannot say, it waits rather than guesses), and is retried every
second by the node agent until it can go in. The check and taking the PF's VFs out of
circulation happen under the agent's lock; the write itself (seconds on real hardware) does not
hold it, so allocation, health and the device plugins go on meanwhile.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Literal

import structlog

from cnispec.errors import PlexusError, TryAgainLater
from sriov.inventory import Inventory
from sriov.ledger import HELD, Ledger
from sriov.membership import Membership
from sriov.model import Pf
from sriov.pools import desired_num_vfs
from sriov.sysfs import Sysfs

log = structlog.get_logger(__name__)

Outcome = Literal["done", "later", ""]


class NumVfs:
    def __init__(
        self,
        *,
        sysfs: Sysfs,
        inventory: Inventory,
        ledger: Ledger,
        membership: Membership,
        lock: threading.RLock,
        granted: Callable[[], set[str]] | None = None,
    ) -> None:
        self._sysfs = sysfs
        self._inventory = inventory
        self._ledger = ledger
        self._membership = membership
        self._lock = lock
        # Cluster mode: the devices kubelet granted to pods (PodResources List). A vfio VF a
        # DPDK pod got straight from the device plugin never shows in our ledger.
        self._granted = granted
        self._pending = False  # a change waits for pods to release VFs
        self._resizing: set[str] = set()  # PFs whose sriov_numvfs is being written
        self._problems: dict[str, str] = {}  # PF PCI -> why its numVfs is not what is wanted

    @property
    def pending(self) -> bool:
        return self._pending

    def problems(self) -> list[str]:
        """Why a PF does not have the numVfs its pools want (a change waiting for pods to
        release VFs, or a write that failed), for the node's VFPoolNodeState."""
        with self._lock:
            return [self._problems[pf] for pf in sorted(self._problems)]

    def resizing(self, pf_pci: str) -> bool:
        """The PF's VF count is being written now (its VFs must not be claimed)."""
        with self._lock:
            return pf_pci in self._resizing

    def apply(self) -> None:
        """Write each PF's numVfs where it differs from the pools in force."""
        pending = changed = False
        wanted = desired_num_vfs(self._inventory.snapshot, self._membership.pools)
        with self._lock:
            before = dict(self._problems)
            for pf_pci in [p for p in self._problems if p not in wanted]:
                del self._problems[pf_pci]  # no pool wants a count of it any more
        for pf_pci, count in wanted.items():
            outcome = self._resize(pf_pci, count)
            pending |= outcome == "later"
            changed |= outcome == "done"
        self._pending = pending
        with self._lock:
            news = self._problems != before
        if news:
            self._membership.notify()
        if changed:
            self._inventory.refresh()

    def _resize(self, pf_pci: str, wanted: int) -> Outcome:
        """ "done", "later" (pods hold VFs, or the kernel said busy), or "" (nothing to do or
        a lasting failure, logged)."""
        with self._lock:
            pf = self._inventory.snapshot.pfs.get(pf_pci)
            if pf is None or pf.num_vfs == wanted:
                self._problems.pop(pf_pci, None)
                return ""
            held = [vf.pci for vf in pf.vfs if self._ledger.get(vf.pci).state in HELD]
            held += self._granted_of(pf)
            if held:
                if not self._pending:
                    log.warning(
                        "num_vfs_deferred", pf=pf_pci, have=pf.num_vfs, want=wanted, in_use=held
                    )
                holding = sorted(set(held))  # ours and kubelet's grants overlap
                self._problems[pf_pci] = (
                    f"PF {pf.name}: numVfs {pf.num_vfs} -> {wanted} waits until pods release "
                    f"{len(holding)} VF(s) ({', '.join(holding[:4])}"
                    f"{', ...' if len(holding) > 4 else ''})"
                )
                return "later"
            self._resizing.add(pf_pci)  # claims of its VFs are refused from now on...
            self._membership.withdraw({vf.pci for vf in pf.vfs})  # ...and none is allocated
        try:
            self._sysfs.set_num_vfs(pf_pci, wanted)
        except PlexusError as exc:
            log.error("num_vfs_failed", pf=pf_pci, want=wanted, error=exc.msg)
            with self._lock:
                self._problems[pf_pci] = f"PF {pf.name}: numVfs {wanted} not set: {exc.msg}"
            return "later" if isinstance(exc, TryAgainLater) else ""
        finally:
            with self._lock:
                self._resizing.discard(pf_pci)
            self._membership.forget_vanished()  # VFs we removed ourselves are not faults
            self._membership.reconcile("num_vfs")
        with self._lock:
            self._problems.pop(pf_pci, None)
        log.info("num_vfs_set", pf=pf_pci, was=pf.num_vfs, now=wanted)
        return "done"

    def _granted_of(self, pf: Pf) -> list[str]:
        """The PF's VFs kubelet has given to pods; all of them when kubelet cannot say."""
        if self._granted is None:
            return []
        try:
            granted = self._granted()
        except PlexusError as exc:
            log.warning("num_vfs_kubelet_unknown", pf=pf.pci, error=exc.msg)
            return [vf.pci for vf in pf.vfs]
        return [vf.pci for vf in pf.vfs if vf.pci in granted]
