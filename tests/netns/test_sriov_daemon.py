"""SR-IOV end to end through the installed shim, on the synthetic sysfs bed: a real plexusd in
local mode in a node namespace whose "VFs" are real links, pods as namespaces. What an operator
checks: `ip -d link` in the pod and the node, `plexusctl vfs`/`pools`, the network-status JSON.

The bed's PF is a veth, whose driver cannot set PF-side VF settings: the NADs here set none
(the VM tier proves them on netdevsim), and one that asks for a VLAN shows the error and the
rollback.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from metaplugin.client import get
from testbed.manifests import host_local, nad
from testbed.netns import Netns
from testbed.runtime import Outcome
from testbed.sriov_bed import SriovBed
from tests.netns.conftest import NETWORKS, Bed, make_bed

PLEXUSCTL = str(Path(sys.executable).with_name("plexusctl"))
POOL = "plexus.dev/intel_vf"
PF = "0000:03:00.0"
RESOURCE = "k8s.v1.cni.cncf.io/resourceName"


class SriovNode:
    def __init__(self, bed: Bed, hw: SriovBed, vfs: list[str], pools: Path) -> None:
        self.bed, self.hw, self.vfs, self.pools = bed, hw, vfs, pools

    def vf_table(self) -> dict[str, dict[str, Any]]:
        status, body = get(self.bed.daemon.socket, "/v1/vfs")
        assert status == 200, body
        return {v["pci"]: v for v in json.loads(body)}

    def pool(self) -> dict[str, Any]:
        status, body = get(self.bed.daemon.socket, "/v1/pools")
        assert status == 200, body
        (pool,) = [p for p in json.loads(body) if p["resourceName"] == POOL]
        return pool

    def host_links(self) -> dict[str, dict[str, Any]]:
        """The VF links in the node namespace, by name."""
        names = {self.hw.vf_netdev(vf) for vf in self.vfs}
        return {n: link for n, link in self.bed.node.links().items() if n in names}

    def add(self, cid: str, pod: Netns, networks: Any = "sriov-net") -> Outcome:
        value = networks if isinstance(networks, str) else json.dumps(networks)
        return self.bed.runtime.add(
            cid, pod.path, annotations={NETWORKS: value}, pod=("default", pod.name)
        )


def _sriov_nad(name: str, subnet: str, ipam_dir: Path, **extra: Any) -> dict[str, Any]:
    return nad(
        name,
        {
            "cniVersion": "1.0.0",
            "name": name,
            "type": "plexus-sriov",
            "capabilities": {"mac": True},
            "ipam": host_local(subnet, ipam_dir),
            **extra,
        },
        annotations={RESOURCE: POOL},
    )


@pytest.fixture
def node(tmp_path: Path) -> Iterator[SriovNode]:
    hw: SriovBed | None = None
    pools = tmp_path / "vf-pools.yaml"
    pools.write_text(
        yaml.safe_dump(
            {"pools": [{"resourceName": POOL, "selectors": {"vendors": ["8086"]}, "mtu": 9000}]}
        )
    )
    made: list[str] = []

    def configure(netns: Netns, nads: list[dict[str, Any]]) -> dict[str, Any]:
        nonlocal hw
        hw = SriovBed(tmp_path / "sys", netns)
        made.extend(hw.add_pf(PF, ifname="pxpf0", num_vfs=4))
        ipam = tmp_path / "ipam"
        nads.append(_sriov_nad("sriov-net", "10.56.217.0/24", ipam))
        nads.append(_sriov_nad("sriov-vlan", "10.56.218.0/24", ipam, vlan=100))
        nads.append(_sriov_nad("sriov-macvlan", "10.56.220.0/24", ipam, type="macvlan"))
        (tmp_path / "nads").mkdir()
        (tmp_path / "nads" / "nads.yaml").write_text(yaml.safe_dump_all(nads))
        return {
            "localDir": str(tmp_path / "nads"),
            "sysfsRoot": str(hw.root),
            "vfPools": str(pools),
        }

    try:
        with make_bed(tmp_path, configure) as bed:
            assert hw is not None
            yield SriovNode(bed, hw, made, pools)
    finally:
        if hw is not None:
            hw.cleanup()


def _wait(predicate: Any, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_two_pods_get_vfs_and_del_restores_them(node: SriovNode) -> None:
    before = node.host_links()
    assert len(before) == 4
    pod1, pod2 = node.bed.pod("pod1"), node.bed.pod("pod2")
    node.add("c1", pod1, [{"name": "sriov-net", "mac": "02:aa:bb:cc:dd:01"}]).ok()
    node.add("c2", pod2).ok()

    for pod in (pod1, pod2):
        net1 = pod.links()["net1"]
        assert net1["mtu"] == 9000  # the pool's MTU
        assert net1["operstate"] in ("UP", "LOWERLAYERDOWN", "UNKNOWN")
        assert pod.addresses("net1")[0].startswith("10.56.217.")
    assert pod1.links()["net1"]["address"] == "02:aa:bb:cc:dd:01"
    taken = set(before) - set(node.host_links())
    assert len(taken) == 2  # two VFs left the node...
    held = {v["pci"]: v for v in node.vf_table().values() if v["state"] == "attached"}
    assert sorted(v["holder"] for v in held.values()) == sorted(
        f"default/{p.name} (net1)" for p in (pod1, pod2)
    )  # ...and each has exactly one holder
    assert node.pool()["inUse"] == 2

    out = subprocess.run(
        [PLEXUSCTL, "--socket", node.bed.daemon.socket, "network-status", f"default/{pod1.name}"],
        capture_output=True,
        text=True,
        check=True,
    )
    sriov = next(e for e in json.loads(out.stdout) if e["name"] == "default/sriov-net")
    pci = sriov["device-info"]["pci"]
    assert sriov["device-info"]["type"] == "pci"
    assert pci["pci-address"] in held and pci["pf-pci-address"] == PF

    node.bed.runtime.delete("c1", pod1.path).ok()
    after = node.host_links()
    restored = set(after) - (set(before) - taken)
    assert len(restored) == 1
    (name,) = restored
    assert after[name]["address"] == before[name]["address"]
    assert after[name]["mtu"] == before[name]["mtu"]
    assert not after[name].get("ifalias")
    assert "net1" not in pod1.links()
    assert node.vf_table()[pci["pci-address"]]["state"] == "free"
    node.bed.runtime.delete("c1", pod1.path).ok()  # a second DEL is fine
    node.bed.runtime.delete("c2", pod2.path).ok()
    assert set(node.host_links()) == set(before)
    assert node.pool()["free"] == 4
    assert node.bed.reservations() == []


def test_a_pf_setting_the_driver_refuses_rolls_everything_back(node: SriovNode) -> None:
    before = node.host_links()
    pod = node.bed.pod("pod1")
    out = node.add("c1", pod, "sriov-vlan")
    assert out.returncode == 1
    assert out.body["code"] == 113, out.body  # DeviceSettingUnsupported, naming the setting
    assert "refused vlan=100" in out.body["msg"]
    assert node.host_links().keys() == before.keys()
    assert set(pod.links()) == {"lo"}
    assert node.pool()["free"] == 4
    assert node.bed.reservations() == [] and node.bed.records() == []


def test_an_empty_pool_is_a_clear_error(node: SriovNode) -> None:
    pods = [node.bed.pod(f"pod{i}") for i in range(5)]
    for i, pod in enumerate(pods[:4]):
        node.add(f"c{i}", pod).ok()
    out = node.add("c4", pods[4])
    assert out.returncode == 1 and out.body["code"] == 111, out.body
    assert POOL in out.body["msg"]
    assert set(pods[4].links()) == {"lo"}
    for i, pod in enumerate(pods[:4]):
        node.bed.runtime.delete(f"c{i}", pod.path).ok()
    assert node.pool()["free"] == 4


def _refund_as_the_kernel_would(node: SriovNode, pod: Netns, ifname: str) -> None:
    """Delete the pod's netns without DEL, then put its VF back in the node the way the
    kernel does for a physical VF: same name, same alias and MAC. The bed's "VFs" are veths,
    which the kernel destroys with their netns instead, so the bed recreates the link."""
    link = pod.links()[ifname]
    pod.delete()
    wire = node.hw.wire()
    assert wire is not None
    node.bed.node.run(
        "ip", "link", "add", ifname, "address", link["address"], "type", "veth",
        "peer", "name", f"rf{ifname}", "netns", wire.name,
    )  # fmt: skip
    node.bed.node.run("ip", "link", "set", ifname, "alias", link["ifalias"])


def test_pod_netns_gone_without_del_then_restart_heals_the_vf(node: SriovNode) -> None:
    before = node.host_links()
    pod = node.bed.pod("pod1")
    node.add("c1", pod).ok()
    (pci,) = [p for p, v in node.vf_table().items() if v["state"] == "attached"]
    host_name = node.hw.vf_netdev(pci)
    assert host_name is not None and host_name not in node.host_links()
    node.bed.daemon.kill()  # the node "reboots": no DEL ever comes for c1's netns
    _refund_as_the_kernel_would(node, pod, "net1")
    assert "net1" in node.bed.node.links()

    node.bed.daemon.start()
    links = node.bed.node.links()
    assert "net1" not in links and host_name in links
    assert links[host_name]["mtu"] == before[host_name]["mtu"]
    assert links[host_name]["address"] == before[host_name]["address"]
    assert node.vf_table()[pci]["state"] == "free"
    assert node.bed.daemon.events("vf_healed")
    node.bed.runtime.delete("c1", pod.path).ok()  # the runtime's late DEL still succeeds
    assert node.pool()["free"] == 4


def test_sigkill_between_vf_move_and_record_then_restart(node: SriovNode) -> None:
    pod = node.bed.pod("pod1")
    node.bed.daemon.stop()
    node.bed.daemon.start(env={"PLEXUS_FAILPOINTS": "sriov_vf_moved"})
    out = node.add("c1", pod)
    assert out.returncode == 1 and out.body["code"] == 11, out.body  # the daemon died
    assert node.bed.daemon.proc is not None and node.bed.daemon.proc.wait(10) == -9
    assert "net1" in pod.links()  # the VF had reached the pod

    node.bed.daemon.start()
    assert "net1" not in pod.links()
    assert len(node.host_links()) == 4
    table = node.vf_table()
    assert {v["state"] for v in table.values()} == {"free"}, table
    node.bed.runtime.delete("c1", pod.path, with_prev=False).ok()

    # No VF lost or given twice: four pods get the four VFs, a fifth gets none.
    pods = [node.bed.pod(f"p{i}") for i in range(5)]
    got: list[str] = []
    for i, p in enumerate(pods[:4]):
        node.add(f"n{i}", p).ok()
        mine = f"default/{p.name} (net1)"
        got += [v["pci"] for v in node.vf_table().values() if v["holder"] == mine]
    assert sorted(got) == sorted(node.vfs)
    assert node.add("n4", pods[4]).body["code"] == 111
    for i, p in enumerate(pods[:4]):
        node.bed.runtime.delete(f"n{i}", p.path).ok()


def test_a_new_pf_joins_its_pool_without_a_restart(node: SriovNode) -> None:
    assert node.pool()["total"] == 4
    node.hw.add_pf("0000:05:00.0", ifname="pxpf1", num_vfs=2)
    _wait(lambda: node.pool()["total"] == 6, "the new PF's VFs did not join the pool")
    assert node.pool()["free"] == 6
    node.hw.remove_vf(node.vfs[3])
    _wait(
        lambda: node.vf_table()[node.vfs[3]]["reason"] == "gone from sysfs",
        "the removed VF is not reported gone",
    )
    assert node.pool()["healthy"] == 5


def test_pools_file_edits_apply_without_a_restart(node: SriovNode) -> None:
    node.pools.write_text(
        yaml.safe_dump(
            {
                "pools": [
                    {"resourceName": POOL, "selectors": {"rootDevices": [f"{PF}#0-1"]}},
                    {"resourceName": "plexus.dev/other", "selectors": {"rootDevices": [PF]}},
                ]
            }
        )
    )
    _wait(lambda: node.pool()["total"] == 2, "the edited pools file was not applied")
    out = subprocess.run(
        [PLEXUSCTL, "--socket", node.bed.daemon.socket, "pools"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "plexus.dev/other" in out.stdout and "PCIDEVICE_PLEXUS_DEV_OTHER" in out.stdout


def test_concurrent_adds_never_share_a_vf(node: SriovNode) -> None:
    pods = [node.bed.pod(f"pod{i}") for i in range(4)]
    outs: dict[int, Outcome] = {}
    threads = [
        threading.Thread(target=lambda i=i, p=p: outs.__setitem__(i, node.add(f"c{i}", p)))
        for i, p in enumerate(pods)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(o.returncode == 0 for o in outs.values()), outs
    # Each pod's net1 is a different VF: our alias on it names the VF's PCI address.
    in_pods = {p.links()["net1"]["ifalias"].split()[1] for p in pods}
    assert in_pods == set(node.vfs)
    for i, p in enumerate(pods):
        node.bed.runtime.delete(f"c{i}", p.path).ok()


def test_local_mode_gives_pool_vfs_only_to_plexus_sriov(node: SriovNode) -> None:
    # Only plexus-sriov gives its VF back on DEL: any other plugin would leak it.
    pod = node.bed.pod("pod1")
    out = node.add("c1", pod, "sriov-macvlan")
    assert out.returncode == 1 and out.body["code"] == 7, out.body
    assert "serves only plexus-sriov" in out.body["msg"]
    assert node.pool()["free"] == 4
    assert set(pod.links()) == {"lo"}
