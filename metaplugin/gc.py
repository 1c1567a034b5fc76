"""CNI GC (spec 1.1): remove every recorded attachment the runtime no longer knows, on every
network, then let each network's plugins collect their own leftovers.

Multus only GCs the cluster network and uses its own idea of what is valid; here the runtime's
`cni.dev/valid-attachments` decides, every network Plexus knows is collected (those in records,
the cluster and default networks, and every NAD, since a network whose last attachment failed
has no record left), and the delegate phase runs exclusively so no ADD can allocate an address
that GC does not yet list as valid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import structlog

from cnispec import cni
from cnispec.cni import CniRequest
from cnispec.errors import InvalidConfig, PlexusError, TeardownIncomplete
from cnispec.netconf import NetworkConfigList, PreparedNetwork
from delegates.chain import ChainRunner
from metaplugin.orchestrator import Orchestrator
from metaplugin.resolve import Resolver
from metaplugin.store import AttachmentStore

log = structlog.get_logger(__name__)

# network name -> (the network as a record prepared it, or a config to prepare; its CNI path)
Networks = dict[str, tuple[PreparedNetwork | dict[str, Any], tuple[str, ...]]]


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

    def gc(self, req: CniRequest) -> None:
        valid = valid_attachments(req.config)
        networks: Networks = {}
        failures = self._remove_stale(valid, networks)
        for net in self._resolver.known_networks():
            networks[str(net.config.get("name"))] = (net.config, ())
        with self._exclusive():  # no ADD or DEL while plugins learn what is valid
            failures.extend(self._collect(networks, req.path))
        if failures:
            raise TeardownIncomplete("GC incomplete: " + "; ".join(failures))

    def _remove_stale(self, valid: set[tuple[str, str]], networks: Networks) -> list[str]:
        failures = []
        for container_id in self._store.container_ids():
            with self._lock_container(container_id):
                loaded = self._store.load(container_id)
                for record in loaded.records:
                    networks.setdefault(record.prepared.name, (record.prepared, record.cni_path))
                if not loaded or (container_id, loaded.runtime_ifname) in valid:
                    continue
                log.info("gc_stale_container", stale_container=container_id)
                try:
                    self._orchestrator.teardown(loaded, loaded.netns)
                except PlexusError as exc:
                    failures.append(exc.msg)
        return failures

    def _collect(self, networks: Networks, request_path: tuple[str, ...]) -> list[str]:
        remaining = [r for loaded in self._store.all() for r in loaded.records]
        failures = []
        for name, (net, path) in networks.items():
            still_valid = [
                {"containerID": r.container_id, "ifname": r.ifname}
                for r in remaining
                if r.prepared.name == name
            ]
            search = self._orchestrator.path(path + request_path)
            try:
                prepared = net if isinstance(net, PreparedNetwork) else self._prepare(net, search)
                self._runner.gc(prepared, still_valid, search)
            except PlexusError as exc:
                failures.append(f"network {name}: {exc.msg}")
        return failures

    def _prepare(self, config: dict[str, Any], path: tuple[str, ...]) -> PreparedNetwork:
        if NetworkConfigList.parse(config).disable_gc:
            # Opted out: nothing of it runs, so a plugin it names need not even be there.
            return PreparedNetwork(name=str(config.get("name")), plugins=(), disable_gc=True)
        return self._runner.prepare(config, {}, path)


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
