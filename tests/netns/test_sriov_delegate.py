"""`plexus-sriov` and the VF audit on the synthetic SR-IOV bed (testbed/sriov_bed.py): a
real `NodeAgent` over the bed's sysfs tree and a pools file, the delegate called in-process from
the bed's node namespace as the daemon calls it, and what `ip -d link` shows in the pod and the
node afterwards. The bed's VF netdevs are veth ends; where a real VF would behave differently
(the kernel hands a physical netdev back to the node when its pod netns dies) the test says so
and emulates the kernel (`refund_as_kernel_would`)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from textwrap import dedent
from typing import Any, TypeVar

import pytest

from cnispec.cni import Result
from cnispec.errors import DeviceSettingUnsupported, InvalidConfig, PlexusError
from cnispec.identity import Holder
from delegates._ipam import Ipam
from delegates.external import RawExec
from delegates.plugin import PluginRequest
from delegates.sriov import Sriov, SriovConf
from kernel.netlink import Netlink
from kernel.netns import run_in_netns
from kernel.rtnl import LinkExists
from sriov import vfconfig
from sriov.agent import NodeAgent
from sriov.audit import AuditReport, audit
from sriov.netdev import move_into_pod, vf_alias
from sriov.pools_source import PoolsFileSource
from sriov.records import HostState, VfRecord, VfSettings, VfState
from sriov.sysfs import Sysfs
from testbed.manifests import host_local, reservations
from testbed.netns import Netns, is_root, namespaces
from testbed.sriov_bed import QuietSource, SriovBed

PF = "0000:03:00.0"
PF_NAME = "pxsf0"
POOL = "plexus.dev/bed_vf"
VFIO_PF = "0000:05:00.0"
VFIO_POOL = "plexus.dev/bed_vfio"
POOL_MTU = 1450
CNI_ARGS = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1;K8S_POD_UID=uid-1"
T = TypeVar("T")


@dataclass
class World:
    bed: SriovBed
    node: Netns
    tmp: Path
    vfs: list[str]
    agent: NodeAgent
    plugin: Sriov
    made: list[Netns] = field(default_factory=list)

    @property
    def ipam_dir(self) -> Path:
        return self.tmp / "ipam"

    def pod(self, role: str) -> Netns:
        ns = Netns(f"{role}-{secrets.token_hex(2)}")
        self.made.append(ns)
        return ns

    def in_node(self, fn: Callable[[], T]) -> T:
        """Run `fn` in the node namespace, as plexusd runs the delegate."""
        return run_in_netns(self.node.path, fn)

    def record(self, pci: str) -> VfRecord:
        """The ledger's record of `pci` (the ledger lists free VFs only once they were used)."""
        return next((r for r in self.agent.vfs.records() if r.pci == pci), VfRecord(pci=pci))

    def restart(self) -> NodeAgent:
        """The daemon restarts (after a crash): a new agent over the same ledger, the audit,
        then VFs may be given out again."""
        self.agent.stop()
        self.agent = _agent(self.bed, self.tmp)
        self.plugin = Sriov(ipam=self.plugin._ipam, owner=self.agent.vfs)
        return self.agent

    def audit(self) -> AuditReport:
        report = self.in_node(lambda: audit(self.agent.vfs))
        self.agent.audit_finished()
        return report


def _agent(bed: SriovBed, tmp: Path) -> NodeAgent:
    agent = NodeAgent(
        sysfs=Sysfs(bed.root),
        pools=PoolsFileSource(tmp / "pools.yaml"),
        state_dir=tmp / "state",
        source_factory=QuietSource,
    )
    agent.start()
    return agent


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    if not is_root():
        pytest.skip("the SR-IOV bed makes network namespaces and needs root")
    with namespaces() as made:
        node = Netns(f"sriov-node-{secrets.token_hex(2)}")
        made.append(node)
        bed = SriovBed(tmp_path / "sys", node)
        try:
            vfs = bed.add_pf(PF, ifname=PF_NAME, num_vfs=4, announce=False)
            vfs += bed.add_pf(
                VFIO_PF, ifname="pxsf1", num_vfs=1, vf_driver="vfio-pci", announce=False
            )
            (tmp_path / "pools.yaml").write_text(
                dedent(f"""
                pools:
                  - resourceName: {POOL}
                    selectors:
                      rootDevices: ["{PF}#0-3"]
                    mtu: {POOL_MTU}
                  - resourceName: {VFIO_POOL}
                    deviceType: vfio-pci
                    selectors:
                      rootDevices: ["{VFIO_PF}#0"]
                """)
            )
            agent = _agent(bed, tmp_path)
            ipam = Ipam(exec_=RawExec(), timeout=30, data_dir=str(tmp_path))
            w = World(bed, node, tmp_path, vfs, agent, Sriov(ipam=ipam, owner=agent.vfs), made)
            try:
                w.audit()
                yield w
            finally:
                w.agent.stop()
        finally:
            bed.cleanup()


def netconf(world: World, vf: str, **extra: Any) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "sriov-net",
        "type": "plexus-sriov",
        "deviceID": vf,
        "ipam": host_local("10.66.0.0/24", world.ipam_dir),
        **extra,
    }


def request(
    pod: Netns, cid: str, config: dict[str, Any], prev: Result | None = None
) -> PluginRequest:
    if prev is not None:
        config = {**config, "prevResult": prev.to_wire("1.0.0")}
    return PluginRequest(
        container_id=cid,
        netns=pod.path,
        ifname="net1",
        cni_args=CNI_ARGS,
        path=("/usr/lib/cni",),
        config=config,
    )


def host_link(world: World, vf: str) -> dict[str, Any]:
    """The VF's netdev in the node, under its host name (the bed names VF i `pxsf0v<i>`)."""
    name = f"{PF_NAME}v{world.vfs.index(vf)}"
    return world.node.links()[name]


def assert_back_in_node(world: World, vf: str, before: dict[str, Any]) -> None:
    """Where DEL (or a heal) must leave a VF: in the node under its host name, MAC and MTU as
    before ADD, no alias, and free in the ledger."""
    link = host_link(world, vf)
    assert (link["address"], link["mtu"]) == (before["address"], before["mtu"])
    assert "ifalias" not in link, link.get("ifalias")
    assert "net1" not in world.node.links()
    assert world.record(vf).state == VfState.FREE
    assert world.record(vf).holder is None


def test_add_attaches_the_vf_check_passes_and_del_restores_it(world: World) -> None:
    vf = world.vfs[0]
    before = host_link(world, vf)
    pod = world.pod("p1")
    conf = netconf(world, vf, mac="02:00:00:aa:00:01", runtimeConfig={"mac": "02:00:00:bb:00:02"})

    result = world.in_node(lambda: world.plugin.add(request(pod, "c1", conf)))

    net1 = pod.links()["net1"]
    assert net1["address"] == "02:00:00:bb:00:02"  # runtimeConfig.mac wins over the NAD's
    assert net1["mtu"] == POOL_MTU
    assert "UP" in net1["flags"]
    assert net1["ifalias"] == vf_alias(vf, before["ifname"])
    assert pod.addresses("net1") == [result.ips[0].address]
    assert result.interfaces[0].pci_id == vf
    assert f"{PF_NAME}v0" not in world.node.links()
    arp_notify = pod.run("cat", "/proc/sys/net/ipv4/conf/net1/arp_notify").stdout.strip()
    assert arp_notify == "1"
    record = world.record(vf)
    assert record.state == VfState.ATTACHED
    assert (record.holder.pod_namespace, record.holder.pod_name) == ("default", "web-1")
    assert record.host == HostState(
        name=before["ifname"], mac=before["address"], mtu=1500, alias=None, up=False
    )

    world.in_node(lambda: world.plugin.check(request(pod, "c1", conf, result), result))

    world.in_node(lambda: world.plugin.delete(request(pod, "c1", conf, result)))
    assert set(pod.links()) == {"lo"}
    assert_back_in_node(world, vf, before)
    assert reservations(world.ipam_dir) == []
    world.in_node(lambda: world.plugin.delete(request(pod, "c1", conf, result)))  # again: fine


def test_check_notices_the_vf_gone_from_the_pod(world: World) -> None:
    vf = world.vfs[0]
    pod = world.pod("p1")
    conf = netconf(world, vf)
    result = world.in_node(lambda: world.plugin.add(request(pod, "c1", conf)))
    pod.run("ip", "link", "set", "net1", "name", "other0")
    with pytest.raises(PlexusError, match="net1 is missing") as info:
        world.in_node(lambda: world.plugin.check(request(pod, "c1", conf, result), result))
    assert info.value.code == 110


def test_a_stale_del_never_touches_a_vf_now_held_by_another_pod(world: World) -> None:
    vf = world.vfs[0]
    pod_a, pod_b = world.pod("a"), world.pod("b")
    conf = netconf(world, vf)
    world.in_node(lambda: world.plugin.add(request(pod_a, "ca", conf)))
    world.in_node(lambda: world.plugin.delete(request(pod_a, "ca", conf)))
    world.in_node(lambda: world.plugin.add(request(pod_b, "cb", conf)))

    world.in_node(lambda: world.plugin.delete(request(pod_a, "ca", conf)))  # late repeat of A's

    assert "net1" in pod_b.links()
    assert world.record(vf).state == VfState.ATTACHED
    assert world.record(vf).holder.container_id == "cb"


def test_the_audit_leaves_a_vf_the_pod_renamed(world: World) -> None:
    vf = world.vfs[0]
    pod = world.pod("p1")
    world.in_node(lambda: world.plugin.add(request(pod, "c1", netconf(world, vf))))
    pod.run("ip", "link", "set", "net1", "down")
    pod.run("ip", "link", "set", "net1", "name", "data0")  # an app with NET_ADMIN

    report = world.audit()

    assert (report.ok, report.healed) == (1, [])
    assert "data0" in pod.links()
    assert world.record(vf).state == VfState.ATTACHED


def test_a_pf_side_restore_that_fails_in_rollback_takes_the_vf_out_of_circulation(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bed's veth PF takes no PF-side setting; our own vfconfig adaptor stands in for a
    # driver that takes the VLAN but then refuses to clear it.
    def refuse(*_: Any) -> None:
        raise PlexusError("PF pxsf0 refused vlan=0 for VF 1: Device or resource busy")

    monkeypatch.setattr(vfconfig, "read_vf", lambda *_: VfSettings(vlan=0, qos=0))
    monkeypatch.setattr(vfconfig, "apply", lambda *_: ("vlan", "qos", "vlan_proto"))
    monkeypatch.setattr(vfconfig, "restore", refuse)
    vf = world.vfs[1]
    pod = _pod_with_net1(world)  # the move fails: the rollback runs
    with pytest.raises(LinkExists):
        world.in_node(lambda: world.plugin.add(request(pod, "c1", netconf(world, vf, vlan=100))))

    record = world.record(vf)
    assert record.state == VfState.UNHEALTHY  # never back in the pool with VLAN 100 on it
    assert "PF-side settings could not be put back" in record.reason


def test_a_del_that_fails_half_way_is_finished_by_the_audit(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The PF refuses to clear the VLAN once (busy): DEL fails (the runtime would retry), and if
    # it never does, the audit finishes the job: the VF must not stay "in flight" for ever.
    refusals = [PlexusError("PF pxsf0 refused vlan=0 for VF 1: Device or resource busy")]

    def restore_once_busy(*args: Any) -> None:
        if refusals:
            raise refusals.pop()
        # the bed's veth PF took nothing: nothing to put back

    monkeypatch.setattr(vfconfig, "read_vf", lambda *_: VfSettings(vlan=0, qos=0))
    monkeypatch.setattr(vfconfig, "apply", lambda *_: ("vlan", "qos", "vlan_proto"))
    monkeypatch.setattr(vfconfig, "restore", restore_once_busy)
    vf = world.vfs[1]
    before = host_link(world, vf)
    pod = world.pod("p1")
    conf = netconf(world, vf, vlan=100)
    world.in_node(lambda: world.plugin.add(request(pod, "c1", conf)))

    with pytest.raises(PlexusError, match="restore incomplete"):
        world.in_node(lambda: world.plugin.delete(request(pod, "c1", conf)))
    assert world.record(vf).state == VfState.RELEASING

    report = world.audit()
    assert report.healed == [vf]
    assert_back_in_node(world, vf, before)


def _pod_with_net1(world: World) -> Netns:
    pod = world.pod("busy")
    pod.run("ip", "link", "add", "net1", "type", "veth", "peer", "name", "other1")
    return pod


@pytest.mark.parametrize(
    ("case", "extra", "error"),
    [
        # Before the move: the driver refuses a PF-side setting (the bed's PF is a veth).
        ("vlan refused", {"vlan": 100}, DeviceSettingUnsupported),
        # At the move: the name is taken in the pod.
        ("ifname taken", {}, LinkExists),
        # After the move: IPAM fails, so the VF must come back out of the pod.
        ("ipam fails", {"ipam": {"type": "static", "addresses": [{"address": "bad"}]}}, None),
    ],
)
def test_a_failed_add_puts_everything_back(
    world: World, case: str, extra: dict[str, Any], error: type[PlexusError] | None
) -> None:
    vf = world.vfs[1]
    before = host_link(world, vf)
    pod = _pod_with_net1(world) if case == "ifname taken" else world.pod("p1")
    conf = netconf(world, vf, mac="02:00:00:aa:00:09", **extra)

    with pytest.raises(error or PlexusError):
        world.in_node(lambda: world.plugin.add(request(pod, "c1", conf)))

    assert_back_in_node(world, vf, before)
    assert set(pod.links()) <= {"lo", "net1", "other1"}
    assert reservations(world.ipam_dir) == []
    # and the VF is given out again
    ok = world.pod("p2")
    world.in_node(lambda: world.plugin.add(request(ok, "c2", netconf(world, vf))))
    assert "net1" in ok.links()


def refund_as_kernel_would(world: World, pod: Netns, vf: str, ifname: str = "net1") -> None:
    """Delete the pod's netns and give its VF back to the node as the kernel would.

    What it emulates: when a network namespace dies, the kernel moves each *physical* netdev in
    it (a real VF included) back to the initial namespace (net/core/dev.c
    default_device_exit_net), keeping its current name, or "devN" when that name is taken
    there; its MAC, MTU and ifalias go with it, and it arrives down.

    Why: the bed's VF netdevs are veth ends, which the kernel destroys with their namespace
    (together with their peer) instead. So this records the pod link's name, alias, MAC and MTU,
    deletes the namespace, waits for the veth pair to be gone, and recreates a veth end in the
    node under the pod's ifname with the same alias, MAC and MTU; its peer goes back into the
    bed's wire namespace under the VF's host name, as the bed made it (the bed's cleanup then
    removes it, as for every VF)."""
    link = pod.links()[ifname]
    alias, mac, mtu = link["ifalias"], link["address"], link["mtu"]
    host_name = f"{PF_NAME}v{world.vfs.index(vf)}"
    wire = world.bed.wire()
    assert wire is not None
    pod.delete()
    deadline = time.monotonic() + 10
    while host_name in wire.links():  # the netns (and the veth) is destroyed asynchronously
        assert time.monotonic() < deadline, "the pod's veth outlived its namespace"
        time.sleep(0.02)
    world.node.run(
        "ip", "link", "add", ifname, "type", "veth", "peer", "name", host_name, "netns", wire.name
    )
    world.node.run("ip", "link", "set", ifname, "address", mac, "mtu", str(mtu), "alias", alias)
    wire.run("ip", "link", "set", host_name, "up")


def test_del_after_the_pod_netns_is_gone(world: World) -> None:
    vf = world.vfs[2]
    before = host_link(world, vf)
    pod = world.pod("p1")
    conf = netconf(world, vf)
    world.in_node(lambda: world.plugin.add(request(pod, "c1", conf)))
    refund_as_kernel_would(world, pod, vf)
    assert "net1" in world.node.links()  # the VF, back in the node under the pod's name

    world.in_node(lambda: world.plugin.delete(request(pod, "c1", conf)))

    assert_back_in_node(world, vf, before)
    assert reservations(world.ipam_dir) == []
    world.in_node(lambda: world.plugin.delete(request(pod, "c1", conf)))


def test_del_of_a_vf_whose_netdev_is_nowhere_succeeds_and_marks_it_unhealthy(
    world: World,
) -> None:
    vf = world.vfs[0]
    pod = world.pod("p1")
    conf = netconf(world, vf)
    world.in_node(lambda: world.plugin.add(request(pod, "c1", conf)))
    pod.run("ip", "link", "del", "net1")  # gone for good (a veth end takes its peer with it)

    world.in_node(lambda: world.plugin.delete(request(pod, "c1", conf)))

    record = world.record(vf)
    assert record.state == VfState.UNHEALTHY
    assert "neither the pod's nor the node's" in record.reason
    assert reservations(world.ipam_dir) == []


def test_audit_heals_a_vf_whose_pod_vanished_without_del(world: World) -> None:
    vf = world.vfs[3]
    before = host_link(world, vf)
    pod = world.pod("p1")
    world.in_node(lambda: world.plugin.add(request(pod, "c1", netconf(world, vf))))
    refund_as_kernel_would(world, pod, vf)
    world.restart()

    report = world.audit()

    assert report.healed == [vf]
    assert report.unhealthy == []
    assert_back_in_node(world, vf, before)


def test_audit_leaves_a_healthy_attachment_alone(world: World) -> None:
    vf = world.vfs[0]
    pod = world.pod("p1")
    world.in_node(lambda: world.plugin.add(request(pod, "c1", netconf(world, vf))))
    world.restart()

    report = world.audit()

    assert (report.ok, report.healed, report.unhealthy) == (1, [], [])
    assert world.record(vf).state == VfState.ATTACHED
    assert "net1" in pod.links()


def test_audit_rolls_back_a_crash_between_move_and_record(world: World) -> None:
    """ADD's steps up to the move, then the daemon dies before `attached`: what the
    `sriov_vf_moved` failpoint does to plexusd, done here step by step."""
    vf = world.vfs[1]
    before = host_link(world, vf)
    pod = world.pod("p1")
    holder = Holder(container_id="c1", ifname="net1", netns=pod.path, pod_name="web-1")
    host = HostState(name=before["ifname"], mac=before["address"], mtu=before["mtu"])
    world.agent.vfs.claim(vf, holder)
    world.agent.vfs.prepare(vf, holder, host=host, pf_before=VfSettings(), pf_applied=())

    def moved_then_crash() -> None:
        with Netlink.open() as node:
            link = node.require(host.name)
            node.modify(link.index, alias=vf_alias(vf, host.name), what="test")
        move_into_pod(host.name, "net1", pod.path)

    world.in_node(moved_then_crash)
    assert "net1" in pod.links()
    world.restart()

    report = world.audit()

    assert report.healed == [vf]
    assert set(pod.links()) == {"lo"}
    assert_back_in_node(world, vf, before)


def test_audit_marks_a_vf_whose_netdev_vanished_unhealthy(world: World) -> None:
    vf = world.vfs[2]
    pod = world.pod("p1")
    world.in_node(lambda: world.plugin.add(request(pod, "c1", netconf(world, vf))))
    pod.delete()  # a veth end dies with its netns: no netdev anywhere to heal
    world.restart()

    report = world.audit()

    assert report.unhealthy == [vf]
    assert report.healed == []
    record = world.record(vf)
    assert record.state == VfState.UNHEALTHY
    assert record.reason
    assert world.audit().healed == []  # still nowhere: it stays out of circulation

    # The netdev turns up after all (a slow driver), as the kernel returns it: "devN", our
    # alias. The next audit heals it and gives it back.
    host_name = f"{PF_NAME}v{world.vfs.index(vf)}"
    wire = world.bed.wire()
    assert wire is not None
    deadline = time.monotonic() + 10
    while host_name in wire.links():  # the dead netns takes its veth pair down asynchronously
        assert time.monotonic() < deadline, "the pod's veth outlived its namespace"
        time.sleep(0.02)
    world.node.run(
        "ip", "link", "add", "dev7", "type", "veth", "peer", "name", host_name, "netns", wire.name
    )
    world.node.run("ip", "link", "set", "dev7", "alias", vf_alias(vf, host_name))
    report = world.audit()
    assert report.healed == [vf]
    assert host_name in world.node.links() and "dev7" not in world.node.links()
    assert world.record(vf).state == VfState.FREE


def test_a_vfio_vf_is_passed_through_without_a_netdev(world: World) -> None:
    vf = world.vfs[4]
    pod = world.pod("dpdk")
    conf = {"cniVersion": "1.0.0", "name": "dpdk", "type": "plexus-sriov", "deviceID": vf}

    result = world.in_node(lambda: world.plugin.add(request(pod, "c1", conf)))

    assert [(i.name, i.pci_id, i.mac) for i in result.interfaces] == [("net1", vf, None)]
    assert result.ips == []
    assert set(pod.links()) == {"lo"}
    assert world.record(vf).state == VfState.ATTACHED
    assert world.record(vf).host is None
    world.in_node(lambda: world.plugin.check(request(pod, "c1", conf, result), result))
    world.in_node(lambda: world.plugin.delete(request(pod, "c1", conf, result)))
    assert world.record(vf).state == VfState.FREE


def test_add_without_device_id_says_how_to_get_one(world: World) -> None:
    conf = netconf(world, "")
    del conf["deviceID"]
    with pytest.raises(InvalidConfig, match=r"k8s\.v1\.cni\.cncf\.io/resourceName"):
        world.in_node(lambda: world.plugin.add(request(world.pod("p"), "c1", conf)))


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ({"vlan": 4095}, "less than or equal to 4094"),
        ({"vlanQoS": 3}, "vlanQoS needs vlan"),
        ({"vlan": 0, "vlanQoS": 3}, "non-zero vlan"),
        ({"vlanProto": "802.1ad"}, "vlanProto needs vlan"),
        ({"vlan": 0, "vlanProto": "802.1ad"}, "802.1ad needs a vlan above 0"),
        ({"spoofchk": "yes"}, "'on' or 'off'"),
        ({"link_state": "up"}, "'auto', 'enable' or 'disable'"),
        ({"min_tx_rate": 200, "max_tx_rate": 100}, "min_tx_rate is above max_tx_rate"),
        ({"max_tx_rate": -1}, "greater than or equal to 0"),
        ({"mac": "02:00:00"}, "not a MAC address"),
    ],
)
def test_config_errors(keys: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        SriovConf.model_validate({"type": "plexus-sriov", "deviceID": "0000:03:02.0", **keys})


def test_config_takes_sriov_cni_keys() -> None:
    conf = SriovConf.model_validate(
        {
            "deviceID": "0000:03:02.0",
            "vlan": 100,
            "vlanQoS": 2,
            "vlanProto": "802.1Q",
            "spoofchk": "off",
            "trust": "on",
            "link_state": "enable",
            "min_tx_rate": 0,
            "max_tx_rate": 1000,
            "someFutureKey": True,  # ignored, as sriov-cni ignores it
        }
    )
    assert conf.pf_side(None) == VfSettings(
        vlan=100,
        qos=2,
        vlan_proto="802.1q",
        spoofchk=False,
        trust=True,
        link_state="enable",
        min_tx_rate=0,
        max_tx_rate=1000,
    )


def test_multicast_config_trusts_the_vf_unless_told_not_to() -> None:
    base = {"type": "plexus-sriov", "deviceID": "0000:03:02.0"}
    assert SriovConf.model_validate({**base, "multicast": True}).pf_side(None).trust is True
    assert SriovConf.model_validate(base).pf_side(None).trust is None  # left as the VF has it
    with pytest.raises(ValueError, match="needs the VF trusted"):
        SriovConf.model_validate({**base, "multicast": True, "trust": "off"})
    with pytest.raises(ValueError, match='need "multicast": true'):
        SriovConf.model_validate({**base, "igmpVersion": 2})
