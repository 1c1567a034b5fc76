"""A multi-node test bed: three "node" namespaces and an "external" one joined by a "fabric"
namespace (a bridge standing for the L2 segment between the nodes), plus a second bridge
for macvlan pods on two nodes. Every node runs its own plexusd (local mode) with the routed
primary (`plexus-routed`), native or VXLAN, and its own NADs; pods are namespaces, driven
through each node's installed shim exactly as a runtime drives it. Dual-stack throughout.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from testbed.daemon import DaemonProcess
from testbed.manifests import host_local, nad, reservations
from testbed.netns import Netns, namespaces
from testbed.runtime import CniRuntime, Outcome

NODES = 3
UNDERLAY_V4 = "192.168.100.{}"
UNDERLAY_V6 = "fd00:100::{}"
EXTERNAL = 100
NETWORKS = "k8s.v1.cni.cncf.io/networks"


def pod_cidrs(i: int) -> list[str]:
    return [f"10.244.{i}.0/24", f"fd00:244:{i}::/64"]


@dataclass
class Node:
    index: int
    ns: Netns
    daemon: DaemonProcess
    runtime: CniRuntime
    pods: list[tuple[str, Netns]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"node{self.index}"

    @property
    def address(self) -> str:
        return UNDERLAY_V4.format(10 + self.index)

    def add_pod(self, bed: Cluster, role: str, networks: str | None = None) -> tuple[Netns, Any]:
        pod = bed.new_ns(f"n{self.index}-{role}")
        cid = f"{pod.name}"
        annotations = {NETWORKS: networks} if networks else {}
        out = self.runtime.add(cid, pod.path, annotations=annotations, pod=("default", role))
        self.pods.append((cid, pod))
        return pod, out

    def remove_pods(self) -> None:
        for cid, pod in self.pods:
            self.runtime.delete(cid, pod.path if pod.exists() else "", with_prev=False).ok()
        self.pods.clear()


@dataclass
class Cluster:
    root: Path
    mode: str
    fabric: Netns
    external: Netns
    nodes: list[Node]
    made: list[Netns]

    def new_ns(self, role: str) -> Netns:
        ns = Netns(f"{role}-{len(self.made)}")  # unique within the run: tests reuse roles
        self.made.append(ns)
        return ns

    def leftovers(self) -> dict[str, Any]:
        """What the nodes still hold: host-side veths, pod routes, leases, records."""
        out: dict[str, Any] = {}
        for node in self.nodes:
            veths = [n for n in node.ns.links() if n.startswith("px")]
            routes = [
                r["dst"]
                for family in ("-4", "-6")
                for r in node.ns.ip(family, "route", "show")
                if r.get("dev", "").startswith("px")
            ]
            leases = reservations(self.root / node.name / "leases")
            records = list((self.root / node.name / "state" / "attachments").glob("*"))
            if veths or routes or leases or records:
                out[node.name] = {
                    "veths": veths,
                    "routes": routes,
                    "leases": leases,
                    "records": [r.name for r in records],
                }
        return out


def _link_to_fabric(fabric: Netns, ns: Netns, inside: str, outside: str, bridge: str) -> None:
    fabric.run(
        "ip", "link", "add", outside, "type", "veth", "peer", "name", inside, "netns", ns.name
    )
    fabric.run("ip", "link", "set", outside, "master", bridge, "up")
    ns.run("ip", "link", "set", inside, "up")


def _address(ns: Netns, ifname: str, host: int) -> None:
    ns.run("ip", "addr", "add", f"{UNDERLAY_V4.format(host)}/24", "dev", ifname)
    ns.run("ip", "addr", "add", f"{UNDERLAY_V6.format(host)}/64", "dev", ifname, "nodad")


def _node_config(
    root: Path, i: int, mode: str, fabric: dict[str, Any] | None = None
) -> dict[str, Any]:
    home = root / f"node{i}"
    (home / "net.d").mkdir(parents=True)
    (home / "nads").mkdir()
    (home / "net.d" / "10-pods.conflist").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "pods", "plugins": [{"type": "plexus-routed"}]})
    )
    segment = host_local(
        "10.50.0.0/24",
        home / "leases",
        ranges=[
            [
                {
                    "subnet": "10.50.0.0/24",
                    "rangeStart": f"10.50.0.{i * 10 + 1}",
                    "rangeEnd": f"10.50.0.{i * 10 + 9}",
                }
            ],
            [
                {
                    "subnet": "fd00:50::/64",
                    "rangeStart": f"fd00:50::{i}:1",
                    "rangeEnd": f"fd00:50::{i}:9",
                }
            ],
        ],
    )
    (home / "nads" / "nads.yaml").write_text(
        yaml.safe_dump_all(
            [
                nad(
                    "segment",
                    {
                        "cniVersion": "1.0.0",
                        "type": "plexus-macvlan",
                        "master": "seg",
                        "ipam": segment,
                    },
                ),
                nad(
                    "tiny",
                    {
                        "cniVersion": "1.0.0",
                        "type": "plexus-macvlan",
                        "master": "seg",
                        "ipam": host_local("10.60.0.0/30", home / "leases"),
                    },
                ),
                nad(
                    "nomaster",
                    {
                        "cniVersion": "1.0.0",
                        "type": "plexus-macvlan",
                        "master": "ghost0",
                        "ipam": host_local("10.61.0.0/24", home / "leases"),
                    },
                ),
                nad(
                    "ipv",
                    {
                        "cniVersion": "1.0.0",
                        "type": "plexus-ipvlan",
                        "master": "seg",
                        "ipam": host_local("10.62.0.0/24", home / "leases"),
                    },
                ),
            ]
        )
    )
    nodes = [
        {
            "name": f"node{j}",
            "addresses": [UNDERLAY_V4.format(10 + j), UNDERLAY_V6.format(10 + j)],
            "podCIDRs": pod_cidrs(j),
        }
        for j in range(1, NODES + 1)
    ]
    return {
        "nodeName": f"node{i}",
        "localDir": str(home / "nads"),
        "clusterNetwork": "pods",
        "hostLocalDataDir": str(home / "leases"),
        "fabric": {"mode": mode, "interface": "eth0", "podCIDRs": pod_cidrs(i), "nodes": nodes}
        | (fabric or {}),
    }


@contextmanager
def cluster(
    root: Path,
    mode: str,
    *,
    fabric_keys: dict[str, Any] | None = None,
    api: Callable[[Netns], dict[str, Any]] | None = None,
) -> Iterator[Cluster]:
    """The bed; `fabric_keys`: more keys for every node's fabric section (e.g. multicast).
    `api`: cluster mode — called with the external namespace (on the underlay, at
    UNDERLAY_V4 .100) before any node starts, it serves the API there and answers the keys
    every node's config gets (its kubeconfig); the nodes then take NADs and their peers from
    the API (no localDir, no fabric.nodes)."""
    with namespaces() as made:
        fabric = Netns("fabric")
        made.append(fabric)
        for bridge in ("fab0", "seg0"):
            fabric.run("ip", "link", "add", bridge, "type", "bridge")
            fabric.run("ip", "link", "set", bridge, "up")
        external = Netns("ext")
        made.append(external)
        _link_to_fabric(fabric, external, "eth0", "fx", "fab0")
        _address(external, "eth0", EXTERNAL)
        api_keys = api(external) if api is not None else None
        nodes: list[Node] = []
        daemons: list[DaemonProcess] = []
        try:
            for i in range(1, NODES + 1):
                ns = Netns(f"node{i}")
                made.append(ns)
                _link_to_fabric(fabric, ns, "eth0", f"fn{i}", "fab0")
                _link_to_fabric(fabric, ns, "seg", f"sn{i}", "seg0")
                _address(ns, "eth0", 10 + i)
                for cidr, via in zip(pod_cidrs(i), (UNDERLAY_V4, UNDERLAY_V6), strict=True):
                    external.run("ip", "route", "add", cidr, "via", via.format(10 + i))
                config = _node_config(root, i, mode, fabric_keys)
                if api_keys is not None:
                    del config["localDir"]
                    del config["fabric"]["nodes"]
                    config |= api_keys
                daemon = DaemonProcess(root / f"node{i}", config, netns=ns.name)
                daemons.append(daemon)  # before it starts: one that fails is stopped too
                daemon.start()
                nodes.append(
                    Node(
                        i,
                        ns,
                        daemon,
                        CniRuntime(daemon.conf_file, Path(daemon.config["cniBinDir"])),
                    )
                )
            yield Cluster(root, mode, fabric, external, nodes, made)
        finally:
            for daemon in daemons:
                daemon.stop()


def observed_source(receiver: Netns, address: str, sender: Netns, *, port: int = 9999) -> str:
    """The source address the receiver sees on a UDP datagram from the sender (no NAT means:
    the sender pod's own address)."""
    family = "AF_INET6" if ":" in address else "AF_INET"
    listen = (
        f"import socket; s=socket.socket(socket.{family}, socket.SOCK_DGRAM); "
        f"s.bind(({address!r}, {port})); s.settimeout(10); "
        "print(s.recvfrom(64)[1][0], flush=True)"
    )
    proc = subprocess.Popen(
        ["ip", "netns", "exec", receiver.name, "python3", "-I", "-c", listen],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        send = (
            f"import socket, time; s=socket.socket(socket.{family}, socket.SOCK_DGRAM)\n"
            "for _ in range(40):\n"
            f"    s.sendto(b'probe', ({address!r}, {port})); time.sleep(0.05)"
        )
        time.sleep(0.3)
        subprocess.run(
            ["ip", "netns", "exec", sender.name, "python3", "-I", "-c", send],
            check=True,
            timeout=30,
            capture_output=True,
        )
        out, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    return out.strip()


def ping(src: Netns, address: str, *extra: str) -> subprocess.CompletedProcess[str]:
    flag = "-6" if ":" in address else "-4"
    return src.run("ping", flag, "-c", "1", "-W", "2", *extra, address, check=False)


def primary_address(pod: Netns, version: int) -> str:
    for cidr in pod.addresses("eth0"):
        if (":" in cidr) == (version == 6):
            return cidr.split("/")[0]
    raise AssertionError(f"pod {pod.name} has no IPv{version} address on eth0")


def ok(out: Outcome) -> Any:
    return out.ok()
