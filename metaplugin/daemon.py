"""plexusd: the node daemon. Wires the pieces together and runs them.

Start-up order matters: take the state-dir lock (one daemon per node), replay spooled DELs
before serving anything, serve the socket, install the shim, and write the conflist once the
cluster network is ready. Local mode (`--local DIR`) needs no cluster at all.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from cnispec import cni, logs
from cnispec.cni import CniRequest
from cnispec.errors import PlexusError
from cnispec.httpserve import MetricsServer
from cnispec.netconf import NetworkConfigList
from delegates.builtins import builtin_plugins
from delegates.chain import ChainRunner
from delegates.external import ChildTracker, RawExec
from delegates.fabric import Fabric, Peer
from delegates.fabric_mcast import FabricMulticast
from delegates.fabric_mcast import clear as clear_replication
from delegates.overlay import TYPE as OVERLAY_TYPE
from delegates.overlay import Overlay, nad_networks
from delegates.registry import PluginRegistry
from kernel.mcast_reports import ReportWatch
from metaplugin import config as daemon_config
from metaplugin import install
from metaplugin.config import DaemonConfig
from metaplugin.fabric_sync import FabricSync, config_peers, fabric_from_config
from metaplugin.gc import Collector
from metaplugin.mcast_members import FABRIC, LocalMembership, Port, ports_of
from metaplugin.metrics import DaemonMetrics, LiveSources
from metaplugin.nad_source import LocalNadSource, NadSource
from metaplugin.orchestrator import Orchestrator, PodSource
from metaplugin.policy_engine import PolicyEngine
from metaplugin.resolve import Resolver
from metaplugin.scheduler import Scheduler
from metaplugin.server import Api, request_timeout_for
from metaplugin.spool import SpoolReplayer
from metaplugin.status import NullSink, StatusSink
from metaplugin.store import AttachmentStore, StateLock
from metaplugin.transport import SocketServer
from sriov.node import SriovNode, SriovSettings

if TYPE_CHECKING:
    from metaplugin.k8s_pools import NodePools
    from metaplugin.mcast_sync import MembershipSource, MembershipSync

log = structlog.get_logger(__name__)
CONF_CHECK_INTERVAL = 2.0  # how soon a removed conf comes back, or an uninstall is honoured
FIRST_POD_CIDRS_WAIT = 30.0  # how long start-up waits for this node's podCIDRs from the API


@dataclass
class Sources:
    nads: NadSource
    pods: PodSource | None
    sink: StatusSink
    synced: threading.Event
    stop: Callable[[], None] | None = None
    # The fabric's nodes and this node's pod subnets, from the API; None while unknown.
    peers: Callable[[], list[Peer] | None] | None = None
    own_pod_cidrs: Callable[[float], list[str] | None] | None = None
    api: Any = None  # cluster mode: the kubernetes ApiClient (VFPools, VFPoolNodeState)


def local_sources(cfg: DaemonConfig) -> Sources:
    assert cfg.local_dir is not None
    synced = threading.Event()
    synced.set()
    return Sources(nads=LocalNadSource(cfg.local_dir), pods=None, sink=NullSink(), synced=synced)


def cluster_sources(cfg: DaemonConfig) -> Sources:
    # The kubernetes client costs ~250 ms to import: only cluster mode pays for it.
    from metaplugin.k8s import Cluster

    cluster = Cluster.connect(cfg)
    return Sources(
        nads=cluster.nads,
        pods=cluster.pods,
        sink=cluster.sink,
        synced=cluster.synced,
        stop=cluster.stop,
        peers=cluster.peers if cfg.fabric is not None else None,
        own_pod_cidrs=cluster.own_pod_cidrs,
        api=cluster.api,
    )


def sriov_settings(cfg: DaemonConfig) -> SriovSettings:
    file = cfg.vf_pools if cfg.pools_from == "file" else None
    return SriovSettings(
        vf_pools=Path(file) if file else None,
        sysfs_root=Path(cfg.sysfs_root),
        state_dir=Path(cfg.state_dir) / "sriov",
        audit_interval=cfg.vf_audit_interval,
        kubelet=not cfg.local,
        device_plugin_dir=Path(cfg.device_plugin_dir),
        pod_resources_socket=Path(cfg.pod_resources_socket),
    )


@dataclass
class Parts:
    store: AttachmentStore
    resolver: Resolver
    orchestrator: Orchestrator
    collector: Collector
    policy: PolicyEngine | None = None
    membership: LocalMembership | None = None

    def handle(self, req: CniRequest) -> dict[str, Any] | None:
        if req.command == cni.GC:
            self.collector.gc(req)
            return None
        return self.orchestrator.handle(req)


class Daemon:
    def __init__(self, cfg: DaemonConfig, *, registry: PluginRegistry | None = None) -> None:
        self.cfg = cfg
        self._registry = registry
        self._stop = threading.Event()
        self._served = threading.Event()
        self._node_pools: NodePools | None = None
        self._fabric_multicast: FabricMulticast | None = None
        self._mcast_sync: MembershipSync | None = None  # cluster mode: `_membership_sync`

    def run(self) -> int:
        lock = StateLock(self.cfg.state_dir)
        lock.acquire()
        try:
            return self._run()
        finally:
            lock.release()

    def _run(self) -> int:
        cfg = self.cfg
        sources = local_sources(cfg) if cfg.local else cluster_sources(cfg)
        scheduler = Scheduler(max_concurrent=cfg.max_concurrent, max_queue=cfg.max_queue)
        fabric, fabric_sync = self._fabric(sources)
        sriov = self._sriov(sources)
        metrics = DaemonMetrics()
        delegates = self._delegates(fabric, sriov, sources.nads)
        parts = self._assemble(sources, scheduler, delegates, sriov, metrics)
        spool = SpoolReplayer(cfg.spool_path, orchestrator=parts.orchestrator, scheduler=scheduler)
        live = _live_sources(scheduler, spool, parts.collector, sriov, fabric_sync)
        live.policy = parts.policy.readout if parts.policy is not None else None
        metrics.watch(live)
        log.info("spool_replayed", still_pending=spool.replay())  # before serving anything
        if sriov is not None:
            sriov.heal_and_open()  # after the spooled DELs put their VFs back themselves
        if parts.policy is not None:
            self._start_policy(parts.policy, sources)
        self._start_multicast(parts, fabric)
        self._mcast_sync = self._membership_sync(sources, fabric, delegates, parts.membership)
        api = Api(
            handle=parts.handle,
            orchestrator=parts.orchestrator,
            scheduler=scheduler,
            store=parts.store,
            ready=lambda: sources.synced.is_set() and self._served.is_set(),
            sriov=sriov,
            request_timeout=request_timeout_for(cfg.shim_timeout),
            metrics=metrics,
            policy=parts.policy,
            fabric_multicast=self._fabric_multicast,
            overlay_listed=self._mcast_sync is not None,
        )
        server = SocketServer(cfg.socket_path, api)
        server.start()
        scrape = MetricsServer(cfg.metrics_address, metrics.render) if cfg.metrics_address else None
        if scrape is not None:
            scrape.start()
        spool.start_retries()
        if cfg.install:
            install.install_shim(cfg)
            install.clear_uninstalled(cfg)  # a daemon that starts is an installed one
            threading.Thread(
                target=self._write_conf_when_ready,
                args=(parts.resolver,),
                name="conf-writer",
                daemon=True,
            ).start()
        self._served.set()
        log.info("plexusd_serving", socket=cfg.socket_path, local=cfg.local, node=cfg.node_name)
        self._stop.wait()
        log.info("plexusd_stopping")
        server.stop()
        if scrape is not None:
            scrape.stop()
        spool.stop()
        if fabric_sync is not None:
            fabric_sync.stop()
        if self._node_pools is not None:
            self._node_pools.stop()
        if sriov is not None:
            sriov.stop()
        if parts.policy is not None:
            parts.policy.stop()
        self._stop_multicast(parts)
        if sources.stop is not None:
            sources.stop()
        return 0

    def _sriov(self, sources: Sources) -> SriovNode | None:
        cfg = self.cfg
        if cfg.pools_from is None:
            return None
        if cfg.local:
            sriov = SriovNode(sriov_settings(cfg))
            sriov.start_agent()
            return sriov
        # Cluster mode: pools from the VFPools (or the file), and this node's VFPoolNodeState.
        from metaplugin.k8s_pools import NodePools

        if cfg.pools_from == "file":
            log.info("vf_pools_from_file", file=cfg.vf_pools, vfpools_ignored=True)
        pools = self._node_pools = NodePools(
            sources.api,
            cfg.node_name,
            from_vfpools=cfg.pools_from == "vfpools",
            cache=Path(cfg.state_dir) / "sriov" / "vfpools.json",
        )
        sriov = SriovNode(sriov_settings(cfg), pools=pools.pools_source)
        sriov.start_agent()
        pools.attach(sriov.agent)
        return sriov

    def _delegates(
        self, fabric: Fabric | None, sriov: SriovNode | None, nads: NadSource | None = None
    ) -> PluginRegistry:
        if self._registry is not None:
            return self._registry
        tracker = ChildTracker(Path(self.cfg.state_dir) / "running")
        killed = tracker.kill_orphans()  # an ADD left running by a crash must not finish later
        if killed:
            log.warning("orphaned_delegates_killed", pids=killed)
        exec_ = RawExec(tracker=tracker)
        builtins = builtin_plugins(
            exec_=exec_,
            timeout=self.cfg.delegate_timeout,
            ipam_data_dir=self.cfg.host_local_data_dir,
            ipam_paths=self.cfg.ipam_paths(),
            fabric=fabric,
            vf_owner=sriov.agent.vfs if sriov is not None else None,
            overlay_networks=(lambda: nad_networks(nads.all(), self.cfg.cni_conf_dir))
            if nads is not None
            else None,
        )
        return PluginRegistry(builtins=builtins, exec_=exec_, timeout=self.cfg.delegate_timeout)

    def _fabric(self, sources: Sources) -> tuple[Fabric | None, FabricSync | None]:
        if self.cfg.fabric is None:
            return None, None
        own_pod_cidrs = sources.own_pod_cidrs
        # At start, give the API a moment for this node's podCIDRs; the sync loop takes them
        # (or a change of them) whenever they arrive after.
        initial = own_pod_cidrs(FIRST_POD_CIDRS_WAIT) if own_pod_cidrs else None
        fabric = fabric_from_config(self.cfg, initial or [])
        fabric.setup()
        sync = FabricSync(
            fabric,
            sources.peers or (lambda: config_peers(self.cfg)),
            own_pod_cidrs=(lambda: own_pod_cidrs(0.0)) if own_pod_cidrs else None,
        )
        sync.sync_once()  # never fatal: what failed is logged and retried by the loop
        sync.start()
        return fabric, sync

    # --- multicast membership across nodes (issue 13, cluster mode) -------------------------

    def _membership_sync(
        self,
        sources: Sources,
        fabric: Fabric | None,
        registry: PluginRegistry,
        membership: MembershipSource | None,
    ) -> MembershipSync | None:
        """Cluster mode with a fabric: this node's multicast groups (`membership`) go to its
        MulticastNodeState, and the controller's replication lists come back to the
        replicators: the overlay segments' (`overlay/<vni>`) and, with `fabric.multicast`,
        the routed primary's (`fabric`) (metaplugin.mcast_sync). After `_start_multicast`,
        which makes the routed primary's replicator."""
        if self.cfg.local or fabric is None or sources.api is None or membership is None:
            return None
        from cnispec.mcast_api import OVERLAY_PREFIX
        from kernel.netlink import family_of
        from metaplugin.mcast_sync import MembershipSync, overlay_programmed, overlay_replicators

        sync = MembershipSync(
            sources.api,
            self.cfg.node_name,
            membership,
            peers=lambda: fabric.peers,
            family=lambda: family_of(fabric.underlay()[1]),
        )
        if OVERLAY_TYPE in registry.builtin_types:
            overlay = registry.resolve(OVERLAY_TYPE, ())
            if isinstance(overlay, Overlay):
                overlay.follow_controller()
                sync.register(
                    OVERLAY_PREFIX, overlay_replicators(overlay), programmed=overlay_programmed
                )
        if (fm := self._fabric_multicast) is not None:
            sync.register(
                FABRIC,
                lambda d: fm if d == FABRIC else None,
                programmed=lambda: {FABRIC: {g: tuple(a) for g, a in fm.replication().items()}},
            )
        fabric.watch_peers(lambda _peers: sync.resync_now())
        sync.start()
        return sync

    def _stop_multicast(self, parts: Parts) -> None:
        if self._mcast_sync is not None:
            self._mcast_sync.stop()
        if parts.membership is not None:
            parts.membership.stop()

    # ------------------------------------------------------------------------------------------

    def _assemble(
        self,
        sources: Sources,
        scheduler: Scheduler,
        registry: PluginRegistry,
        sriov: SriovNode | None = None,
        metrics: DaemonMetrics | None = None,
    ) -> Parts:
        store = AttachmentStore(self.cfg.state_dir)
        policy = self._policy_engine(store, metrics)
        membership = self._membership(store)
        resolver = Resolver(config=self.cfg, nads=sources.nads)
        observe = metrics.delegate_observer(registry.builtin_types) if metrics else None
        runner = ChainRunner(registry=registry, observe=observe)
        orchestrator = Orchestrator(
            config=self.cfg,
            resolver=resolver,
            store=store,
            runner=runner,
            sink=sources.sink,
            pods=sources.pods,
            devices=sriov.devices if sriov is not None else None,
            policy=policy,
            pods_changed=membership.refresh if membership is not None else None,
        )
        collector = Collector(
            orchestrator=orchestrator,
            store=store,
            resolver=resolver,
            runner=runner,
            lock_container=scheduler.container,
            exclusive=scheduler.exclusive,
        )
        return Parts(store, resolver, orchestrator, collector, policy, membership)

    def _membership(self, store: AttachmentStore) -> LocalMembership | None:
        """Multicast membership of this node's pods, where someone uses it: the routed primary's
        multicast, and in cluster mode the controller (overlay segments too). Local mode without
        `fabric.multicast` has no reader (each overlay bridge snoops for itself), so no reads
        of the store and the pods' netns after every ADD and DEL."""
        fabric = self.cfg.fabric
        if fabric is None or not (fabric.multicast or not self.cfg.local):
            return None
        multicast = fabric.multicast

        def ports() -> list[Port]:
            records = [r for c in store.all() for r in c.records]
            return ports_of(records, fabric_multicast=multicast)

        return LocalMembership(ports, watch=ReportWatch)

    def _start_multicast(self, parts: Parts, fabric: Fabric | None) -> None:
        if fabric is not None and fabric.multicast_device() is None:
            self._clear_replication(parts.store)
        membership = parts.membership
        if membership is None:
            return
        if fabric is not None and fabric.multicast_device() is not None:
            replicator = FabricMulticast(fabric, listed=not self.cfg.local)
            membership.subscribe(
                lambda _: replicator.set_local(membership.members(FABRIC), membership.ports(FABRIC))
            )
            self._fabric_multicast = replicator
            # After each fabric pass (a multicast device made again has a new index)
            fabric.watch_peers(lambda _peers: replicator.reconcile())
        membership.start()

    @staticmethod
    def _clear_replication(store: AttachmentStore) -> None:
        """`fabric.multicast` is off: a previous run's replication filters on the routed pods'
        veths go with it."""
        records = [r for c in store.all() for r in c.records]
        hosts = [p.host for p in ports_of(records, fabric_multicast=True) if p.domain == FABRIC]
        try:
            cleared = clear_replication(hosts)
        except PlexusError as exc:
            log.warning("fabric_multicast_clear_failed", error=exc.msg)
            return
        if cleared:
            log.info("fabric_multicast_cleared", veths=cleared)

    def _start_policy(self, engine: PolicyEngine, sources: Sources) -> None:
        """Open the policy source and start the engine: every local pod's table, once the
        source has synced. NOTE: after the spool replay and the VF audit: the source's imports
        (gRPC for the CRI) and watches took ~200 ms, and a VFPoolNodeState was published
        before the audit had verified its VFs."""
        from metaplugin.policy_source import open_policy_source

        engine.start(open_policy_source(self.cfg, sources.api))

    def _policy_engine(
        self, store: AttachmentStore, metrics: DaemonMetrics | None
    ) -> PolicyEngine | None:
        if not self.cfg.policy_enforcement:
            log.info("policy_enforcement_off")
            return None
        return PolicyEngine(  # its source is opened at start (`_start_policy`)
            store=store,
            observe_apply=metrics.policy_apply_seconds.observe if metrics else None,
        )

    def _write_conf_when_ready(self, resolver: Resolver) -> None:
        """Write the conflist only once the cluster network resolves and any readiness file
        exists (NPWG §6.1), so the runtime never sends pods to a Plexus that cannot serve them;
        keep it in place, unless `plexusd --uninstall` said Plexus is being removed."""
        last = ""
        while not self._stop.is_set():
            try:
                capabilities = self._cluster_capabilities(resolver)
            except PlexusError as exc:
                if exc.msg != last:
                    log.warning("conf_not_written_yet", reason=exc.msg)
                    last = exc.msg
                self._stop.wait(1.0)
                continue
            if install.uninstalled(self.cfg):
                if install.remove_conf(self.cfg):
                    log.info("conf_removed_uninstalled", path=self.cfg.conf_file)
            elif install.write_conf(self.cfg, capabilities):
                log.info("conf_written", path=self.cfg.conf_file)
            self._stop.wait(CONF_CHECK_INTERVAL)

    def _cluster_capabilities(self, resolver: Resolver) -> frozenset[str]:
        net = resolver.cluster_network()
        indicator = self.cfg.readiness_indicator_file
        if indicator and not Path(indicator).exists():
            raise PlexusError(f"waiting for readiness indicator file {indicator}")
        # Whatever the primary can take from the runtime, Plexus must ask for too (as Multus's
        # generated config does), or it would never reach it.
        return NetworkConfigList.parse(net.config).declared_capabilities()

    def stop(self) -> None:
        self._stop.set()


def _live_sources(
    scheduler: Scheduler,
    spool: SpoolReplayer,
    collector: Collector,
    sriov: SriovNode | None,
    fabric_sync: FabricSync | None,
) -> LiveSources:
    """What a scrape reads from the running daemon (the live objects, never copies)."""
    stats = collector.stats
    return LiveSources(
        admitted=lambda: scheduler.admitted,
        spool_depth=lambda: len(spool.pending()),
        spool_replays=lambda: spool.replayed,
        gc_stats=lambda: {
            "runs": stats.runs,
            "stale_containers": stats.stale_containers,
            "container_failures": stats.container_failures,
            "network_failures": stats.network_failures,
        },
        vf_pools=sriov.pools if sriov is not None else None,
        vf_healed=(lambda: dict(sriov.healed)) if sriov is not None else None,
        fabric_peers=(lambda: fabric_sync.peer_count) if fabric_sync is not None else None,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="plexusd",
        description="Plexus node daemon: serves the plexus CNI shim on a unix socket.",
        epilog=daemon_config.keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    daemon_config.add_arguments(parser)
    parser.add_argument(
        "--uninstall",
        action="store_true",
        help=f"remove {daemon_config.CONF_FILE_NAME} and tell a running plexusd not to write it "
        "again (new pods stop using Plexus; running pods can still be deleted), then exit",
    )
    ns = parser.parse_args(argv)
    try:
        cfg = daemon_config.from_args(ns)
    except PlexusError as exc:
        print(f"plexusd: {exc.msg}", file=sys.stderr)
        return 2
    logs.configure(cfg.log_level, cfg.log_format)
    if ns.uninstall:
        install.uninstall(cfg)
        return 0
    daemon = Daemon(cfg)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stop())
    try:
        return daemon.run()
    except PlexusError as exc:
        log.error("plexusd_failed", error=exc.msg)
        return 1


if __name__ == "__main__":
    sys.exit(main())
