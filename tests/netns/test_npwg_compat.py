"""Pods written for Multus run on Plexus: a 0.2.0 NAD run by Debian's reference macvlan (which
still speaks 0.1.0 and 0.2.0) and a selection element with keys Plexus does not know, end to end
through the installed shim. What is checked is what an operator sees: the links in the pod,
host-local's leases, `plexusctl network-status`, the answer the runtime gets, the daemon's log."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.manifests import host_local, nad
from testbed.netns import Netns
from tests.netns.conftest import NETWORKS, Bed, make_bed
from tests.netns.test_core import PLEXUSCTL

DEFAULT_NETWORK = "v1.multus-cni.io/default-network"


def legacy_macvlan(ipam_dir: Path) -> dict[str, Any]:
    """A NAD as old clusters still have them: cniVersion 0.2.0, macvlan + host-local."""
    return {
        "cniVersion": "0.2.0",
        "type": "macvlan",
        "master": "pxm0",
        "mode": "bridge",
        "ipam": host_local("10.93.0.0/24", ipam_dir),
    }


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Bed]:
    def local(node: Netns, nads: list[dict[str, Any]]) -> dict[str, Any]:
        more = [*nads, nad("net-old", legacy_macvlan(tmp_path / "ipam"))]
        (tmp_path / "nads").mkdir()
        (tmp_path / "nads" / "nads.yaml").write_text(yaml.safe_dump_all(more))
        return {"localDir": str(tmp_path / "nads")}

    with make_bed(tmp_path, local) as b:
        yield b


def network_status(bed: Bed, pod: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [PLEXUSCTL, "--socket", bed.daemon.socket, "network-status", pod],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_a_0_2_0_nad_attaches_reports_section_5_3_status_and_deletes(bed: Bed) -> None:
    pod = bed.pod("pod1")
    networks = json.dumps([{"name": "net-old", "namespace": ""}, {"name": "net-a"}])
    bed.runtime.add("c1", pod.path, annotations={NETWORKS: networks}, pod=("default", "pod1")).ok()

    links = pod.links()
    assert set(links) == {"lo", "eth0", "net1", "net2"}
    assert links["net1"]["linkinfo"]["info_kind"] == "macvlan"
    (address,) = pod.addresses("net1")
    assert address.startswith("10.93.0.") and address.endswith("/24")
    assert len(bed.reservations()) == 3
    (container,) = bed.daemon.attachments()
    (old,) = [r for r in container["attachments"] if r["network"] == "default/net-old"]
    assert [p["version"] for p in old["prepared"]["plugins"]] == ["0.2.0"]  # spoken to in 0.2.0

    # NPWG §5.3 for a pre-0.3.0 result: the ip4 address, the interface asked for, no mac.
    status = network_status(bed, "default/pod1")
    assert [(e["name"], e["interface"]) for e in status] == [
        ("cluster", "eth0"),
        ("default/net-old", "net1"),
        ("default/net-a", "net2"),
    ]
    assert status[1] == {
        "name": "default/net-old",
        "interface": "net1",
        "ips": [address.split("/")[0]],
        "default": False,
    }

    bed.runtime.check("c1", pod.path).ok()  # a 0.2.0 plugin is not asked (CHECK is 0.4.0)
    bed.runtime.delete("c1", pod.path).ok()
    bed.assert_nothing_left(pod)
    bed.runtime.delete("c1", "", with_prev=False).ok()  # containerd's second DEL


def test_a_0_2_0_default_network_answers_in_the_runtimes_version(bed: Bed) -> None:
    pod = bed.pod("pod1")
    annotations = {DEFAULT_NETWORK: "default/net-old"}
    result = bed.runtime.add("c1", pod.path, annotations=annotations, version="0.4.0").ok()

    assert result["cniVersion"] == "0.4.0"
    (ip,) = result["ips"]
    assert ip["version"] == "4" and ip["address"].startswith("10.93.0.")
    assert ip["gateway"] == "10.93.0.1"
    assert "interface" not in ip  # a 0.2.0 result names no interface
    assert pod.links()["eth0"]["linkinfo"]["info_kind"] == "macvlan"
    assert pod.addresses("eth0") == [ip["address"]]

    bed.runtime.delete("c1", pod.path, version="0.4.0").ok()
    bed.assert_nothing_left(pod)


def test_unknown_keys_do_not_fail_the_pod_and_are_logged(bed: Bed) -> None:
    pod = bed.pod("pod1")
    networks = json.dumps(
        [{"name": "net-b", "colour": "blue", "IPs": ["10.90.0.77/24"], "interface": "data0"}]
    )
    bed.runtime.add("c1", pod.path, annotations={NETWORKS: networks}).ok()
    assert pod.addresses("data0") == ["10.90.0.77/24"]  # "IPs" read as Multus reads it
    (event,) = bed.daemon.events("network_selection_keys_ignored")
    assert event["elements"] == [
        {"network": "default/net-b", "ignored": ["colour"], "read_as": {"IPs": "ips"}}
    ]
    out = bed.runtime.add("c2", bed.pod("pod2").path, annotations={NETWORKS: "net-a@if1@if2"})
    assert (out.returncode, out.body["code"]) == (1, 7)
    assert "net-a@if1@if2" in out.body["msg"]
    bed.runtime.delete("c1", pod.path).ok()
    bed.assert_nothing_left(pod)
