"""Smoke tests of the kernel VM tier: the link kinds this machine's kernel lacks (dummy, ipvlan,
802.1q) exist in the VM and carry traffic. They skip, with the reason, on a kernel without them
and run under `make kernel`. Each builds only what it proves: Python runs 15-25x slower there."""

from __future__ import annotations

from collections.abc import Callable

from testbed.netns import Netns

NetnsFactory = Callable[[str], Netns]


def ping(src: Netns, address: str) -> None:
    # busybox's ping: the VM's root is the host's, and busybox-static is a project dependency.
    out = src.run("busybox", "ping", "-c", "1", "-W", "5", address, check=False)
    assert out.returncode == 0, f"{src.name} cannot reach {address}: {out.stdout}{out.stderr}"


def test_dummy_link_comes_up_with_an_address(
    require_kernel: Callable[..., None], netns: NetnsFactory
) -> None:
    require_kernel("dummy")
    ns = netns("dummy")
    ns.ip("link", "add", "d0", "type", "dummy")
    ns.ip("addr", "add", "10.77.0.1/24", "dev", "d0")
    ns.ip("link", "set", "d0", "up")

    link = ns.links()["d0"]
    assert link["linkinfo"]["info_kind"] == "dummy"
    assert "UP" in link["flags"]
    assert ns.addresses("d0") == ["10.77.0.1/24"]


def test_ipvlan_l2_slaves_of_one_dummy_in_two_namespaces_ping_each_other(
    require_kernel: Callable[..., None], netns: NetnsFactory
) -> None:
    require_kernel("dummy", "ipvlan")
    node, pod_a, pod_b = netns("node"), netns("a"), netns("b")
    node.ip("link", "add", "d0", "type", "dummy")
    node.ip("link", "set", "d0", "up")
    for pod, slave, address in ((pod_a, "iva", "10.78.0.1/24"), (pod_b, "ivb", "10.78.0.2/24")):
        node.ip(
            "link", "add", slave, "link", "d0", "netns", pod.name, "type", "ipvlan", "mode", "l2"
        )
        pod.ip("addr", "add", address, "dev", slave)
        pod.ip("link", "set", slave, "up")

    info = pod_a.links()["iva"]["linkinfo"]
    assert (info["info_kind"], info["info_data"]["mode"]) == ("ipvlan", "l2")
    ping(pod_a, "10.78.0.2")


def test_vlan_subinterfaces_on_a_veth_pair_carry_tagged_traffic(
    require_kernel: Callable[..., None], netns: NetnsFactory
) -> None:
    require_kernel("8021q", "veth")
    left, right = netns("left"), netns("right")
    left.ip("link", "add", "vl", "type", "veth", "peer", "name", "vr", "netns", right.name)
    for ns, parent, address in ((left, "vl", "10.79.0.1/24"), (right, "vr", "10.79.0.2/24")):
        vlan = f"{parent}.42"
        ns.ip("link", "set", parent, "up")
        ns.ip("link", "add", "link", parent, "name", vlan, "type", "vlan", "id", "42")
        ns.ip("addr", "add", address, "dev", vlan)
        ns.ip("link", "set", vlan, "up")

    info = left.links()["vl.42"]["linkinfo"]
    assert info["info_kind"] == "vlan"
    assert (info["info_data"]["protocol"], info["info_data"]["id"]) == ("802.1Q", 42)
    ping(left, "10.79.0.2")
