"""End to end through containerd's CRI, exactly as kubelet drives a node: RunPodSandbox with
metadata, annotations and port mappings; StopPodSandbox; RemovePodSandbox."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from cri_api.v1 import api_pb2 as pb

from testbed.cri import CriError, Pod
from tests.e2e.conftest import NETWORKS, CriBed


def test_pod_gets_eth0_net1_data0_and_pods_talk_over_a_secondary(cri: CriBed) -> None:
    cri.start_plexus()
    pods = [
        cri.containerd.run_pod(
            f"web-{i}",
            annotations={NETWORKS: "net-a, net-b@data0"},
            port_mappings=[(8080, 18080 + i)],
        )
        for i in range(2)
    ]
    for pod in pods:
        ifaces = cri.interfaces(pod)
        assert set(ifaces) == {"eth0", "net1", "data0"}
        assert ifaces["eth0"][0].startswith("10.88.")
        assert ifaces["net1"][0].startswith("10.89.")
        assert ifaces["data0"][0].startswith("10.90.")
        kinds = {
            n: link["linkinfo"]["info_kind"]
            for n, link in cri.containerd.links(pod.netns).items()
            if n != "lo"
        }
        assert kinds == {"eth0": "veth", "net1": "macvlan", "data0": "macvlan"}
    # the sandbox IP kubelet sees is the cluster network's
    status = cri.containerd.runtime().PodSandboxStatus(
        pb.PodSandboxStatusRequest(pod_sandbox_id=pods[0].sandbox_id)
    )
    assert status.status.network.ip == cri.interfaces(pods[0])["eth0"][0].split("/")[0]

    assert len(cri.portmap_chains()) == 2  # the runtime's port mappings reached the primary

    target = cri.interfaces(pods[1])["data0"][0].split("/")[0]
    ping = cri.containerd.in_netns(
        pods[0].netns,
        "/bin/busybox",
        "ping",
        "-c",
        "2",
        "-W",
        "2",
        "-I",
        "data0",
        target,
        check=False,
    )
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert "2 packets received" in ping.stdout

    for pod in pods:
        cri.containerd.stop_pod(pod)
        cri.containerd.remove_pod(pod)
    cri.assert_nothing_left()


def test_namespace_isolation_refuses_with_the_reason_and_leaves_nothing(cri: CriBed) -> None:
    cri.start_plexus(namespaceIsolation=True)
    with pytest.raises(CriError) as err:
        cri.containerd.run_pod(
            "intruder", namespace="team-a", annotations={NETWORKS: "team-b/private"}
        )
    assert "namespace isolation: pod team-a/intruder may not use network team-b/private" in (
        err.value.details
    )
    cri.assert_nothing_left()
    ok = cri.containerd.run_pod("owner", namespace="team-b", annotations={NETWORKS: "private"})
    assert set(cri.interfaces(ok)) == {"eth0", "net1"}
    cri.containerd.stop_pod(ok)
    cri.containerd.remove_pod(ok)
    cri.assert_nothing_left()


def test_double_del_stop_then_remove(cri: CriBed) -> None:
    daemon = cri.start_plexus()
    pod = cri.containerd.run_pod("p", annotations={NETWORKS: "net-a"})
    cri.containerd.stop_pod(pod)  # DEL with CNI_NETNS and prevResult
    assert not cri.reservations() and not cri.records()
    cri.containerd.remove_pod(pod)  # DEL again, with neither
    dels = [e for e in daemon.events("cni_request_done") if e.get("command") == "DEL"]
    assert [e["outcome"] for e in dels] == ["ok", "ok"]
    cri.assert_nothing_left()


def test_failing_delegate_fails_the_sandbox_with_our_message(cri: CriBed) -> None:
    cri.start_plexus()
    with pytest.raises(CriError) as err:
        cri.containerd.run_pod("doomed", annotations={NETWORKS: "net-a, net-fail"})
    assert (
        "network default/net-fail (net2): plugin failer failed: deliberate failure"
        in err.value.details
    )
    cri.assert_nothing_left()


def test_daemon_killed_while_pods_run(cri: CriBed) -> None:
    daemon = cri.start_plexus()
    first, second = (
        cri.containerd.run_pod(n, annotations={NETWORKS: "net-a"}) for n in ("first", "second")
    )
    daemon.kill()
    cri.containerd.stop_pod(first)  # daemon down: the shim spools the DEL, Stop succeeds
    spool = cri.root / "plexus-state" / "spool"
    assert len(list(spool.glob("*.json"))) == 1
    daemon.start()  # replays the spool before serving
    cri.containerd.wait_network_ready()
    cri.containerd.remove_pod(first)
    cri.containerd.stop_pod(second)
    cri.containerd.remove_pod(second)
    cri.assert_nothing_left()
    assert daemon.events("spooled_del_replayed")


def test_thirty_pods_at_once(cri: CriBed) -> None:
    cri.start_plexus()

    def run(i: int) -> Pod:
        return cri.containerd.run_pod(f"burst-{i}", annotations={NETWORKS: "net-a"})

    with ThreadPoolExecutor(max_workers=30) as pool:
        pods = list(pool.map(run, range(30)))
    addresses = set()
    for pod in pods:
        ifaces = cri.interfaces(pod)
        assert set(ifaces) == {"eth0", "net1"}
        addresses.update(ifaces["eth0"] + ifaces["net1"])
    assert len(addresses) == 60  # every address distinct
    with ThreadPoolExecutor(max_workers=30) as pool:
        list(pool.map(lambda p: (cri.containerd.stop_pod(p), cri.containerd.remove_pod(p)), pods))
    cri.assert_nothing_left()


def test_pod_without_annotations_gets_the_cluster_network_only(cri: CriBed) -> None:
    cri.start_plexus()
    pod = cri.containerd.run_pod("plain")
    assert set(cri.interfaces(pod)) == {"eth0"}
    out = cri.containerd.in_netns("", "cat", str(cri.containerd.cni_conf / "00-plexus.conflist"))
    conf = json.loads(out.stdout)
    assert conf["plugins"][0]["type"] == "plexus"
    cri.containerd.stop_pod(pod)
    cri.containerd.remove_pod(pod)
    cri.assert_nothing_left()


def test_built_in_delegates_through_the_runtime(cri: CriBed) -> None:
    """The in-process delegates as containerd drives them: a routed primary chosen with the
    default-network override and a plexus-macvlan secondary."""
    cri.start_plexus()
    annotations = {"v1.multus-cni.io/default-network": "kube-system/routed", NETWORKS: "fast"}
    pods = [cri.containerd.run_pod(f"fast-{i}", annotations=annotations) for i in range(2)]
    first, second = (cri.interfaces(p) for p in pods)
    assert set(first) == {"eth0", "net1"}
    assert first["eth0"][0].startswith("10.95.") and first["eth0"][0].endswith("/32")
    status = cri.containerd.runtime().PodSandboxStatus(
        pb.PodSandboxStatusRequest(pod_sandbox_id=pods[0].sandbox_id)
    )
    assert status.status.network.ip == first["eth0"][0].split("/")[0]
    for via, target in (("eth0", second["eth0"][0]), ("net1", second["net1"][0])):
        out = cri.containerd.in_netns(
            pods[0].netns,
            "/bin/busybox",
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            "-I",
            via,
            target.split("/")[0],
            check=False,
        )
        assert out.returncode == 0, f"via {via}: {out.stdout}{out.stderr}"
    for pod in pods:
        cri.containerd.stop_pod(pod)
        cri.containerd.remove_pod(pod)
    cri.assert_nothing_left()
