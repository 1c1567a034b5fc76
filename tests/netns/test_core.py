"""The core end to end through the installed shim: a real plexusd in a node namespace, Debian's
reference plugins as delegates, pods as namespaces. Each test checks what an operator would:
`ip -d link` and addresses in the pod, host-local's reservation files, the node's links, and the
daemon's records."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from testbed.runtime import Outcome
from tests.netns.conftest import NETWORKS, Bed

PLEXUSCTL = str(Path(sys.executable).with_name("plexusctl"))


def wait_for(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def gate_processes(bed: Bed) -> list[str]:
    out = subprocess.run(
        ["pgrep", "-f", str(bed.root / "testbin" / "gate")],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.split()


def test_add_check_del_del(bed: Bed) -> None:
    pod = bed.pod("pod1")
    networks = json.dumps(
        [
            {"name": "net-a"},
            {"name": "net-b", "ips": ["10.90.0.77/24"], "mac": "0a:58:0a:5a:00:4d"},
        ]
    )
    result = bed.runtime.add(
        "c1", pod.path, annotations={NETWORKS: networks}, pod=("default", "pod1")
    ).ok()

    assert result["cniVersion"] == "1.0.0"  # the caller's version
    assert [i["name"] for i in result["interfaces"] if i.get("sandbox")] == ["eth0"]
    links = pod.links()
    assert set(links) == {"lo", "eth0", "net1", "net2"}
    assert links["eth0"]["linkinfo"]["info_kind"] == "veth"
    for name in ("net1", "net2"):
        assert links[name]["linkinfo"]["info_kind"] == "macvlan"
        assert links[name]["linkinfo"]["info_data"]["mode"] == "bridge"
    assert links["net2"]["address"] == "0a:58:0a:5a:00:4d"
    assert pod.addresses("eth0")[0].startswith("10.88.0.")
    assert pod.addresses("net1")[0].startswith("10.89.0.")
    assert pod.addresses("net2") == ["10.90.0.77/24"]
    assert len(bed.reservations()) == 3

    status = json.loads(
        subprocess.run(
            [PLEXUSCTL, "--socket", bed.daemon.socket, "network-status", "default/pod1"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert [(e["name"], e["interface"], e["default"]) for e in status] == [
        ("cluster", "eth0", True),
        ("default/net-a", "net1", False),
        ("default/net-b", "net2", False),
    ]
    assert status[2]["ips"] == ["10.90.0.77"] and status[2]["mac"] == "0a:58:0a:5a:00:4d"

    bed.runtime.check("c1", pod.path).ok()

    bed.runtime.delete("c1", pod.path).ok()
    bed.assert_nothing_left(pod)
    # containerd's second DEL (RemovePodSandbox): no netns, no prevResult
    bed.runtime.delete("c1", "", with_prev=False).ok()
    bed.assert_nothing_left(pod)


def test_check_finds_a_missing_interface(bed: Bed) -> None:
    pod = bed.pod("pod1")
    bed.runtime.add("c1", pod.path, annotations={NETWORKS: "net-a"}).ok()
    pod.run("ip", "link", "del", "net1")
    out = bed.runtime.check("c1", pod.path)
    assert out.returncode == 1
    assert "network default/net-a (net1)" in out.body["msg"]
    bed.runtime.delete("c1", pod.path).ok()
    bed.assert_nothing_left(pod)


def test_del_with_the_netns_gone_and_no_prev_result(bed: Bed) -> None:
    pod = bed.pod("pod1")
    bed.runtime.add("c1", pod.path, annotations={NETWORKS: "net-a, net-b"}).ok()
    old_path = pod.path
    pod.delete()
    bed.runtime.delete("c1", old_path, with_prev=False).ok()
    bed.assert_nothing_left(pod)


def test_failure_of_the_third_delegate_leaves_nothing(bed: Bed) -> None:
    pod = bed.pod("pod1")
    out = bed.runtime.add("c1", pod.path, annotations={NETWORKS: "net-a, net-fail"})
    assert out.returncode == 1
    err = out.body
    assert err["code"] == 101
    assert err["msg"].startswith("network default/net-fail (net2): plugin failer failed")
    assert json.loads(err["details"])["msg"] == "deliberate failure"
    bed.assert_nothing_left(pod)
    bed.runtime.delete("c1", pod.path, with_prev=False).ok()  # the runtime's cleanup DEL


def test_gc_removes_a_stale_attachment(bed: Bed) -> None:
    keep, stale = bed.pod("keep"), bed.pod("stale")
    bed.runtime.add("keep", keep.path, annotations={NETWORKS: "net-a"}).ok()
    bed.runtime.add("stale", stale.path, annotations={NETWORKS: "net-a, net-b"}).ok()
    out = bed.runtime.invoke(
        "GC",
        version="1.1.0",
        extra={"cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]},
    )
    out.ok()
    assert set(stale.links()) == {"lo"}
    assert set(keep.links()) == {"lo", "eth0", "net1"}
    assert len(bed.reservations()) == 2  # keep's eth0 and net1 only
    assert [c["containerID"] for c in bed.daemon.attachments()] == ["keep"]
    bed.runtime.delete("keep", keep.path).ok()
    bed.assert_nothing_left(keep, stale)


def test_sigkill_between_two_delegates_then_restart_then_del(bed: Bed) -> None:
    pod = bed.pod("pod1")
    outcome: list[Outcome] = []
    adder = threading.Thread(
        target=lambda: outcome.append(
            bed.runtime.add("c1", pod.path, annotations={NETWORKS: "net-a, net-gate"})
        )
    )
    adder.start()
    wait_for(bed.gate_dir / "reached")  # eth0 and net1 are made; net2's delegate is running
    assert set(pod.links()) == {"lo", "eth0", "net1"}
    bed.daemon.kill()
    adder.join(30)
    assert outcome[0].returncode == 1 and outcome[0].body["code"] == 11
    assert gate_processes(bed)  # the orphaned delegate still runs

    bed.daemon.start()  # kills the orphan before it serves anything
    assert not gate_processes(bed)
    assert bed.daemon.events("orphaned_delegates_killed")
    bed.runtime.delete("c1", pod.path, with_prev=False).ok()
    (bed.gate_dir / "release").touch()  # had it survived, it would attach net2 now
    time.sleep(0.5)
    bed.assert_nothing_left(pod)


def test_del_while_the_daemon_is_down_is_spooled_and_replayed(bed: Bed) -> None:
    pod = bed.pod("pod1")
    bed.runtime.add("c1", pod.path, annotations={NETWORKS: "net-a"}).ok()
    bed.daemon.kill()
    bed.runtime.delete("c1", pod.path).ok()  # succeeds: spooled, not lost
    spool = Path(bed.daemon.config["stateDir"]) / "spool"
    assert len(list(spool.glob("*.json"))) == 1
    assert set(pod.links()) == {"lo", "eth0", "net1"}  # nothing was torn down yet

    bed.daemon.start()  # replays the spool before it serves
    bed.assert_nothing_left(pod)
    assert list(spool.glob("*.json")) == []
    assert bed.daemon.events("spooled_del_replayed")


def test_bad_input_gets_the_right_code_and_leaves_nothing(bed: Bed) -> None:
    pod = bed.pod("pod1")
    out = bed.runtime.add("c1", pod.path, ifname="a-very-long-ifname")
    assert (out.returncode, out.body["code"]) == (1, 4)
    assert "CNI_IFNAME" in out.body["msg"]
    out = bed.runtime.invoke("ADD", "c1", netns=pod.path, raw_stdin=b"{nope")
    assert out.body["code"] == 6
    out = bed.runtime.add("c1", pod.path, annotations={NETWORKS: "Bad_Name"})
    assert out.body["code"] == 7 and "DNS-1123" in out.body["msg"]
    out = bed.runtime.add("c1", pod.path, annotations={NETWORKS: "ghost"})
    assert out.body["code"] == 102 and "default/ghost not found" in out.body["msg"]
    out = bed.runtime.add("c1", "/run/netns/does-not-exist", annotations={})
    assert out.body["code"] == 4 and "CNI_NETNS" in out.body["msg"]
    bed.assert_nothing_left(pod)


def test_version_and_status(bed: Bed) -> None:
    out = bed.runtime.invoke("VERSION", raw_stdin=b'{"cniVersion":"1.1.0"}').ok()
    assert out["supportedVersions"] == ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
    assert bed.runtime.invoke("STATUS", version="1.1.0").returncode == 0


def test_the_result_speaks_every_version(bed: Bed) -> None:
    for i, version in enumerate(("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")):
        pod = bed.pod(f"v{i}")
        result = bed.runtime.add(f"v{i}", pod.path, version=version, annotations={}).ok()
        assert result["cniVersion"] == version
        assert ("version" in result["ips"][0]) == version.startswith("0.")
        bed.runtime.delete(f"v{i}", pod.path, version=version).ok()
        bed.assert_nothing_left(pod)


def test_conflist_written_by_the_daemon(bed: Bed) -> None:
    conf = json.loads(bed.daemon.conf_file.read_text())
    assert conf["cniVersion"] == "1.0.0"
    assert conf["cniVersions"] == ["0.3.1", "0.4.0", "1.0.0", "1.1.0"]
    (plugin,) = conf["plugins"]
    assert plugin["type"] == "plexus"
    assert plugin["capabilities"]["io.kubernetes.cri.pod-annotations"] is True
    assert plugin["socketPath"] == bed.daemon.socket
    sock = Path(bed.daemon.socket)
    assert sock.stat().st_mode & 0o777 == 0o600
    assert sock.parent.stat().st_mode & 0o777 == 0o700


def test_default_route_moves_to_the_requesting_attachment(bed: Bed) -> None:
    pod = bed.pod("pod1")
    networks = json.dumps([{"name": "net-a"}, {"name": "net-b", "default-route": ["10.90.0.1"]}])
    result = bed.runtime.add("c1", pod.path, annotations={NETWORKS: networks}).ok()
    routes = pod.ip("route", "show", "default")
    assert [(r["gateway"], r["dev"]) for r in routes] == [("10.90.0.1", "net2")]
    assert not [r for r in result.get("routes", []) if r["dst"] == "0.0.0.0/0"]
    bed.runtime.check("c1", pod.path).ok()
    bed.runtime.delete("c1", pod.path).ok()
    bed.assert_nothing_left(pod)
