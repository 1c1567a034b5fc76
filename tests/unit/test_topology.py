"""`plexusctl topology`'s pure half: the daemon's /v1/attachments view parsed, folded into pods,
and drawn as a text tree and as Graphviz DOT."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import pytest
from pydantic import ValidationError

from metaplugin import ctl, topology

NETNS_A = "/run/netns/pod-a"
NETNS_B = "/run/netns/pod-b"


def _att(
    cid: str,
    pod: str,
    network: str,
    ifname: str,
    plugin: dict[str, Any],
    *,
    ips: list[str] | None = None,
    mac: str = "",
    is_default: bool = False,
    state: str = "added",
    pci: str | None = None,
) -> dict[str, Any]:
    """One record as `Attachment.view()` shows it (with the keys a picture ignores)."""
    netns = NETNS_A if cid == CID_A else NETNS_B
    namespace, name = pod.split("/")
    interfaces: list[dict[str, Any]] = []
    if plugin["type"] in ("bridge", "ptp"):  # a host-side veth of the same name comes first
        interfaces.append({"name": ifname, "mac": "ee:ee:ee:ee:ee:ee"})
    own = {"name": ifname, "mac": mac, "sandbox": netns} | ({"pciID": pci} if pci else {})
    interfaces.append(own)
    result = {
        "cniVersion": "1.1.0",
        "interfaces": interfaces,
        "ips": [{"address": a, "interface": len(interfaces) - 1} for a in ips or []],
        "dns": {},
    }
    return {
        "version": 2,
        "container_id": cid,
        "network": network,
        "ifname": ifname,
        "netns": netns,
        "pod_namespace": namespace,
        "pod_name": name,
        "pod_uid": f"uid-{cid}",
        "index": 0,
        "is_default": is_default,
        "runtime_ifname": "eth0",
        "cni_args": "IgnoreUnknown=1",
        "cni_path": ["/opt/cni/bin"],
        "default_route": None,
        "state": state,
        "result": result if state == "added" else None,
        "prepared": {"name": network, "plugins": [plugin], "disableCheck": False},
        "created_at": 1.0,
    }


BRIDGE = {"type": "bridge", "path": "/opt/cni/bin/bridge", "version": "1.0.0", "config": {}}
MACVLAN = {"type": "macvlan", "path": "/opt/cni/bin/macvlan", "version": "1.0.0", "config": {}}
SRIOV = {
    "type": "plexus-sriov",
    "path": "",
    "version": "1.1.0",
    "config": {"deviceID": "0000:5e:02.3"},
}
CID_A = "a" * 64
CID_B = "b" * 64

VIEW: list[dict[str, Any]] = [
    {  # listed second on purpose: pods come out in name order
        "containerID": CID_B,
        "attachments": [
            _att(
                CID_B,
                "web/b",
                "cluster",
                "eth0",
                BRIDGE,
                ips=["10.88.0.3/24"],
                mac="0a:00:00:00:00:03",
                is_default=True,
            ),
            _att(
                CID_B,
                "web/b",
                "web/sriov-net",
                "net1",
                SRIOV,
                ips=["10.95.0.9/24"],
                mac="0a:00:00:00:00:09",
            ),
            _att(CID_B, "web/b", "web/storage", "net2", MACVLAN, state="planned"),
        ],
        "quarantined": [],
    },
    {
        "containerID": CID_A,
        "attachments": [
            _att(
                CID_A,
                "web/a",
                "cluster",
                "eth0",
                BRIDGE,
                ips=["10.88.0.2/24"],
                mac="0a:00:00:00:00:02",
                is_default=True,
            ),
            _att(
                CID_A,
                "web/a",
                "web/storage",
                "net1",
                MACVLAN,
                ips=["10.89.0.2/24", "fd00::2/64"],
                mac="0a:00:00:00:00:12",
            ),
        ],
        "quarantined": [],
    },
    {"containerID": "c" * 64, "attachments": [], "quarantined": ["/x/q.record"]},
]


def _pods() -> list[topology.Pod]:
    return topology.build(topology.parse(json.dumps(VIEW)))


def test_build_folds_records_into_pods_and_interfaces() -> None:
    pods = _pods()
    assert [p.ref for p in pods] == ["web/a", "web/b"]  # the empty container is no pod
    a, b = pods
    assert a.netns == NETNS_A and a.short_id == "a" * 12
    eth0, storage = a.interfaces
    # The pod-side interface's MAC, not the host veth's that shares its name.
    assert (eth0.ifname, eth0.type, eth0.ips, eth0.mac, eth0.default) == (
        "eth0", "bridge", ("10.88.0.2/24",), "0a:00:00:00:00:02", True
    )  # fmt: skip
    assert storage.ips == ("10.89.0.2/24", "fd00::2/64") and storage.vf_pci == ""
    sriov = b.interfaces[1]
    assert (sriov.type, sriov.vf_pci) == ("plexus-sriov", "0000:5e:02.3")
    planned = b.interfaces[2]
    assert (planned.state, planned.ips, planned.mac) == ("planned", (), "")


def test_the_vf_comes_from_the_result_when_the_config_has_no_device_id() -> None:
    view = json.loads(json.dumps(VIEW))
    att = view[0]["attachments"][1]
    att["prepared"]["plugins"][0]["config"] = {}
    att["result"]["interfaces"][0]["pciID"] = "0000:5e:02.7"
    pods = topology.build(topology.parse(json.dumps(view)))
    assert pods[1].interfaces[1].vf_pci == "0000:5e:02.7"


def test_a_foreign_view_is_refused() -> None:
    with pytest.raises(ValidationError):
        topology.parse(json.dumps([{"attachments": []}]))  # no containerID


def test_tree() -> None:
    assert topology.render_tree("node-1", _pods()) == [
        "node-1  (2 pods, 3 networks)",
        "├── pods",
        f"│   ├── web/a  (aaaaaaaaaaaa  {NETNS_A})",
        "│   │   ├── eth0  net cluster  bridge  10.88.0.2/24  0a:00:00:00:00:02  default",
        "│   │   └── net1  net web/storage  macvlan  10.89.0.2/24,fd00::2/64  0a:00:00:00:00:12",
        f"│   └── web/b  (bbbbbbbbbbbb  {NETNS_B})",
        "│       ├── eth0  net cluster  bridge  10.88.0.3/24  0a:00:00:00:00:03  default",
        "│       ├── net1  net web/sriov-net  plexus-sriov  10.95.0.9/24  0a:00:00:00:00:09  "
        "VF 0000:5e:02.3",
        "│       └── net2  net web/storage  macvlan  no IP  [planned]",
        "└── networks",
        "    ├── cluster  (bridge, 2 interfaces)",
        "    │   ├── web/a eth0  10.88.0.2/24",
        "    │   └── web/b eth0  10.88.0.3/24",
        "    ├── web/sriov-net  (plexus-sriov, 1 interface)",
        "    │   └── web/b net1  10.95.0.9/24",
        "    └── web/storage  (macvlan, 2 interfaces)",
        "        ├── web/a net1  10.89.0.2/24,fd00::2/64",
        "        └── web/b net2  no IP",
    ]


def test_tree_of_an_empty_node() -> None:
    assert topology.render_tree("n", []) == [
        "n  (0 pods, 0 networks)",
        "└── no attachments recorded",
    ]


def _statements(dot: str) -> tuple[list[str], list[str]]:
    body = [line.strip() for line in dot.splitlines()[1:-1]]
    edges = [s for s in body if " -> " in s]
    nodes = [s for s in body if " -> " not in s and s.startswith('"')]
    return nodes, edges


def test_dot_nodes_and_edges() -> None:
    dot = topology.render_dot("node-1", _pods())
    assert dot.startswith("digraph plexus_topology {\n") and dot.endswith("}\n")
    nodes, edges = _statements(dot)
    # 1 node + 2 pods + 5 interfaces + 3 networks; node->pod x2, pod->if x5, if->network x5
    assert len(nodes) == 11
    assert len(edges) == 12
    assert f'"pod:{CID_B}" -> "if:{CID_B}/net1";' in edges
    assert f'"if:{CID_B}/net1" -> "net:web/sriov-net" [label="plexus-sriov"];' in edges
    assert f'"if:{CID_B}/net1" [shape=box, label="net1\\n10.95.0.9/24\\n0a:00:00:00:00:09\\nVF 0000:5e:02.3"];' in nodes  # fmt: skip


def test_dot_quotes_what_it_labels() -> None:
    view = json.loads(json.dumps(VIEW))
    view[1]["attachments"][0]["pod_name"] = 'we"ird\\name'
    dot = topology.render_dot("n", topology.build(topology.parse(json.dumps(view))))
    assert 'label="web/we\\"ird\\\\name"' in dot


def test_dot_renders_through_graphviz() -> None:
    binary = shutil.which("dot")
    if binary is None:
        pytest.skip("Graphviz's dot is not installed (Debian package graphviz)")
    dot = topology.render_dot("node-1", _pods())
    svg = subprocess.run([binary, "-Tsvg"], input=dot, capture_output=True, text=True, check=True)
    assert svg.stderr == ""
    assert svg.stdout.count('class="node"') == 11
    assert svg.stdout.count('class="edge"') == 12


def test_svg_without_graphviz_names_the_package(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(ctl.shutil, "which", lambda _: None)
    assert ctl._print_svg("digraph {}") == 1
    err = capsys.readouterr().err
    assert "Debian package graphviz" in err and "--format dot" in err
