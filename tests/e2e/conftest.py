"""The real-runtime bed for end-to-end tests: containerd's CRI drives Plexus (local mode).

`cri` gives a started containerd with a macvlan master (veth) in its network namespace, NAD
manifests in a temp dir and the reference plugins plus the test plugins on plexusd's cniPath;
the test starts plexusd with `cri.start_plexus(**config)` so each test picks its own daemon
config (namespace isolation, ...).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.cri import ContainerdBed, Pod, containerd_bed
from testbed.daemon import DaemonProcess
from testbed.manifests import bridge_conflist, host_local, macvlan, nad, reservations
from tests.support.plugins import write_test_plugins
from tests.support.require import required

NETWORKS = "k8s.v1.cni.cncf.io/networks"


@dataclass
class CriBed:
    root: Path
    containerd: ContainerdBed
    ipam: Path
    nad_dir: Path
    cluster_conf: Path
    testbin: Path
    daemon: DaemonProcess | None = None

    def start_plexus(self, **config: Any) -> DaemonProcess:
        self.daemon = self.containerd.start_plexusd(
            {
                "localDir": str(self.nad_dir),
                "clusterNetwork": str(self.cluster_conf),
                "cniPath": ["/usr/lib/cni", str(self.testbin)],
                "stateDir": str(self.root / "plexus-state"),
                "runDir": str(self.root / "plexus-run"),
                **config,
            }
        )
        return self.daemon

    def reservations(self) -> list[str]:
        return reservations(self.ipam)

    def records(self) -> list[str]:
        root = self.root / "plexus-state" / "attachments"
        return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []

    def runtime_veths(self) -> list[str]:
        links = self.containerd.links("")
        return [
            n
            for n, link in links.items()
            if link.get("linkinfo", {}).get("info_kind") == "veth" and not n.startswith("pxm")
        ]

    def interfaces(self, pod: Pod) -> dict[str, list[str]]:
        links = self.containerd.links(pod.netns)
        return {name: self.containerd.addresses(pod.netns, name) for name in links if name != "lo"}

    def portmap_chains(self) -> list[str]:
        """portmap's per-container DNAT chains in the runtime's network namespace."""
        out = self.containerd.in_netns("", "iptables", "-t", "nat", "-S").stdout
        return sorted(
            {line.split()[1] for line in out.splitlines() if line.startswith("-N CNI-DN-")}
        )

    def assert_nothing_left(self) -> None:
        assert self.containerd.sandboxes() == []
        assert self.portmap_chains() == []
        assert self.runtime_veths() == []
        assert self.reservations() == []
        assert self.records() == []
        spool = self.root / "plexus-state" / "spool"
        assert not spool.exists() or not list(spool.glob("*.json"))


@pytest.fixture
def cri(tmp_path: Path) -> Iterator[CriBed]:
    ipam = tmp_path / "ipam"
    nad_dir = tmp_path / "nads"
    nad_dir.mkdir()
    testbin = write_test_plugins(tmp_path / "testbin")
    cluster_conf = tmp_path / "cluster.conflist"
    cluster = bridge_conflist("cluster", "pxbr0", "10.88.0.0/16", ipam)
    cluster["plugins"].append(
        {"type": "portmap", "capabilities": {"portMappings": True}, "snat": False}
    )
    cluster_conf.write_text(json.dumps(cluster))
    nads = [
        nad("net-a", macvlan("pxm0", "10.89.0.0/16", ipam)),
        nad("net-b", macvlan("pxm0", "10.90.0.0/16", ipam)),
        nad(
            "net-fail",
            {
                "cniVersion": "1.0.0",
                "plugins": [macvlan("pxm0", "10.91.0.0/16", ipam), {"type": "failer"}],
            },
        ),
        nad("private", macvlan("pxm0", "10.93.0.0/16", ipam), namespace="team-b"),
        nad("fast", macvlan("pxm0", "10.94.0.0/16", ipam, type="plexus-macvlan")),
        nad(
            "routed",
            {
                "cniVersion": "1.0.0",
                "type": "plexus-routed",
                "ipam": host_local("10.95.0.0/16", ipam),
            },
            namespace="kube-system",
        ),
    ]
    (nad_dir / "nads.yaml").write_text(yaml.safe_dump_all(nads))
    with required(containerd_bed(tmp_path / "rt")) as containerd:
        containerd.in_netns("", "ip", "link", "add", "pxm0", "type", "veth", "peer", "name", "pxm1")
        containerd.in_netns("", "ip", "link", "set", "pxm0", "up")
        containerd.in_netns("", "ip", "link", "set", "pxm1", "up")
        yield CriBed(tmp_path, containerd, ipam, nad_dir, cluster_conf, testbin)
