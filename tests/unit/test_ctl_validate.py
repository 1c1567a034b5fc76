"""`plexusctl validate FILE...`: the admission webhook's verdicts on manifest files, each problem
at its file:line, non-zero exit when any document is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metaplugin import ctl
from nad_controller.validate import review

MANIFEST = """\
apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata:
  name: good
  namespace: team-a
spec:
  config: '{"cniVersion": "1.0.0", "type": "plexus-macvlan", "master": "eth0"}'
---
apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata:
  name: vlan-net_1
  namespace: team-a
spec:
  config: |
    {
      "cniVersion": "1.0.0",
      "plugins": [
        {"type": "plexus-sriov", "vlan": 5000,
         "ipam": {"type": "host-local", "subnet": "10.9.0.7/24"}}
      ]
    }
---
apiVersion: v1
kind: ConfigMap
metadata: {name: unrelated}
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: team-a
  annotations:
    k8s.v1.cni.cncf.io/networks: good@net1, team-b/x/y
spec: {containers: [{name: c, image: i}]}
"""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = ctl.main(["validate", *argv])
    return code, capsys.readouterr().out.splitlines()


def test_each_problem_is_reported_at_its_line_and_the_exit_code_says_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nets.yaml"
    path.write_text(MANIFEST)
    code, lines = run(capsys, str(path))
    assert code == 1
    f = str(path)
    assert lines == [
        f"ok   {f}:1: NetworkAttachmentDefinition team-a/good",
        f"FAIL {f}:12: NetworkAttachmentDefinition team-a/vlan-net_1: metadata.name: "
        "'vlan-net_1' is not a DNS-1123 subdomain: has '_': only lower-case letters, digits, "
        "'-' and '.' are allowed",
        f"FAIL {f}:15: NetworkAttachmentDefinition team-a/vlan-net_1: spec.config: "
        "plugins[0].vlan: Input should be less than or equal to 4094 (got 5000)",
        f"FAIL {f}:15: NetworkAttachmentDefinition team-a/vlan-net_1: spec.config: "
        "plugins[0].ipam: range set 0[0].subnet '10.9.0.7/24' has host bits set; did you mean "
        "10.9.0.0/24?",
        f"skip {f}:24: ConfigMap (not checked)",
        f"FAIL {f}:34: Pod team-a/client: metadata.annotations[k8s.v1.cni.cncf.io/networks]: "
        "item 1 ('team-b/x/y'): more than one '/' (expected [namespace/]name[@interface])",
    ]


def test_the_verdicts_are_the_webhooks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each refusal plexusctl prints is in the message the webhook answers for that object."""
    import yaml

    path = tmp_path / "nets.yaml"
    path.write_text(MANIFEST)
    _, lines = run(capsys, str(path))
    for doc in yaml.safe_load_all(MANIFEST):
        if doc["kind"] == "ConfigMap":
            continue
        group = "" if doc["kind"] == "Pod" else "k8s.cni.cncf.io"
        request = {
            "uid": "u",
            "kind": {"group": group, "version": "v1", "kind": doc["kind"]},
            "operation": "CREATE",
            "namespace": "team-a",
            "object": doc,
        }
        body = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
        response = review(json.loads(json.dumps(body)), None)["response"]
        name = doc["metadata"]["name"]
        mine = [line.split(": ", 2)[2] for line in lines if f"/{name}: " in line and "FAIL" in line]
        assert response["allowed"] is (not mine)
        if mine:
            assert response["status"]["message"].split(": ", 1)[1] == "; ".join(mine)


def test_a_nad_without_config_is_checked_against_the_conf_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    path = tmp_path / "nad.yaml"
    path.write_text("kind: NetworkAttachmentDefinition\nmetadata:\n  name: local\n")
    code, lines = run(capsys, str(path), "--cni-conf-dir", str(conf_dir))
    assert code == 1
    assert lines == [
        f"FAIL {path}:1: NetworkAttachmentDefinition local: spec.config: is empty and no CNI "
        "config named 'local' is there"
    ]
    (conf_dir / "10-local.conf").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "local", "type": "plexus-ipvlan", "mode": "x"})
    )
    code, lines = run(capsys, str(path), "--cni-conf-dir", str(conf_dir))
    assert code == 1
    assert "spec.config: mode: Input should be 'l2', 'l3' or 'l3s' (got 'x')" in lines[0]


def test_unreadable_files_fail_and_good_files_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: NetworkAttachmentDefinition\nmetadata: [\n")
    empty = tmp_path / "other.yaml"
    empty.write_text("kind: ConfigMap\nmetadata: {name: x}\n")
    code, lines = run(capsys, str(broken), str(empty), str(tmp_path / "missing.yaml"))
    assert code == 1
    assert lines[0].startswith(f"FAIL {broken}: not valid YAML")
    assert lines[-2] == f"FAIL {empty}: no NetworkAttachmentDefinition or pod found"
    assert lines[-1].startswith("FAIL ") and "missing.yaml" in lines[-1]
    good = tmp_path / "good.yaml"
    good.write_text(MANIFEST.split("---", maxsplit=1)[0])
    assert run(capsys, str(good)) == (
        0,
        [f"ok   {good}:1: NetworkAttachmentDefinition team-a/good"],
    )
