"""The node's SR-IOV side as kubelet sees it, on the synthetic bed: plexusd's SR-IOV assembly
(`SriovNode`, cluster mode) follows the bed's uevents in its node namespace and serves one device
plugin per pool to the kubelet stand-in. What kubelet would see: nothing advertised before the
audit, real health in ListAndWatch within a second of a change (a VF gone or rebound, its PF's
link pulled), new PFs without a restart,
re-registration after a kubelet restart, and the devices PodResources says a pod was granted
going into the attachment's config."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cnispec.identity import Holder, PodInfo
from kernel.netns import run_in_netns
from metaplugin.config import DaemonConfig
from metaplugin.daemon import sriov_settings
from sriov.devices import DeviceRequest
from sriov.node import SriovNode
from sriov.uevents import open_source
from testbed.sriov_bed import SriovBed
from tests.support.kubelet import KubeletStandin

POOL = "plexus.dev/intel_vf"
DPDK = "plexus.dev/intel_dpdk"
PF = "0000:03:00.0"
DPDK_PF = "0000:05:00.0"
NEW_PF = "0000:03:00.1"  # appears while the agent runs


@dataclass
class World:
    bed: SriovBed
    kubelet: KubeletStandin
    node: SriovNode

    def seen(self) -> dict[str, str]:
        return {pci: d.health for pci, d in self.kubelet.devices.get(POOL, {}).items()}


@pytest.fixture
def world(sriov_bed: SriovBed, tmp_path: Path) -> Iterator[World]:
    sockets = Path(tempfile.mkdtemp(prefix="pxs", dir="/tmp"))  # unix paths <= 107 bytes
    sriov_bed.add_pf(PF, ifname="pxpf0", num_vfs=4)
    sriov_bed.add_pf(DPDK_PF, ifname="pxpf9", num_vfs=2, vf_driver="vfio-pci")
    pools = tmp_path / "pools.yaml"
    pools.write_text(
        yaml.safe_dump(
            {
                "pools": [
                    {
                        "resourceName": POOL,
                        "selectors": {"vendors": ["8086"], "rootDevices": [PF, NEW_PF]},
                    },
                    {
                        "resourceName": DPDK,
                        "deviceType": "vfio-pci",
                        "selectors": {"rootDevices": [DPDK_PF]},
                    },
                ]
            }
        )
    )
    cfg = DaemonConfig.model_validate(
        {
            "stateDir": str(tmp_path / "state"),
            "runDir": str(tmp_path / "run"),
            "sysfsRoot": str(sriov_bed.root),
            "vfPools": str(pools),
            "devicePluginDir": str(sockets / "dp"),
            "podResourcesSocket": str(sockets / "pr" / "kubelet.sock"),
        }
    )
    kubelet = KubeletStandin(sockets / "dp", sockets / "pr").start()
    node_ns = sriov_bed.node
    assert node_ns is not None
    root = sriov_bed.root  # the daemon's own source (uevents + link changes), in the node's netns
    node = SriovNode(
        sriov_settings(cfg),
        source_factory=lambda: run_in_netns(node_ns.path, lambda: open_source(root)),
    )
    try:
        yield World(sriov_bed, kubelet, node)
    finally:
        node.stop()
        kubelet.stop()
        shutil.rmtree(sockets, ignore_errors=True)


def test_nothing_is_advertised_before_the_audit(world: World) -> None:
    world.node.start_agent()
    time.sleep(0.5)
    assert world.kubelet.registrations == []  # kubelet must not count unverified VFs
    world.node.heal_and_open()
    assert world.kubelet.wait_for(lambda k: k.registered(POOL) == 1)
    assert world.kubelet.wait_for(lambda _: len(world.seen()) == 4)
    assert set(world.seen().values()) == {"Healthy"}


def test_health_follows_the_hardware_within_a_second(world: World) -> None:
    world.node.start_agent()
    world.node.heal_and_open()
    assert world.kubelet.wait_for(lambda _: len(world.seen()) == 4)
    vfs = sorted(world.seen())

    started = time.monotonic()
    world.bed.remove_vf(vfs[1])
    assert world.kubelet.wait_for(lambda _: world.seen().get(vfs[1]) == "Unhealthy", 1.0)
    took = time.monotonic() - started
    assert took < 1.0, took
    assert world.seen()[vfs[0]] == "Healthy"

    world.bed.bind(vfs[2], "vfio-pci")  # a netdevice pool cannot use a vfio-bound VF
    assert world.kubelet.wait_for(lambda _: world.seen().get(vfs[2]) == "Unhealthy", 1.0)
    world.bed.bind(vfs[2], "iavf")
    assert world.kubelet.wait_for(lambda _: world.seen().get(vfs[2]) == "Healthy", 1.0)

    new = world.bed.add_pf(NEW_PF, ifname="pxpf1", num_vfs=2)
    assert world.kubelet.wait_for(lambda _: set(new) <= set(world.seen()), 1.0)
    assert {world.seen()[v] for v in new} == {"Healthy"}


def test_health_follows_the_pfs_link_within_a_second(world: World) -> None:
    world.node.start_agent()
    world.node.heal_and_open()
    assert world.kubelet.wait_for(lambda _: len(world.seen()) == 4)
    held, *free = sorted(world.seen())
    holder = Holder(container_id="c1", ifname="net1")
    world.node.agent.vfs.claim(held, holder)  # as ADD does with the VF kubelet granted
    world.node.agent.vfs.attached(held, holder)

    started = time.monotonic()
    world.bed.set_pf_link(PF, False)  # the cable is pulled: the kernel says so by rtnetlink only
    down = dict.fromkeys(free, "Unhealthy") | {held: "Healthy"}
    assert world.kubelet.wait_for(lambda _: world.seen() == down, 1.0), world.seen()
    took = time.monotonic() - started
    assert took < 1.0, took
    reasons = {v.pci: v.reason for v in world.node.agent.membership.vfs_view() if v.pool == POOL}
    assert {reasons[pci] for pci in free} == {"PF pxpf0 has no link (operstate lowerlayerdown)"}
    assert reasons[held] == ""  # kubelet evicts nothing for it: the pod keeps its VF
    pools = {p["resourceName"]: p for p in world.node.agent.membership.pools_view()}
    assert (pools[POOL]["healthy"], pools[POOL]["free"]) == (1, 0)

    started = time.monotonic()
    world.bed.set_pf_link(PF, True)
    assert world.kubelet.wait_for(lambda _: set(world.seen().values()) == {"Healthy"}, 1.0)
    assert time.monotonic() - started < 1.0


def test_kubelet_restart_and_allocate(world: World) -> None:
    world.node.start_agent()
    world.node.heal_and_open()
    assert world.kubelet.wait_for(lambda _: len(world.seen()) == 4)
    world.kubelet.restart()
    assert world.kubelet.wait_for(lambda k: k.registered(POOL) == 2, 5.0)
    assert world.kubelet.wait_for(lambda _: len(world.seen()) == 4)
    vfs = sorted(world.seen())
    reply = world.kubelet.allocate(POOL, vfs[:2])
    envs = dict(reply.container_responses[0].envs)
    assert envs["PCIDEVICE_PLEXUS_DEV_INTEL_VF"] == ",".join(vfs[:2])


def test_an_attachment_gets_the_vf_kubelet_granted(world: World) -> None:
    world.node.start_agent()
    world.node.heal_and_open()
    vfs = sorted(v.pci for v in world.node.agent.membership.vfs_view())
    world.kubelet.set_pod("default", "web", {POOL: [vfs[2], vfs[0]]})
    pod = PodInfo("default", "web", "uid-1")
    requests = [
        DeviceRequest(
            Holder.of("c1", ifname, "/proc/self/ns/net", pod), net, POOL, ("plexus-sriov",)
        )
        for ifname, net in (("net1", "default/sriov-a"), ("net2", "default/sriov-b"))
    ]
    got = world.node.devices.assign(pod, requests)
    assert got == [vfs[2], vfs[0]]  # kubelet's order
    info = world.node.devices.device_info(vfs[2])
    assert info == {"pci-address": vfs[2], "pf-pci-address": PF}


def test_a_vfio_pool_hands_out_its_vfio_group(world: World) -> None:
    world.node.start_agent()
    world.node.heal_and_open()
    assert world.kubelet.wait_for(lambda k: len(k.devices.get(DPDK, {})) == 2)
    vf = sorted(world.kubelet.devices[DPDK])[0]
    group = (world.bed.root / "bus/pci/devices" / vf / "iommu_group").readlink().name
    reply = world.kubelet.allocate(DPDK, [vf])
    specs = {(d.container_path, d.host_path) for d in reply.container_responses[0].devices}
    assert specs == {
        ("/dev/vfio/vfio", "/dev/vfio/vfio"),
        (f"/dev/vfio/{group}", f"/dev/vfio/{group}"),
    }
    assert dict(reply.container_responses[0].envs) == {"PCIDEVICE_PLEXUS_DEV_INTEL_DPDK": vf}
