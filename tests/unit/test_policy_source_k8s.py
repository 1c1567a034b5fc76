"""Cluster mode's policy source against the API stand-in, through the real `kubernetes` client:
a NetworkPolicy or MultiNetworkPolicy created, changed or deleted in the API fires on_change
and shows in the snapshot; namespaces and every node's pods are there as the compiler's models;
an object plexusd cannot use is listed by errors() and never hides the others. And the stand-in
serves the two policy kinds as the API server does."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from metaplugin.config import DaemonConfig
from metaplugin.k8s_policy import ClusterPolicySource
from metaplugin.policy_source import open_policy_source
from netpolicy.model import PodInterface
from tests.k8s_standin import ApiStandin
from tests.unit.test_deploy import DEPLOY

WAIT = 10.0
G, V, P = "k8s.cni.cncf.io", "v1beta1", "multi-networkpolicies"


def wait(check: Callable[[], Any], timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    return value


def netpol(name: str, app: str = "web", namespace: str = "team-a") -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"podSelector": {"matchLabels": {"app": app}}, "policyTypes": ["Ingress"]},
    }


def mnp(name: str, policy_for: str | None = "macvlan") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "team-a"}
    if policy_for is not None:
        meta["annotations"] = {"k8s.v1.cni.cncf.io/policy-for": policy_for}
    return {
        "apiVersion": f"{G}/{V}",
        "kind": "MultiNetworkPolicy",
        "metadata": meta,
        "spec": {"podSelector": {}},
    }


def pod(name: str, node: str, labels: dict[str, str], status: str | None = None) -> dict[str, Any]:
    annotations = {"k8s.v1.cni.cncf.io/network-status": status} if status is not None else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "team-a",
            "labels": labels,
            "annotations": annotations,
        },
        "spec": {
            "nodeName": node,
            "containers": [
                {"name": "c", "image": "i", "ports": [{"name": "http", "containerPort": 80}]}
            ],
        },
        "status": {"podIPs": [{"ip": "10.244.2.7"}]},
    }


class Changes:
    def __init__(self) -> None:
        self.seen = threading.Event()

    def __call__(self) -> None:
        self.seen.set()

    def wait(self) -> bool:
        found = self.seen.wait(WAIT)
        self.seen.clear()
        return found


@pytest.fixture
def standin() -> Iterator[ApiStandin]:
    with ApiStandin() as api:
        yield api


@pytest.fixture
def api(standin: ApiStandin) -> Iterator[client.ApiClient]:
    with client.ApiClient(client.Configuration(host=standin.url)) as api:
        yield api


@pytest.fixture
def source(standin: ApiStandin, api: client.ApiClient) -> Iterator[ClusterPolicySource]:
    standin.create(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "team-a", "annotations": {"plexus.dev/isolation": "namespace"}},
        }
    )
    standin.create(netpol("seeded"))
    status = json.dumps(
        [
            {"name": "cluster", "interface": "eth0", "ips": ["10.244.2.7"], "default": True},
            {"name": "team-a/macvlan", "interface": "net1", "ips": ["192.168.1.7"]},
        ]
    )
    standin.create(pod("far", "node-2", {"app": "db"}, status))
    made = open_policy_source(DaemonConfig.model_validate({"nodeName": "node-1"}), api)
    assert isinstance(made, ClusterPolicySource)
    wait(made.synced)
    yield made
    made.close()


def refs(source: ClusterPolicySource) -> list[str]:
    return sorted(p.ref for p in source.snapshot().policies)


def test_the_first_lists_fill_the_snapshot_with_models(source: ClusterPolicySource) -> None:
    snap = source.snapshot()
    assert [p.ref for p in snap.policies] == ["NetworkPolicy:team-a/seeded"]
    assert snap.namespaces["team-a"].annotations == {"plexus.dev/isolation": "namespace"}
    assert snap.namespaces["team-a"].name == "team-a"
    (far,) = snap.pods  # a pod of another node: a peer
    assert (far.key, far.labels, far.netns) == ("team-a/far", {"app": "db"}, "")
    assert [n.name for n in far.named_ports] == ["http"]
    assert far.interfaces == (
        PodInterface(ifname="eth0", network="cluster", primary=True, addresses=("10.244.2.7",)),
        PodInterface(
            ifname="net1", network="team-a/macvlan", primary=False, addresses=("192.168.1.7",)
        ),
    )
    assert source.pod_labels("team-a", "far", "any-sandbox") == {"app": "db"}
    assert source.pod_labels("team-a", "nobody", "") is None
    assert source.errors() == []


def test_a_network_policy_created_changed_and_deleted_fires_on_change(
    source: ClusterPolicySource, api: client.ApiClient
) -> None:
    changes = Changes()
    source.on_change(changes)
    networking: Any = client.NetworkingV1Api(api)  # raw dicts, as the daemon's calls
    networking.create_namespaced_network_policy("team-a", netpol("web"))
    assert changes.wait()
    assert wait(lambda: "NetworkPolicy:team-a/web" in refs(source))

    networking.patch_namespaced_network_policy(
        "web", "team-a", {"spec": {"podSelector": {"matchLabels": {"app": "api"}}}}
    )
    assert changes.wait()

    def selector() -> dict[str, str]:
        web = [p for p in source.snapshot().policies if p.name == "web"]
        return web[0].spec.pod_selector.match_labels if web else {}

    assert wait(lambda: selector() == {"app": "api"})

    networking.delete_namespaced_network_policy("web", "team-a")
    assert changes.wait()
    assert wait(lambda: refs(source) == ["NetworkPolicy:team-a/seeded"])


def test_a_multi_network_policy_created_changed_and_deleted_fires_on_change(
    source: ClusterPolicySource, api: client.ApiClient
) -> None:
    changes = Changes()
    source.on_change(changes)
    custom = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(G, V, "team-a", P, mnp("sec"))
    assert changes.wait()

    def policy_for() -> tuple[str, ...]:
        found = [p for p in source.snapshot().policies if p.kind == "MultiNetworkPolicy"]
        return found[0].policy_for if found else ()

    assert wait(lambda: policy_for() == ("team-a/macvlan",))
    custom.patch_namespaced_custom_object(
        G,
        V,
        "team-a",
        P,
        "sec",
        {"metadata": {"annotations": {"k8s.v1.cni.cncf.io/policy-for": "infra/storage"}}},
    )
    assert wait(lambda: policy_for() == ("infra/storage",))
    custom.delete_namespaced_custom_object(G, V, "team-a", P, "sec")
    assert wait(lambda: policy_for() == ())


def test_a_multi_network_policy_without_policy_for_is_an_error_until_it_goes(
    source: ClusterPolicySource, api: client.ApiClient
) -> None:
    custom = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(G, V, "team-a", P, mnp("nowhere", policy_for=None))
    errors = wait(source.errors)
    assert "MultiNetworkPolicy team-a/nowhere" in errors[0]
    assert "k8s.v1.cni.cncf.io/policy-for" in errors[0]
    assert refs(source) == ["NetworkPolicy:team-a/seeded"]  # the others still count

    custom.delete_namespaced_custom_object(G, V, "team-a", P, "nowhere")
    wait(lambda: not source.errors())


def test_pods_of_every_node_come_and_go_and_a_bad_network_status_keeps_the_labels(
    source: ClusterPolicySource, standin: ApiStandin
) -> None:
    changes = Changes()
    source.on_change(changes)
    standin.create(pod("near", "node-1", {"app": "web"}, "not json"))
    assert changes.wait()
    near = wait(lambda: [p for p in source.snapshot().pods if p.name == "near"])[0]
    assert near.labels == {"app": "web"}
    assert [i.addresses for i in near.interfaces] == [("10.244.2.7",)]  # podIPs still count
    assert source.pod_labels("team-a", "near", "") == {"app": "web"}
    standin.delete("v1", "Pod", "team-a", "near")
    wait(lambda: source.pod_labels("team-a", "near", "") is None)


def test_a_watch_cut_and_expired_relists_and_announces(
    source: ClusterPolicySource, standin: ApiStandin
) -> None:
    changes = Changes()
    source.on_change(changes)
    standin.compact()
    standin.create(netpol("after"))
    standin.close_watches()
    assert changes.wait()
    assert wait(lambda: "NetworkPolicy:team-a/after" in refs(source))


# ---- the stand-in serves the policy kinds as the API server does ---------------------------------


def test_the_standin_lists_and_watches_network_policies_as_a_built_in(
    standin: ApiStandin, api: client.ApiClient
) -> None:
    networking: Any = client.NetworkingV1Api(api)  # raw dicts, as the daemon's calls
    created = networking.create_namespaced_network_policy(
        "team-a", netpol("web"), _preload_content=False
    )
    assert json.loads(created.data)["metadata"]["generation"] == 1
    listed = json.loads(
        networking.list_network_policy_for_all_namespaces(_preload_content=False).data
    )
    assert listed["kind"] == "NetworkPolicyList"
    (item,) = listed["items"]
    assert "kind" not in item  # built-in list items are untyped
    rv = listed["metadata"]["resourceVersion"]
    networking.patch_namespaced_network_policy(
        "web", "team-a", {"spec": {"podSelector": {"matchLabels": {"app": "x"}}}}
    )
    resp = networking.list_network_policy_for_all_namespaces(
        watch=True, resource_version=rv, timeout_seconds=1, _preload_content=False
    )
    events = [json.loads(line) for line in resp.read().decode().splitlines() if line]
    assert [(e["type"], e["object"]["kind"]) for e in events] == [("MODIFIED", "NetworkPolicy")]
    assert events[0]["object"]["metadata"]["generation"] == 2
    typed = networking.read_namespaced_network_policy("web", "team-a")
    assert typed.spec.pod_selector.match_labels == {"app": "x"}  # the client's model reads it


def test_the_standin_serves_multi_network_policies_only_with_their_crd() -> None:
    with (
        ApiStandin(require_crds=True) as standin,
        client.ApiClient(client.Configuration(host=standin.url)) as crd_api,
    ):
        custom: Any = client.CustomObjectsApi(crd_api)
        with pytest.raises(ApiException) as err:
            custom.list_cluster_custom_object(G, V, P)
        assert err.value.status == 404
        (crd,) = yaml.safe_load_all((DEPLOY / "crds" / "multi-networkpolicies.yaml").read_text())
        client.ApiextensionsV1Api(crd_api).create_custom_resource_definition(crd)
        custom.create_namespaced_custom_object(G, V, "team-a", P, mnp("sec"))
        (item,) = custom.list_cluster_custom_object(G, V, P)["items"]
        assert (item["kind"], item["metadata"]["generation"]) == ("MultiNetworkPolicy", 1)
        groups: Any = client.ApisApi(crd_api).get_api_versions().groups
        cni = next(g for g in groups if g.name == G)
        assert [v.version for v in cni.versions] == ["v1beta1"]  # no NAD CRD here
        resources = custom.get_api_resources(G, V).resources
        assert [(r.name, r.kind, r.namespaced) for r in resources] == [
            (P, "MultiNetworkPolicy", True)
        ]


def test_the_standin_lists_both_versions_of_the_cni_group(api: client.ApiClient) -> None:
    groups: Any = client.ApisApi(api).get_api_versions().groups
    cni = next(g for g in groups if g.name == G)
    assert [v.version for v in cni.versions] == ["v1", "v1beta1"]
    assert cni.preferred_version.version == "v1"


def test_a_pod_update_that_moves_nothing_policy_reads_announces_nothing(
    source: ClusterPolicySource, standin: ApiStandin
) -> None:
    fired: list[int] = []
    changes = Changes()
    source.on_change(lambda: fired.append(1))
    source.on_change(changes)
    far = standin.get("Pod", "team-a", "far")
    assert far is not None
    far["status"]["conditions"] = [{"type": "Ready", "status": "True"}]  # a heartbeat
    standin.update(far)
    far = standin.get("Pod", "team-a", "far")
    assert far is not None
    far["metadata"]["labels"] = {"app": "db", "tier": "2"}
    standin.update(far)
    assert changes.wait()  # the label change; the heartbeat before it, in order, fired nothing
    assert fired == [1]
    assert source.pod_labels("team-a", "far", "") == {"app": "db", "tier": "2"}
