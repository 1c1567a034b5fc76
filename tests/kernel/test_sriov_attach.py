"""`plexus-sriov` end to end against a driver that really takes PF-side VF settings: the PF is a
netdevsim port (VM tier, Debian's kernel), the sysfs tree and the VF netdevs come from the
synthetic bed (netdevsim's VFs have no netdevs), and the node agent gives the VFs out of a
pool as in local mode. Two pods get a VF each with their NAD's PF-side settings, seen by
`ip -d link show <pf>` exactly as a node admin would; DEL puts every setting back."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cnispec.errors import CheckFailed
from cnispec.identity import Holder
from delegates._ipam import Ipam
from delegates.external import RawExec
from delegates.plugin import PluginRequest
from delegates.sriov import Sriov
from kernel.netns import run_in_netns
from sriov.agent import NodeAgent
from sriov.audit import audit
from sriov.pools_source import PoolsFileSource
from sriov.sysfs import Sysfs
from testbed.netns import Netns
from testbed.sriov_bed import QuietSource, SriovBed
from tests.support.netdevsim import Nsim, netdevsim

pytestmark = pytest.mark.kernel

T = TypeVar("T")
POOL = "plexus.dev/nsim_vf"
PF = "0000:03:00.0"
NADS = {
    "p1": {"vlan": 100, "vlanQoS": 3, "vlanProto": "802.1ad", "spoofchk": "on", "trust": "on",
           "link_state": "enable", "min_tx_rate": 10, "max_tx_rate": 100},
    "p2": {"vlan": 200, "spoofchk": "off", "trust": "off", "mac": "02:00:00:00:02:02"},
}  # fmt: skip
SHOWN = {  # what `ip -d link show <pf>` says of each pod's VF afterwards
    "p1": {"vlan": "100", "qos": "3", "vlan_proto": "802.1ad", "spoofchk": "on", "trust": "on",
           "link_state": "enable", "min_tx_rate": "10", "max_tx_rate": "100"},
    "p2": {"vlan": "200", "spoofchk": "off", "trust": "off", "mac": "02:00:00:00:02:02"},
}  # fmt: skip


@dataclass
class Node:
    nsim: Nsim
    bed: SriovBed
    agent: NodeAgent
    plugin: Sriov
    netns: Callable[[str], Netns]

    def run(self, fn: Callable[[], T]) -> T:
        """As plexusd runs it: on a thread in the node's namespace."""
        return run_in_netns(self.nsim.node.path, fn)

    def request(self, pod: Netns, cid: str, vf: str, keys: dict[str, Any]) -> PluginRequest:
        config = {
            "cniVersion": "1.0.0",
            "name": "sriov-net",
            "type": "plexus-sriov",
            "deviceID": vf,
            "ipam": {"type": "static", "addresses": [{"address": "10.77.0.2/24"}]},
            **keys,
        }
        return PluginRequest(
            container_id=cid,
            netns=pod.path,
            ifname="net1",
            cni_args=f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={cid}",
            config=config,
        )


@pytest.fixture
def node(
    require_kernel: Callable[..., None], netns: Callable[[str], Netns], tmp_path: Path
) -> Iterator[Node]:
    require_kernel("netdevsim")
    with netdevsim(netns("node")) as nsim:
        # A PF without link takes its free VFs out of service; the bed copies the port's
        # operstate into the tree ("unknown" on 6.1's netdevsim, which reports no carrier).
        nsim.node.run("ip", "link", "set", nsim.pf, "up")
        bed = SriovBed(tmp_path / "sys", nsim.node)
        try:
            bed.add_pf(PF, ifname=nsim.pf, num_vfs=4, pf_netdev_exists=True, announce=False)
            pools = tmp_path / "pools.yaml"
            pools.write_text(
                f"pools:\n  - resourceName: {POOL}\n    selectors: {{rootDevices: [{PF}]}}\n"
            )
            agent = NodeAgent(
                sysfs=Sysfs(bed.root), pools=PoolsFileSource(pools), state_dir=tmp_path / "state",
                source_factory=QuietSource,
            )  # fmt: skip
            agent.start()
            try:
                run_in_netns(nsim.node.path, lambda: audit(agent.vfs))
                agent.audit_finished()
                plugin = Sriov(ipam=Ipam(exec_=RawExec(), timeout=30), owner=agent.vfs)
                yield Node(nsim, bed, agent, plugin, netns)
            finally:
                agent.stop()
        finally:
            bed.cleanup()


def test_two_pods_get_their_nads_pf_settings_and_del_puts_them_back(node: Node) -> None:
    shown_before = node.nsim.shown()
    links_before = node.nsim.node.links()
    pods, requests, indexes, results = {}, {}, {}, {}
    for cid, keys in NADS.items():
        pods[cid] = node.netns(cid)
        vf = node.agent.vfs.allocate(POOL, Holder(container_id=cid, ifname="net1"))
        indexes[cid] = node.agent.vfs.lookup(vf).vf.index
        requests[cid] = node.request(pods[cid], cid, vf, keys)
        results[cid] = node.run(lambda r=requests[cid]: node.plugin.add(r))

    shown = node.nsim.shown()
    for cid, want in SHOWN.items():
        assert {k: shown[indexes[cid]][k] for k in want} == want, (cid, shown[indexes[cid]])
        assert "net1" in pods[cid].links()
    assert pods["p2"].links()["net1"]["address"] == "02:00:00:00:02:02"
    untouched = set(shown) - set(indexes.values())
    assert {i: shown[i] for i in untouched} == {i: shown_before[i] for i in untouched}

    # CHECK compares the PF side with the NAD: a VLAN changed behind our back is reported.
    node.run(lambda: node.plugin.check(requests["p1"], results["p1"]))
    node.nsim.node.run("ip", "link", "set", node.nsim.pf, "vf", str(indexes["p1"]), "vlan", "5")
    with pytest.raises(CheckFailed, match="vlan"):
        node.run(lambda: node.plugin.check(requests["p1"], results["p1"]))
    # ...and the audit puts the NAD's VLAN back on the VF, which stays in its pod.
    report = node.run(lambda: audit(node.agent.vfs))
    assert report.corrected == [node.agent.vfs.held_by("p1", "net1").pci]  # type: ignore[union-attr]
    assert node.nsim.shown()[indexes["p1"]]["vlan"] == "100"
    node.run(lambda: node.plugin.check(requests["p1"], results["p1"]))
    assert "net1" in pods["p1"].links()

    for cid in NADS:
        node.run(lambda r=requests[cid]: node.plugin.delete(r))
        node.run(lambda r=requests[cid]: node.plugin.delete(r))  # a second DEL is fine
    assert node.nsim.shown() == shown_before  # every PF-side setting as it was
    links = node.nsim.node.links()
    for name, link in links_before.items():
        assert (links[name]["address"], links[name]["mtu"]) == (link["address"], link["mtu"])
    assert {p["resourceName"]: p["free"] for p in node.agent.membership.pools_view()} == {POOL: 4}


def test_a_multicast_vf_is_trusted_receives_every_group_and_routes_groups(node: Node) -> None:
    """`"multicast": true`: the PF trusts the VF (drivers filter multicast for untrusted VFs),
    the VF's netdev takes every group (ALLMULTI), and the pod's group routes go through it."""
    shown_before = node.nsim.shown()
    pod = node.netns("mc")
    vf = node.agent.vfs.allocate(POOL, Holder(container_id="mc", ifname="net1"))
    index = node.agent.vfs.lookup(vf).vf.index
    request = node.request(pod, "mc", vf, {"multicast": True, "mldVersion": 2})
    result = node.run(lambda: node.plugin.add(request))
    assert node.nsim.shown()[index]["trust"] == "on"
    assert "ALLMULTI" in pod.links()["net1"]["flags"]
    routes = pod.ip("-4", "route", "show", "224.0.0.0/4")
    assert [(r["dev"], r["metric"]) for r in routes] == [("net1", 100)]
    node.run(lambda: node.plugin.check(request, result))
    node.run(lambda: node.plugin.delete(request))
    assert node.nsim.shown() == shown_before  # trust put back as it was
