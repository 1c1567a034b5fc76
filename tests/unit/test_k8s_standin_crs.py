"""The API stand-in's semantics the controller relies on, through the real `kubernetes` client:
Lease optimistic concurrency, the status subresource of the Plexus CRs, generation, and the
garbage collector's handling of ownerReferences."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.k8s_standin import ApiStandin, resource_for

G, V = "plexus.dev", "v1alpha1"


@pytest.fixture
def api(kube: client.ApiClient) -> client.ApiClient:
    return kube  # the shared client (tests/unit/conftest.py) under this file's name


def _json(resp: Any) -> dict[str, Any]:
    return json.loads(resp.data)


def pool(name: str = "p1") -> dict[str, Any]:
    return {
        "apiVersion": f"{G}/{V}",
        "kind": "VFPool",
        "metadata": {"name": name},
        "spec": {"resourceName": "plexus.dev/fast", "nicSelector": {"pfNames": ["ens1f0"]}},
        "status": {"observedGeneration": 99},
    }


def test_lease_update_with_stale_resource_version_is_409(api: client.ApiClient) -> None:
    leases = client.CoordinationV1Api(api)
    body = {"metadata": {"name": "l"}, "spec": {"holderIdentity": "a"}}
    created = _json(leases.create_namespaced_lease("ns", body, _preload_content=False))
    first = {**created, "spec": {"holderIdentity": "b"}}
    leases.replace_namespaced_lease("l", "ns", first, _preload_content=False)
    stale = {**created, "spec": {"holderIdentity": "c"}}  # still the creation's version
    with pytest.raises(ApiException) as err:
        leases.replace_namespaced_lease("l", "ns", stale, _preload_content=False)
    assert err.value.status == 409
    got = _json(leases.read_namespaced_lease("l", "ns", _preload_content=False))
    assert got["spec"]["holderIdentity"] == "b"


def test_lease_update_without_resource_version_is_refused(api: client.ApiClient) -> None:
    leases = client.CoordinationV1Api(api)
    leases.create_namespaced_lease("ns", {"metadata": {"name": "l"}}, _preload_content=False)
    blind = {"metadata": {"name": "l"}, "spec": {"holderIdentity": "x"}}
    with pytest.raises(ApiException) as err:
        leases.replace_namespaced_lease("l", "ns", blind, _preload_content=False)
    assert err.value.status == 422
    assert "resourceVersion" in json.loads(err.value.body)["message"]


def test_create_drops_status_of_a_cr_with_status_subresource(api: client.ApiClient) -> None:
    custom = client.CustomObjectsApi(api)
    made = _json(
        custom.create_cluster_custom_object(G, V, "vfpools", pool(), _preload_content=False)
    )
    assert "status" not in made
    assert made["metadata"]["generation"] == 1


def test_main_resource_ignores_status_and_status_ignores_spec(api: client.ApiClient) -> None:
    custom = client.CustomObjectsApi(api)
    custom.create_cluster_custom_object(G, V, "vfpools", pool(), _preload_content=False)
    status = {"status": {"observedGeneration": 1}, "spec": {"priority": 7},
              "metadata": {"labels": {"sneaky": "yes"}}}  # fmt: skip
    after = _json(
        custom.patch_cluster_custom_object_status(
            G,
            V,
            "vfpools",
            "p1",
            status,
            _preload_content=False,
            _content_type="application/merge-patch+json",
        )
    )
    assert after["status"] == {"observedGeneration": 1}
    assert "priority" not in after["spec"] and "labels" not in after["metadata"]
    assert after["metadata"]["generation"] == 1  # a status write is no spec change
    main = {"status": {"observedGeneration": 5}, "spec": {"priority": 3}}
    after = _json(
        custom.patch_cluster_custom_object(
            G,
            V,
            "vfpools",
            "p1",
            main,
            _preload_content=False,
            _content_type="application/merge-patch+json",
        )
    )
    assert after["status"] == {"observedGeneration": 1}
    assert after["spec"]["priority"] == 3
    assert after["metadata"]["generation"] == 2


def test_metadata_change_keeps_generation(api: client.ApiClient) -> None:
    custom = client.CustomObjectsApi(api)
    custom.create_cluster_custom_object(G, V, "vfpools", pool(), _preload_content=False)
    patch = {"metadata": {"labels": {"a": "b"}}}
    after = _json(
        custom.patch_cluster_custom_object(
            G,
            V,
            "vfpools",
            "p1",
            patch,
            _preload_content=False,
            _content_type="application/merge-patch+json",
        )
    )
    assert after["metadata"]["labels"] == {"a": "b"}
    assert after["metadata"]["generation"] == 1


def _node_and_state(standin: ApiStandin, node: str, *extra_owners: dict[str, Any]) -> str:
    made = standin.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}})
    owner = {"apiVersion": "v1", "kind": "Node", "name": node, "uid": made["metadata"]["uid"]}
    standin.create({
        "apiVersion": f"{G}/{V}", "kind": "VFPoolNodeState",
        "metadata": {"name": node, "ownerReferences": [owner, *extra_owners]},
        "spec": {"nodeName": node},
    })  # fmt: skip
    return str(made["metadata"]["uid"])


def test_deleting_a_node_collects_its_node_state(
    standin: ApiStandin, api: client.ApiClient
) -> None:
    _node_and_state(standin, "n1")
    _node_and_state(standin, "n2")
    client.CoreV1Api(api).delete_node("n1", _preload_content=False)
    assert standin.get("VFPoolNodeState", None, "n1") is None
    assert standin.get("VFPoolNodeState", None, "n2") is not None
    kinds = [(e["type"], e["object"]["kind"]) for e in _history(standin)]
    assert kinds[-2:] == [("DELETED", "Node"), ("DELETED", "VFPoolNodeState")]


def test_dependent_with_another_live_owner_only_loses_the_reference(
    standin: ApiStandin,
) -> None:
    other = standin.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "keeper"}})
    ref = {"apiVersion": "v1", "kind": "Node", "name": "keeper", "uid": other["metadata"]["uid"]}
    _node_and_state(standin, "n1", ref)
    standin.delete("v1", "Node", None, "n1")
    state = standin.get("VFPoolNodeState", None, "n1")
    assert state is not None
    assert state["metadata"]["ownerReferences"] == [ref]


def test_orphan_propagation_keeps_the_dependent(standin: ApiStandin, api: client.ApiClient) -> None:
    _node_and_state(standin, "n1")
    client.CoreV1Api(api).delete_node(
        "n1", body={"propagationPolicy": "Orphan"}, _preload_content=False
    )
    state = standin.get("VFPoolNodeState", None, "n1")
    assert state is not None and "ownerReferences" not in state["metadata"]


def _history(standin: ApiStandin) -> list[dict[str, Any]]:
    """Every change as a watch from the beginning would replay it."""
    changes = standin.store._history
    return [{"type": c.type, "object": c.obj} for c in changes]


def crd(plural: str = "vfpools", kind: str = "VFPool", scope: str = "Cluster") -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{G}"},
        "spec": {"group": G, "scope": scope,
                 "names": {"plural": plural, "singular": kind.lower(), "kind": kind},
                 "versions": [{"name": V, "served": True, "storage": True,
                               "subresources": {"status": {}},
                               "schema": {"openAPIV3Schema": {"type": "object"}}}]},
    }  # fmt: skip


def test_with_require_crds_a_kind_is_served_only_while_its_crd_exists() -> None:
    with (
        ApiStandin(require_crds=True) as standin,
        client.ApiClient(client.Configuration(host=standin.url)) as api,
    ):
        custom = client.CustomObjectsApi(api)
        with pytest.raises(ApiException) as err:
            custom.list_cluster_custom_object(G, V, "vfpools")
        assert err.value.status == 404
        groups = client.ApisApi(api).get_api_versions().groups
        assert G not in [g.name for g in groups]

        ext = client.ApiextensionsV1Api(api)
        made = _json(ext.create_custom_resource_definition(crd(), _preload_content=False))
        established = {c["type"]: c["status"] for c in made["status"]["conditions"]}
        assert established == {"NamesAccepted": "True", "Established": "True"}
        custom.create_cluster_custom_object(G, V, "vfpools", pool())
        assert [
            p["metadata"]["name"]
            for p in custom.list_cluster_custom_object(G, V, "vfpools")["items"]
        ] == ["p1"]
        with pytest.raises(ApiException):  # another kind's CRD is still missing
            custom.list_cluster_custom_object(G, V, "vfpoolnodestates")

        ext.delete_custom_resource_definition(f"vfpools.{G}")
        assert standin.get("VFPool", None, "p1") is None  # its objects go with it
        with pytest.raises(ApiException) as err:
            custom.list_cluster_custom_object(G, V, "vfpools")
        assert err.value.status == 404


def test_a_crd_with_the_wrong_scope_serves_nothing() -> None:
    with ApiStandin(require_crds=True) as standin:
        standin.create(crd(scope="Namespaced"))
        assert not standin.store.served(resource_for("VFPool"))
        standin.create({**crd("vfpoolnodestates", "VFPoolNodeState")})
        assert standin.store.served(resource_for("VFPoolNodeState"))
