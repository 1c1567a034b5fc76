"""The built-in delegates on one node, through the daemon and the installed shim: what
`ip -d link`, `ip addr`, `ip route` and `ip rule` show in the pod, CHECK that notices what went
missing, DEL that leaves nothing, and a kernel without ipvlan answered clearly."""

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


def dual_stack(v4: str, v6: str, data_dir: Path) -> dict[str, Any]:
    return {
        "type": "host-local",
        "dataDir": str(data_dir),
        "ranges": [[{"subnet": v4}], [{"subnet": v6}]],
        "routes": [{"dst": "192.0.2.0/24"}, {"dst": "2001:db8::/64"}],
    }


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Bed]:
    ipam = tmp_path / "ipam"

    def builtins(node: Netns, nads: list[dict[str, Any]]) -> dict[str, Any]:
        node.run("ip", "link", "add", "pxmp0", "type", "veth", "peer", "name", "pxmp1")
        node.run("ip", "link", "set", "pxmp0", "up")
        mv = {"cniVersion": "1.0.0", "type": "plexus-macvlan", "master": "pxm0"}
        extra = [
            nad(
                "mv",
                {
                    **mv,
                    "mode": "bridge",
                    "mtu": 1400,
                    "bcqueuelen": 123,
                    "capabilities": {"mac": True, "ips": True},
                    "ipam": dual_stack("10.70.0.0/24", "fd00:70::/64", ipam),
                },
            ),
            nad("mv-private", {**mv, "mode": "private", "ipam": host_local("10.71.0.0/24", ipam)}),
            nad("mv-vepa", {**mv, "mode": "vepa", "ipam": host_local("10.72.0.0/24", ipam)}),
            nad(
                "mv-passthru",
                {
                    **mv,
                    "master": "pxmp0",
                    "mode": "passthru",
                    "ipam": host_local("10.73.0.0/24", ipam),
                },
            ),
            nad(
                "mv-sbr",
                {
                    "cniVersion": "1.0.0",
                    "plugins": [
                        # No default route from IPAM: sbr's table must get one of its own.
                        {**mv, "ipam": host_local("10.74.0.0/24", ipam)},
                        {"type": "plexus-sbr"},
                    ],
                },
            ),
            nad(
                "mv-gw",
                {
                    **mv,
                    "ipam": host_local("10.77.0.0/24", ipam, routes=[{"dst": "0.0.0.0/0"}]),
                },
            ),
            nad(
                "ipv",
                {
                    "cniVersion": "1.0.0",
                    "type": "plexus-ipvlan",
                    "master": "pxm0",
                    "ipam": host_local("10.75.0.0/24", ipam),
                },
            ),
            nad(
                "tuned",
                {
                    "cniVersion": "1.0.0",
                    "plugins": [
                        {**mv, "ipam": host_local("10.76.0.0/24", ipam)},
                        {
                            "type": "tuning",
                            "mtu": 1300,  # tuning keeps the original MTU in dataDir until DEL
                            "dataDir": str(tmp_path / "tuning"),
                            "sysctl": {"net.ipv4.conf.net1.arp_notify": "1"},
                        },
                    ],
                },
            ),
        ]
        (tmp_path / "nads").mkdir()
        (tmp_path / "nads" / "nads.yaml").write_text(yaml.safe_dump_all([*nads, *extra]))
        return {"localDir": str(tmp_path / "nads"), "hostLocalDataDir": str(ipam)}

    with make_bed(tmp_path, builtins) as b:
        b.ipam_dir = ipam  # leases of both the reference and the built-in host-local
        yield b


def macvlan(pod: Netns, ifname: str = "net1") -> dict[str, Any]:
    link = pod.links()[ifname]
    assert link["linkinfo"]["info_kind"] == "macvlan"
    return link


def test_macvlan_bridge_with_every_option(bed: Bed) -> None:
    pod = bed.pod("p1")
    sel = json.dumps([{"name": "mv", "mac": "0a:58:0a:46:00:09", "ips": ["10.70.0.9/24"]}])
    result = bed.runtime.add("c1", pod.path, annotations={NETWORKS: sel}).ok()
    link = macvlan(pod)
    data = link["linkinfo"]["info_data"]
    assert (data["mode"], data["bcqueuelen"]) == ("bridge", 123)
    assert link["mtu"] == 1400 and link["address"] == "0a:58:0a:46:00:09"
    assert link["group"] != "default"  # the pod's teardown group
    addrs = pod.addresses("net1")
    assert "10.70.0.9/24" in addrs and any(a.startswith("fd00:70::") for a in addrs)
    routes = {r["dst"] for r in pod.ip("-4", "route", "show", "dev", "net1")}
    routes |= {r["dst"] for r in pod.ip("-6", "route", "show", "dev", "net1")}
    assert {"192.0.2.0/24", "2001:db8::/64"} <= routes
    status = bed.daemon.attachments()[0]["attachments"][1]["result"]
    assert status["interfaces"][0]["mac"] == "0a:58:0a:46:00:09"
    # the runtime still sees the primary only
    assert [i["name"] for i in result["interfaces"] if i.get("sandbox")] == ["eth0"]
    bed.runtime.check("c1", pod.path).ok()
    bed.runtime.delete("c1", pod.path).ok()
    bed.assert_nothing_left(pod)
    bed.runtime.delete("c1", "", with_prev=False).ok()


ARP_CAPTURE = """
import socket, struct, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind(("pxm1", 0)); s.settimeout(0.2); print("ready", flush=True)
end = time.monotonic() + 10
while time.monotonic() < end:
    try:
        frame = s.recv(128)
    except TimeoutError:
        continue
    sender, target = frame[28:32], frame[38:42]
    if frame[:6] == b"\\xff" * 6 and sender == target:
        print(socket.inet_ntoa(sender), frame[22:28].hex(":"), flush=True)
        break
"""


def test_macvlan_announces_its_address(bed: Bed) -> None:
    """A gratuitous ARP on the segment, so neighbours drop a stale MAC for a reused address."""
    capture = subprocess.Popen(
        ["ip", "netns", "exec", bed.node.name, "python3", "-I", "-c", ARP_CAPTURE],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert capture.stdout is not None and capture.stdout.readline().strip() == "ready"
        pod = bed.pod("p1")
        sel = json.dumps([{"name": "mv", "mac": "0a:58:0a:46:00:0a", "ips": ["10.70.0.10/24"]}])
        bed.runtime.add("c1", pod.path, annotations={NETWORKS: sel}).ok()
        out, _ = capture.communicate(timeout=15)
    finally:
        capture.kill()
    assert out.split() == ["10.70.0.10", "0a:58:0a:46:00:0a"]
    bed.runtime.delete("c1", pod.path).ok()
    bed.assert_nothing_left(pod)


@pytest.mark.parametrize("mode", ["private", "vepa", "passthru"])
def test_macvlan_modes(bed: Bed, mode: str) -> None:
    pod = bed.pod(f"p-{mode}")
    bed.runtime.add("c1", pod.path, annotations={NETWORKS: f"mv-{mode}"}).ok()
    assert macvlan(pod)["linkinfo"]["info_data"]["mode"] == mode
    bed.runtime.delete("c1", pod.path).ok()
    bed.assert_nothing_left(pod)


def test_check_names_what_went_missing(bed: Bed) -> None:
    pod = bed.pod("p1")
    bed.runtime.add("c1", pod.path, annotations={NETWORKS: "mv"}).ok()
    pod.run("ip", "route", "del", "192.0.2.0/24", "dev", "net1")
    out = bed.runtime.check("c1", pod.path)
    assert out.returncode == 1 and "route to 192.0.2.0/24 via net1 is missing" in out.body["msg"]
    pod.run("ip", "link", "del", "net1")
    out = bed.runtime.check("c1", pod.path)
    assert "interface net1 is missing" in out.body["msg"]
    bed.runtime.delete("c1", pod.path).ok()
    bed.assert_nothing_left(pod)


def test_source_routing_sends_replies_out_the_interface_they_came_in_on(bed: Bed) -> None:
    pod = bed.pod("p1")
    bed.runtime.add("c1", pod.path, annotations={NETWORKS: "mv-sbr"}).ok()
    address = pod.addresses("net1")[0].split("/")[0]
    rules = pod.run("ip", "rule", "show").stdout
    assert f"from {address} lookup 100" in rules
    table = pod.run("ip", "route", "show", "table", "100").stdout
    assert "default via 10.74.0.1 dev net1" in table
    # the main table says eth0 for everything; a reply from net1's address leaves via net1
    assert pod.ip("route", "get", "198.51.100.7")[0]["dev"] == "eth0"
    route = pod.ip("route", "get", "198.51.100.7", "from", address)[0]
    assert route["dev"] == "net1"
    bed.runtime.check("c1", pod.path).ok()
    pod.run("ip", "rule", "del", "from", address, "lookup", "100")
    out = bed.runtime.check("c1", pod.path)
    assert out.body["code"] == 110 and f"rule for {address} on net1 is missing" in out.body["msg"]
    bed.runtime.delete("c1", pod.path).ok()
    assert f"from {address}" not in pod.run("ip", "rule", "show").stdout
    bed.assert_nothing_left(pod)


def test_a_secondarys_default_route_never_erases_the_primarys(bed: Bed) -> None:
    pod = bed.pod("p1")
    bed.runtime.add("c1", pod.path, annotations={NETWORKS: "mv-gw"}).ok()
    defaults = {(r.get("dev"), r.get("gateway")) for r in pod.ip("-4", "route", "show", "default")}
    assert ("net1", "10.77.0.1") in defaults
    assert any(dev == "eth0" for dev, _ in defaults)  # added beside it, as the reference does
    bed.runtime.delete("c1", pod.path).ok()
    bed.assert_nothing_left(pod)


def test_builtins_chain_with_reference_plugins(bed: Bed, tmp_path: Path) -> None:
    pod = bed.pod("p1")
    bed.runtime.add("c1", pod.path, annotations={NETWORKS: "tuned"}).ok()
    assert pod.run("sysctl", "-n", "net.ipv4.conf.net1.arp_notify").stdout.strip() == "1"
    assert pod.links()["net1"]["mtu"] == 1300
    assert list((tmp_path / "tuning").iterdir())  # tuning's saved state ...
    bed.runtime.delete("c1", pod.path).ok()
    # ... is gone: tuning's DEL found its interface (links are not reaped before an exec'd DEL)
    assert list((tmp_path / "tuning").iterdir()) == []
    bed.assert_nothing_left(pod)


def test_ipvlan_on_a_kernel_without_it_is_a_clear_error(bed: Bed) -> None:
    if Path("/sys/module/ipvlan").exists():
        pytest.skip("this kernel has ipvlan; tests/kernel covers it")
    pod = bed.pod("p1")
    out = bed.runtime.add("c1", pod.path, annotations={NETWORKS: "ipv"})
    assert out.returncode == 1 and out.body["code"] == 109
    assert "this kernel has no ipvlan support" in out.body["msg"]
    bed.assert_nothing_left(pod)


def test_teardown_deletes_the_pods_links_in_one_go(bed: Bed) -> None:
    pod = bed.pod("p1")
    bed.runtime.add("c1", pod.path, annotations={NETWORKS: "mv, mv-private"}).ok()
    bed.runtime.delete("c1", pod.path).ok()
    bed.assert_nothing_left(pod)
    assert bed.daemon.events("pod_links_reaped")
    assert not bed.daemon.events("pod_links_not_reaped")
