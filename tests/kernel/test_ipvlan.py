"""plexus-ipvlan on a kernel that has ipvlan (the VM tier): the delegate's own code path, called
in-process from a "node" namespace, as the daemon calls it. Modes and port flags show in
`ip -d link`, two l2 pods on one parent reach each other, CHECK and DEL do their job."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cnispec.cni import Result
from delegates._ipam import Ipam
from delegates.external import RawExec
from delegates.ipvlan import Ipvlan
from delegates.plugin import PluginRequest
from kernel.netns import run_in_netns
from testbed.manifests import host_local, reservations
from testbed.netns import Netns

NetnsFactory = Callable[[str], Netns]


def request(
    pod: Netns, cid: str, conf: dict[str, Any], prev: Result | None = None
) -> PluginRequest:
    config = {"cniVersion": "1.0.0", "name": "ipv", "type": "plexus-ipvlan", **conf}
    if prev is not None:
        config["prevResult"] = prev.to_wire("1.0.0")
    return PluginRequest(
        container_id=cid, netns=pod.path, ifname="net1", path=("/usr/lib/cni",), config=config
    )


@pytest.fixture
def node(require_kernel: Callable[..., None], netns: NetnsFactory) -> Netns:
    require_kernel("ipvlan", "dummy")
    ns = netns("node")
    ns.run("ip", "link", "add", "parent0", "type", "dummy")
    ns.run("ip", "link", "set", "parent0", "up")
    return ns


def test_l2_pods_on_one_parent_talk_check_and_del(
    node: Netns, netns: NetnsFactory, tmp_path: Path
) -> None:
    plugin = Ipvlan(ipam=Ipam(exec_=RawExec(), timeout=30, data_dir=str(tmp_path)))
    conf = {"master": "parent0", "mode": "l2", "ipam": host_local("10.80.0.0/24", tmp_path)}
    a, b = netns("a"), netns("b")
    results = [
        run_in_netns(node.path, lambda p=p, c=c: plugin.add(request(p, c, conf)))
        for p, c in ((a, "ca"), (b, "cb"))
    ]
    link = a.links()["net1"]
    assert link["linkinfo"]["info_kind"] == "ipvlan"
    assert link["linkinfo"]["info_data"]["mode"] == "l2"
    target = results[1].ips[0].address.split("/")[0]
    out = a.run("busybox", "ping", "-c", "1", "-W", "5", target, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    run_in_netns(node.path, lambda: plugin.check(request(a, "ca", conf), results[0]))
    for pod, cid, prev in ((a, "ca", results[0]), (b, "cb", results[1])):
        run_in_netns(node.path, lambda p=pod, c=cid, r=prev: plugin.delete(request(p, c, conf, r)))
        assert set(pod.links()) == {"lo"}
    assert reservations(tmp_path) == []
    run_in_netns(node.path, lambda: plugin.delete(request(a, "ca", conf)))  # twice: fine


@pytest.mark.parametrize(("mode", "flag"), [("l3", "private"), ("l3s", "vepa"), ("l2", "bridge")])
def test_modes_and_port_flags(
    node: Netns, netns: NetnsFactory, tmp_path: Path, mode: str, flag: str
) -> None:
    plugin = Ipvlan(ipam=Ipam(exec_=RawExec(), timeout=30, data_dir=str(tmp_path)))
    conf = {
        "master": "parent0",
        "mode": mode,
        "flag": flag,
        "ipam": host_local("10.81.0.0/24", tmp_path),
    }
    pod = netns("p")
    run_in_netns(node.path, lambda: plugin.add(request(pod, "c1", conf)))
    data = pod.links()["net1"]["linkinfo"]["info_data"]
    assert data["mode"] == mode
    # iproute2 prints the port flag as a boolean key: "private" / "vepa", nothing for bridge
    shown = [f for f in ("private", "vepa") if data.get(f)] or ["bridge"]
    assert shown == [flag]
    run_in_netns(node.path, lambda: plugin.delete(request(pod, "c1", conf)))
    assert reservations(tmp_path) == []
