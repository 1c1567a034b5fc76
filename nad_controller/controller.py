"""One controller replica: informers (always), the Lease elector, and the reconcilers (VFPool
status; multicast membership) that work only while this replica leads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import structlog

from nad_controller.events import EventRecorder
from nad_controller.k8s import MCAST, NODE, ClusterApi, Informers
from nad_controller.leader import ElectionTiming, LeaseElector
from nad_controller.metrics import ControllerMetrics
from nad_controller.multicast import MembershipReconciler
from nad_controller.reconciler import Reconciler

log = structlog.get_logger(__name__)

LEASE_NAME: Final = "plexus-controller"
DEFAULT_NAMESPACE: Final = "plexus-system"


@dataclass(frozen=True)
class Settings:
    namespace: str = DEFAULT_NAMESPACE
    identity: str = "plexus-controller"
    lease_name: str = LEASE_NAME
    timing: ElectionTiming = field(default_factory=ElectionTiming)
    stale_after: float = 120.0
    debounce: float = 0.1
    resync: float = 30.0


class Controller:
    def __init__(self, api: ClusterApi, settings: Settings) -> None:
        self.settings = settings
        self.events = EventRecorder(api, settings.identity)
        self.informers = Informers(api, self._changed)
        self.reconciler = Reconciler(
            self.informers,
            api,
            self.events,
            stale_after=settings.stale_after,
            debounce=settings.debounce,
            resync=settings.resync,
        )
        self.multicast = MembershipReconciler(
            self.informers, api, debounce=settings.debounce, resync=settings.resync
        )
        self.elector = LeaseElector(
            api,
            settings.namespace,
            settings.lease_name,
            settings.identity,
            timing=settings.timing,
            on_started=self._started_leading,
            on_stopped=self._stopped_leading,
        )
        self.metrics = ControllerMetrics()
        self.metrics.watch(leader=lambda: self.is_leader, writes=lambda: self.reconciler.writes)
        self.reconciler.observe_pass = self.metrics.reconcile_seconds.observe
        self.metrics.watch_multicast(self.multicast)

    def _changed(self, kind: str, obj: object) -> None:
        changed = obj if isinstance(obj, dict) else None
        if kind != MCAST:  # the VFPool statuses read no multicast object
            self.reconciler.notify(kind, changed)
        if kind in (MCAST, NODE):
            self.multicast.notify(kind, changed)

    def _started_leading(self) -> None:
        self.reconciler.started_leading()
        self.multicast.started_leading()

    def _stopped_leading(self) -> None:
        self.reconciler.stopped_leading()
        self.multicast.stopped_leading()

    def start(self) -> None:
        log.info("controller_starting", identity=self.settings.identity,
                 lease=f"{self.settings.namespace}/{self.settings.lease_name}")  # fmt: skip
        self.informers.start()
        self.reconciler.start()
        self.multicast.start()
        self.elector.start()

    def stop(self, release: bool = True) -> None:
        """Clean shutdown: stop leading (and hand the Lease over), then stop watching."""
        self.elector.stop(release=release)
        self.reconciler.stop()
        self.multicast.stop()
        self.informers.stop()
        log.info("controller_stopped", identity=self.settings.identity)

    @property
    def is_leader(self) -> bool:
        return self.elector.is_leader
