"""Multicast-capable attachments (`"multicast": true`) on one segment, through the daemon and the
shim: an application that joins and sends without naming an interface uses the multicast
network; members receive every datagram, a pod that did not join receives none; with two
multicast networks the first in the annotation wins unless the pod chooses with cni-args; ipvlan
in L3 mode is refused with a message that says why."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from metaplugin.client import get
from testbed.manifests import host_local, nad
from testbed.netns import Netns
from tests.netns.conftest import NETWORKS, Bed, make_bed

GROUP4, GROUP6, PORT = "239.7.7.7", "ff3e::7:7", 17777

RECEIVE = """
import socket, struct, sys, time
family, group, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if family == "4":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", port))
    # INADDR_ANY: the kernel picks the interface from the route to the group
    mreq = socket.inet_aton(group) + socket.inet_aton("0.0.0.0")
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
else:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", port))
    mreq = socket.inet_pton(socket.AF_INET6, group) + struct.pack("@I", 0)  # interface 0
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
print("joined", flush=True)
s.settimeout(0.5)
got, end = 0, time.monotonic() + 8
while time.monotonic() < end and got < count:
    try:
        s.recv(2048)
        got += 1
    except TimeoutError:
        pass
print(got, flush=True)
"""

SEND = """
import socket, sys, time
family, group, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET if family == "4" else socket.AF_INET6, socket.SOCK_DGRAM)
for i in range(count):  # no IP_MULTICAST_IF: the route to the group picks the interface
    s.sendto(b"x%d" % i, (group, port))
    time.sleep(0.02)
"""


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Bed]:
    ipam = tmp_path / "ipam"

    def multicast_nads(node: Netns, nads: list[dict[str, Any]]) -> dict[str, Any]:
        node.run("ip", "link", "add", "pxmq0", "type", "veth", "peer", "name", "pxmq1")
        node.run("ip", "link", "set", "pxmq0", "up")
        node.run("ip", "link", "set", "pxmq1", "up")

        def mv(name: str, master: str, v4: str, v6: str, **keys: Any) -> dict[str, Any]:
            return nad(
                name,
                {
                    "cniVersion": "1.0.0",
                    "type": "plexus-macvlan",
                    "master": master,
                    "mode": "bridge",
                    **keys,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": str(ipam),
                        "ranges": [[{"subnet": v4}], [{"subnet": v6}]],
                    },
                },
            )

        extra = [
            mv("mc-a", "pxm0", "10.81.0.0/24", "fd00:81::/64", multicast=True, igmpVersion=2),
            mv("mc-b", "pxmq0", "10.82.0.0/24", "fd00:82::/64", multicast=True),
            mv("plain", "pxm0", "10.83.0.0/24", "fd00:83::/64"),
            nad(
                "ipv-l3-mc",
                {
                    "cniVersion": "1.0.0",
                    "type": "plexus-ipvlan",
                    "master": "pxm0",
                    "mode": "l3",
                    "multicast": True,
                    "ipam": host_local("10.84.0.0/24", ipam),
                },
            ),
        ]
        (tmp_path / "nads").mkdir()
        (tmp_path / "nads" / "nads.yaml").write_text(yaml.safe_dump_all([*nads, *extra]))
        return {"localDir": str(tmp_path / "nads"), "hostLocalDataDir": str(ipam)}

    with make_bed(tmp_path, multicast_nads) as b:
        yield b


def group_routes(pod: Netns) -> dict[str, list[tuple[str, int]]]:
    """(device, metric) of each group route in the pod, best first."""
    v4 = pod.ip("-4", "route", "show", "224.0.0.0/4")
    v6 = pod.ip("-6", "route", "show", "table", "local", "ff00::/8")
    out: dict[str, list[tuple[str, int]]] = {}
    for family, routes in (("4", v4), ("6", v6)):
        ours = [(r["dev"], int(r.get("metric", 0))) for r in routes if r.get("metric", 0) < 256]
        out[family] = sorted(ours, key=lambda r: r[1])
    return out


def joined_on(pod: Netns, family: str, group: str) -> list[str]:
    """The devices the pod's kernel holds `group` on (/proc/net/igmp, igmp6)."""
    if family == "4":
        wanted = socket.inet_aton(group)[::-1].hex().upper()  # /proc shows it little-endian
        devices, current = [], ""
        for line in pod.run("cat", "/proc/net/igmp").stdout.splitlines()[1:]:
            if not line.startswith("\t"):
                current = line.split()[1].rstrip(":")
            elif line.split()[0] == wanted:
                devices.append(current)
        return devices
    wanted = socket.inet_pton(socket.AF_INET6, group).hex()
    rows = [line.split() for line in pod.run("cat", "/proc/net/igmp6").stdout.splitlines()]
    return [row[1] for row in rows if row[2] == wanted]


def script(pod: Netns, code: str, family: str, group: str, count: int) -> list[str]:
    argv = [family, group, str(PORT), str(count)]
    return ["ip", "netns", "exec", pod.name, "python3", "-I", "-c", code, *argv]


def receiver(pod: Netns, family: str, group: str, count: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        script(pod, RECEIVE, family, group, count),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "joined"
    return proc


def send(pod: Netns, family: str, group: str, count: int) -> None:
    subprocess.run(
        script(pod, SEND, family, group, count),
        check=True,
        timeout=30,
    )


def received(proc: subprocess.Popen[str]) -> int:
    out, _ = proc.communicate(timeout=20)
    return int(out.strip())


@pytest.mark.parametrize(("family", "group"), [("4", GROUP4), ("6", GROUP6)])
def test_members_receive_every_datagram_and_others_none(bed: Bed, family: str, group: str) -> None:
    sender, member, bystander = bed.pod("snd"), bed.pod("mem"), bed.pod("bys")
    for i, pod in enumerate((sender, member)):
        bed.runtime.add(f"c{i}", pod.path, annotations={NETWORKS: "mc-a"}).ok()
    bed.runtime.add("c2", bystander.path, annotations={NETWORKS: "plain"}).ok()
    assert group_routes(member)[family] == [("net1", 100)]
    assert group_routes(bystander)[family] == []
    n = 20
    joined = receiver(member, family, group, n)
    idle = receiver(bystander, family, group, n)
    try:
        # the socket joined without naming an interface: on the multicast network, not eth0
        assert joined_on(member, family, group) == ["net1"]
        # ...and `plexusctl multicast` shows it: the member pod, on the network's segment
        status, body = get(bed.daemon.socket, "/v1/multicast")
        assert status == 200
        assert json.loads(body) == [
            {
                "network": "default/mc-a",
                "group": group,
                "members": ["default/pod (net1)"],
                "sentTo": ["the network's own L2 segment"],
            }
        ]
        send(sender, family, group, n)
        assert received(joined) == n
        assert received(idle) == 0
    finally:
        joined.kill()
        idle.kill()
    for i, pod in enumerate((sender, member, bystander)):
        bed.runtime.delete(f"c{i}", pod.path).ok()
    bed.assert_nothing_left(sender, member, bystander)


def test_pinned_igmp_version(bed: Bed) -> None:
    pod = bed.pod("p1")
    bed.runtime.add("c1", pod.path, annotations={NETWORKS: "mc-a"}).ok()
    version = pod.run("cat", "/proc/sys/net/ipv4/conf/net1/force_igmp_version").stdout.strip()
    assert version == "2"
    bed.runtime.check("c1", pod.path).ok()
    pod.run("ip", "route", "del", "224.0.0.0/4", "dev", "net1")
    pod.run(
        "ip", "-6", "route", "del", "table", "local", "ff00::/8", "dev", "net1", "metric", "100"
    )
    out = bed.runtime.check("c1", pod.path)
    assert out.returncode == 1 and "lost its group routes" in out.body["msg"]
    bed.runtime.delete("c1", pod.path).ok()


def test_first_multicast_network_in_the_annotation_wins(bed: Bed) -> None:
    pod = bed.pod("p1")
    bed.runtime.add("c1", pod.path, annotations={NETWORKS: "mc-b,mc-a"}).ok()
    routes = group_routes(pod)
    assert routes["4"] == [("net1", 100), ("net2", 101)]  # net1 is mc-b: listed first
    assert routes["6"] == [("net1", 100), ("net2", 101)]
    bed.runtime.delete("c1", pod.path).ok()


def test_the_pods_choice_wins(bed: Bed) -> None:
    pod = bed.pod("p1")
    chosen = json.dumps(
        [{"name": "mc-b"}, {"name": "mc-a", "cni-args": {"multicastDefault": True}}]
    )
    bed.runtime.add("c1", pod.path, annotations={NETWORKS: chosen}).ok()
    assert group_routes(pod)["4"] == [("net2", 50), ("net1", 100)]
    bed.runtime.delete("c1", pod.path).ok()
    bad = json.dumps([{"name": "mc-a", "cni-args": {"multicastDefault": "yes"}}])
    out = bed.runtime.add("c2", pod.path, annotations={NETWORKS: bad})
    assert out.returncode == 1 and out.body["code"] == 7
    assert "multicastDefault must be true or false" in out.body["msg"]
    bed.assert_nothing_left(pod)


def test_ipvlan_l3_multicast_is_refused(bed: Bed) -> None:
    pod = bed.pod("p1")
    out = bed.runtime.add("c1", pod.path, annotations={NETWORKS: "ipv-l3-mc"})
    assert out.returncode == 1 and out.body["code"] == 7
    assert "ipvlan in l3 mode carries no multicast" in out.body["msg"]
    bed.assert_nothing_left(pod)
