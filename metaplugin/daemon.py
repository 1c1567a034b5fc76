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

import structlog

from delegates.chain import ChainRunner
from delegates.registry import PluginRegistry
from metaplugin import config as daemon_config
from metaplugin import install, logs
from metaplugin.config import DaemonConfig
from metaplugin.errors import PlexusError
from metaplugin.nad import LocalNadSource, NadSource
from metaplugin.orchestrator import Orchestrator, PodSource
from metaplugin.resolve import Resolver
from metaplugin.scheduler import Scheduler
from metaplugin.server import Api, SocketServer
from metaplugin.spool import SpoolReplayer
from metaplugin.status import NullSink, StatusSink
from metaplugin.store import AttachmentStore, StateLock

log = structlog.get_logger(__name__)


@dataclass
class Sources:
    nads: NadSource
    pods: PodSource | None
    sink: StatusSink
    synced: threading.Event
    stop: Callable[[], None] | None = None


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
    )


class Daemon:
    def __init__(self, cfg: DaemonConfig, *, registry: PluginRegistry | None = None) -> None:
        self.cfg = cfg
        self.registry = registry or PluginRegistry(timeout=cfg.delegate_timeout)
        self._stop = threading.Event()
        self._served = threading.Event()

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
        store = AttachmentStore(cfg.state_dir)
        resolver = Resolver(config=cfg, nads=sources.nads)
        orchestrator = Orchestrator(
            config=cfg,
            resolver=resolver,
            store=store,
            runner=ChainRunner(registry=self.registry),
            sink=sources.sink,
            pods=sources.pods,
            lock_container=scheduler.container_lock,
        )
        spool = SpoolReplayer(cfg.spool_path, orchestrator=orchestrator, scheduler=scheduler)
        left = spool.replay()
        log.info("spool_replayed", still_pending=left)
        api = Api(
            orchestrator=orchestrator,
            scheduler=scheduler,
            store=store,
            ready=lambda: sources.synced.is_set() and self._served.is_set(),
        )
        server = SocketServer(cfg.socket_path, api)
        server.start()
        spool.start_retries()
        if cfg.install:
            install.install_shim(cfg)
            threading.Thread(
                target=self._write_conf_when_ready,
                args=(resolver,),
                name="conf-writer",
                daemon=True,
            ).start()
        self._served.set()
        log.info("plexusd_serving", socket=cfg.socket_path, local=cfg.local, node=cfg.node_name)
        self._stop.wait()
        log.info("plexusd_stopping")
        server.stop()
        spool.stop()
        if sources.stop is not None:
            sources.stop()
        return 0

    def _write_conf_when_ready(self, resolver: Resolver) -> None:
        """Write the conflist only once the cluster network resolves and any readiness file
        exists (NPWG §6.1), so the runtime never sends pods to a Plexus that cannot serve them."""
        last_error = ""
        while not self._stop.is_set():
            try:
                resolver.cluster_network()
                indicator = self.cfg.readiness_indicator_file
                if indicator and not Path(indicator).exists():
                    raise PlexusError(f"waiting for readiness indicator file {indicator}")
            except PlexusError as exc:
                if exc.msg != last_error:
                    log.warning("conf_not_written_yet", reason=exc.msg)
                    last_error = exc.msg
                self._stop.wait(1.0)
                continue
            if install.write_conf(self.cfg):
                log.info("conf_written", path=self.cfg.conf_file)
            self._stop.wait(5.0)  # keep it in place (an admin may have removed it)

    def stop(self) -> None:
        self._stop.set()


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
        help=f"remove {daemon_config.CONF_FILE_NAME} (pods stop using Plexus), then exit",
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
