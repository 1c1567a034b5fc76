"""Which VFs serve which pool, and whether each may be given out now; what kubelet and
`plexusctl` are told about them.

`Membership` holds the pools in force (from the node agent's `PoolsSource`), matches the
inventory's VFs to them on every change (`reconcile`), hands each pool's givable VFs to the
ledger's free index (present, bound to a driver that fits the pool's deviceType, on a PF with
link, not unhealthy, and verified by an audit: `sriov.health`), keeps a VF that vanished listed
as unhealthy until the admin changes the pools or numVfs, and runs one kubelet device plugin per
pool (cluster mode). It shares the node agent's lock with the VF state machine and numVfs, so a
claim sees membership and health from one moment.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from cnispec.errors import DeviceNotFound
from cnispec.vfpools import PoolsFile, PoolSpec
from sriov.health import VfView, givable, pool_summary, vf_view
from sriov.inventory import Inventory
from sriov.ledger import Ledger
from sriov.model import Snapshot, Vf
from sriov.owner import DeviceType
from sriov.pools import assign

log = structlog.get_logger(__name__)


class DevicePlugin(Protocol):
    """What membership needs of a kubelet device plugin (sriov.deviceplugin.PoolDevicePlugin)."""

    def start(self) -> None: ...

    def notify(self) -> None: ...

    def stop(self) -> None: ...


PluginFactory = Callable[[PoolSpec, Callable[[], list[VfView]]], DevicePlugin]


class Membership:
    def __init__(
        self,
        *,
        inventory: Inventory,
        ledger: Ledger,
        lock: threading.RLock,
        plugin_factory: PluginFactory | None = None,
    ) -> None:
        self._inventory = inventory
        self._ledger = ledger
        self._lock = lock
        self._plugin_factory = plugin_factory
        self._pools = PoolsFile(pools=[])
        self._members: dict[str, list[Vf]] = {}
        self._pool_of: dict[str, str] = {}
        self._advertised: dict[str, set[str]] = {}
        self._forget_vanished = False  # the admin changed pools or numVfs: start afresh
        self._verified = False  # no VF is given out before the first audit finished
        self._plugins: dict[str, DevicePlugin] = {}
        self._listeners: list[Callable[[], None]] = []

    # --- the pools in force -------------------------------------------------------------------

    @property
    def pools(self) -> PoolsFile:
        with self._lock:
            return self._pools

    def use(self, pools: PoolsFile, *, why: str, reconcile: bool = True) -> None:
        """Put `pools` in force; membership follows in the same breath (a lookup in between
        would find a VF's pool gone) unless the caller reconciles next itself."""
        with self._lock:
            self._pools = pools
            self._forget_vanished = True
            if reconcile:
                self.reconcile(why)

    def spec(self, pool: str) -> PoolSpec:
        with self._lock:
            found = self._pools.pool(pool)
            names = [s.resource_name for s in self._pools.pools]
        if found is None:
            raise DeviceNotFound(
                f"no VF pool {pool} on this node (pools: {', '.join(names) or 'none'}); check "
                "the NAD's k8s.v1.cni.cncf.io/resourceName and the vfPools file",
            )
        return found

    def pool_of(self, pci: str) -> tuple[str | None, PoolSpec | None]:
        """The VF's pool and its spec, from one generation of the pools."""
        with self._lock:
            pool = self._pool_of.get(pci)
            return pool, self._pools.pool(pool) if pool else None

    # --- verification -------------------------------------------------------------------------

    @property
    def verified(self) -> bool:
        return self._verified

    def verify(self) -> bool:
        """The audit has looked at every VF: healthy VFs may be given out. True the first time."""
        with self._lock:
            first = not self._verified
            self._verified = True
        return first

    # --- membership and health ----------------------------------------------------------------

    def forget_vanished(self) -> None:
        """VFs that go now were removed by the admin (numVfs): not faults to keep showing."""
        with self._lock:
            self._forget_vanished = True

    def withdraw(self, gone: set[str]) -> None:
        """Stop giving these VFs out at once (their PF is being resized). Caller holds the
        lock; the next `reconcile` recomputes everything."""
        for pool, vfs in self._members.items():
            self._ledger.set_pool(pool, [v.pci for v in vfs if v.pci not in gone])

    def reconcile(self, why: str) -> None:
        started = time.monotonic()
        with self._lock:
            snapshot = self._inventory.snapshot  # inside: a queued older one must not win
            self._members = assign(snapshot, self._pools)
            self._pool_of = {vf.pci: pool for pool, vfs in self._members.items() for vf in vfs}
            for pool, vfs in self._members.items():
                spec = self.spec(pool)
                free = [vf.pci for vf in vfs if self._givable(snapshot, vf, spec.device_type)]
                self._ledger.set_pool(pool, free)
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

    def on_change(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    def notify(self) -> None:
        """Tell the listeners of a change they show that no reconcile follows (numVfs
        problems)."""
        for fn in self._listeners:
            fn()

    def _givable(self, snapshot: Snapshot, vf: Vf, device_type: DeviceType) -> bool:
        state = self._ledger.get(vf.pci).state
        return givable(vf, snapshot.pf_of(vf), state, device_type, verified=self._verified)

    # --- views --------------------------------------------------------------------------------

    def pool_devices(self, pool: str) -> list[VfView]:
        """The pool's VFs with real health, for its device plugin (a VF that vanished stays
        listed as unhealthy)."""
        snapshot = self._inventory.snapshot
        with self._lock:
            pcis = sorted(self._advertised.get(pool, set()))
            spec = self.spec(pool)
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

    # --- device plugins (cluster mode) --------------------------------------------------------

    def start_plugins(self) -> None:
        """One device plugin per pool in force: new pools get one, gone pools lose theirs."""
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

    def stop_plugins(self) -> None:
        with self._lock:
            plugins, self._plugins = self._plugins, {}
        for plugin in plugins.values():
            plugin.stop()
