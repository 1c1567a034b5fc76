"""The API adaptor with the real kubernetes client against the HTTP stand-in: watch-fed caches
(list, watch, 410 relist, reconnect), live fallbacks, network-status patch with conflict retry,
and Events."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cnispec.errors import InvalidConfig, TryAgainLater
from cnispec.identity import PodInfo
from metaplugin.config import DaemonConfig
from metaplugin.k8s import Cluster
from tests.k8s_standin import ApiStandin

NODE = "node-1"
STATUS_KEY = "k8s.v1.cni.cncf.io/network-status"


def pod(name: str, node: str = NODE, namespace: str = "default", **annotations: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
    }


def nad(name: str, namespace: str = "default", cni_type: str = "macvlan") -> dict:
    config = {"cniVersion": "1.0.0", "name": name, "type": cni_type}
    return {
        "apiVersion": "k8s.cni.cncf.io/v1",
        "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"config": json.dumps(config)},
    }


def eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.fixture
def api() -> Iterator[ApiStandin]:
    with ApiStandin() as standin:
        yield standin


@pytest.fixture
def cluster(api: ApiStandin, tmp_path: Path) -> Iterator[Cluster]:
    cfg = DaemonConfig.model_validate(
        {
            "kubeconfig": api.kubeconfig(tmp_path / "kubeconfig"),
            "nodeName": NODE,
            "stateDir": str(tmp_path / "state"),
        }
    )
    c = Cluster.connect(cfg)
    assert c.synced.wait(5)
    yield c
    c.stop()


def test_connect_without_any_api_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(InvalidConfig, match="local mode"):
        Cluster.connect(DaemonConfig())


def test_pods_of_this_node_only_are_cached(api: ApiStandin, cluster: Cluster) -> None:
    api.create(pod("mine", **{"k8s.v1.cni.cncf.io/networks": "net-a"}))
    api.create(pod("theirs", node="node-2"))
    found = cluster.pods.get("default", "mine", "")
    assert found is not None
    assert found.annotations == {"k8s.v1.cni.cncf.io/networks": "net-a"}
    assert cluster._pod_informer.get("default/theirs") is None


def test_watch_keeps_the_cache_current(api: ApiStandin, cluster: Cluster) -> None:
    created = api.create(pod("p1"))
    eventually(lambda: cluster._pod_informer.get("default/p1"))
    created["metadata"]["annotations"] = {"a": "b"}
    api.update(created)
    eventually(lambda: (cluster._pod_informer.get("default/p1") or PodInfo("", "")).annotations)
    api.delete("v1", "Pod", "default", "p1")
    eventually(lambda: cluster._pod_informer.get("default/p1") is None)


def test_expired_watch_relists_and_misses_nothing(api: ApiStandin, cluster: Cluster) -> None:
    api.wait_for_watches(2)
    api.close_watches()  # the informers reconnect from their resourceVersion ...
    api.create(nad("while-away"))
    api.compact()  # ... which is now too old: 410 Gone, so they must relist
    eventually(lambda: cluster.nads.synced() and cluster._nad_informer.get("default/while-away"))
    lists = [p for m, p in api.requests if m == "GET" and "network-attachment" in p]
    assert len(lists) >= 2


def test_watch_survives_an_abrupt_disconnect(api: ApiStandin, cluster: Cluster) -> None:
    api.wait_for_watches(2)
    api.close_watches(abrupt=True)
    api.create(nad("after-cut"))
    eventually(lambda: cluster._nad_informer.get("default/after-cut"), timeout=8)


def test_nad_lookup_falls_back_to_a_live_get(api: ApiStandin, cluster: Cluster) -> None:
    api.create(nad("net-a", namespace="team"))
    found = cluster.nads.get("team", "net-a")  # cache or live GET: either way it is found
    assert found is not None and found.key == "team/net-a"
    assert cluster.nads.get("team", "ghost") is None


def test_api_outage_on_a_cache_miss_is_try_again(api: ApiStandin, cluster: Cluster) -> None:
    api.fail_next("GET", "/apis/k8s.cni.cncf.io/v1/namespaces/team", 503)
    with pytest.raises(TryAgainLater) as err:
        cluster.nads.get("team", "net-a")
    assert err.value.code == 11


def test_pod_uid_mismatch_is_not_the_pod(api: ApiStandin, cluster: Cluster) -> None:
    created = api.create(pod("p1"))
    uid = created["metadata"]["uid"]
    assert cluster.pods.get("default", "p1", uid) is not None
    started = time.monotonic()
    assert cluster.pods.get("default", "p1", "some-older-uid") is None
    assert time.monotonic() - started < 5


def test_unknown_pod_is_none(cluster: Cluster) -> None:
    assert cluster.pods.get("default", "ghost", "") is None


def test_network_status_is_patched_onto_the_pod(api: ApiStandin, cluster: Cluster) -> None:
    created = api.create(pod("p1"))
    info = PodInfo("default", "p1", created["metadata"]["uid"])
    status = [{"name": "cluster", "interface": "eth0", "ips": ["10.0.0.2"], "default": True}]
    cluster.sink.attached(info, status, ["Add eth0 [10.0.0.2/24] from cluster"])
    assert cluster.sink.flush()
    stored = api.get("Pod", "default", "p1")
    assert stored is not None
    assert json.loads(stored["metadata"]["annotations"][STATUS_KEY]) == status
    patches = [r for r in api.request_log if r.method == "PATCH"]
    assert patches[0].path.endswith("/pods/p1/status")
    assert patches[0].content_type == "application/merge-patch+json"
    (event,) = api.events()
    assert event["reason"] == "AddedInterface"
    assert event["involvedObject"]["name"] == "p1"
    assert event["message"] == "Add eth0 [10.0.0.2/24] from cluster"


def test_status_patch_retries_on_conflict(api: ApiStandin, cluster: Cluster) -> None:
    created = api.create(pod("p1"))
    api.fail_next("PATCH", "/api/v1/namespaces/default/pods/p1/status", 409, times=2)
    cluster.sink.attached(PodInfo("default", "p1", created["metadata"]["uid"]), [{"x": 1}], [])
    assert cluster.sink.flush()
    stored = api.get("Pod", "default", "p1") or {}
    assert json.loads(stored["metadata"]["annotations"][STATUS_KEY]) == [{"x": 1}]


def test_status_is_not_written_onto_a_replaced_pod(api: ApiStandin, cluster: Cluster) -> None:
    api.create(pod("p1"))
    cluster.sink.attached(PodInfo("default", "p1", "uid-of-the-old-pod"), [{"x": 1}], [])
    assert cluster.sink.flush()
    stored = api.get("Pod", "default", "p1") or {}
    assert STATUS_KEY not in (stored["metadata"].get("annotations") or {})


def test_network_not_found_event(api: ApiStandin, cluster: Cluster) -> None:
    api.create(pod("p1"))
    cluster.sink.network_not_found(PodInfo("default", "p1", ""), "NAD default/ghost not found")
    assert cluster.sink.flush()
    (event,) = api.events()
    assert (event["type"], event["reason"]) == ("Warning", "NoNetworkFound")


def node_object(name: str, addresses: list[str], cidrs: list[str]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "spec": {"podCIDR": cidrs[0], "podCIDRs": cidrs},
        "status": {
            "addresses": [{"type": "InternalIP", "address": a} for a in addresses]
            + [{"type": "Hostname", "address": name}]
        },
    }


def test_fabric_peers_come_from_the_node_objects(api: ApiStandin, cluster: Cluster) -> None:
    api.create(node_object(NODE, ["192.168.1.1"], ["10.244.1.0/24", "fd00:1::/64"]))
    api.create(node_object("node-2", ["192.168.1.2", "fd00:100::2"], ["10.244.2.0/24"]))
    api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "bare"}})
    eventually(lambda: len(cluster.peers() or []) == 2)
    peers = {p.name: p for p in cluster.peers() or []}
    assert peers["node-2"].addresses == ("192.168.1.2", "fd00:100::2")
    assert peers["node-2"].pod_cidrs == ("10.244.2.0/24",)
    assert cluster.own_pod_cidrs() == ["10.244.1.0/24", "fd00:1::/64"]


def test_own_pod_cidrs_are_unknown_until_assigned(api: ApiStandin, cluster: Cluster) -> None:
    api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
    eventually(lambda: cluster.peers() is not None)
    assert cluster.own_pod_cidrs() is None  # registered, no podCIDRs yet: unknown, not "none"
    node = api.get("Node", None, NODE)
    assert node is not None
    api.update({**node, "spec": {"podCIDR": "10.244.9.0/24"}})
    eventually(lambda: cluster.own_pod_cidrs() == ["10.244.9.0/24"])


def test_an_invalid_nad_in_the_cluster_fails_its_own_lookups_only(
    api: ApiStandin, tmp_path: Path
) -> None:
    """A NAD whose spec.config is not a string (a CRD installed without its schema lets it
    in) kept the NAD cache from ever listing: every lookup went to the API, none was synced."""
    bad = nad("bad")
    bad["spec"]["config"] = {"cniVersion": "1.0.0", "type": "macvlan"}
    api.create(bad)
    api.create(nad("good"))
    cfg = DaemonConfig.model_validate(
        {
            "kubeconfig": api.kubeconfig(tmp_path / "kubeconfig"),
            "nodeName": NODE,
            "stateDir": str(tmp_path / "state"),
        }
    )
    cluster = Cluster.connect(cfg)
    try:
        assert cluster.synced.wait(5)
        assert [n.key for n in cluster.nads.all()] == ["default/good"]
        with pytest.raises(InvalidConfig, match=r"spec\.config must be a string") as err:
            cluster.nads.get("default", "bad")
        assert err.value.code == 7
        # ... and one that turns invalid leaves the cache, rather than stay as it was.
        good = api.get("NetworkAttachmentDefinition", "default", "good")
        assert good is not None
        good["spec"]["config"] = ["not", "a", "string"]
        api.update(good)
        eventually(lambda: cluster._nad_informer.get("default/good") is None)
    finally:
        cluster.stop()


def test_nad_lookups_and_listings_are_answered_from_the_watched_cache(
    api: ApiStandin, cluster: Cluster
) -> None:
    for i in range(50):
        api.create(nad(f"net-{i}", namespace="team"))
    eventually(lambda: cluster._nad_informer.get("team/net-49"))
    before = len(api.requests)
    for _ in range(3):
        for i in range(50):
            found = cluster.nads.get("team", f"net-{i}")
            assert found is not None and found.key == f"team/net-{i}"
        assert len(list(cluster.nads.all())) == 50
    # No live GET and no relist of the NADs: every answer was a dict hit.
    assert [p for _, p in api.requests[before:] if "network-attachment-definitions" in p] == []
