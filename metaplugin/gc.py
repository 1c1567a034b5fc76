"""CNI GC (spec 1.1): remove every recorded attachment the runtime no longer knows, on every
network, then let each network's plugins collect their own leftovers.

Multus only GCs the cluster network and uses its own idea of what is valid; here the runtime's
`cni.dev/valid-attachments` decides, every network Plexus knows is collected (those in records,
the cluster and default networks, and every NAD, since a network whose last attachment failed
has no record left), and the delegate phase runs exclusively so no ADD can allocate an address
that GC does not yet list as valid.

Networks are keyed by what the pod asked for, the NAD's `namespace/name` (or the cluster and
default networks' own reference), never by the config's `name`: a NAD of another namespace
whose config says the same `name` is another network, so it cannot turn GC off for this one
(`disableGC` is each NAD's own) or have its config run in this one's place. Each network's
plugins are told every live attachment of *any* network with that config `name`, though: a
plugin keeps its state under the config name (host-local's leases are `<dataDir>/<name>`), so
two such networks may share it, and a GC told of fewer attachments would release the other's.
Telling a plugin of too many only keeps too much.

One stuck container or one broken network never fails the collection. A container the runtime
no longer knows gets the last DEL (what cannot be deleted is given up: `Orchestrator._abandon`);
a container whose records cannot be read, a network whose config no longer prepares, or whose
plugin's GC fails, is logged (`gc_container_failed`, `gc_network_failed`) and counted
(`GcStats`), and the others are still collected. (Only while some container's records cannot be
read at all do the plugins not collect: they would not be told of its attachments.) GC answers
an error only for a request it cannot act on (no valid-attachments list: code 7), so it never
answers one error for ever and masks everything after it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import structlog

from cnispec import cni
from cnispec.cni import CniRequest
from cnispec.errors import InvalidConfig, PlexusError
from cnispec.netconf import NetworkConfigList, PreparedNetwork
from delegates.chain import ChainRunner
from metaplugin.orchestrator import Orchestrator
from metaplugin.resolve import Resolver
from metaplugin.store import Attachment, AttachmentStore

log = structlog.get_logger(__name__)

GC_WHY = "GC (the runtime no longer knows the container)"


@dataclass
class _Network:
    """One network to collect: as a record prepared it or a config to prepare, and where its
    plugins are looked up."""

    net: PreparedNetwork | dict[str, Any]
    path: tuple[str, ...] = ()

    @property
    def config_name(self) -> str:
        return self.net.name if isinstance(self.net, PreparedNetwork) else str(self.net.get("name"))


# network key ("namespace/name" of a NAD, the cluster/default network's reference) -> network
Networks = dict[str, _Network]


@dataclass
class GcStats:
    """Counts since the daemon started (for /metrics): collections, stale containers torn
    down, and the failures a GC logged instead of answering them."""

    runs: int = 0
    stale_containers: int = 0
    container_failures: int = 0
    network_failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)


class Collector:
    def __init__(
        self,
        *,
        orchestrator: Orchestrator,
        store: AttachmentStore,
        resolver: Resolver,
        runner: ChainRunner,
        lock_container: Callable[[str], AbstractContextManager[None]],
        exclusive: Callable[[], AbstractContextManager[None]],
    ) -> None:
        self._orchestrator = orchestrator
        self._store = store
        self._resolver = resolver
        self._runner = runner
        self._lock_container = lock_container
        self._exclusive = exclusive
        self.stats = GcStats()

    def gc(self, req: CniRequest) -> None:
        valid = valid_attachments(req.config)
        recorded: Networks = {}
        stale, container_failures = self._remove_stale(valid, recorded)
        # No ADD or DEL while plugins learn what is valid. NOTE: the NADs are resolved in there
        # too, one at a time: resolving them all first, outside, held every config at once
        # (+31 MiB at 10,000 NADs) to shorten the exclusive part by a third.
        with self._exclusive():
            collected, network_failures = self._collect(recorded, req.path)
        self.stats.add(
            runs=1,
            stale_containers=stale,
            container_failures=container_failures,
            network_failures=network_failures,
        )
        log.info(
            "gc_done",
            stale_containers=stale,
            networks=collected,
            container_failures=container_failures,
            network_failures=network_failures,
        )

    def _remove_stale(self, valid: set[tuple[str, str]], networks: Networks) -> tuple[int, int]:
        """Tear down every container the runtime no longer lists; (torn down, failed)."""
        stale = failed = 0
        for container_id in self._store.container_ids():
            try:
                with self._lock_container(container_id):
                    loaded = self._store.load(container_id)
                    for record in loaded.records:
                        networks.setdefault(
                            record.network, _Network(record.prepared, record.cni_path)
                        )
                    if not loaded:
                        if container_id not in {cid for cid, _ in valid}:
                            # A crash between making its directory and writing its first
                            # record: nothing to tear down, but the directory must go.
                            self._store.remove_container(container_id)
                        continue
                    if (container_id, loaded.runtime_ifname) in valid:
                        continue
                    log.info("gc_stale_container", stale_container=container_id)
                    stale += 1
                    # The runtime says it is gone: no DEL will come for it, so this is its last.
                    self._orchestrator.teardown(loaded, loaded.netns, last_chance=GC_WHY)
            except Exception as exc:  # noqa: BLE001 - one container never fails the collection
                failed += 1
                log.warning("gc_container_failed", container_id=container_id, error=_msg(exc))
        return stale, failed

    def _networks(self, recorded: Networks, failures: list[str]) -> Iterator[tuple[str, _Network]]:
        """Every network to collect, one at a time (10,000 NADs resolved at once held 30 MB):
        each one Plexus can resolve now, in its current config (over a record's), then those
        only records name. When the networks cannot be listed at all, the recorded ones are
        still collected (and `failures` says why)."""
        listed: set[str] = set()
        try:
            for net in self._resolver.known_networks():
                listed.add(net.network)
                yield net.network, _Network(net.config)
        except Exception as exc:  # noqa: BLE001 - the recorded networks are still collected
            log.warning("gc_networks_not_listed", error=_msg(exc))
            failures.append(_msg(exc))
        for key, network in recorded.items():
            if key not in listed:
                yield key, network

    def _collect(self, recorded: Networks, request_path: tuple[str, ...]) -> tuple[int, int]:
        """Each network's GC, told which of its attachments are valid; (collected, failed)."""
        remaining = self._remaining()
        if remaining is None:
            return 0, 0
        # config name -> its live attachments: every network sharing its plugins' state is told
        # of them all (one pass over the records, not one per network)
        by_name: dict[str, list[dict[str, str]]] = {}
        for r in remaining:
            by_name.setdefault(r.prepared.name, []).append(
                {"containerID": r.container_id, "ifname": r.ifname}
            )
        collected, failures = 0, list[str]()
        for key, network in self._networks(recorded, failures):
            collected += 1
            still_valid = by_name.get(network.config_name, [])
            search = self._orchestrator.path(network.path + request_path)
            try:
                prepared = (
                    network.net
                    if isinstance(network.net, PreparedNetwork)
                    else self._prepare(network.net, search)
                )
                self._runner.gc(prepared, still_valid, search)
            except Exception as exc:  # noqa: BLE001 - one broken network never fails them all
                failures.append(key)
                log.warning("gc_network_failed", network=key, error=_msg(exc))
        return collected, len(failures)

    def _remaining(self) -> list[Attachment] | None:
        """Every recorded attachment; None when a container's records cannot be read (an I/O
        error, a newer plexusd's record). Its attachments may be on any network, and a plugin
        not told of them would release what they hold: no plugin collects this time (the
        stale containers are still torn down), and the log says which container is why."""
        remaining: list[Attachment] = []
        for container_id in self._store.container_ids():
            try:
                remaining += self._store.load(container_id, quarantine=False).records
            except Exception as exc:  # noqa: BLE001 - reported, and nothing is released
                log.warning("gc_plugins_skipped", container_id=container_id, error=_msg(exc))
                return None
        return remaining

    def _prepare(self, config: dict[str, Any], path: tuple[str, ...]) -> PreparedNetwork:
        if NetworkConfigList.parse(config).disable_gc:
            # Opted out: nothing of it runs, so a plugin it names need not even be there.
            return PreparedNetwork(name=str(config.get("name")), plugins=(), disable_gc=True)
        return self._runner.prepare(config, {}, path)


def _msg(exc: BaseException) -> str:
    return exc.msg if isinstance(exc, PlexusError) else f"{type(exc).__name__}: {exc}"


def valid_attachments(config: Mapping[str, Any]) -> set[tuple[str, str]]:
    raw = config.get(cni.VALID_ATTACHMENTS_KEY, config.get(cni.LEGACY_ATTACHMENTS_KEY))
    if raw is None:
        raise InvalidConfig(f"GC needs '{cni.VALID_ATTACHMENTS_KEY}' in the config")
    if not isinstance(raw, list):
        raise InvalidConfig(f"'{cni.VALID_ATTACHMENTS_KEY}' must be a list")
    out = set()
    for item in raw:
        if not isinstance(item, dict) or "containerID" not in item or "ifname" not in item:
            raise InvalidConfig(
                f"'{cni.VALID_ATTACHMENTS_KEY}' entries need containerID and ifname: {item!r}",
            )
        out.add((str(item["containerID"]), str(item["ifname"])))
    return out
