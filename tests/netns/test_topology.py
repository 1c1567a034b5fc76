"""`plexusctl topology` against a real plexusd: a pod with two secondary networks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns.conftest import NETWORKS, Bed

pytestmark = pytest.mark.netns


def plexusctl(bed: Bed, *args: str) -> str:
    # `-m metaplugin.ctl` with this interpreter: the CLI of the tree under test.
    return subprocess.run(
        [sys.executable, "-m", "metaplugin.ctl", "--socket", bed.daemon.socket, *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout


def test_topology_shows_the_pod_its_interfaces_and_networks(bed: Bed) -> None:
    pod = bed.pod("topo")
    networks = json.dumps(
        [
            {"name": "net-a"},
            {"name": "net-b", "ips": ["10.90.0.77/24"], "mac": "0a:58:0a:5a:00:4d"},
        ]
    )
    bed.runtime.add("c1", pod.path, annotations={NETWORKS: networks}, pod=("default", "pod1")).ok()
    net1 = pod.addresses("net1")[0]
    eth0 = pod.addresses("eth0")[0]
    net1_mac = pod.links()["net1"]["address"]

    tree = plexusctl(bed, "topology", "--node", "node-x").splitlines()
    assert tree[0] == "node-x  (1 pod, 3 networks)"
    assert any(line.endswith("default/pod1  (c1  " + pod.path + ")") for line in tree), tree
    rows = {line.split("── ")[1].split()[0]: line for line in tree if "  net " in line}
    assert set(rows) == {"eth0", "net1", "net2"}
    assert f"net cluster  bridge  {eth0}" in rows["eth0"] and "default" in rows["eth0"]
    assert f"net default/net-a  macvlan  {net1}  {net1_mac}" in rows["net1"]
    assert "net default/net-b  macvlan  10.90.0.77/24  0a:58:0a:5a:00:4d" in rows["net2"]
    assert "└── networks" in tree
    for name in ("cluster", "default/net-a", "default/net-b"):
        assert any(line.strip("│├└─ ").startswith(f"{name}  (") for line in tree), (name, tree)
    assert any(line.strip("│├└─ ") == "default/pod1 net2  10.90.0.77/24" for line in tree)

    dot = plexusctl(bed, "topology", "--format", "dot", "--node", "node-x")
    assert dot.startswith("digraph plexus_topology {")
    assert '"if:c1/net2" -> "net:default/net-b" [label="macvlan"];' in dot
    assert '"10.90.0.77/24' in dot.replace("\\n", '"')
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed (Debian package graphviz): no SVG check")
    svg = plexusctl(bed, "topology", "--format", "svg")
    assert "<svg" in svg and "default/pod1" in svg and "10.90.0.77/24" in svg
