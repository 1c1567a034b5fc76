"""Keeps the node's fabric (delegates.fabric) in step with the set of nodes: from the daemon
config in local mode, from the API's Node objects in cluster mode. Reconciles when the set
changes and, to heal drift (an admin's `ip route flush`), every minute regardless."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from delegates.fabric import Fabric, FabricConfig, Peer
from metaplugin.config import DaemonConfig
from metaplugin.errors import PlexusError

log = structlog.get_logger(__name__)
RESYNC_EVERY = 60.0


def fabric_from_config(cfg: DaemonConfig, pod_cidrs: list[str]) -> Fabric | None:
    if cfg.fabric is None:
        return None
    settings = cfg.fabric
    return Fabric(
        FabricConfig(
            mode=settings.mode,
            node_name=cfg.node_name,
            pod_cidrs=tuple(pod_cidrs or settings.pod_cidrs),
            interface=settings.interface,
            address=settings.address,
            vni=settings.vni,
            port=settings.port,
        )
    )


def config_peers(cfg: DaemonConfig) -> list[Peer]:
    nodes = cfg.fabric.nodes if cfg.fabric else []
    return [Peer(n.name, tuple(n.addresses), tuple(n.pod_cidrs)) for n in nodes]


class FabricSync:
    def __init__(
        self, fabric: Fabric, peers: Callable[[], list[Peer]], *, interval: float = 2.0
    ) -> None:
        self._fabric = fabric
        self._peers = peers
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fabric-sync", daemon=True)

    def sync_once(self) -> None:
        self._fabric.reconcile(self._peers())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        last: list[Peer] | None = None
        last_full = 0.0
        while not self._stop.wait(self._interval):
            try:
                peers = sorted(self._peers(), key=lambda p: p.name)
                if peers != last or time.monotonic() - last_full > RESYNC_EVERY:
                    self._fabric.reconcile(peers)
                    last, last_full = peers, time.monotonic()
                    log.info("fabric_reconciled", peers=[p.name for p in peers])
            except PlexusError as exc:
                log.warning("fabric_reconcile_failed", error=exc.msg)
            except Exception:  # the loop must survive anything; the next pass retries
                log.exception("fabric_reconcile_crashed")
