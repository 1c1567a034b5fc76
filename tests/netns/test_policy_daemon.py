"""Network policy through a real plexusd in local mode: policy manifests written beside the
NADs, pods ADDed through the installed shim (bridge primary `cluster` on eth0, macvlan `net-a`
on net1), and what a user checks: `nft list table inet plexus_policy` in the pod, a connection
refused or let through, `plexusctl policy`, the drop metric, the table gone with the policy, a
pod protected before its ADD returns, and a restarted daemon putting the rules back."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from metaplugin import dirwatch
from metaplugin.client import get
from metaplugin.policy_source import LocalPolicySource
from testbed.netns import Netns
from tests.netns.conftest import NETWORKS, Bed

PLEXUSCTL = str(Path(sys.executable).with_name("plexusctl"))
TABLE = "plexus_policy"

SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.close()
"""
CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
except socket.timeout:
    sys.exit(3)
except ConnectionRefusedError:
    sys.exit(4)
"""


def wait_until(what: str, check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.1)


def write_manifest(bed: Bed, name: str, docs: list[dict[str, Any]]) -> None:
    """As an admin would: a whole file, renamed into place."""
    directory = Path(bed.daemon.config["localDir"])
    tmp = directory / f".{name}.tmp"
    tmp.write_text(yaml.safe_dump_all(docs))
    tmp.rename(directory / name)


def remove_manifest(bed: Bed, name: str) -> None:
    (Path(bed.daemon.config["localDir"]) / name).unlink()


def table(pod: Netns) -> str | None:
    out = pod.run("nft", "list", "table", "inet", TABLE, check=False)
    return out.stdout if out.returncode == 0 else None


@contextmanager
def listening(pod: Netns, port: int) -> Iterator[None]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", pod.name, sys.executable, "-c", SERVER, str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        yield
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def connects(client: Netns, address: str, port: int, timeout: float = 1.0) -> bool:
    """True: connected; False: no answer (dropped). A refusal (RST) is a test error here."""
    rc = client.run(sys.executable, "-c", CLIENT, address, str(port), str(timeout), check=False)
    assert rc.returncode in (0, 3), rc
    return rc.returncode == 0


def add_pod(bed: Bed, namespace: str, name: str, *, networks: str | None = None) -> Netns:
    pod = bed.pod(name)
    annotations = {NETWORKS: networks} if networks else {}
    bed.runtime.add(f"c-{name}", pod.path, annotations=annotations, pod=(namespace, name)).ok()
    return pod


def ip_of(pod: Netns, ifname: str = "eth0") -> str:
    return pod.addresses(ifname)[0].split("/")[0]


def policy_view(bed: Bed, pod: str) -> dict[str, Any]:
    out = subprocess.run(
        [PLEXUSCTL, "--socket", bed.daemon.socket, "policy", pod, "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    view: dict[str, Any] = json.loads(out.stdout)
    return view


def dropped(bed: Bed, namespace: str, kind: str, direction: str = "ingress") -> float:
    status, body = get(bed.daemon.socket, "/metrics")
    assert status == 200
    want = (
        f'plexus_policy_dropped_packets_total{{direction="{direction}",'
        f'namespace="{namespace}",policy_kind="{kind}"}}'
    )
    for line in body.decode().splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def covers(cidrs: list[str], address: str) -> bool:
    return any(ipaddress.ip_address(address) in ipaddress.ip_network(c) for c in cidrs)


def network_policy(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


SAME_NAMESPACE_ON_8080 = network_policy(
    "same-ns-8080",
    "default",
    {
        "podSelector": {},
        "policyTypes": ["Ingress"],
        "ingress": [{"from": [{"podSelector": {}}], "ports": [{"protocol": "TCP", "port": 8080}]}],
    },
)


def test_network_policy_on_the_primary(bed: Bed) -> None:
    server = add_pod(bed, "default", "server")
    client = add_pod(bed, "default", "client")
    outsider = add_pod(bed, "other", "outsider")
    address = ip_of(server)
    with listening(server, 8080), listening(server, 9090):
        assert connects(outsider, address, 8080)  # cluster mode: open until a policy says
        assert table(server) is None

        write_manifest(bed, "policy.yaml", [SAME_NAMESPACE_ON_8080])
        wait_until("the server's table", lambda: table(server) is not None)
        rules = table(server)
        assert rules is not None
        assert "hook input" in rules and 'iifname "eth0"' in rules
        assert "counter drop_in_eth0" in rules
        assert "tcp dport 8080 accept" in rules
        # the allowed peer, by its primary address, is in the allow's set
        assert server.run(
            "nft", "get", "element", "inet", TABLE, "in_eth0_0_ip", f"{{ {ip_of(client)} }}"
        )

        assert connects(client, address, 8080)
        assert not connects(client, address, 9090)  # the port is not allowed
        assert not connects(outsider, address, 8080)  # another namespace is not
        # the node (kubelet's probes) always gets in
        node_ok = bed.node.run(
            sys.executable, "-c", CLIENT, address, "9090", "1.0", check=False
        ).returncode
        assert node_ok == 0

        view = policy_view(bed, "default/server")
        assert view["enforcing"] is True
        (eth0,) = view["interfaces"]
        assert eth0["ingress"]["selectedBy"] == ["NetworkPolicy:default/same-ns-8080"]
        assert eth0["ingress"]["droppedPackets"] >= 2
        assert eth0["egress"]["isolated"] is False
        (allow,) = eth0["ingress"]["allows"]
        assert covers(allow["cidrs"], ip_of(client))
        assert not covers(allow["cidrs"], ip_of(outsider))
        assert allow["ports"] == [{"protocol": "TCP", "first": 8080, "last": 8080}]
        assert allow["by"] == ["NetworkPolicy:default/same-ns-8080"]

        before = dropped(bed, "default", "NetworkPolicy")
        assert before >= 2
        assert not connects(outsider, address, 8080, timeout=0.5)
        assert dropped(bed, "default", "NetworkPolicy") > before

        # a pod added while the policy is in force is protected when its ADD returns
        late = add_pod(bed, "default", "late")
        late_rules = table(late)
        assert late_rules is not None and "counter drop_in_eth0" in late_rules
        # ... and the server's table now lets it in too (its address, recomputed)
        wait_until(
            "the late pod allowed",
            lambda: covers(
                policy_view(bed, "default/server")["interfaces"][0]["ingress"]["allows"][0][
                    "cidrs"
                ],
                ip_of(late),
            ),
        )
        assert connects(late, address, 8080)

        remove_manifest(bed, "policy.yaml")
        wait_until("the table gone", lambda: table(server) is None and table(late) is None)
        assert connects(outsider, address, 8080)


def test_multi_network_policy_on_a_secondary_and_a_restart(bed: Bed) -> None:
    net_a = json.dumps([{"name": "net-a", "namespace": "default"}])
    server = add_pod(bed, "default", "server", networks=net_a)
    friend = add_pod(bed, "default", "friend", networks=net_a)
    stranger = add_pod(bed, "other", "stranger", networks=net_a)
    write_manifest(
        bed,
        "multi.yaml",
        [
            {
                "apiVersion": "k8s.cni.cncf.io/v1beta1",
                "kind": "MultiNetworkPolicy",
                "metadata": {
                    "name": "net-a-same-ns",
                    "namespace": "default",
                    "annotations": {"k8s.v1.cni.cncf.io/policy-for": "net-a"},
                },
                "spec": {
                    "podSelector": {},
                    "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"podSelector": {}}]}],
                },
            }
        ],
    )
    wait_until("the server's table", lambda: table(server) is not None)
    rules = table(server)
    assert rules is not None and 'iifname "net1"' in rules and 'iifname "eth0"' not in rules
    secondary = ip_of(server, "net1")
    view = policy_view(bed, "default/server")
    (allow,) = view["interfaces"][1]["ingress"]["allows"]
    assert covers(allow["cidrs"], ip_of(friend, "net1"))  # the peer by its address on net-a
    assert not covers(allow["cidrs"], ip_of(friend))  # not by its primary one
    assert not covers(allow["cidrs"], ip_of(stranger, "net1"))
    with listening(server, 7000):
        assert connects(friend, secondary, 7000)
        assert not connects(stranger, secondary, 7000)
        assert connects(stranger, ip_of(server), 7000)  # eth0 is not governed
    view = policy_view(bed, "default/server")
    eth0, net1 = view["interfaces"]
    assert net1["ingress"]["selectedBy"] == ["MultiNetworkPolicy:default/net-a-same-ns"]
    assert eth0["ingress"]["isolated"] is False
    assert dropped(bed, "default", "MultiNetworkPolicy") >= 1

    # A restarted daemon puts every running pod's table back, whatever happened meanwhile.
    bed.daemon.stop()
    server.run("nft", "delete", "table", "inet", TABLE)
    bed.daemon.start()
    wait_until("the table back after the restart", lambda: table(server) is not None)
    assert 'iifname "net1"' in (table(server) or "")


@contextmanager
def table_owned_by_another(pod: Netns) -> Iterator[None]:
    """An `inet plexus_policy` table in the pod that only its creator may change: nft's owner
    flag, held by an interactive nft that keeps its netlink socket open. Plexus's replacement
    of that table is then refused by the kernel (EPERM), as any nft failure would be."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", pod.name, "nft", "-i"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write(f"add table inet {TABLE} {{ flags owner; }}\n")
        proc.stdin.flush()
        wait_until("the owned table", lambda: "flags owner" in (table(pod) or ""))
        yield
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdin is not None:
            proc.stdin.close()


def test_an_add_that_cannot_be_protected_fails_and_rolls_back(bed: Bed) -> None:
    write_manifest(bed, "policy.yaml", [SAME_NAMESPACE_ON_8080])
    first = add_pod(bed, "default", "first")
    assert table(first) is not None
    records = bed.records()
    pod = bed.pod("doomed")
    with table_owned_by_another(pod):
        out = bed.runtime.add("c-doomed", pod.path, pod=("default", "doomed"))
        assert out.returncode != 0
        error = out.body
        assert error["code"] == 999
        assert "network policy: cannot protect pod default/doomed" in error["msg"]
        assert "Operation not permitted" in error["msg"]
        # rolled back like any failed ADD: no interface, no lease, no record of it
        assert set(pod.links()) == {"lo"}
        assert bed.records() == records
        assert len(bed.reservations()) == 1
    # the runtime's retry, once nft can work there, protects it
    bed.runtime.add("c-doomed", pod.path, pod=("default", "doomed")).ok()
    assert "counter drop_in_eth0" in (table(pod) or "")


def test_a_manifest_whose_notice_another_reader_took_is_still_seen(tmp_path: Path) -> None:
    """The NAD source's lookups drain the process's one inotify queue and settle only their
    own listener; a policy manifest noticed that way must still reach the engine (on_change)
    within the poll interval, not the 60 s safety audit."""
    watcher = dirwatch.shared()
    if watcher is None:
        pytest.skip("no inotify here")
    changed = threading.Event()
    source = LocalPolicySource(str(tmp_path), poll_interval=0.2)
    source.on_change(changed.set)
    try:
        with watcher._lock:  # the watcher's own thread cannot read the event first
            tmp = tmp_path / ".p.tmp"
            tmp.write_text(yaml.safe_dump(SAME_NAMESPACE_ON_8080))
            tmp.rename(tmp_path / "policy.yaml")
            watcher._read_into(set())  # what drain() does for the NAD source
        wait_until("on_change", changed.is_set, timeout=5.0)
        assert [p.name for p in source.snapshot().policies] == ["same-ns-8080"]
    finally:
        source.close()
