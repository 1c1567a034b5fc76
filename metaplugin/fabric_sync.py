"""Keeps the node's fabric (delegates.fabric) in step with the set of nodes: from the daemon
config in local mode, from the API's Node objects in cluster mode. Reconciles when the set (or
this node's pod subnets) changes and, to heal drift (an admin's `ip route flush`), every minute
regardless. While the API has not listed the nodes yet nothing is reconciled: an unknown set of
peers must not read as "every peer is gone"."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from cnispec.errors import InvalidConfig, PlexusError
from delegates.fabric import Fabric, FabricConfig, Peer
from metaplugin.config import DaemonConfig

log = structlog.get_logger(__name__)
RESYNC_EVERY = 60.0


def fabric_from_config(cfg: DaemonConfig, pod_cidrs: list[str]) -> Fabric:
    """The fabric of `cfg` (which must have one), with `pod_cidrs` from the API when known."""
    if cfg.fabric is None:
        raise InvalidConfig("the daemon config has no 'fabric' section")
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
            multicast=settings.multicast,
            multicast_vni=settings.multicast_vni,
        )
    )


def config_peers(cfg: DaemonConfig) -> list[Peer]:
    nodes = cfg.fabric.nodes if cfg.fabric else []
    return [Peer(n.name, tuple(n.addresses), tuple(n.pod_cidrs)) for n in nodes]


class FabricSync:
    def __init__(
        self,
        fabric: Fabric,
        peers: Callable[[], list[Peer] | None],
        *,
        own_pod_cidrs: Callable[[], list[str] | None] | None = None,
        interval: float = 2.0,
    ) -> None:
        self._fabric = fabric
        self._peers = peers
        self._own_pod_cidrs = own_pod_cidrs
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fabric-sync", daemon=True)
        self._last: list[Peer] | None = None
        self._last_full = 0.0

    def sync_once(self) -> None:
        """One pass: reconcile if anything changed or a resync is due. Never raises: a failed
        pass is logged, and the next one retries."""
        try:
            self._pass()
        except PlexusError as exc:
            log.warning("fabric_reconcile_failed", error=exc.msg)
        except Exception:  # the loop must survive anything; the next pass retries
            log.exception("fabric_reconcile_crashed")

    @property
    def peer_count(self) -> int | None:
        """Peers of the last pass (None before the first one): for /metrics."""
        last = self._last
        return None if last is None else len(last)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _pass(self) -> None:
        changed = False
        if self._own_pod_cidrs is not None:
            cidrs = self._own_pod_cidrs()
            if cidrs is not None:
                changed = self._fabric.set_pod_cidrs(tuple(cidrs))
        peers = self._peers()
        if peers is None:
            log.debug("fabric_peers_unknown")
            return
        peers = sorted(peers, key=lambda p: p.name)
        due = time.monotonic() - self._last_full > RESYNC_EVERY
        if not (changed or due or peers != self._last):
            return
        # Only a clean pass counts as done; one with problems runs again at the next resync.
        problems = self._fabric.reconcile(peers)
        self._last, self._last_full = peers, time.monotonic()
        if problems:
            log.warning("fabric_reconciled_with_problems", problems=problems)
        else:
            log.info("fabric_reconciled", peers=[p.name for p in peers])

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sync_once()
