"""DEL is a replay of what ADD recorded, nothing else: a routed primary's lease is released when
the daemon restarted without knowing the node's pod subnets, and a node upgraded while pods run
DELs every pod the previous plexusd attached, from that version's own records
(tests/fixtures/records-v1, written by plexusd 9a907b2)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.daemon import DaemonProcess
from testbed.manifests import host_local, nad, reservations
from testbed.netns import Netns, namespaces
from testbed.runtime import CniRuntime
from tests.support.plugins import write_test_plugins
from tests.support.require import missing

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "records-v1"
NETWORKS = "k8s.v1.cni.cncf.io/networks"
POD_CIDRS = ["10.244.1.0/24", "fd00:244:1::/64"]
# The pod the v1 records of `added/` were written for.
LEGACY = json.dumps(
    [
        {"name": "mv", "mac": "0a:58:0a:46:00:09"},
        {"name": "ref", "interface": "ref0"},
        {"name": "mv-sbr"},
        {"name": "mv-gw", "default-route": ["10.77.0.1"]},
    ]
)


@dataclass
class Node:
    root: Path
    ns: Netns
    daemon: DaemonProcess
    made: list[Netns] = field(default_factory=list)

    @property
    def runtime(self) -> CniRuntime:
        return CniRuntime(self.daemon.conf_file, Path(self.daemon.config["cniBinDir"]))

    def pod(self, role: str) -> Netns:
        ns = Netns(role)
        self.made.append(ns)
        return ns

    def restart(self, **config: Any) -> None:
        """Stop plexusd and start it again, with `config` keys changed (an upgrade, a restart
        with the API down)."""
        self.daemon.stop()
        self.daemon = DaemonProcess(
            self.root, {**self.daemon.config, **config}, netns=self.ns.name
        ).start()

    def attachments_dir(self, cid: str) -> Path:
        return self.root / "state" / "attachments" / cid

    def leases(self) -> list[str]:
        return reservations(self.root / "leases") + reservations(self.root / "ipam")

    def host_veths(self) -> list[str]:
        return [n for n in self.ns.links() if n.startswith("px") and n not in ("pxm0", "pxm1")]

    def assert_nothing_left(self, *pods: Netns) -> None:
        for pod in pods:
            assert set(pod.links()) == {"lo"}, pod.links().keys()
        assert self.leases() == []
        assert self.host_veths() == []
        assert not (self.root / "state" / "attachments").exists() or not any(
            (self.root / "state" / "attachments").iterdir()
        )


def _nads(root: Path) -> list[dict[str, Any]]:
    """The networks plexusd 9a907b2 had when it wrote the fixtures, with the same names."""
    ipam = root / "ipam"
    mv = {"cniVersion": "1.0.0", "type": "plexus-macvlan", "master": "pxm0"}
    return [
        nad("mv", {**mv, "capabilities": {"mac": True}, "ipam": host_local("10.70.0.0/24", ipam)}),
        nad(
            "ref",
            {
                "cniVersion": "1.0.0",
                "type": "macvlan",
                "master": "pxm0",
                "ipam": host_local("10.71.0.0/24", ipam),
            },
        ),
        nad(
            "mv-sbr",
            {
                "cniVersion": "1.0.0",
                "plugins": [
                    {**mv, "ipam": host_local("10.74.0.0/24", ipam)},
                    {"type": "plexus-sbr"},
                ],
            },
        ),
        nad(
            "mv-gw",
            {**mv, "ipam": host_local("10.77.0.0/24", ipam, routes=[{"dst": "0.0.0.0/0"}])},
        ),
        nad(
            "gated",
            {
                "cniVersion": "1.0.0",
                "type": "gate",
                "master": "pxm0",
                "gateDir": str(root / "gate"),
                "ipam": host_local("10.78.0.0/24", ipam),
            },
        ),
    ]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """One node in local mode with the routed primary (`plexus-routed` over this node's pod
    subnets, native fabric) and the networks the v1 fixtures name."""
    if not Path("/usr/lib/cni/macvlan").exists():
        missing("Debian's containernetworking-plugins are not installed (/usr/lib/cni)")
    testbin = write_test_plugins(tmp_path / "testbin")
    (tmp_path / "gate").mkdir()
    (tmp_path / "gate" / "release").touch()  # the gate never holds an ADD here
    (tmp_path / "net.d").mkdir()
    (tmp_path / "net.d" / "10-pods.conflist").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "pods", "plugins": [{"type": "plexus-routed"}]})
    )
    (tmp_path / "nads").mkdir()
    (tmp_path / "nads" / "nads.yaml").write_text(yaml.safe_dump_all(_nads(tmp_path)))
    with namespaces() as made:
        ns = Netns("replay-node")
        made.append(ns)
        ns.run("ip", "link", "add", "pxm0", "type", "veth", "peer", "name", "pxm1")
        ns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "wire")
        ns.run("ip", "addr", "add", "192.168.100.11/24", "dev", "eth0")
        for link in ("pxm0", "pxm1", "eth0", "wire"):
            ns.run("ip", "link", "set", link, "up")
        daemon = DaemonProcess(
            tmp_path,
            {
                "clusterNetwork": "pods",
                "localDir": str(tmp_path / "nads"),
                "hostLocalDataDir": str(tmp_path / "leases"),
                "cniPath": ["/usr/lib/cni", str(testbin)],
                "fabric": {"mode": "native", "interface": "eth0", "podCIDRs": POD_CIDRS},
            },
            netns=ns.name,
        )
        bed = Node(tmp_path, ns, daemon, made)
        try:
            daemon.start()
            yield bed
        finally:
            bed.daemon.stop()


def test_routed_del_releases_the_lease_with_the_pod_subnets_unknown(node: Node) -> None:
    pod = node.pod("routed")
    node.runtime.add("r1", pod.path).ok()
    assert [a.split("/")[0] for a in pod.addresses("eth0")][:1] == ["10.244.1.2"]
    assert len(node.leases()) == 2  # one per family
    # What a daemon started while the API is down knows: no pod subnets for this node.
    node.restart(fabric={**node.daemon.config["fabric"], "podCIDRs": []})
    refused = node.runtime.add("r2", node.pod("later").path)
    assert refused.returncode == 1 and refused.body["code"] == 11  # ADD: try again later
    node.runtime.delete("r1", pod.path, with_prev=False).ok()
    node.assert_nothing_left(pod)


def _put_v1_records(node: Node, fixture: str, cid: str, pod: Netns) -> None:
    """Replace the container's records with the v1 ones plexusd 9a907b2 wrote for it."""
    target = node.attachments_dir(cid)
    shutil.rmtree(target)
    target.mkdir()
    for source in sorted((FIXTURES / fixture).glob("*.json")):
        text = source.read_text().replace("{root}", str(node.root)).replace("{netns}", pod.path)
        (target / source.name).write_text(text)


def test_del_after_upgrade_replays_the_previous_versions_records(node: Node) -> None:
    # The kernel state the old plexusd left: what its ADD made (the delegates did not change).
    pod = node.pod("legacy")
    node.runtime.add(
        "legacyc1", pod.path, annotations={NETWORKS: LEGACY}, pod=("default", "legacy")
    )
    half = node.pod("legacy2")  # ADD cut short: eth0 and net1 made, net2 never ran
    node.runtime.add(
        "legacyc2", half.path, annotations={NETWORKS: "mv"}, pod=("default", "legacy2")
    )
    assert set(pod.links()) == {"lo", "eth0", "net1", "ref0", "net3", "net4"}
    node.daemon.stop()
    _put_v1_records(node, "added", "legacyc1", pod)
    _put_v1_records(node, "mid-add", "legacyc2", half)

    node.restart()  # the upgraded plexusd migrates the records when it opens its store

    files = sorted(p.name for p in node.attachments_dir("legacyc1").iterdir())
    assert len(files) == 5 and all("@" in f for f in files), files  # no version-1 file left
    listed = {a["containerID"]: a["attachments"] for a in node.daemon.attachments()}
    assert [(a["ifname"], a["state"]) for a in listed["legacyc2"]] == [
        ("eth0", "added"),
        ("net1", "added"),
        ("net2", "planned"),
    ]
    assert [a["network"] for a in listed["legacyc1"]] == [
        "pods",
        "default/mv",
        "default/ref",
        "default/mv-sbr",
        "default/mv-gw",
    ]
    node.runtime.delete("legacyc1", pod.path, with_prev=False).ok()
    node.runtime.delete("legacyc2", half.path, with_prev=False).ok()
    assert pod.ip("rule", "show", "table", "100") == []  # plexus-sbr's rules went too
    node.assert_nothing_left(pod, half)
