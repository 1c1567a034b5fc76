"""The node agent's SR-IOV half: the one owner of every VF on this node, assembled from four
parts that share one lock (a claim must see membership, health and a PF being resized from the
same moment):

- `pools` (`sriov.pools_source`): where the admin's pools come from (the file, or in cluster
  mode the VFPool objects that select this node);
- `membership` (`sriov.membership`): which VFs serve which pool, their health, the device
  plugins and the views behind `plexusctl pools` / `plexusctl vfs`;
- `num_vfs` (`sriov.numvfs`): each PF's VF count, changed only when no pod holds one of its VFs;
- `vfs` (`sriov.vfstate`): the VF state machine with its leases, the `VfOwner` the
  `plexus-sriov` delegate and the audit (`sriov.audit`) work through.

The agent keeps them in time: the inventory (sysfs + uevents) drives membership, an edited
pools file is put in force within a second (a broken edit keeps the pools in force), a deferred
numVfs change is retried, and nothing is given out before the first audit finished. plexusd
builds it through `sriov.node.SriovNode`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from cnispec.errors import PlexusError
from sriov.inventory import Inventory
from sriov.ledger import Ledger
from sriov.membership import Membership, PluginFactory
from sriov.model import Snapshot
from sriov.numvfs import NumVfs
from sriov.pools_source import PoolsSource
from sriov.sysfs import Sysfs
from sriov.uevents import UeventSource
from sriov.vfstate import VfStates

log = structlog.get_logger(__name__)
POOLS_CHECK_INTERVAL = 1.0  # how soon an edited pools file takes effect


class NodeAgent:
    def __init__(
        self,
        *,
        sysfs: Sysfs,
        pools: PoolsSource | None,
        state_dir: Path,
        source_factory: Callable[[], UeventSource] | None = None,
        plugin_factory: PluginFactory | None = None,
        rescan_interval: float = 30.0,
        granted: Callable[[], set[str]] | None = None,
    ) -> None:
        self.sysfs = sysfs
        self.pools = pools
        self.inventory = Inventory(
            sysfs=sysfs, source_factory=source_factory, rescan_interval=rescan_interval
        )
        ledger = self.ledger = Ledger(state_dir)
        lock = threading.RLock()
        self.membership = Membership(
            inventory=self.inventory, ledger=ledger, lock=lock, plugin_factory=plugin_factory
        )
        self.num_vfs = NumVfs(
            sysfs=sysfs,
            inventory=self.inventory,
            ledger=ledger,
            membership=self.membership,
            lock=lock,
            granted=granted,
        )
        self.vfs = VfStates(
            inventory=self.inventory,
            ledger=ledger,
            membership=self.membership,
            num_vfs=self.num_vfs,
            lock=lock,
        )
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._watcher: threading.Thread | None = None

    # --- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Read the hardware and the pools; no VF is advertised until `audit_finished()`."""
        if self.pools is not None:
            # A broken pools file at start is fatal: there are no pools in force to keep.
            self.membership.use(self.pools.load(), why="start", reconcile=False)
        self.inventory.subscribe(lambda _snapshot: self.membership.reconcile("uevent"))
        self.inventory.start()
        self.num_vfs.apply()
        self.membership.reconcile("start")
        self._watcher = threading.Thread(target=self._watch_pools, name="vf-pools", daemon=True)
        self._watcher.start()

    def audit_finished(self) -> None:
        """The audit has looked at every VF: from now on healthy VFs may be given out."""
        if self.membership.verify():
            self.membership.start_plugins()
        self.membership.reconcile("audit")

    def on_change(self, fn: Callable[[], None]) -> None:
        """`fn()` whenever what `plexusctl vfs` shows may have changed: membership or health
        (inventory uevents, pools, health) and any VF's state (reserve, attach, release). Called
        from the thread that made the change, maybe under the agent's locks: it must only take
        note, never block (the VFPoolNodeState writer sets a flag and writes later)."""
        self.membership.on_change(fn)
        self.ledger.on_change(fn)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.inventory.stop()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        self.membership.stop_plugins()

    # --- pools --------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Read the pools again; a broken source keeps the pools in force. True when applied."""
        if self.pools is None:
            return False
        try:
            pools = self.pools.load()
        except PlexusError as exc:
            log.error("vf_pools_invalid", source=self.pools.describe(), error=exc.msg)
            return False
        self.membership.use(pools, why="reload")
        log.info("vf_pools_reloaded", source=self.pools.describe(), pools=len(pools.pools))
        self.num_vfs.apply()
        if self.membership.verified:
            self.membership.start_plugins()
        return True

    def wake(self) -> None:
        """Look at the pools source now rather than within POOLS_CHECK_INTERVAL (a source
        that is told of changes, like the VFPool watch, calls this)."""
        self._wake.set()

    def _watch_pools(self) -> None:
        while True:
            self._wake.wait(POOLS_CHECK_INTERVAL)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self.pools is not None and self.pools.changed():
                self.reload()
                continue
            if self.num_vfs.pending:
                self.num_vfs.apply()  # pods may have released what held a change back

    # --- the hardware -------------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self.inventory.snapshot

    def refresh(self) -> Snapshot:
        """Re-read sysfs now (uevents do this on their own; for tests and `reload`)."""
        return self.inventory.refresh()
