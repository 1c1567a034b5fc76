"""The admission webhook over real TLS with real AdmissionReview JSON, alone and called by the
API stand-in the way kube-apiserver calls it (the user sees what the `kubernetes` client
raises, as kubectl would print it)."""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from nad_controller import certs, k8s_lookups, webhook
from tests.k8s_standin import ApiStandin

SERVICE_DNS = "plexus-controller.plexus-system.svc"
NETWORKS = "k8s.v1.cni.cncf.io/networks"


def nad_body(name: str, config: dict[str, Any], namespace: str = "team-a") -> dict[str, Any]:
    return {
        "apiVersion": "k8s.cni.cncf.io/v1",
        "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"config": json.dumps(config)},
    }


GOOD = {"cniVersion": "1.0.0", "type": "plexus-macvlan", "master": "eth0"}
BAD = {"cniVersion": "1.0.0", "type": "plexus-macvlan", "master": "eth0", "mode": "bridged"}


def review(obj: dict[str, Any], operation: str = "CREATE", uid: str = "u-1") -> dict[str, Any]:
    kind = obj["kind"]
    group = "k8s.cni.cncf.io" if kind != "Pod" else ""
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": group, "version": "v1", "kind": kind},
            "operation": operation,
            "namespace": obj["metadata"].get("namespace", "team-a"),
            "object": obj,
        },
    }


class Served:
    def __init__(self, server: webhook.WebhookServer, ca_pem: bytes) -> None:
        self.server, self.ca_pem = server, ca_pem
        self.port = server.port

    def context(self, ca_pem: bytes | None = None) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=(ca_pem or self.ca_pem).decode())

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        ca_pem: bytes | None = None,
    ) -> tuple[int, bytes]:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.sock = self.context(ca_pem).wrap_socket(raw, server_hostname=SERVICE_DNS)
        try:
            conn.request(method, path, body, headers or {"Content-Type": "application/json"})
            reply = conn.getresponse()
            return reply.status, reply.read()
        finally:
            conn.close()

    def review(self, body: dict[str, Any]) -> dict[str, Any]:
        status, data = self.request("POST", "/validate", json.dumps(body).encode())
        assert status == 200, data
        answer: dict[str, Any] = json.loads(data)
        return answer


def start(server: webhook.WebhookServer) -> Callable[[], None]:
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop


@pytest.fixture
def pair(tmp_path: Path) -> tuple[certs.Generated, Path, Path]:
    generated = certs.generate(certs.service_names("plexus-controller", "plexus-system"))
    cert, key = certs.write_pair(tmp_path / "tls", generated)
    return generated, cert, key


@pytest.fixture
def served(pair: tuple[certs.Generated, Path, Path]) -> Iterator[Served]:
    generated, cert, key = pair
    source = certs.CertSource(str(cert), str(key))
    server = webhook.WebhookServer(
        ("127.0.0.1", 0), context=source.context, lookups=None, timeout=2.0, max_body=100_000
    )
    stop = start(server)
    try:
        yield Served(server, generated.ca_pem)
    finally:
        stop()


# --- alone, no API -----------------------------------------------------------------------------


def test_a_bad_nad_is_refused_with_its_reason_and_the_uid_echoed(served: Served) -> None:
    answer = served.review(review(nad_body("mv", BAD), uid="7c2e"))
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == "7c2e"
    assert response["allowed"] is False
    assert response["status"]["code"] == 400
    assert response["status"]["message"] == (
        "NetworkAttachmentDefinition team-a/mv: spec.config: mode: Input should be 'bridge', "
        "'private', 'vepa' or 'passthru' (got 'bridged')"
    )


def test_a_good_nad_is_admitted_without_any_api(served: Served) -> None:
    response = served.review(review(nad_body("mv", GOOD)))["response"]
    assert response == {"uid": "u-1", "allowed": True}


def test_without_the_api_a_pods_references_are_admitted_with_a_warning(served: Served) -> None:
    pod = {"kind": "Pod", "metadata": {"name": "p", "annotations": {NETWORKS: "net-a"}}}
    response = served.review(review(pod))["response"]
    assert response["allowed"] is True
    assert response["warnings"] == [
        f"metadata.annotations[{NETWORKS}]: no API: the NADs it names were not looked up"
    ]
    pod["metadata"]["annotations"][NETWORKS] = "a/b/c"
    response = served.review(review(pod))["response"]
    assert response["allowed"] is False
    assert "more than one '/'" in response["status"]["message"]


def test_deletes_and_unchecked_kinds_are_allowed(served: Served) -> None:
    assert served.review(review(nad_body("Bad", BAD), operation="DELETE"))["response"]["allowed"]
    lease = {"kind": "Lease", "metadata": {"name": "x"}}
    assert served.review(review(lease))["response"]["allowed"]


def test_a_pod_update_leaving_its_networks_alone_is_not_rechecked(served: Served) -> None:
    pod = {"kind": "Pod", "metadata": {"name": "p", "annotations": {NETWORKS: "a/b/c"}}}
    body = review(pod, operation="UPDATE")
    body["request"]["oldObject"] = pod
    assert served.review(body)["response"]["allowed"] is True


def test_healthz_and_bad_requests(served: Served) -> None:
    assert served.request("GET", "/healthz") == (200, b"ok\n")
    assert served.request("POST", "/mutate", b"{}")[0] == 404
    status, body = served.request("POST", "/validate", b"{nope")
    assert status == 400 and b"not JSON" in body
    status, body = served.request("POST", "/validate", b'{"kind": "Pod"}')
    assert status == 400 and b"expected a AdmissionReview" in body
    old = review(nad_body("a", GOOD))
    old["apiVersion"] = "admission.k8s.io/v1beta1"
    status, body = served.request("POST", "/validate", json.dumps(old).encode())
    assert status == 400 and b"admissionReviewVersions" in body


def test_an_oversized_body_is_refused_unread(served: Served) -> None:
    raw = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
    conn.sock = served.context().wrap_socket(raw, server_hostname=SERVICE_DNS)
    try:
        # Only the headers: the answer comes without the server waiting for the body.
        conn.putrequest("POST", "/validate")
        conn.putheader("Content-Length", "100001")
        conn.endheaders()
        reply = conn.getresponse()
        assert reply.status == 413
        assert b"body over 100000 bytes" in reply.read()
    finally:
        conn.close()


def test_a_silent_client_does_not_hold_up_others_and_is_dropped(served: Served) -> None:
    idle = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    try:
        assert served.review(review(nad_body("mv", GOOD)))["response"]["allowed"]
        assert idle.recv(1) == b""  # the server gave up on its handshake (timeout 2 s)
    finally:
        idle.close()


def test_the_certificate_is_verified_against_the_service_name(served: Served) -> None:
    other = certs.generate(["elsewhere.example"])
    with pytest.raises(ssl.SSLCertVerificationError):
        served.request("GET", "/healthz", ca_pem=other.ca_pem)


def test_rotated_certificate_files_are_served_without_a_restart(
    pair: tuple[certs.Generated, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(certs, "RECHECK_SECONDS", 0.0)
    first, cert, key = pair
    source = certs.CertSource(str(cert), str(key))
    server = webhook.WebhookServer(("127.0.0.1", 0), context=source.context, lookups=None)
    stop = start(server)
    try:
        served = Served(server, first.ca_pem)
        assert served.request("GET", "/healthz")[0] == 200
        rotated = certs.generate(certs.service_names("plexus-controller", "plexus-system"))
        certs.write_pair(cert.parent, rotated)  # as cert-manager renews the Secret
        assert served.request("GET", "/healthz", ca_pem=rotated.ca_pem)[0] == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            served.request("GET", "/healthz", ca_pem=first.ca_pem)
        assert source.reloads == 1
        # Half a rotation (the key not yet written) keeps serving the last good pair.
        key.write_text("garbage")
        assert served.request("GET", "/healthz", ca_pem=rotated.ca_pem)[0] == 200
    finally:
        stop()


def args_for(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    webhook.add_arguments(parser)
    return parser.parse_args(
        ["--port", "0", "--bind-address", "127.0.0.1", "--cert-dir", str(tmp_path), *extra]
    )


def test_self_signed_serving_needs_no_files_and_no_api(tmp_path: Path) -> None:
    server = webhook.build(args_for(tmp_path, "--self-signed", "--no-api"))
    stop = start(server)
    try:
        served = Served(server, (tmp_path / "ca.crt").read_bytes())
        assert served.review(review(nad_body("mv", BAD)))["response"]["allowed"] is False
        assert (tmp_path / "tls.key").stat().st_mode & 0o077 == 0
    finally:
        stop()


# --- called by the API stand-in ------------------------------------------------------------------


def vwc(ca_pem: bytes, failure: str = "Fail") -> dict[str, Any]:
    def hook(name: str, rule: dict[str, Any], **more: Any) -> dict[str, Any]:
        return {
            "name": name,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": failure,
            "timeoutSeconds": 5,
            "clientConfig": {
                "service": {
                    "name": "plexus-controller",
                    "namespace": "plexus-system",
                    "path": "/validate",
                    "port": 443,
                },
                "caBundle": base64.b64encode(ca_pem).decode(),
            },
            "rules": [{"operations": ["CREATE", "UPDATE"], **rule}],
            **more,
        }

    system = ["kube-system", "plexus-system"]
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": "plexus-validation"},
        "webhooks": [
            hook(
                "nads.plexus.dev",
                {
                    "apiGroups": ["k8s.cni.cncf.io"],
                    "apiVersions": ["v1"],
                    "resources": ["network-attachment-definitions"],
                },
            ),
            hook(
                "pods.plexus.dev",
                {"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]},
                namespaceSelector={
                    "matchExpressions": [
                        {
                            "key": "kubernetes.io/metadata.name",
                            "operator": "NotIn",
                            "values": system,
                        }
                    ]
                },
            ),
        ],
    }


class Cluster:
    def __init__(self, standin: ApiStandin, served: Served, api: client.ApiClient) -> None:
        self.standin, self.served, self.api = standin, served, api
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    def create_nad(self, name: str, config: dict[str, Any], namespace: str = "team-a") -> Any:
        return self.custom.create_namespaced_custom_object(
            "k8s.cni.cncf.io",
            "v1",
            namespace,
            "network-attachment-definitions",
            nad_body(name, config, namespace),
        )

    def create_pod(self, name: str, networks: str, namespace: str = "team-a") -> Any:
        body = {
            "metadata": {"name": name, "annotations": {NETWORKS: networks}},
            "spec": {"containers": [{"name": "c", "image": "i"}]},
        }
        return self.core.create_namespaced_pod(namespace, body)

    def raw_post(self, path: str, body: dict[str, Any]) -> http.client.HTTPResponse:
        host, port = self.standin.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        reply = conn.getresponse()
        reply.read()
        conn.close()
        return reply


@pytest.fixture
def cluster(pair: tuple[certs.Generated, Path, Path]) -> Iterator[Cluster]:
    generated, cert, key = pair
    with ApiStandin() as standin:
        api = client.ApiClient(client.Configuration(host=standin.url))
        source = certs.CertSource(str(cert), str(key))
        server = webhook.WebhookServer(
            ("127.0.0.1", 0), context=source.context, lookups=k8s_lookups.ApiLookups(api)
        )
        stop = start(server)
        try:
            standin.admission.services[SERVICE_DNS] = f"127.0.0.1:{server.port}"
            standin.create(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}}
            )
            standin.create(vwc(generated.ca_pem))
            yield Cluster(standin, Served(server, generated.ca_pem), api)
        finally:
            stop()
            api.close()


def test_through_the_api_a_bad_nad_is_refused_with_its_reason(cluster: Cluster) -> None:
    with pytest.raises(ApiException) as refused:
        cluster.create_nad("mv", BAD)
    assert refused.value.status == 400
    assert json.loads(refused.value.body)["message"] == (
        'admission webhook "nads.plexus.dev" denied the request: NetworkAttachmentDefinition '
        "team-a/mv: spec.config: mode: Input should be 'bridge', 'private', 'vepa' or "
        "'passthru' (got 'bridged')"
    )
    assert cluster.standin.get("NetworkAttachmentDefinition", "team-a", "mv") is None


def test_through_the_api_a_good_nad_is_admitted_and_a_bad_update_refused(
    cluster: Cluster,
) -> None:
    cluster.create_nad("mv", GOOD)
    assert cluster.standin.get("NetworkAttachmentDefinition", "team-a", "mv") is not None
    with pytest.raises(ApiException) as refused:
        cluster.custom.patch_namespaced_custom_object(
            "k8s.cni.cncf.io",
            "v1",
            "team-a",
            "network-attachment-definitions",
            "mv",
            {"spec": {"config": json.dumps({**GOOD, "mtu": 10})}},
        )
    assert "spec.config: mtu: Input should be greater than or equal to 68" in refused.value.body


def test_through_the_api_a_resource_name_no_vfpool_provides_is_refused(cluster: Cluster) -> None:
    cluster.standin.create(
        {
            "apiVersion": "plexus.dev/v1alpha1",
            "kind": "VFPool",
            "metadata": {"name": "fast"},
            "spec": {"resourceName": "plexus.dev/fast", "nicSelector": {}},
        }
    )
    body = nad_body("vf", {"cniVersion": "1.0.0", "type": "plexus-sriov"})
    body["metadata"]["annotations"] = {"k8s.v1.cni.cncf.io/resourceName": "plexus.dev/slow"}
    with pytest.raises(ApiException) as refused:
        cluster.custom.create_namespaced_custom_object(
            "k8s.cni.cncf.io", "v1", "team-a", "network-attachment-definitions", body
        )
    assert "no VFPool provides resource 'plexus.dev/slow'" in refused.value.body
    body["metadata"]["annotations"]["k8s.v1.cni.cncf.io/resourceName"] = "plexus.dev/fast"
    cluster.custom.create_namespaced_custom_object(
        "k8s.cni.cncf.io", "v1", "team-a", "network-attachment-definitions", body
    )


def test_through_the_api_a_pod_naming_a_missing_nad_is_refused(cluster: Cluster) -> None:
    cluster.create_nad("there", GOOD)
    cluster.create_pod("ok", "there")
    with pytest.raises(ApiException) as refused:
        cluster.create_pod("p", "there, gone@net2")
    assert refused.value.status == 400
    assert json.loads(refused.value.body)["message"] == (
        'admission webhook "pods.plexus.dev" denied the request: Pod team-a/p: '
        f"metadata.annotations[{NETWORKS}]: team-a/gone: no NetworkAttachmentDefinition 'gone' "
        "in namespace 'team-a'"
    )


def test_through_the_api_a_labelled_namespace_admits_it_with_a_warning(cluster: Cluster) -> None:
    cluster.standin.update(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": "team-a",
                "labels": {"plexus.dev/allow-missing-networks": "true"},
            },
        }
    )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "early", "annotations": {NETWORKS: "later"}},
        "spec": {"containers": [{"name": "c", "image": "i"}]},
    }
    reply = cluster.raw_post("/api/v1/namespaces/team-a/pods", pod)
    assert reply.status == 201
    warning = reply.getheader("Warning") or ""
    assert warning.startswith('299 - "metadata.annotations[k8s.v1.cni.cncf.io/networks]: ')
    assert (
        "team-a/later: no NetworkAttachmentDefinition 'later' in namespace 'team-a' yet "
        "(admitted: namespace team-a has plexus.dev/allow-missing-networks=true" in warning
    )


def test_through_the_api_isolation_refuses_a_cross_namespace_reference(cluster: Cluster) -> None:
    cluster.standin.create(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "secure", "labels": {"plexus.dev/isolation": "namespace"}},
        }
    )
    cluster.create_nad("private", GOOD, namespace="secure")
    with pytest.raises(ApiException) as refused:
        cluster.create_pod("p", "secure/private")
    assert "namespace secure has plexus.dev/isolation=namespace" in refused.value.body


def test_the_webhook_is_not_called_for_what_its_rules_leave_out(cluster: Cluster) -> None:
    before = cluster.standin.admission.calls
    cluster.standin.create(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kube-system"}}
    )
    cluster.create_pod("sys", "a/b/c", namespace="kube-system")  # namespaceSelector leaves it
    lease = {"metadata": {"name": "l"}, "spec": {}}
    client.CoordinationV1Api(cluster.api).create_namespaced_lease("team-a", lease)
    assert cluster.standin.admission.calls == before


@pytest.mark.parametrize("failure", ["Fail", "Ignore"])
def test_an_unreachable_webhook_follows_the_failure_policy(cluster: Cluster, failure: str) -> None:
    cluster.standin.admission.services.clear()
    cluster.standin.update(vwc(cluster.served.ca_pem, failure))
    if failure == "Ignore":
        cluster.create_nad("mv", BAD)
        return
    with pytest.raises(ApiException) as refused:
        cluster.create_nad("mv", GOOD)
    assert refused.value.status == 500
    message = json.loads(refused.value.body)["message"]
    assert message.startswith(
        'Internal error occurred: failed calling webhook "nads.plexus.dev": failed to call webhook:'
    )


def test_a_webhook_that_does_not_answer_in_time_fails_the_call(cluster: Cluster) -> None:
    with socket.create_server(("127.0.0.1", 0)) as mute:  # accepts, never speaks TLS
        cluster.standin.admission.services[SERVICE_DNS] = f"127.0.0.1:{mute.getsockname()[1]}"
        config = vwc(cluster.served.ca_pem)
        for hook in config["webhooks"]:
            hook["timeoutSeconds"] = 1
        cluster.standin.update(config)
        with pytest.raises(ApiException) as refused:
            cluster.create_nad("mv", GOOD)
    assert refused.value.status == 500
    message = json.loads(refused.value.body)["message"]
    assert 'failed calling webhook "nads.plexus.dev"' in message
    assert "timed out" in message


def test_a_ca_bundle_that_does_not_match_fails_the_call(cluster: Cluster) -> None:
    cluster.standin.update(vwc(certs.generate(["other"]).ca_pem))
    with pytest.raises(ApiException) as refused:
        cluster.create_nad("mv", GOOD)
    assert "certificate verify failed" in refused.value.body


def test_self_signed_serving_patches_its_ca_into_the_webhook_configuration(
    tmp_path: Path,
) -> None:
    with ApiStandin() as standin:
        standin.create(vwc(b"old"))
        kubeconfig = standin.kubeconfig(tmp_path / "kubeconfig")
        server = webhook.build(
            args_for(tmp_path / "certs", "--self-signed", "--kubeconfig", kubeconfig)
        )
        stop = start(server)
        try:
            ca = (tmp_path / "certs" / "ca.crt").read_bytes()
            stored = standin.get("ValidatingWebhookConfiguration", None, "plexus-validation")
            assert stored is not None
            bundles = {h["clientConfig"]["caBundle"] for h in stored["webhooks"]}
            assert bundles == {base64.b64encode(ca).decode()}
            standin.admission.services[SERVICE_DNS] = f"127.0.0.1:{server.port}"
            standin.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}})
            with pytest.raises(ApiException) as refused:
                client.CustomObjectsApi(
                    client.ApiClient(client.Configuration(host=standin.url))
                ).create_namespaced_custom_object(
                    "k8s.cni.cncf.io",
                    "v1",
                    "x",
                    "network-attachment-definitions",
                    nad_body("mv", BAD, "x"),
                )
            assert "denied the request" in refused.value.body
        finally:
            stop()
