"""Cluster mode with a real plexusd: pod requests and NADs from the API (the stand-in, served
inside the node namespace so the daemon reaches it on its own loopback), network-status and
Events written back to the pod, and DEL that works with the API gone."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernel.netns import run_in_netns
from testbed.netns import Netns
from tests.k8s_standin import ApiStandin
from tests.netns.conftest import NETWORKS, Bed, make_bed

NODE = "node-1"
STATUS = "k8s.v1.cni.cncf.io/network-status"


def pod_object(name: str, annotations: dict[str, str], node: str = NODE) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "annotations": annotations},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "pause"}]},
    }


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Bed, ApiStandin]]:
    holder: list[ApiStandin] = []

    def api_mode(node: Netns, nads: list[dict[str, Any]]) -> dict[str, Any]:
        # The listening socket is made in the node namespace; the daemon's 127.0.0.1 is there.
        api = run_in_netns(node.path, lambda: ApiStandin().start())
        holder.append(api)
        for obj in nads:
            api.create(obj)
        return {"kubeconfig": api.kubeconfig(tmp_path / "kubeconfig"), "nodeName": NODE}

    try:
        with make_bed(tmp_path, api_mode) as bed:
            yield bed, holder[0]
    finally:
        for api in holder:
            api.stop()


def add(bed: Bed, cid: str, netns: str, pod: str, uid: str = "") -> Any:
    # No io.kubernetes.cri.pod-annotations: the daemon must ask the API (its pod cache).
    return bed.runtime.add(cid, netns, annotations=None, pod=("default", pod), uid=uid)


def wait_for(check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


def test_requests_from_the_api_and_status_written_back(cluster: tuple[Bed, ApiStandin]) -> None:
    bed, api = cluster
    created = api.create(pod_object("web", {NETWORKS: "net-a, net-b@data0"}))
    pod = bed.pod("web")
    add(bed, "c1", pod.path, "web", created["metadata"]["uid"]).ok()
    assert set(pod.links()) == {"lo", "eth0", "net1", "data0"}

    def status() -> list[dict[str, Any]] | None:
        obj = api.get("Pod", "default", "web") or {}
        raw = (obj.get("metadata", {}).get("annotations") or {}).get(STATUS)
        return json.loads(raw) if raw else None

    entries = wait_for(status)
    assert [(e["name"], e["interface"], e["default"]) for e in entries] == [
        ("cluster", "eth0", True),
        ("default/net-a", "net1", False),
        ("default/net-b", "data0", False),
    ]
    assert entries[1]["ips"] == [pod.addresses("net1")[0].split("/")[0]]
    events = wait_for(
        lambda: (
            [e for e in api.events() if e["reason"] == "AddedInterface"]
            if len(api.events()) >= 3
            else None
        )
    )
    assert {e["involvedObject"]["uid"] for e in events} == {created["metadata"]["uid"]}
    assert any(e["message"].startswith("Add data0 [10.90.0.") for e in events)

    api.stop()  # the API goes away; DEL must not care
    bed.runtime.delete("c1", pod.path).ok()
    bed.assert_nothing_left(pod)


def test_missing_nad_is_reported_on_the_pod(cluster: tuple[Bed, ApiStandin]) -> None:
    bed, api = cluster
    created = api.create(pod_object("lost", {NETWORKS: "ghost"}))
    pod = bed.pod("lost")
    out = add(bed, "c1", pod.path, "lost", created["metadata"]["uid"])
    assert out.returncode == 1 and out.body["code"] == 102
    warning = wait_for(lambda: [e for e in api.events() if e["reason"] == "NoNetworkFound"])
    assert warning[0]["type"] == "Warning" and "ghost" in warning[0]["message"]
    bed.assert_nothing_left(pod)


def test_unknown_pod_and_api_outage(cluster: tuple[Bed, ApiStandin]) -> None:
    bed, api = cluster
    pod = bed.pod("p")
    out = add(bed, "c1", pod.path, "nobody")
    assert out.body["code"] == 106
    replaced = api.create(pod_object("reborn", {}))  # same name, another pod than the runtime's
    out = add(bed, "c1", pod.path, "reborn", "uid-of-the-deleted-pod")
    assert out.body["code"] == 106 and replaced["metadata"]["uid"] not in out.body["msg"]
    api.fail_next("GET", "/api/v1/namespaces/default/pods/", 503, times=10)
    out = add(bed, "c2", pod.path, "also-unknown")
    assert out.body["code"] == 11 and "Kubernetes API" in out.body["msg"]
    bed.assert_nothing_left(pod)


def test_failed_add_is_one_event_on_the_pod_however_often_it_fails(
    cluster: tuple[Bed, ApiStandin],
) -> None:
    bed, api = cluster
    # net-fail: macvlan, then a plugin whose ADD always fails (the rollback removes the macvlan).
    created = api.create(pod_object("crashy", {NETWORKS: "net-fail@data0"}))
    uid = created["metadata"]["uid"]
    pod = bed.pod("crashy")
    out = add(bed, "c1", pod.path, "crashy", uid)
    assert out.returncode == 1 and out.body["code"] == 101

    def add_failed() -> list[dict[str, Any]]:
        return [e for e in api.events() if e["reason"] == "AddFailed"]

    first = wait_for(add_failed)[0]
    assert first["type"] == "Warning" and first["involvedObject"]["uid"] == uid
    assert first["message"].startswith(
        "CNI error 101 DelegateFailed: network default/net-fail (data0): plugin failer"
    ), first["message"]
    assert first["count"] == 1

    # A crash-looping pod: 49 more identical failures. They bump the one Event (count,
    # lastTimestamp) up to the pod's burst of 10 API writes; the rest are dropped.
    for _ in range(49):
        assert add(bed, "c1", pod.path, "crashy", uid).body["code"] == 101
    wait_for(lambda: add_failed()[0]["count"] == 10)
    bump = add(bed, "c1", pod.path, "crashy", uid)  # one more, dropped like the 40 before it
    assert bump.body["code"] == 101
    events = add_failed()
    assert len(events) == 1 and events[0]["count"] == 10
    assert events[0]["metadata"]["name"] == first["metadata"]["name"]
    assert events[0]["firstTimestamp"] == first["firstTimestamp"]
    bed.assert_nothing_left(pod)
