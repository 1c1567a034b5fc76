"""Checks tests/k8s_standin.py against the real ``kubernetes`` client.

The stand-in replaces kube-apiserver in Plexus tests, so each test here drives it through
``CoreV1Api`` / ``CustomObjectsApi`` / ``kubernetes.watch.Watch`` and checks a semantic the
real server has. Every watch carries ``timeout_seconds`` (server side) and ``_request_timeout``
(client side) so that a bug fails the test instead of hanging the run.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from tests.k8s_standin import ApiStandin

NAD = {"group": "k8s.cni.cncf.io", "version": "v1", "plural": "network-attachment-definitions"}
NETWORK_STATUS = "k8s.v1.cni.cncf.io/network-status"


@pytest.fixture
def api_client(kube: client.ApiClient) -> client.ApiClient:
    return kube  # the shared client (tests/unit/conftest.py) under this file's name


@pytest.fixture
def core(api_client: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api_client)


@pytest.fixture
def custom(api_client: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client)


def pod(name: str, node: str = "node-a", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels or {}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "pause"}]},
    }


def nad(name: str, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "k8s.cni.cncf.io/v1",
        "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"config": json.dumps({"cniVersion": "1.0.0", "type": "macvlan"})},
    }


def collect(
    func: Callable[..., Any],
    *args: Any,
    count: int,
    on_event: Callable[[int, dict[str, Any]], None] | None = None,
    timeout: int = 5,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Watch until ``count`` events arrived (or the stream ends); bounded in time."""
    w = watch.Watch()
    events: list[dict[str, Any]] = []
    stream = w.stream(func, *args, timeout_seconds=timeout, _request_timeout=timeout + 5, **kwargs)
    for event in stream:
        events.append(event)
        if on_event is not None:
            on_event(len(events), event)
        if len(events) >= count:
            w.stop()
    return events


def summary(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["type"], e["raw_object"]["metadata"]["name"]) for e in events]


# ---------------------------------------------------------------- lists


def test_list_carries_current_resource_version(standin: ApiStandin, core: client.CoreV1Api) -> None:
    first = core.create_namespaced_pod("default", pod("a"))
    second = core.create_namespaced_pod("default", pod("b"))
    listed = core.list_namespaced_pod("default")
    assert int(second.metadata.resource_version) > int(first.metadata.resource_version)
    assert listed.metadata.resource_version == second.metadata.resource_version
    assert listed.metadata.resource_version == standin.resource_version
    assert [p.metadata.name for p in listed.items] == ["a", "b"]
    assert first.metadata.uid and first.metadata.creation_timestamp
    assert core.list_namespaced_pod("other").items == []


def test_field_and_label_selectors(core: client.CoreV1Api, standin: ApiStandin) -> None:
    standin.create(pod("a", node="node-a", labels={"app": "x"}))
    standin.create(pod("b", node="node-b", labels={"app": "y"}))
    standin.create(pod("c", node="node-a", labels={"app": "y", "tier": "t"}))

    def names(**kwargs: str) -> list[str]:
        return [p.metadata.name for p in core.list_pod_for_all_namespaces(**kwargs).items]

    assert names(field_selector="spec.nodeName=node-a") == ["a", "c"]
    assert names(field_selector="spec.nodeName=node-a,metadata.name!=a") == ["c"]
    assert names(field_selector="metadata.namespace=default,metadata.name=b") == ["b"]
    assert names(label_selector="app=y") == ["b", "c"]
    assert names(label_selector="app=y,tier") == ["c"]
    assert names(label_selector="app in (x, y),!tier") == ["a", "b"]
    assert names(label_selector="app!=x", field_selector="spec.nodeName=node-a") == ["c"]
    with pytest.raises(ApiException) as err:
        names(field_selector="spec.bogus=1")
    assert err.value.status == 400
    assert "field label not supported" in json.loads(err.value.body)["message"]


def test_limit_and_continue(core: client.CoreV1Api, standin: ApiStandin) -> None:
    for name in "abcde":
        standin.create(pod(name))
    page = core.list_namespaced_pod("default", limit=2)
    assert [p.metadata.name for p in page.items] == ["a", "b"]
    assert page.metadata.remaining_item_count == 3
    rest = core.list_namespaced_pod("default", limit=10, _continue=page.metadata._continue)
    assert [p.metadata.name for p in rest.items] == ["c", "d", "e"]
    assert rest.metadata._continue is None
    assert rest.metadata.resource_version == page.metadata.resource_version


def test_raw_wire_format(standin: ApiStandin) -> None:
    standin.create(pod("a"))
    conn = http.client.HTTPConnection("127.0.0.1", int(standin.url.rsplit(":", 1)[1]), timeout=5)
    try:
        conn.request("GET", "/api/v1/namespaces/default/pods")
        listed = json.loads(conn.getresponse().read())
        assert (listed["kind"], listed["apiVersion"]) == ("PodList", "v1")
        assert "kind" not in listed["items"][0]  # built-in list items carry no TypeMeta
        conn.request("GET", "/api/v1/nope")
        response = conn.getresponse()
        body = json.loads(response.read())
        assert response.status == 404
        assert body["kind"] == "Status" and body["reason"] == "NotFound" and body["code"] == 404
        conn.request("GET", "/api/v1/pods?watch=true&timeoutSeconds=30")
        response = conn.getresponse()
        assert standin.wait_for_watches(1)
        standin.close_watches()
        assert response.getheader("Transfer-Encoding") == "chunked"
        lines = response.read().decode().splitlines()
        assert [json.loads(line)["type"] for line in lines] == ["ADDED"]
    finally:
        conn.close()


def test_discovery_and_version(api_client: client.ApiClient) -> None:
    assert client.VersionApi(api_client).get_code().major == "1"
    assert client.CoreApi(api_client).get_api_versions().versions == ["v1"]
    groups = client.ApisApi(api_client).get_api_versions().groups
    assert [(g.name, g.preferred_version.version) for g in groups] == [
        ("admissionregistration.k8s.io", "v1"),
        ("apiextensions.k8s.io", "v1"),
        ("coordination.k8s.io", "v1"),
        ("k8s.cni.cncf.io", "v1"),
        ("networking.k8s.io", "v1"),
        ("plexus.dev", "v1alpha1"),
    ]
    plexus = client.CustomObjectsApi(api_client).get_api_resources("plexus.dev", "v1alpha1")
    assert {r.name: r.namespaced for r in plexus.resources} == {
        "vfpools": False, "vfpools/status": False,
        "vfpoolnodestates": False, "vfpoolnodestates/status": False,
        "multicastnodestates": False, "multicastnodestates/status": False,
    }  # fmt: skip


def test_kubeconfig(standin: ApiStandin, tmp_path: Path) -> None:
    path = standin.kubeconfig(tmp_path / "kubeconfig")
    with config.new_client_from_config(config_file=path) as api:
        assert client.CoreV1Api(api).list_namespaced_pod("default").items == []


# ---------------------------------------------------------------- watches


def test_watch_from_resource_version_replays_later_events_in_order(
    standin: ApiStandin, core: client.CoreV1Api
) -> None:
    core.create_namespaced_pod("default", pod("before"))
    rv = core.list_namespaced_pod("default").metadata.resource_version
    core.create_namespaced_pod("default", pod("p"))
    core.patch_namespaced_pod("p", "default", {"metadata": {"annotations": {"k": "v"}}})
    core.delete_namespaced_pod("p", "default")
    events = collect(core.list_namespaced_pod, "default", count=3, resource_version=rv)
    assert summary(events) == [("ADDED", "p"), ("MODIFIED", "p"), ("DELETED", "p")]
    rvs = [int(e["object"].metadata.resource_version) for e in events]
    assert rvs == sorted(rvs) and rvs[0] > int(rv)
    assert rvs[-1] == int(standin.resource_version)  # DELETED carries a new resourceVersion
    assert events[1]["object"].metadata.annotations == {"k": "v"}


def test_watch_without_resource_version_starts_with_current_state(
    standin: ApiStandin, core: client.CoreV1Api
) -> None:
    standin.create(pod("a"))

    def then_create(seen: int, _: dict[str, Any]) -> None:
        if seen == 1:
            standin.create(pod("b"))

    events = collect(core.list_pod_for_all_namespaces, count=2, on_event=then_create)
    assert summary(events) == [("ADDED", "a"), ("ADDED", "b")]
    # The client hung up after two events; the server notices and forgets the watch.
    deadline = time.monotonic() + 2
    while standin.watch_count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert standin.watch_count == 0


def test_watch_selector_transitions(core: client.CoreV1Api, standin: ApiStandin) -> None:
    standin.create(pod("p", labels={"app": "x"}))
    rv = standin.resource_version
    core.patch_namespaced_pod("p", "default", {"metadata": {"labels": {"app": "y"}}})
    core.patch_namespaced_pod("p", "default", {"metadata": {"labels": {"app": "x"}}})
    events = collect(
        core.list_namespaced_pod, "default", count=2, resource_version=rv, label_selector="app=x"
    )
    assert summary(events) == [("DELETED", "p"), ("ADDED", "p")]
    assert events[0]["object"].metadata.labels == {"app": "x"}  # last state that matched


def test_watch_expired_resource_version_raises_410(
    standin: ApiStandin, core: client.CoreV1Api
) -> None:
    standin.create(pod("a"))
    old = standin.resource_version
    standin.create(pod("b"))
    standin.compact()
    with pytest.raises(ApiException) as err:
        collect(core.list_namespaced_pod, "default", count=1, resource_version=old)
    assert err.value.status == 410
    assert f"too old resource version: {old} ({standin.resource_version})" in err.value.reason
    # Without timeout_seconds the client retries once from the same version, then gives up.
    before = len(standin.requests)
    with pytest.raises(ApiException) as err:
        for _ in watch.Watch().stream(
            core.list_namespaced_pod, "default", resource_version=old, _request_timeout=5
        ):
            pass
    assert err.value.status == 410
    assert len(standin.requests) - before == 2
    # From the compaction point on, watching works again.
    standin.create(pod("c"))
    events = collect(core.list_namespaced_pod, "default", count=1, resource_version="2")
    assert summary(events) == [("ADDED", "c")]


def test_timeout_seconds_ends_stream_with_bookmark(core: client.CoreV1Api) -> None:
    started = time.monotonic()
    events = collect(
        core.list_pod_for_all_namespaces, count=5, timeout=1, allow_watch_bookmarks=True
    )
    assert 0.8 < time.monotonic() - started < 4
    assert [e["type"] for e in events] == ["BOOKMARK"]


def test_close_watches_ends_stream(standin: ApiStandin, core: client.CoreV1Api) -> None:
    standin.create(pod("a"))
    closed: list[int] = []
    started = time.monotonic()
    events = collect(
        core.list_pod_for_all_namespaces,
        count=5,
        timeout=30,
        on_event=lambda *_: closed.append(standin.close_watches()),
    )
    assert time.monotonic() - started < 5
    assert summary(events) == [("ADDED", "a")] and closed == [1]
    assert standin.watch_count == 0


def test_abrupt_close_drops_the_connection(standin: ApiStandin, core: client.CoreV1Api) -> None:
    standin.create(pod("a"))
    with pytest.raises(urllib3.exceptions.ProtocolError):
        collect(
            core.list_pod_for_all_namespaces,
            count=5,
            timeout=30,
            on_event=lambda *_: standin.close_watches(abrupt=True),
        )


def test_stop_closes_open_watches() -> None:
    standin = ApiStandin().start()
    core = client.CoreV1Api(client.ApiClient(client.Configuration(host=standin.url)))
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(collect(core.list_pod_for_all_namespaces, count=5, timeout=30))
        except Exception as exc:  # the test asserts on it
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert standin.wait_for_watches(1, timeout=5)
    started = time.monotonic()
    standin.stop()
    thread.join(timeout=5)
    assert not thread.is_alive() and time.monotonic() - started < 3
    assert outcome == [[]]
    core.api_client.close()


# ---------------------------------------------------------------- patches and updates


def test_patch_pod_annotation(standin: ApiStandin, core: client.CoreV1Api) -> None:
    created = core.create_namespaced_pod("default", pod("p"))
    body = {"metadata": {"annotations": {NETWORK_STATUS: "[]", "other": "1"}}}
    patched = core.patch_namespaced_pod("p", "default", body)
    assert standin.request_log[-1].content_type == "application/strategic-merge-patch+json"
    assert patched.metadata.annotations == {NETWORK_STATUS: "[]", "other": "1"}
    assert int(patched.metadata.resource_version) > int(created.metadata.resource_version)

    drop = {"metadata": {"annotations": {"other": None}}}
    merged = core.patch_namespaced_pod(
        "p", "default", drop, _content_type="application/merge-patch+json"
    )
    assert standin.request_log[-1].content_type == "application/merge-patch+json"
    assert merged.metadata.annotations == {NETWORK_STATUS: "[]"}

    path = "/metadata/annotations/" + NETWORK_STATUS.replace("/", "~1")
    ops = [
        {"op": "test", "path": path, "value": "[]"},
        {"op": "replace", "path": path, "value": "x"},
    ]
    replaced = core.patch_namespaced_pod("p", "default", ops)
    assert standin.request_log[-1].content_type == "application/json-patch+json"
    assert replaced.metadata.annotations == {NETWORK_STATUS: "x"}
    with pytest.raises(ApiException) as err:
        core.patch_namespaced_pod("p", "default", ops)  # the test op no longer holds
    assert err.value.status == 422


def test_noop_patch_keeps_resource_version(core: client.CoreV1Api) -> None:
    core.create_namespaced_pod("default", pod("p"))
    body = {"metadata": {"annotations": {"a": "1"}}}
    first = core.patch_namespaced_pod("p", "default", body)
    again = core.patch_namespaced_pod("p", "default", body)
    assert again.metadata.resource_version == first.metadata.resource_version


def test_patch_pod_status(standin: ApiStandin, core: client.CoreV1Api) -> None:
    created = core.create_namespaced_pod("default", {**pod("p"), "status": {"phase": "Running"}})
    assert created.status.phase == "Pending"  # the create strategy resets status
    body = {
        "metadata": {"annotations": {NETWORK_STATUS: "[]"}},
        "spec": {"nodeName": "elsewhere"},
        "status": {"phase": "Running", "podIP": "10.0.0.5"},
    }
    patched = core.patch_namespaced_pod_status("p", "default", body)
    assert standin.requests[-1] == ("PATCH", "/api/v1/namespaces/default/pods/p/status")
    assert patched.status.phase == "Running" and patched.status.pod_ip == "10.0.0.5"
    assert patched.metadata.annotations == {NETWORK_STATUS: "[]"}
    assert patched.spec.node_name == "node-a"  # /status cannot change spec
    main = core.patch_namespaced_pod("p", "default", {"status": {"phase": "Failed"}})
    assert main.status.phase == "Running"  # ... and the main resource cannot change status
    listed = core.list_pod_for_all_namespaces(field_selector="status.podIP=10.0.0.5")
    assert [p.metadata.name for p in listed.items] == ["p"]


def test_patch_preconditions_conflict(core: client.CoreV1Api) -> None:
    created = core.create_namespaced_pod("default", pod("p"))
    stale = created.metadata.resource_version
    core.patch_namespaced_pod("p", "default", {"metadata": {"labels": {"a": "b"}}})
    with pytest.raises(ApiException) as err:
        body = {"metadata": {"resourceVersion": stale, "annotations": {"x": "y"}}}
        core.patch_namespaced_pod("p", "default", body)
    status = json.loads(err.value.body)
    assert err.value.status == 409 and status["reason"] == "Conflict"
    assert status["message"] == (
        'Operation cannot be fulfilled on pods "p": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )
    with pytest.raises(ApiException) as err:
        core.patch_namespaced_pod("p", "default", {"metadata": {"uid": "wrong"}})
    assert err.value.status == 409
    uid = created.metadata.uid
    assert json.loads(err.value.body)["message"] == (
        f"Precondition failed: UID in precondition: wrong, UID in object meta: {uid}"
    )
    with pytest.raises(ApiException) as err:
        core.patch_namespaced_pod_status("missing", "default", {"status": {}})
    assert err.value.status == 404
    assert json.loads(err.value.body)["message"] == 'pods "missing" not found'


def test_create_duplicate_and_replace(core: client.CoreV1Api) -> None:
    core.create_namespaced_pod("default", pod("p"))
    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod("default", pod("p"))
    assert err.value.status == 409 and json.loads(err.value.body)["reason"] == "AlreadyExists"

    current = core.read_namespaced_pod("p", "default")
    current.metadata.labels = {"v": "1"}
    replaced = core.replace_namespaced_pod("p", "default", current)
    assert replaced.metadata.labels == {"v": "1"}
    current.metadata.labels = {"v": "2"}  # still carries the old resourceVersion
    with pytest.raises(ApiException) as err:
        core.replace_namespaced_pod("p", "default", current)
    assert err.value.status == 409
    current.metadata.name = "other"
    with pytest.raises(ApiException) as err:
        core.replace_namespaced_pod("p", "default", current)
    assert err.value.status == 400


def test_delete_preconditions_and_finalizers(standin: ApiStandin, core: client.CoreV1Api) -> None:
    created = core.create_namespaced_pod("default", pod("p"))
    wrong = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid="nope"))
    with pytest.raises(ApiException) as err:
        core.delete_namespaced_pod("p", "default", body=wrong)
    assert err.value.status == 409
    core.patch_namespaced_pod("p", "default", {"metadata": {"finalizers": ["plexus/cleanup"]}})
    pending = core.delete_namespaced_pod("p", "default")
    assert pending.metadata.deletion_timestamp is not None
    assert standin.get("Pod", "default", "p") is not None
    core.patch_namespaced_pod(
        "p",
        "default",
        {"metadata": {"finalizers": None}},
        _content_type="application/merge-patch+json",
    )
    assert standin.get("Pod", "default", "p") is None
    rv = created.metadata.resource_version
    events = collect(core.list_namespaced_pod, "default", count=3, resource_version=rv)
    assert [e["type"] for e in events] == ["MODIFIED", "MODIFIED", "DELETED"]


# ---------------------------------------------------------------- errors injected


def test_fail_next_injects_status(standin: ApiStandin, core: client.CoreV1Api) -> None:
    standin.fail_next("GET", "/api/v1/namespaces/default/pods", 500)
    with pytest.raises(ApiException) as err:
        core.list_namespaced_pod("default")
    assert err.value.status == 500 and json.loads(err.value.body)["reason"] == "InternalError"
    assert core.list_namespaced_pod("default").items == []

    standin.fail_next("post", "/api/v1/namespaces/default/pods", 409, times=2)
    for _ in range(2):
        with pytest.raises(ApiException) as err:
            core.create_namespaced_pod("default", pod("p"))
        assert err.value.status == 409
    core.create_namespaced_pod("default", pod("p"))

    standin.fail_next("GET", "/api/v1/pods", 503)
    with pytest.raises(ApiException) as err:
        collect(core.list_pod_for_all_namespaces, count=1)
    assert err.value.status == 503


# ---------------------------------------------------------------- events and nodes


def test_create_event(standin: ApiStandin, core: client.CoreV1Api) -> None:
    event = client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name="p."),
        involved_object=client.V1ObjectReference(kind="Pod", name="p", namespace="default"),
        reason="AddedInterface",
        message="Add net1 [10.1.0.5/24] from default/macvlan",
        type="Normal",
    )
    created = core.create_namespaced_event("default", event)
    assert created.metadata.name.startswith("p.") and len(created.metadata.name) == 7
    assert [e["reason"] for e in standin.events()] == ["AddedInterface"]
    assert standin.requests[-1] == ("POST", "/api/v1/namespaces/default/events")
    found = core.list_namespaced_event("default", field_selector="involvedObject.name=p")
    assert [e.metadata.name for e in found.items] == [created.metadata.name]
    assert len(core.list_event_for_all_namespaces().items) == 1


def test_nodes(core: client.CoreV1Api) -> None:
    for name in ("node-a", "node-b"):
        core.create_node({"metadata": {"name": name}, "status": {"allocatable": {"cpu": "4"}}})
    assert core.read_node("node-b").status.allocatable == {"cpu": "4"}
    listed = core.list_node(field_selector="metadata.name=node-a")
    assert [n.metadata.name for n in listed.items] == ["node-a"]
    assert listed.items[0].metadata.namespace is None
    events = collect(core.list_node, count=2)
    assert summary(events) == [("ADDED", "node-a"), ("ADDED", "node-b")]


# ---------------------------------------------------------------- network attachment definitions


def test_nad_list_get_update_delete(standin: ApiStandin, custom: client.CustomObjectsApi) -> None:
    created = custom.create_namespaced_custom_object(namespace="default", body=nad("a"), **NAD)
    standin.create(nad("b", namespace="other"))
    listed = custom.list_cluster_custom_object(**NAD)
    assert listed["kind"] == "NetworkAttachmentDefinitionList"
    assert listed["apiVersion"] == "k8s.cni.cncf.io/v1"
    assert [(i["kind"], i["metadata"]["name"]) for i in listed["items"]] == [
        ("NetworkAttachmentDefinition", "a"),
        ("NetworkAttachmentDefinition", "b"),
    ]
    assert len(custom.list_namespaced_custom_object(namespace="other", **NAD)["items"]) == 1
    got = custom.get_namespaced_custom_object(namespace="default", name="a", **NAD)
    assert got["metadata"]["uid"] == created["metadata"]["uid"]
    assert got["metadata"]["generation"] == 1

    got["spec"]["config"] = "{}"
    replaced = custom.replace_namespaced_custom_object(
        namespace="default", name="a", body=got, **NAD
    )
    assert replaced["metadata"]["generation"] == 2
    with pytest.raises(ApiException) as err:  # got still carries the old resourceVersion
        custom.replace_namespaced_custom_object(namespace="default", name="a", body=got, **NAD)
    assert err.value.status == 409

    patch = {"metadata": {"annotations": {"k": "v"}}}
    patched = custom.patch_namespaced_custom_object(
        namespace="default", name="a", body=patch, **NAD
    )
    assert patched["metadata"]["annotations"] == {"k": "v"}
    with pytest.raises(ApiException) as err:  # custom resources have no strategic merge
        custom.patch_namespaced_custom_object(
            namespace="default",
            name="a",
            body=patch,
            _content_type="application/strategic-merge-patch+json",
            **NAD,
        )
    assert err.value.status == 415

    gone = custom.delete_namespaced_custom_object(namespace="default", name="a", **NAD)
    assert gone["kind"] == "Status" and gone["status"] == "Success"
    with pytest.raises(ApiException) as err:
        custom.get_namespaced_custom_object(namespace="default", name="a", **NAD)
    assert err.value.status == 404


def test_nad_watch(standin: ApiStandin, custom: client.CustomObjectsApi) -> None:
    standin.create(nad("before"))
    rv = custom.list_cluster_custom_object(**NAD)["metadata"]["resourceVersion"]
    standin.create(nad("a", namespace="other"))
    standin.update({**nad("a", namespace="other"), "spec": {"config": "{}"}})
    standin.delete("k8s.cni.cncf.io/v1", "NetworkAttachmentDefinition", "other", "a")
    events = collect(custom.list_cluster_custom_object, count=3, resource_version=rv, **NAD)
    assert summary(events) == [("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]
    assert events[0]["object"]["kind"] == "NetworkAttachmentDefinition"
    assert events[1]["object"]["spec"] == {"config": "{}"}

    namespaced = collect(custom.list_namespaced_custom_object, count=1, namespace="default", **NAD)
    assert summary(namespaced) == [("ADDED", "before")]


def test_strategic_merge_uses_list_merge_keys(core: client.CoreV1Api) -> None:
    core.create_namespaced_pod("default", pod("p"))
    ready = {"type": "Ready", "status": "False"}
    core.patch_namespaced_pod_status("p", "default", {"status": {"conditions": [ready]}})
    body = {
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "X", "status": "Unknown"}]
        }
    }
    patched = core.patch_namespaced_pod_status("p", "default", body)
    assert [(c.type, c.status) for c in patched.status.conditions] == [
        ("Ready", "True"),
        ("X", "Unknown"),
    ]
    core.patch_namespaced_pod("p", "default", {"metadata": {"finalizers": ["a"]}})
    merged = core.patch_namespaced_pod("p", "default", {"metadata": {"finalizers": ["b"]}})
    assert merged.metadata.finalizers == ["a", "b"]


def test_concurrent_writes_get_distinct_ordered_versions(
    standin: ApiStandin, core: client.CoreV1Api
) -> None:
    standin.create(pod("first"))  # watching from "0" would mean "current state", not history
    start = standin.resource_version

    def writer(prefix: str) -> None:
        for i in range(20):
            standin.create(pod(f"{prefix}-{i}"))

    threads = [threading.Thread(target=writer, args=(f"w{n}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    events = collect(core.list_namespaced_pod, "default", count=120, resource_version=start)
    rvs = [int(e["object"].metadata.resource_version) for e in events]
    assert rvs == list(range(int(start) + 1, int(start) + 121))


def test_send_bookmarks(standin: ApiStandin, core: client.CoreV1Api) -> None:
    standin.create(pod("a"))

    def on_event(seen: int, _: dict[str, Any]) -> None:
        if seen == 1:
            standin.create({**pod("b"), "metadata": {"name": "b", "labels": {"skip": "1"}}})
            standin.send_bookmarks()

    events = collect(
        core.list_namespaced_pod,
        "default",
        count=2,
        on_event=on_event,
        label_selector="!skip",
        allow_watch_bookmarks=True,
    )
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    assert events[1]["raw_object"]["metadata"]["resourceVersion"] == standin.resource_version
