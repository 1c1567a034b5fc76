"""The netns test bed for the core: a "node" namespace running a real plexusd in local mode,
pod namespaces, a veth in the node as macvlan master, Debian's reference plugins as delegates
(bridge + host-local for eth0, macvlan + host-local for secondaries), and two test plugins:
`failer` (ADD always fails) and `gate` (ADD waits for the test before running macvlan)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.daemon import DaemonProcess
from testbed.manifests import bridge_conflist, macvlan, nad, reservations
from testbed.netns import Netns, namespaces
from testbed.runtime import CniRuntime
from tests.support.plugins import write_test_plugins
from tests.support.require import missing

REFERENCE_PLUGINS = Path("/usr/lib/cni")
NETWORKS = "k8s.v1.cni.cncf.io/networks"


@dataclass
class Bed:
    root: Path
    node: Netns
    daemon: DaemonProcess
    runtime: CniRuntime
    ipam_dir: Path
    gate_dir: Path
    made: list[Netns] = field(default_factory=list)

    def pod(self, role: str) -> Netns:
        ns = Netns(role)
        self.made.append(ns)
        return ns

    def reservations(self) -> list[str]:
        return reservations(self.ipam_dir)

    def records(self) -> list[str]:
        root = Path(self.daemon.config["stateDir"]) / "attachments"
        return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []

    def node_veths(self) -> list[str]:
        return [
            n
            for n, link in self.node.links().items()
            if link.get("linkinfo", {}).get("info_kind") == "veth" and not n.startswith("pxm")
        ]

    def assert_nothing_left(self, *pods: Netns) -> None:
        for pod in pods:
            if pod.exists():
                assert set(pod.links()) == {"lo"}, pod.links().keys()
        assert self.reservations() == []
        assert self.node_veths() == []
        assert self.records() == []


def test_nads(ipam_dir: Path, gate_dir: Path) -> list[dict[str, Any]]:
    return [
        nad("net-a", macvlan("pxm0", "10.89.0.0/24", ipam_dir)),
        nad(
            "net-b",
            macvlan("pxm0", "10.90.0.0/24", ipam_dir, capabilities={"ips": True, "mac": True}),
        ),
        nad(
            "net-fail",
            {
                "cniVersion": "1.0.0",
                "plugins": [macvlan("pxm0", "10.91.0.0/24", ipam_dir), {"type": "failer"}],
            },
        ),
        nad(
            "net-gate",
            macvlan("pxm0", "10.92.0.0/24", ipam_dir, type="gate", gateDir=str(gate_dir)),
        ),
    ]


@contextmanager
def make_bed(
    tmp_path: Path, configure: Callable[[Netns, list[dict[str, Any]]], dict[str, Any]]
) -> Iterator[Bed]:
    """Build the bed; `configure(node, nads)` returns the daemon config keys of the mode."""
    if not REFERENCE_PLUGINS.is_dir():
        missing("Debian's containernetworking-plugins are not installed (/usr/lib/cni)")
    ipam_dir, gate_dir, testbin = tmp_path / "ipam", tmp_path / "gate", tmp_path / "testbin"
    gate_dir.mkdir()
    write_test_plugins(testbin)
    (tmp_path / "net.d").mkdir()
    (tmp_path / "net.d" / "10-cluster.conflist").write_text(
        json.dumps(bridge_conflist("cluster", "pxbr0", "10.88.0.0/24", ipam_dir))
    )
    nads = test_nads(ipam_dir, gate_dir)
    with namespaces() as made:
        node = Netns("node")
        made.append(node)
        node.run("ip", "link", "add", "pxm0", "type", "veth", "peer", "name", "pxm1")
        node.run("ip", "link", "set", "pxm0", "up")
        node.run("ip", "link", "set", "pxm1", "up")
        mode = configure(node, nads)
        daemon = DaemonProcess(
            tmp_path,
            {
                "clusterNetwork": "cluster",
                "cniPath": [str(REFERENCE_PLUGINS), str(testbin)],
                **mode,
            },
            netns=node.name,
        )
        try:
            daemon.start()
            runtime = CniRuntime(daemon.conf_file, Path(daemon.config["cniBinDir"]))
            yield Bed(tmp_path, node, daemon, runtime, ipam_dir, gate_dir, made)
        finally:
            daemon.stop()
            (gate_dir / "release").touch()
            if os.environ.get("PLEXUS_KEEP_LOGS"):
                shutil.copy(daemon.log, os.environ["PLEXUS_KEEP_LOGS"])


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Bed]:
    """Local mode: NADs from a directory, pod requests from the runtime."""

    def local(node: Netns, nads: list[dict[str, Any]]) -> dict[str, Any]:
        (tmp_path / "nads").mkdir()
        (tmp_path / "nads" / "nads.yaml").write_text(yaml.safe_dump_all(nads))
        return {"localDir": str(tmp_path / "nads")}

    with make_bed(tmp_path, local) as b:
        yield b
