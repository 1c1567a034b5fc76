"""deploy/ stays in step with the code: every manifest parses, the daemon config in the
ConfigMap is a valid DaemonConfig, the example NADs validate, `kubectl kustomize deploy/`
renders objects that pass the Kubernetes models of their kinds, RBAC grants exactly what each
component needs with no wildcard, and the controller's objects point at each other."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from cnispec.nad import network_config, parse_manifests
from cnispec.netconf import NetworkConfigList
from metaplugin.config import DaemonConfig

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def test_every_manifest_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert files
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert docs, path
        assert all("kind" in d for d in docs), path


def test_configmap_holds_a_valid_daemon_config() -> None:
    (cm,) = yaml.safe_load_all((DEPLOY / "configmap.yaml").read_text())
    cfg = DaemonConfig.model_validate(yaml.safe_load(cm["data"]["plexusd.yaml"]))
    assert cfg.cni_conf_dir == "/host/etc/cni/net.d"


def test_configmap_takes_vf_pools_from_vfpools() -> None:
    # cluster mode: no pools file, so plexusd serves the VFPools selecting its Node
    (cm,) = yaml.safe_load_all((DEPLOY / "configmap.yaml").read_text())
    cfg = DaemonConfig.model_validate(yaml.safe_load(cm["data"]["plexusd.yaml"]))
    assert cfg.vf_pools is None
    assert set(cm["data"]) == {"plexusd.yaml"}


def test_kustomization_lists_existing_files() -> None:
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    for resource in kust["resources"]:
        assert (DEPLOY / resource).is_file(), resource


def test_example_nads_validate() -> None:
    nads = [
        n
        for p in sorted((DEPLOY / "examples").glob("*.yaml"))
        for n in parse_manifests(p.read_text(), str(p))
    ]
    assert nads
    for nad in nads:
        NetworkConfigList.parse(network_config(nad, "/nonexistent"))


# --- the whole of deploy/ as `kubectl apply -k deploy/` sends it -----------------------------------
#
# `kubectl kustomize` renders it (kubectl 1.32 is on the CI machines; the tests skip, saying so,
# where it is not). Every built-in object is then read by the `kubernetes` client's model of its
# kind and written back: a misspelt or misplaced field is dropped by the model and shows up as
# a difference, a wrong type fails or changes, a missing required field raises. (A client-side
# `kubectl create --dry-run=client` needs an API server for discovery; the models do not.)
# The CRDs' own schemas and CEL rules are tests/unit/test_deploy_schemas.py's.

Obj = dict[str, Any]
NODE_NS, CONTROLLER_NS = "kube-system", "plexus-system"
CLUSTER_SCOPED = {
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingWebhookConfiguration",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}


def _kustomize(path: Path) -> list[Obj]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (CI has it): `kubectl kustomize deploy/` not run")
    done = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> list[Obj]:
    return _kustomize(DEPLOY)


def _one(objs: list[Obj], kind: str, name: str) -> Obj:
    (found,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def _model_roundtrip(obj: Obj) -> Obj:
    """`obj` read by the kubernetes client's model of its kind and written back."""
    from kubernetes import client

    version = obj["apiVersion"].rpartition("/")[2]
    api = client.ApiClient()
    model = api.deserialize(json.dumps(obj), version.capitalize() + obj["kind"], "application/json")
    return typing.cast(Obj, api.sanitize_for_serialization(model))


def test_kustomize_renders_every_object_named(rendered: list[Obj]) -> None:
    kinds = {o["kind"] for o in rendered}
    assert {
        "CustomResourceDefinition",
        "Namespace",
        "Deployment",
        "DaemonSet",
        "Service",
        "PodDisruptionBudget",
        "ValidatingWebhookConfiguration",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    } <= kinds
    seen = set()
    for obj in rendered:
        assert obj["apiVersion"] and obj["kind"] and obj["metadata"]["name"], obj
        key = (obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        assert key not in seen, key
        seen.add(key)
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in obj["metadata"], key
        else:
            assert obj["metadata"].get("namespace") in (NODE_NS, CONTROLLER_NS), key
    crds = {o["metadata"]["name"] for o in rendered if o["kind"] == "CustomResourceDefinition"}
    assert crds == {
        "network-attachment-definitions.k8s.cni.cncf.io",
        "vfpools.plexus.dev",
        "vfpoolnodestates.plexus.dev",
        "multicastnodestates.plexus.dev",
        "multi-networkpolicies.k8s.cni.cncf.io",
    }


def _model_problem(obj: Obj) -> str:
    """What the kubernetes model of `obj`'s kind finds wrong with it ('' = nothing)."""
    try:
        back = _model_roundtrip(obj)
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        return f"{type(exc).__name__}: {exc}"
    if back != obj:
        return "fields the model does not know or types it changes: " + json.dumps(
            sorted(_diff(obj, back))
        )
    return ""


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [p for k in a.keys() | b.keys() for p in _diff(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            p
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for p in _diff(x, y, f"{path}[{i}]")
        ]
    return [] if a == b and type(a) is type(b) else [path]


def test_every_builtin_object_passes_its_kubernetes_model(rendered: list[Obj]) -> None:
    for obj in rendered:
        assert _model_problem(obj) == "", f"{obj['kind']}/{obj['metadata']['name']}"


def test_the_model_check_catches_mistakes(rendered: list[Obj]) -> None:
    # the check above can fail: a misspelt field, a wrong type, a missing required field
    deployment = copy.deepcopy(_one(rendered, "Deployment", "plexus-controller"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["readOnlyRootFileSystem"] = True  # the real one: ...Filesystem
    problem = _model_problem(deployment)
    assert "securityContext.readOnlyRootFileSystem" in problem
    service = copy.deepcopy(_one(rendered, "Service", "plexus-controller"))
    service["spec"]["ports"][0]["port"] = "443"
    assert "port" in _model_problem(service)
    vwc = copy.deepcopy(_one(rendered, "ValidatingWebhookConfiguration", "plexus-validation"))
    del vwc["webhooks"][0]["sideEffects"]
    assert "sideEffects" in _model_problem(vwc) or "side_effects" in _model_problem(vwc)


def test_cert_manager_component_renders(tmp_path: Path) -> None:
    # an overlay outside deploy/ (kustomize refuses one inside its base)
    base = os.path.relpath(DEPLOY, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{base}]\ncomponents: [{base}/components/cert-manager]\n"
    )
    objs = _kustomize(tmp_path)
    cert = _one(objs, "Certificate", "plexus-controller")
    assert cert["spec"]["secretName"] == "plexus-controller-tls"
    assert "plexus-controller.plexus-system.svc" in cert["spec"]["dnsNames"]
    vwc = _one(objs, "ValidatingWebhookConfiguration", "plexus-validation")
    annotations = vwc["metadata"]["annotations"]
    assert annotations["cert-manager.io/inject-ca-from"] == "plexus-system/plexus-controller"
    pod = _one(objs, "Deployment", "plexus-controller")["spec"]["template"]["spec"]
    (tls,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    assert tls["secret"] == {"secretName": "plexus-controller-tls", "optional": False}


# --- RBAC: least privilege, no wildcards -------------------------------------------------------------


def _rules(rendered: list[Obj], kind: str, name: str) -> set[tuple[str, str, str, str]]:
    """(apiGroup, resource, verb, resourceName or '') of every grant."""
    out = set()
    for rule in _one(rendered, kind, name)["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    for rname in rule.get("resourceNames") or [""]:
                        out.add((group, resource, verb, rname))
    return out


def test_no_rbac_wildcards(rendered: list[Obj]) -> None:
    roles = [o for o in rendered if o["kind"] in ("Role", "ClusterRole")]
    assert len(roles) == 3
    for role in roles:
        for rule in role["rules"]:
            assert "nonResourceURLs" not in rule
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert not any("*" in v for v in rule.get(key, ())), (role["metadata"], rule)


def _grants(*specs: tuple[str, str, str, str]) -> set[tuple[str, str, str, str]]:
    out = set()
    for group, resources, verbs, rname in specs:
        for resource in resources.split():
            for verb in verbs.split():
                out.add((group, resource, verb, rname))
    return out


def test_controller_rbac_is_exactly_what_it_needs(rendered: list[Obj]) -> None:
    assert _rules(rendered, "ClusterRole", "plexus-controller") == _grants(
        ("plexus.dev", "vfpools vfpoolnodestates", "get list watch", ""),
        ("plexus.dev", "vfpools/status", "get patch update", ""),
        ("plexus.dev", "multicastnodestates", "get list watch", ""),
        ("plexus.dev", "multicastnodestates/status", "get patch", ""),
        ("", "nodes namespaces", "get list watch", ""),
        ("k8s.cni.cncf.io", "network-attachment-definitions", "get list watch", ""),
        ("", "events", "create patch", ""),
        ("events.k8s.io", "events", "create patch", ""),
        ("admissionregistration.k8s.io", "validatingwebhookconfigurations", "get patch",
         "plexus-validation"),
    )  # fmt: skip
    leader = _one(rendered, "Role", "plexus-controller-leader")
    assert leader["metadata"]["namespace"] == CONTROLLER_NS
    assert _rules(rendered, "Role", "plexus-controller-leader") == _grants(
        ("coordination.k8s.io", "leases", "get update", "plexus-controller"),
        ("coordination.k8s.io", "leases", "create", ""),  # create cannot name its object
    )
    for kind, name in (("ClusterRoleBinding", "plexus-controller"),
                       ("RoleBinding", "plexus-controller-leader")):  # fmt: skip
        binding = _one(rendered, kind, name)
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "plexus-controller", "namespace": CONTROLLER_NS}
        ]
        assert binding["roleRef"]["name"] == name


def test_node_agent_may_write_node_states_but_delete_nothing(rendered: list[Obj]) -> None:
    grants = _rules(rendered, "ClusterRole", "plexus-node")
    assert (
        _grants(
            ("plexus.dev", "vfpools", "get list watch", ""),
            ("plexus.dev", "vfpoolnodestates", "get create patch update", ""),
            ("plexus.dev", "vfpoolnodestates/status", "get patch update", ""),
            ("plexus.dev", "multicastnodestates", "get list watch create patch", ""),
            ("", "nodes", "get watch", ""),
        )
        <= grants
    )
    # the node agent never writes a MulticastNodeState's status (the controller's)
    assert not [g for g in grants if g[1] == "multicastnodestates/status"]
    assert not [g for g in grants if g[2] in ("delete", "deletecollection")]
    assert not [g for g in grants if g[1] == "secrets"]
    # the controller never writes a node's state object
    controller = _rules(rendered, "ClusterRole", "plexus-controller")
    assert {g[2] for g in controller if g[1].startswith("vfpoolnodestates")} == {
        "get",
        "list",
        "watch",
    }


# --- the controller's objects fit together ------------------------------------------------------------


def test_controller_deployment(rendered: list[Obj]) -> None:
    deployment = _one(rendered, "Deployment", "plexus-controller")
    assert deployment["metadata"]["namespace"] == CONTROLLER_NS
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "plexus-controller"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert (
        anti[0]["podAffinityTerm"]["labelSelector"]["matchLabels"]
        == spec["selector"]["matchLabels"]
    )
    (container,) = pod["containers"]
    assert container["command"][:2] == ["plexus-controller", "run"]
    assert "--port=9443" in container["command"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    # the certificate files the command names are where the Secret is mounted
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "plexus-controller-tls"
    for flag in ("--tls-cert-file=", "--tls-private-key-file="):
        (arg,) = [a for a in container["command"] if a.startswith(flag)]
        assert Path(arg.removeprefix(flag)).parent == Path(mounts["tls"])
    assert "/tmp" in mounts.values()  # a read-only root: self-generated certificates go here


def test_service_pdb_and_webhook_reach_the_controller(rendered: list[Obj]) -> None:
    deployment = _one(rendered, "Deployment", "plexus-controller")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    service = _one(rendered, "Service", "plexus-controller")
    assert service["metadata"]["namespace"] == CONTROLLER_NS
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert (port["port"], ports[port["targetPort"]]) == (443, 9443)
    pdb = _one(rendered, "PodDisruptionBudget", "plexus-controller")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    vwc = _one(rendered, "ValidatingWebhookConfiguration", "plexus-validation")
    hooks = {w["name"]: w for w in vwc["webhooks"]}
    assert set(hooks) == {"nads.plexus.dev", "pods.plexus.dev"}
    for hook in hooks.values():
        assert hook["clientConfig"]["service"] == {
            "name": "plexus-controller",
            "namespace": CONTROLLER_NS,
            "path": "/validate",
            "port": 443,
        }
        assert "caBundle" not in hook["clientConfig"]  # the controller or cert-manager sets it
        assert hook["sideEffects"] == "None"
        assert hook["admissionReviewVersions"] == ["v1"]
        assert 1 <= hook["timeoutSeconds"] <= 10
        # never the namespaces its own recovery needs
        (expr,) = hook["namespaceSelector"]["matchExpressions"]
        assert expr["key"] == "kubernetes.io/metadata.name" and expr["operator"] == "NotIn"
        assert set(expr["values"]) == {NODE_NS, CONTROLLER_NS}
    assert hooks["nads.plexus.dev"]["failurePolicy"] == "Fail"
    assert hooks["pods.plexus.dev"]["failurePolicy"] == "Ignore"
    (rule,) = hooks["nads.plexus.dev"]["rules"]
    assert (rule["apiGroups"], rule["resources"]) == (
        ["k8s.cni.cncf.io"],
        ["network-attachment-definitions"],
    )
    assert set(rule["operations"]) == {"CREATE", "UPDATE"}
    (rule,) = hooks["pods.plexus.dev"]["rules"]
    assert (rule["apiGroups"], rule["resources"], rule["operations"]) == (
        [""],
        ["pods"],
        ["CREATE"],
    )
    # and the controller may patch exactly this object's caBundle
    controller = _rules(rendered, "ClusterRole", "plexus-controller")
    assert ("admissionregistration.k8s.io", "validatingwebhookconfigurations", "patch",
            vwc["metadata"]["name"]) in controller  # fmt: skip


def test_node_agent_objects_stay_in_kube_system(rendered: list[Obj]) -> None:
    daemonset = _one(rendered, "DaemonSet", "plexusd")
    assert daemonset["metadata"]["namespace"] == NODE_NS
    configmap = _one(rendered, "ConfigMap", "plexusd-config")
    assert configmap["metadata"]["namespace"] == NODE_NS
    binding = _one(rendered, "ClusterRoleBinding", "plexus-node")
    sa = daemonset["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NODE_NS}]


def test_example_nads_and_pods_name_resources_an_example_vfpool_provides() -> None:
    examples = [
        d
        for p in sorted((DEPLOY / "examples").glob("*.yaml"))
        for d in yaml.safe_load_all(p.read_text())
        if d
    ]
    provided = {d["spec"]["resourceName"] for d in examples if d["kind"] == "VFPool"}
    named = {
        d["metadata"]["annotations"]["k8s.v1.cni.cncf.io/resourceName"]
        for d in examples
        if d["kind"] == "NetworkAttachmentDefinition"
        and "k8s.v1.cni.cncf.io/resourceName" in d["metadata"].get("annotations", {})
    }
    requested = {
        r
        for d in examples
        if d["kind"] == "Pod"
        for c in d["spec"]["containers"]
        for r in c.get("resources", {}).get("limits", {})
    }
    assert named and requested
    assert named <= provided
    assert requested <= provided


# --- the image: what the manifests run is what `make image` builds ----------------------------------


def _make_print_image() -> str:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed: the Makefile's image ref cannot be read")
    done = subprocess.run(
        [make, "-s", "--no-print-directory", "print-image"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_manifests_name_the_image_make_builds(rendered: list[Obj]) -> None:
    image = _make_print_image()
    name, _, tag = image.rpartition(":")
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert tag == version  # the Makefile's default IMAGE_TAG
    (entry,) = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["images"]
    assert (entry["newName"], entry["newTag"]) == (name, tag)
    daemonset = _one(rendered, "DaemonSet", "plexusd")["spec"]["template"]["spec"]
    controller = _one(rendered, "Deployment", "plexus-controller")["spec"]["template"]["spec"]
    images = [c["image"] for pod in (daemonset, controller) for c in pod["containers"]]
    assert images == [image, image]
    # `kubectl apply -f` of a single file, without kustomize, runs the same image
    for path in ("daemonset.yaml", "controller.yaml"):
        for doc in yaml.safe_load_all((DEPLOY / path).read_text()):
            for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                assert c["image"] == image, path


def test_daemonset_command_reads_the_configmap(rendered: list[Obj]) -> None:
    # the command is the image's entrypoint + default arguments (tests/e2e/test_image.py checks
    # that against the built image); the file it names is the ConfigMap's, where it is mounted
    pod = _one(rendered, "DaemonSet", "plexusd")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    program, flag, config = container["command"]
    assert (program, flag) == ("plexusd", "--config")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert str(Path(config).parent) == mounts["config"]
    configmap = _one(rendered, "ConfigMap", volumes["config"]["configMap"]["name"])
    assert Path(config).name in configmap["data"]
