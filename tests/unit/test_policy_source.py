"""Local mode's policy source: NetworkPolicy, MultiNetworkPolicy and Namespace manifests in the
NAD directory are in force as soon as they are written, renamed into place or removed (the
engine is told through on_change), a bad one is reported without hiding the others, the NAD
source keeps ignoring them, and a local pod's labels come from the runtime's CRI, known a moment
after the ADD that asked for them."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as rpc

from metaplugin.config import DaemonConfig
from metaplugin.cri_labels import CriLabels, CriUnavailable
from metaplugin.nad_source import LocalNadSource
from metaplugin.policy_source import LocalPolicySource, SandboxLabels, open_policy_source
from tests.support.world import nad_manifest, simple_net

WAIT = 10.0  # the longest a test waits for a notice (a failure, never a measurement)


def netpol(name: str, namespace: str = "team-a", app: str = "web") -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"podSelector": {"matchLabels": {"app": app}}},
    }


def mnp(name: str, policy_for: str | None = "macvlan") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "team-a"}
    if policy_for is not None:
        meta["annotations"] = {"k8s.v1.cni.cncf.io/policy-for": policy_for}
    return {
        "apiVersion": "k8s.cni.cncf.io/v1beta1",
        "kind": "MultiNetworkPolicy",
        "metadata": meta,
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }


def namespace(name: str, **annotations: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "annotations": annotations},
    }


def write(directory: Path, file: str, *docs: dict[str, Any]) -> Path:
    path = directory / file
    path.write_text(yaml.safe_dump_all(docs))
    return path


def replace(directory: Path, file: str, *docs: dict[str, Any]) -> None:
    """As kubectl cp / a config manager does: a temp file renamed over the old one."""
    tmp = directory / f".{file}.tmp"
    tmp.write_text(yaml.safe_dump_all(docs))
    os.rename(tmp, directory / file)


class Changes:
    def __init__(self) -> None:
        self.seen = threading.Event()
        self.count = 0

    def __call__(self) -> None:
        self.count += 1
        self.seen.set()

    def wait(self) -> bool:
        found = self.seen.wait(WAIT)
        self.seen.clear()
        return found


def refs(source: LocalPolicySource) -> list[str]:
    return sorted(p.ref for p in source.snapshot().policies)


@pytest.fixture
def sources() -> Iterator[list[LocalPolicySource]]:
    made: list[LocalPolicySource] = []
    yield made
    for source in made:
        source.close()


@pytest.mark.parametrize("watch", [True, False], ids=["inotify", "polling"])
def test_a_policy_written_renamed_over_and_removed_fires_on_change_and_shows(
    tmp_path: Path, watch: bool, sources: list[LocalPolicySource]
) -> None:
    write(tmp_path, "nads.yaml", nad_manifest("macvlan", simple_net("macvlan", "macvlan")))
    source = LocalPolicySource(str(tmp_path), watch=watch, poll_interval=0.05)
    sources.append(source)
    changes = Changes()
    source.on_change(changes)
    assert source.snapshot().policies == ()

    write(
        tmp_path,
        "web.yaml",
        netpol("web"),
        namespace("team-a", **{"plexus.dev/isolation": "namespace"}),
    )
    assert changes.wait()  # nobody asked for a snapshot: the source noticed on its own
    assert refs(source) == ["NetworkPolicy:team-a/web"]
    assert source.snapshot().namespaces["team-a"].annotations == {
        "plexus.dev/isolation": "namespace"
    }

    replace(tmp_path, "web.yaml", netpol("web", app="api"), mnp("sec"))
    assert changes.wait()
    snap = source.snapshot()
    assert sorted(p.ref for p in snap.policies) == [
        "MultiNetworkPolicy:team-a/sec",
        "NetworkPolicy:team-a/web",
    ]
    web = next(p for p in snap.policies if p.name == "web")
    assert web.spec.pod_selector.match_labels == {"app": "api"}
    assert next(p for p in snap.policies if p.name == "sec").policy_for == ("team-a/macvlan",)
    assert snap.namespaces == {}
    assert snap.pods == ()

    os.unlink(tmp_path / "web.yaml")
    assert changes.wait()
    assert refs(source) == []
    assert source.errors() == []


def test_a_change_made_just_before_a_snapshot_is_in_it(
    tmp_path: Path, sources: list[LocalPolicySource]
) -> None:
    source = LocalPolicySource(str(tmp_path))
    sources.append(source)
    for i in range(20):
        write(tmp_path, f"p{i}.yaml", netpol(f"p{i}"))
        assert f"NetworkPolicy:team-a/p{i}" in refs(source)


def test_a_file_that_did_not_change_is_not_read_again(
    tmp_path: Path, sources: list[LocalPolicySource], monkeypatch: pytest.MonkeyPatch
) -> None:
    from metaplugin import policy_source

    for i in range(10):
        write(tmp_path, f"p{i}.yaml", netpol(f"p{i}"))
    source = LocalPolicySource(str(tmp_path))
    sources.append(source)
    assert len(source.snapshot().policies) == 10
    read: list[str] = []
    real = policy_source._read

    def counting(path: str, signature: int) -> Any:
        read.append(os.path.basename(path))
        return real(path, signature)

    monkeypatch.setattr(policy_source, "_read", counting)
    write(tmp_path, "p3.yaml", netpol("p3", app="other"))
    assert len(source.snapshot().policies) == 10
    assert read == ["p3.yaml"]


def test_a_bad_manifest_is_reported_and_the_others_stay_in_force(
    tmp_path: Path, sources: list[LocalPolicySource]
) -> None:
    write(tmp_path, "good.yaml", netpol("good"))
    write(tmp_path, "mixed.yaml", mnp("no-networks", policy_for=None), netpol("fine"))
    (tmp_path / "broken.yaml").write_text("kind: [NetworkPolicy\n")
    bad_spec = netpol("bad")
    bad_spec["spec"]["ingress"] = [{"ports": [{"protocol": "ICMP"}]}]
    write(tmp_path, "spec.yaml", bad_spec)
    source = LocalPolicySource(str(tmp_path))
    sources.append(source)
    assert refs(source) == ["NetworkPolicy:team-a/fine", "NetworkPolicy:team-a/good"]
    errors = source.errors()
    assert len(errors) == 3
    mixed = next(e for e in errors if "mixed.yaml" in e)
    assert "document 0: MultiNetworkPolicy team-a/no-networks" in mixed
    assert "k8s.v1.cni.cncf.io/policy-for" in mixed
    assert any("broken.yaml: not valid YAML" in e for e in errors)
    assert any("spec.yaml: document 0: NetworkPolicy team-a/bad: spec.ingress" in e for e in errors)

    write(tmp_path, "spec.yaml", netpol("bad"))  # fixed
    assert "NetworkPolicy:team-a/bad" in refs(source)
    assert len(source.errors()) == 2


def test_a_policy_defined_twice_is_taken_from_the_first_file(
    tmp_path: Path, sources: list[LocalPolicySource]
) -> None:
    write(tmp_path, "a.yaml", netpol("web", app="first"), namespace("team-a"))
    write(tmp_path, "b.yaml", netpol("web", app="second"), namespace("team-a", x="y"))
    source = LocalPolicySource(str(tmp_path))
    sources.append(source)
    (policy,) = source.snapshot().policies
    assert policy.spec.pod_selector.match_labels == {"app": "first"}
    assert source.snapshot().namespaces["team-a"].annotations == {}
    errors = source.errors()
    assert any(
        "b.yaml: NetworkPolicy:team-a/web is defined twice (first in a.yaml)" in e for e in errors
    )
    assert any("b.yaml: Namespace team-a is defined twice" in e for e in errors)
    os.unlink(tmp_path / "a.yaml")
    (policy,) = source.snapshot().policies
    assert policy.spec.pod_selector.match_labels == {"app": "second"}
    assert source.errors() == []


def test_a_directory_made_after_start_is_watched_once_it_is_there(
    tmp_path: Path, sources: list[LocalPolicySource]
) -> None:
    directory = tmp_path / "later"
    source = LocalPolicySource(str(directory), poll_interval=0.05)
    sources.append(source)
    changes = Changes()
    source.on_change(changes)
    assert refs(source) == []
    directory.mkdir()
    write(directory, "p.yaml", netpol("p"))
    assert changes.wait()
    assert refs(source) == ["NetworkPolicy:team-a/p"]
    write(directory, "q.yaml", netpol("q"))  # now through inotify
    assert changes.wait()
    assert refs(source) == ["NetworkPolicy:team-a/p", "NetworkPolicy:team-a/q"]


def test_the_nad_source_ignores_policies_and_namespaces_beside_the_nads(tmp_path: Path) -> None:
    write(
        tmp_path,
        "all.yaml",
        nad_manifest("macvlan", simple_net("macvlan", "macvlan"), namespace="team-a"),
        netpol("web"),
        mnp("sec", policy_for=None),  # bad as a policy: none of the NAD source's business
        namespace("team-a"),
    )
    nads = LocalNadSource(str(tmp_path))
    assert [n.name for n in nads.all()] == ["macvlan"]
    assert nads.errors() == []


def test_local_mode_opens_the_directory_source(tmp_path: Path) -> None:
    write(tmp_path, "p.yaml", netpol("p"))
    config = DaemonConfig.model_validate({"localDir": str(tmp_path)})
    source = open_policy_source(config, None)
    try:
        assert isinstance(source, LocalPolicySource)
        assert source.synced()
        assert [p.ref for p in source.snapshot().policies] == ["NetworkPolicy:team-a/p"]
        assert source.pod_labels("team-a", "web", "abc") is None  # no criSocket: no labels
    finally:
        source.close()


# ---- labels from the CRI ------------------------------------------------------------------------


class FakeRuntime(rpc.RuntimeServiceServicer):  # type: ignore[misc]
    """containerd's answers to PodSandboxStatus: NotFound for a sandbox it has not stored."""

    def __init__(self) -> None:
        self.sandboxes: dict[str, dict[str, str]] = {}
        self.asked = 0

    def PodSandboxStatus(self, request: Any, context: Any) -> Any:  # gRPC names it
        self.asked += 1
        labels = self.sandboxes.get(request.pod_sandbox_id)
        if labels is None:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f'an error occurred when try to find sandbox "{request.pod_sandbox_id}": not found',
            )
        status = pb.PodSandboxStatus(id=request.pod_sandbox_id, labels=labels)
        return pb.PodSandboxStatusResponse(status=status)


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[tuple[FakeRuntime, str]]:
    fake = FakeRuntime()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rpc.add_RuntimeServiceServicer_to_server(fake, server)
    socket = str(tmp_path / "cri.sock")
    server.add_insecure_port(f"unix://{socket}")
    server.start()
    yield fake, socket
    server.stop(None)


def test_cri_labels_are_the_pods_and_none_for_an_unknown_sandbox(
    runtime: tuple[FakeRuntime, str],
) -> None:
    fake, socket = runtime
    fake.sandboxes["abc"] = {  # as kubelet makes a sandbox
        "app": "web",
        "io.kubernetes.pod.name": "web-0",
        "io.kubernetes.pod.namespace": "team-a",
        "io.kubernetes.pod.uid": "u-1",
    }
    cri = CriLabels(socket)
    try:
        assert cri.labels("abc") == {"app": "web"}  # kubelet's own labels are not the pod's
        assert cri.labels("nope") is None
    finally:
        cri.close()


def test_a_runtime_that_is_not_there_is_unavailable_naming_the_socket(tmp_path: Path) -> None:
    cri = CriLabels(str(tmp_path / "none.sock"), timeout=0.5)
    with pytest.raises(CriUnavailable, match=r"none\.sock: PodSandboxStatus sandbox-1"):
        cri.labels("sandbox-1")
    cri.close()


def test_labels_unknown_during_the_add_are_learned_after_it_and_announced(
    tmp_path: Path, runtime: tuple[FakeRuntime, str], sources: list[LocalPolicySource]
) -> None:
    fake, socket = runtime
    config = DaemonConfig.model_validate({"localDir": str(tmp_path), "criSocket": socket})
    source = open_policy_source(config, None)
    assert isinstance(source, LocalPolicySource)
    sources.append(source)
    changes = Changes()
    source.on_change(changes)
    # The ADD runs inside RunPodSandbox: the runtime has not stored the sandbox yet.
    assert source.pod_labels("team-a", "web", "sbx-1") is None
    fake.sandboxes["sbx-1"] = {"app": "web"}  # RunPodSandbox returned
    assert changes.wait()
    assert source.pod_labels("team-a", "web", "sbx-1") == {"app": "web"}
    asked = fake.asked
    assert source.pod_labels("team-a", "web", "sbx-1") == {"app": "web"}
    assert fake.asked == asked  # a sandbox's labels never change: asked once


class Scripted:
    """A CRI client whose answers the test scripts."""

    def __init__(self, *answers: dict[str, str] | Exception | None) -> None:
        self.answers = list(answers)

    def labels(self, sandbox_id: str) -> dict[str, str] | None:
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def close(self) -> None:
        pass


def test_a_runtime_down_during_the_add_is_asked_again_until_it_answers() -> None:
    cri = Scripted(CriUnavailable("down"), CriUnavailable("down"), {"app": "db"})
    told = threading.Event()
    labels = SandboxLabels(cri, told.set, first_retry=0.01, max_retry=0.02)  # type: ignore[arg-type]
    try:
        assert labels.get("s1", "team-a/db") is None
        assert told.wait(WAIT)
        assert labels.get("s1", "team-a/db") == {"app": "db"}
    finally:
        labels.close()


def test_a_sandbox_never_known_is_given_up_without_an_announcement() -> None:
    cri = Scripted(None)
    told = threading.Event()
    labels = SandboxLabels(
        cri,  # type: ignore[arg-type]
        told.set,
        retry_for=0.0,
        first_retry=0.01,
        max_retry=0.01,
    )
    try:
        assert labels.get("gone", "team-a/x") is None
        assert labels.waiting() == ["gone"] or not told.is_set()
        deadline = time.monotonic() + WAIT
        while labels.waiting() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert labels.waiting() == []
        assert not told.is_set()
        cri.answers = [{"late": "yes"}]  # a later ADD's lookup asks again
        assert labels.get("gone", "team-a/x") == {"late": "yes"}
    finally:
        labels.close()
