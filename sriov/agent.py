"""The node agent's SR-IOV half: the one owner of every VF on this node.

It keeps the live inventory (sysfs + uevents), the admin's pools file (reloaded when it changes),
the durable VF ledger and, in cluster mode, one kubelet device plugin per pool. It decides which
VFs may be given out (present, bound to a driver that fits the pool's deviceType, on a PF with
link, not unhealthy, and verified by an audit), applies each PF's numVfs, and implements
`VfOwner` for the `plexus-sriov` delegate and the audit. plexusd builds it (`metaplugin.daemon`);
`plexusctl pools` and `plexusctl vfs` read `pools_view()` / `vfs_view()` through the daemon's API;
the health rules and the views themselves are `sriov.health`.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import structlog

from metaplugin.errors import DeviceNotFound, DeviceUnavailable, PlexusError, TryAgainLater
from sriov.health import VfView, givable, misfit, pool_summary, vf_view
from sriov.inventory import Inventory
from sriov.ledger import HELD, Ledger
from sriov.model import Pf, Snapshot, Vf
from sriov.owner import DeviceType, Placement
from sriov.pools import PoolsFile, PoolSpec, assign, desired_num_vfs, load_pools
from sriov.records import Holder, HostState, VfRecord, VfSettings, VfState
from sriov.sysfs import Sysfs
from sriov.uevents import UeventSource

log = structlog.get_logger(__name__)
POOLS_CHECK_INTERVAL = 1.0  # how soon an edited pools file takes effect
HEAL_WAIT = 5.0  # how long a DEL waits for the audit to let go of its VF


class DevicePlugin(Protocol):
    """What the agent needs of a kubelet device plugin (sriov.deviceplugin.PoolDevicePlugin)."""

    def start(self) -> None: ...

    def notify(self) -> None: ...

    def stop(self) -> None: ...


PluginFactory = Callable[[PoolSpec, Callable[[], list[VfView]]], DevicePlugin]


class NodeAgent:
    def __init__(
        self,
        *,
        sysfs: Sysfs,
        pools_path: Path | None,
        state_dir: Path,
        source_factory: Callable[[], UeventSource] | None = None,
        plugin_factory: PluginFactory | None = None,
        rescan_interval: float = 30.0,
        granted: Callable[[], set[str]] | None = None,
    ) -> None:
        self._sysfs = sysfs
        self._pools_path = pools_path
        self._inventory = Inventory(
            sysfs=sysfs, source_factory=source_factory, rescan_interval=rescan_interval
        )
        self._ledger = Ledger(state_dir)
        self._plugin_factory = plugin_factory
        # Cluster mode: the devices kubelet granted to pods (PodResources List). A vfio VF a
        # DPDK pod got straight from the device plugin never shows in our ledger.
        self._granted = granted
        self._plugins: dict[str, DevicePlugin] = {}
        self._pools = PoolsFile(pools=[])
        self._pools_stamp: tuple[int, int, int] | None = None
        self._members: dict[str, list[Vf]] = {}
        self._pool_of: dict[str, str] = {}
        self._advertised: dict[str, set[str]] = {}
        self._forget_vanished = False  # the admin changed pools or numVfs: start afresh
        # PCI -> who is changing it now: "op" (an ADD or DEL) or "heal" (the audit's lease).
        self._in_flight: dict[str, str] = {}
        self._num_vfs_pending = False  # a numVfs change waits for pods to release VFs
        self._verified = False  # no VF is given out before the first audit finished
        self._lock = threading.RLock()
        self._lease_over = threading.Condition(self._lock)  # a heal let go of a VF
        self._resizing: set[str] = set()  # PFs whose sriov_numvfs is being written
        self._stop = threading.Event()
        self._listeners: list[Callable[[], None]] = []
        self._watcher: threading.Thread | None = None

    # --- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Read the hardware and the pools; no VF is advertised until `audit_finished()`."""
        if self._pools_path is not None:
            self._pools = load_pools(self._pools_path)  # a broken file at start is fatal
            self._pools_stamp = _stamp(self._pools_path)
        self._inventory.subscribe(lambda _snapshot: self._reconcile("uevent"))
        self._inventory.start()
        self._apply_num_vfs()
        self._reconcile("start")
        self._watcher = threading.Thread(target=self._watch_pools, name="vf-pools", daemon=True)
        self._watcher.start()

    def audit_finished(self) -> None:
        """The audit has looked at every VF: from now on healthy VFs may be given out."""
        first = not self._verified
        self._verified = True
        if first:
            self._start_plugins()
        self._reconcile("audit")

    def stop(self) -> None:
        self._stop.set()
        self._inventory.stop()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        with self._lock:
            plugins, self._plugins = self._plugins, {}
        for plugin in plugins.values():
            plugin.stop()

    def on_pools_changed(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    # --- pools --------------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the pools file; a broken file keeps the pools in force. True when applied."""
        if self._pools_path is None:
            return False
        try:
            pools = load_pools(self._pools_path)
        except PlexusError as exc:
            log.error("vf_pools_invalid", path=str(self._pools_path), error=exc.msg)
            return False
        with self._lock:
            # The pools and their membership change together: a lookup in between would
            # find a VF's pool gone.
            self._pools = pools
            self._forget_vanished = True
            self._reconcile("reload")
        log.info("vf_pools_reloaded", path=str(self._pools_path), pools=len(pools.pools))
        self._apply_num_vfs()
        if self._verified:
            self._start_plugins()
        return True

    def _watch_pools(self) -> None:
        while not self._stop.wait(POOLS_CHECK_INTERVAL):
            if self._pools_path is not None:
                stamp = _stamp(self._pools_path)
                if stamp != self._pools_stamp:
                    self._pools_stamp = stamp
                    self.reload()
                    continue
            if self._num_vfs_pending:
                self._apply_num_vfs()  # pods may have released what held a change back

    def _apply_num_vfs(self) -> None:
        """Write each PF's numVfs where it differs, never under a VF a pod holds (the kernel
        goes through 0 VFs, which would pull it out of its pod). The check and taking the
        PF's VFs out of circulation happen under the agent's lock; the write itself (seconds
        on real hardware) does not hold it."""
        pending = changed = False
        for pf_pci, wanted in desired_num_vfs(self._inventory.snapshot, self._pools).items():
            outcome = self._resize(pf_pci, wanted)
            pending |= outcome == "later"
            changed |= outcome == "done"
        self._num_vfs_pending = pending
        if changed:
            self._inventory.refresh()

    def _resize(self, pf_pci: str, wanted: int) -> str:
        """ "done", "later" (pods hold VFs, or the kernel said busy), or "" (nothing to do or
        a lasting failure, logged)."""
        with self._lock:
            pf = self._inventory.snapshot.pfs.get(pf_pci)
            if pf is None or pf.num_vfs == wanted:
                return ""
            held = [vf.pci for vf in pf.vfs if self._ledger.get(vf.pci).state in HELD]
            held += self._granted_of(pf)
            if held:
                if not self._num_vfs_pending:
                    log.warning(
                        "num_vfs_deferred", pf=pf_pci, have=pf.num_vfs, want=wanted, in_use=held
                    )
                return "later"
            self._resizing.add(pf_pci)  # claim() refuses its VFs from now on...
            gone = {vf.pci for vf in pf.vfs}
            for pool, vfs in self._members.items():  # ...and nothing allocates them
                self._ledger.set_pool(pool, [v.pci for v in vfs if v.pci not in gone])
        try:
            self._sysfs.set_num_vfs(pf_pci, wanted)
        except PlexusError as exc:
            log.error("num_vfs_failed", pf=pf_pci, want=wanted, error=exc.msg)
            return "later" if isinstance(exc, TryAgainLater) else ""
        finally:
            with self._lock:
                self._resizing.discard(pf_pci)
                self._forget_vanished = True  # VFs we removed ourselves are not faults
            self._reconcile("num_vfs")
        log.info("num_vfs_set", pf=pf_pci, was=pf.num_vfs, now=wanted)
        return "done"

    def _granted_of(self, pf: Pf) -> list[str]:
        """The PF's VFs kubelet has given to pods; all of them when kubelet cannot say (a
        numVfs change waits rather than guess)."""
        if self._granted is None:
            return []
        try:
            granted = self._granted()
        except PlexusError as exc:
            log.warning("num_vfs_kubelet_unknown", pf=pf.pci, error=exc.msg)
            return [vf.pci for vf in pf.vfs]
        return [vf.pci for vf in pf.vfs if vf.pci in granted]

    def _start_plugins(self) -> None:
        if self._plugin_factory is None:
            return
        with self._lock:
            wanted = {spec.resource_name: spec for spec in self._pools.pools}
            gone = [name for name in self._plugins if name not in wanted]
            new = [spec for name, spec in wanted.items() if name not in self._plugins]
            stopped = [self._plugins.pop(name) for name in gone]
        for plugin in stopped:
            plugin.stop()
        for spec in new:
            name = spec.resource_name
            plugin = self._plugin_factory(spec, functools.partial(self.pool_devices, name))
            plugin.start()
            with self._lock:
                self._plugins[name] = plugin

    # --- membership and health ----------------------------------------------------------------

    def _reconcile(self, why: str) -> None:
        started = time.monotonic()
        with self._lock:
            snapshot = self._inventory.snapshot  # inside: a queued older one must not win
            self._members = assign(snapshot, self._pools)
            self._pool_of = {vf.pci: pool for pool, vfs in self._members.items() for vf in vfs}
            for pool, vfs in self._members.items():
                spec = self._spec(pool)
                givable = [vf.pci for vf in vfs if self._givable(snapshot, vf, spec.device_type)]
                self._ledger.set_pool(pool, givable)
                present = {vf.pci for vf in vfs}
                # A VF that was advertised and vanished stays listed, unhealthy, so kubelet
                # stops counting it at once and the admin sees it (until the pools or numVfs
                # change: then the admin removed it).
                kept = set() if self._forget_vanished else self._advertised.get(pool, set())
                self._advertised[pool] = kept | present
            for pool in [p for p in self._advertised if p not in self._members]:
                del self._advertised[pool]
                self._ledger.drop_pool(pool)
            self._forget_vanished = False
            plugins = list(self._plugins.values())
        for plugin in plugins:
            plugin.notify()
        for fn in self._listeners:
            fn()
        log.debug(
            "sriov_pools_updated",
            why=why,
            pools={p: len(v) for p, v in self._members.items()},
            took_ms=round((time.monotonic() - started) * 1000, 2),
        )

    def _spec(self, pool: str) -> PoolSpec:
        for spec in self._pools.pools:
            if spec.resource_name == pool:
                return spec
        raise DeviceNotFound(f"no VF pool named {pool} on this node")

    def _givable(self, snapshot: Snapshot, vf: Vf, device_type: DeviceType) -> bool:
        state = self._ledger.get(vf.pci).state
        pf = snapshot.pf_of(vf)
        return givable(vf, pf, state, device_type, verified=self._verified)

    def pool_devices(self, pool: str) -> list[VfView]:
        """The pool's VFs with real health, for its device plugin (a VF that vanished stays
        listed as unhealthy)."""
        snapshot = self._inventory.snapshot
        with self._lock:
            pcis = sorted(self._advertised.get(pool, set()))
            spec = self._spec(pool)
        return [self._view(snapshot, pci, pool, spec.device_type) for pci in pcis]

    def _view(self, snapshot: Snapshot, pci: str, pool: str | None, dtype: DeviceType) -> VfView:
        record = self._ledger.get(pci)
        return vf_view(snapshot, pci, record, pool, dtype, verified=self._verified)

    def vfs_view(self) -> list[VfView]:
        """Every VF of the node (in a pool or not), every VF a pool advertised, and every VF the
        ledger still remembers."""
        snapshot = self._inventory.snapshot
        with self._lock:
            # A VF that vanished stays listed under the pool that advertised it.
            pool_of = {pci: pool for pool, pcis in self._advertised.items() for pci in pcis}
            pool_of.update(self._pool_of)
            types = {s.resource_name: s.device_type for s in self._pools.pools}
        pcis = set(snapshot.vfs) | set(pool_of) | {r.pci for r in self._ledger.records()}
        views = []
        for pci in sorted(pcis):
            pool = pool_of.get(pci)
            views.append(self._view(snapshot, pci, pool, types.get(pool or "", "netdevice")))
        return views

    def pools_view(self) -> list[dict[str, Any]]:
        """One summary per pool, in file order, for `plexusctl pools`."""
        views = self.vfs_view()
        with self._lock:
            specs = list(self._pools.pools)
        return [pool_summary(spec, views) for spec in specs]

    @property
    def snapshot(self) -> Snapshot:
        return self._inventory.snapshot

    def refresh(self) -> Snapshot:
        """Re-read sysfs now (uevents do this on their own; for tests and `reload`)."""
        return self._inventory.refresh()

    def has_pool(self, resource_name: str) -> bool:
        with self._lock:
            return any(s.resource_name == resource_name for s in self._pools.pools)

    # --- allocation (local mode: no kubelet picks devices) ------------------------------------

    def allocate(self, resource_name: str, holder: Holder) -> str:
        if not self.has_pool(resource_name):
            raise DeviceNotFound(
                f"no VF pool {resource_name} on this node (pools: "
                f"{', '.join(s.resource_name for s in self._pools.pools) or 'none'}); check "
                "the NAD's k8s.v1.cni.cncf.io/resourceName and the vfPools file",
            )
        if not self._verified:
            raise DeviceUnavailable(
                f"pool {resource_name}: VFs are not verified yet (the start-up audit is running)"
            )
        with self._lock:
            record = self._ledger.reserve(resource_name, holder)
            self._in_flight[record.pci] = "op"
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
        with self._lock:  # the pool and its spec from one generation of the pools file
            pool = self._pool_of.get(pci)
            spec = self._pools.pool(pool) if pool else None
        device_type: DeviceType = (
            spec.device_type if spec else ("vfio-pci" if vf.is_vfio else "netdevice")
        )
        mtu = spec.mtu if spec else None
        return Placement(vf=vf, pf=pf, pool=pool, device_type=device_type, mtu=mtu)

    def claim(self, pci: str, holder: Holder) -> VfRecord:
        with self._lock:
            vf = self._inventory.snapshot.vf(pci)
            if vf is not None and vf.pf_pci in self._resizing:
                raise TryAgainLater(
                    f"VF {pci}: its PF {vf.pf_pci} is changing its number of VFs (numVfs)"
                )
            record = self._ledger.get(pci)
            if record.state == VfState.RESERVED and _same(record.holder, holder):
                self._in_flight[pci] = "op"
                return self._ledger.put(record.model_copy(update={"holder": holder}))
            if not self._verified:
                raise DeviceUnavailable(f"VF {pci} is not verified yet (start-up audit running)")
            record = self._ledger.transition(
                pci,
                expect={VfState.FREE},
                to=VfState.RESERVED,
                holder=holder,
                pool=self._pool_of.get(pci),
            )
            self._in_flight[pci] = "op"
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
                if self._in_flight.get(pci) != "heal":
                    return None  # the lease is gone
            elif not self._lease_over.wait_for(
                lambda: self._in_flight.get(pci) != "heal", timeout=HEAL_WAIT
            ):
                # The audit is on this VF (it may be putting it back itself): a DEL must not
                # report done while the VF may still sit in the pod. The runtime retries.
                raise TryAgainLater(f"VF {pci} is being audited; DEL again in a moment")
            record = self._ledger.get(pci)
            if record.state not in HELD or not _same(record.holder, holder):
                return None
            released = self._ledger.transition(pci, expect=set(HELD), to=VfState.RELEASING)
            self._in_flight[pci] = "heal" if healing else "op"
            return released

    def let_go(self, pci: str) -> None:
        """An ADD or DEL that failed half-way lets go of the VF: its record stays as it is
        (RELEASING: the audit or the runtime's retry finishes the job)."""
        self._done(pci)

    def lease(self, pci: str, seen: VfRecord) -> bool:
        """The audit's exclusive hold on a VF, granted only when no ADD or DEL is working on
        it and its record is still exactly what the audit read."""
        with self._lock:
            if pci in self._in_flight or self._ledger.get(pci) != seen:
                return False
            self._in_flight[pci] = "heal"
            return True

    def unlease(self, pci: str) -> None:
        with self._lock:
            if self._in_flight.get(pci) == "heal":
                del self._in_flight[pci]
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
            self._reconcile("unhealthy")

    def retry_unhealthy(self, pci: str) -> VfRecord | None:
        with self._lock:
            record = self._ledger.get(pci)
            if record.state != VfState.UNHEALTHY or self._in_flight.get(pci) != "heal":
                return None  # only under the audit's lease
            if record.holder is not None and (record.host or record.pf_applied):
                return self._ledger.transition(
                    pci, expect={VfState.UNHEALTHY}, to=VfState.RELEASING
                )
            vf = self._inventory.snapshot.vf(pci)
            pool = self._pool_of.get(pci)
            spec = self._pools.pool(pool) if pool else None
            dtype: DeviceType = spec.device_type if spec else "netdevice"
            if vf is None or misfit(vf, dtype) is not None:
                return None
            freed = self._ledger.transition(pci, expect={VfState.UNHEALTHY}, to=VfState.FREE)
        log.info("vf_recovered", pci=pci, was=record.reason)
        self._reconcile("recovered")
        return freed

    def held_by(self, container_id: str, ifname: str) -> VfRecord | None:
        return self._ledger.held_by(container_id, ifname)

    def records(self) -> list[VfRecord]:
        return self._ledger.records()

    def _done(self, pci: str) -> None:
        with self._lock:
            if self._in_flight.pop(pci, None) == "heal":
                self._lease_over.notify_all()


def _same(a: Holder | None, b: Holder) -> bool:
    return a is not None and a.same_attachment(b)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)
