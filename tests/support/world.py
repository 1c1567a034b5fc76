"""A local-mode world in a temp dir: NAD manifests, a CNI conf dir with a cluster network, a
daemon config pointing every path inside the temp dir, and an orchestrator over a FakeExec."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cnispec.errors import InvalidConfig, PlexusError
from cnispec.identity import PodInfo
from delegates.chain import ChainRunner
from delegates.ipam.paths import IpamPaths
from delegates.registry import PluginRegistry
from metaplugin.config import DaemonConfig
from metaplugin.gc import Collector
from metaplugin.nad_source import LocalNadSource
from metaplugin.orchestrator import Orchestrator
from metaplugin.podwide import DefaultRoute, MovedRoutes
from metaplugin.resolve import Resolver
from metaplugin.salvage import Salvage
from metaplugin.scheduler import Scheduler
from metaplugin.store import AttachmentStore
from testbed.manifests import nad
from tests.support.fake_exec import FakeExec, FakePlugin


def nad_manifest(
    name: str,
    config: dict[str, Any] | None,
    namespace: str = "default",
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    return nad(name, config, namespace, annotations)


def simple_net(name: str, plugin: str = "macvlan", **extra: Any) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": name, "type": plugin, **extra}


@dataclass
class RecordingSink:
    attached_calls: list[tuple[PodInfo, list[dict[str, Any]], list[str]]] = field(
        default_factory=list
    )
    not_found: list[tuple[PodInfo, str]] = field(default_factory=list)

    def attached(self, pod: PodInfo, status: list[dict[str, Any]], messages: list[str]) -> None:
        self.attached_calls.append((pod, status, messages))

    abandoned: list[tuple[PodInfo, str]] = field(default_factory=list)

    def network_not_found(self, pod: PodInfo, message: str) -> None:
        self.not_found.append((pod, message))

    def teardown_abandoned(self, pod: PodInfo, message: str) -> None:
        self.abandoned.append((pod, message))

    add_failures: list[tuple[PodInfo, PlexusError]] = field(default_factory=list)

    def add_failed(self, pod: PodInfo, error: PlexusError) -> None:
        self.add_failures.append((pod, error))


@dataclass
class FakeLinks:
    """Salvage's kernel side (`metaplugin.salvage.Links`), faked: unit tests never touch the
    host's links. `present` says which exist; what was removed is remembered."""

    present: set[tuple[str, str]] = field(default_factory=set)  # (netns or "node", ifname)
    removed: list[tuple[str, str]] = field(default_factory=list)

    def remove_pod_link(self, netns: str, ifname: str) -> bool:
        return self._remove((netns, ifname))

    def remove_host_veth(self, ifname: str, mac: str) -> bool:
        return self._remove(("node", ifname))

    def _remove(self, link: tuple[str, str]) -> bool:
        if link not in self.present:
            return False
        self.present.discard(link)
        self.removed.append(link)
        return True


class World:
    def __init__(self, root: Path, **config: Any) -> None:
        self.root = root
        self.nad_dir = root / "nads"
        self.conf_dir = root / "net.d"
        self.state = root / "state"
        for d in (self.nad_dir, self.conf_dir, self.state):
            d.mkdir(parents=True, exist_ok=True)
        self.write_conf(
            "10-cluster.conflist",
            {
                "cniVersion": "1.1.0",
                "name": "cluster",
                "plugins": [{"type": "cluster", "capabilities": {"portMappings": True}}],
            },
        )
        self.config = DaemonConfig.model_validate(
            {
                "localDir": str(self.nad_dir),
                "stateDir": str(self.state),
                "runDir": str(root / "run"),
                "cniConfDir": str(self.conf_dir),
                "cniBinDir": str(root / "bin"),
                "cniPath": ["/fake"],
                "hostLocalDataRoots": [str(root)],  # leases of test NADs stay in the temp dir
                **config,
            }
        )
        self.exec = FakeExec(
            FakePlugin("cluster", subnet="10.0.0"),
            FakePlugin("macvlan", subnet="10.1.0"),
            FakePlugin("ipvlan", subnet="10.2.0"),
            FakePlugin("tuning"),
            FakePlugin("broken", fail={"ADD"}),
        )
        self.sink = RecordingSink()
        self.links = FakeLinks()
        self.nads = LocalNadSource(str(self.nad_dir))
        self.store = AttachmentStore(str(self.state))
        self.resolver = Resolver(config=self.config, nads=self.nads)
        self.existing_interfaces: set[tuple[str, str]] = set()
        self.moved_routes: list[tuple[str, str, list[str]]] = []
        self.routes_put_back: list[tuple[str, MovedRoutes]] = []
        runner = self.runner = ChainRunner(registry=PluginRegistry(exec_=self.exec))
        self.orchestrator = Orchestrator(
            config=self.config,
            resolver=self.resolver,
            store=self.store,
            runner=runner,
            sink=self.sink,
            existing=lambda netns, names: [
                n for n in names if (netns, n) in self.existing_interfaces
            ],
            pod_steps=(DefaultRoute(routes=self),),
            reap_links=lambda netns: None,
            salvage=Salvage(
                host_local_data_dir=str(root / "leases"),
                paths=IpamPaths(data_roots=(str(root),)),
                links=self.links,
            ),
        )
        self.scheduler = Scheduler(max_concurrent=4, max_queue=16)
        self.collector = Collector(
            orchestrator=self.orchestrator,
            store=self.store,
            resolver=self.resolver,
            runner=runner,
            lock_container=self.scheduler.container,
            exclusive=self.scheduler.exclusive,
        )

    # PodRoutes, faked: what the default-route step asked for is remembered.
    def move_default_route(self, netns: str, ifname: str, gateways: list[str]) -> MovedRoutes:
        self.moved_routes.append((netns, ifname, gateways))
        if any(gw == "10.66.0.1" for gw in gateways):
            raise InvalidConfig("gateway 10.66.0.1 is not reachable (fake)")
        return MovedRoutes({socket.AF_INET6 if ":" in gw else socket.AF_INET for gw in gateways})

    def put_back(self, netns: str, moved: MovedRoutes) -> None:
        self.routes_put_back.append((netns, moved))

    def write_conf(self, name: str, config: dict[str, Any]) -> Path:
        path = self.conf_dir / name
        path.write_text(json.dumps(config))
        return path

    def add_nads(self, *docs: dict[str, Any], file: str = "nads.yaml") -> None:
        (self.nad_dir / file).write_text(yaml.safe_dump_all(docs))
