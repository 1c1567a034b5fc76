"""deploy/ for network policy: the MultiNetworkPolicy CRD serves k8s.cni.cncf.io/v1beta1 with a
schema whose fields are the ones plexusd reads (netpolicy.model's aliases), admits the policies
users write and refuses what plexusd would refuse; the node agent may read every policy kind,
namespace and pod, and nothing more on them."""

from __future__ import annotations

import copy
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from netpolicy.manifests import policy_from_object
from netpolicy.model import (
    EgressRule,
    IngressRule,
    IPBlock,
    LabelSelector,
    LabelSelectorRequirement,
    PolicyPeer,
    PolicyPort,
    PolicySpec,
)
from tests.unit.test_deploy import DEPLOY, _grants, _kustomize, _rules

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the dev extra")

Json = dict[str, Any]
CRD_FILE = DEPLOY / "crds" / "multi-networkpolicies.yaml"


def _crd() -> Json:
    (doc,) = yaml.safe_load_all(CRD_FILE.read_text())
    return typing.cast(Json, doc)


def _as_json_schema(node: Any) -> Any:
    """OpenAPI v3 as the API server reads it, for jsonschema: int-or-string is either."""
    if isinstance(node, list):
        return [_as_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _as_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def _schema() -> Json:
    (version,) = _crd()["spec"]["versions"]
    return typing.cast(Json, _as_json_schema(version["schema"]["openAPIV3Schema"]))


def test_the_crd_serves_v1beta1_only_namespaced_under_the_upstream_names() -> None:
    crd = _crd()
    assert crd["metadata"]["name"] == "multi-networkpolicies.k8s.cni.cncf.io"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"]) == ("k8s.cni.cncf.io", "Namespaced")
    assert spec["names"]["kind"] == "MultiNetworkPolicy"
    assert spec["names"]["plural"] == "multi-networkpolicies"
    assert [(v["name"], v["served"], v["storage"]) for v in spec["versions"]] == [
        ("v1beta1", True, True)
    ]


def _structural(node: Json, path: str) -> list[str]:
    """Nodes without a type (the API server refuses a non-structural schema)."""
    problems = []
    if "type" not in node and not node.get("x-kubernetes-int-or-string"):
        problems.append(path)
    for name, child in (node.get("properties") or {}).items():
        problems += _structural(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        problems += _structural(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        problems += _structural(node["additionalProperties"], f"{path}{{}}")
    return problems


def test_the_schema_is_structural() -> None:
    (version,) = _crd()["spec"]["versions"]
    assert _structural(version["schema"]["openAPIV3Schema"], "") == []


@pytest.mark.parametrize(
    ("path", "model"),
    [
        ("spec", PolicySpec),
        ("spec.podSelector", LabelSelector),
        ("spec.podSelector.matchExpressions[]", LabelSelectorRequirement),
        ("spec.ingress[]", IngressRule),
        ("spec.egress[]", EgressRule),
        ("spec.ingress[].from[]", PolicyPeer),
        ("spec.egress[].to[]", PolicyPeer),
        ("spec.ingress[].from[].ipBlock", IPBlock),
        ("spec.ingress[].ports[]", PolicyPort),
        ("spec.egress[].ports[]", PolicyPort),
    ],
)
def test_the_crds_fields_are_the_ones_plexusd_reads(path: str, model: type[BaseModel]) -> None:
    node = _schema()
    for part in path.split("."):
        node = node["properties"][part.removesuffix("[]")]
        if part.endswith("[]"):
            node = node["items"]
    fields = {f.alias or name for name, f in model.model_fields.items()}
    assert set(node["properties"]) == fields


def policy(**spec: Any) -> Json:
    return {
        "apiVersion": "k8s.cni.cncf.io/v1beta1",
        "kind": "MultiNetworkPolicy",
        "metadata": {
            "name": "db",
            "namespace": "team-a",
            "annotations": {"k8s.v1.cni.cncf.io/policy-for": "macvlan, infra/storage"},
        },
        "spec": {"podSelector": {"matchLabels": {"app": "db"}}, **spec},
    }


GOOD = policy(
    policyTypes=["Ingress", "Egress"],
    ingress=[
        {
            "from": [
                {
                    "namespaceSelector": {"matchLabels": {"team": "a"}},
                    "podSelector": {
                        "matchExpressions": [{"key": "role", "operator": "In", "values": ["app"]}]
                    },
                },
                {"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.9.0/24"]}},
            ],
            "ports": [{"protocol": "TCP", "port": 5432}, {"port": "metrics"}],
        }
    ],
    egress=[
        {"to": [{"podSelector": {}}], "ports": [{"protocol": "UDP", "port": 9000, "endPort": 9100}]}
    ],
)


def test_a_policy_users_write_passes_the_crd_and_plexusd() -> None:
    jsonschema.validate(GOOD, _schema())
    got = policy_from_object(GOOD)
    assert got.policy_for == ("team-a/macvlan", "infra/storage")
    assert got.spec.egress[0].ports[0].end_port == 9100


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "podSelector"), None),  # required
        (("spec", "policyTypes"), ["Ingress", "Both"]),
        (("spec", "ingress", 0, "ports", 0, "protocol"), "ICMP"),
        (("spec", "ingress", 0, "from", 1, "ipBlock"), {"except": ["10.0.0.0/8"]}),
        (("spec", "ingress", 0, "from", 0, "podSelector", "matchExpressions", 0, "operator"), "Is"),
        (("spec", "ingress", 0, "ports", 0, "port"), 5.5),
    ],
)
def test_what_plexusd_would_refuse_the_crd_refuses(path: tuple[Any, ...], value: Any) -> None:
    bad = copy.deepcopy(GOOD)
    node: Any = bad
    for part in path[:-1]:
        node = node[part]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _schema())


def test_the_node_agent_reads_every_policy_kind_namespace_and_pod_and_writes_none() -> None:
    rendered = _kustomize(DEPLOY)
    assert "multi-networkpolicies.k8s.cni.cncf.io" in {
        o["metadata"]["name"] for o in rendered if o["kind"] == "CustomResourceDefinition"
    }
    grants = _rules(rendered, "ClusterRole", "plexus-node")
    assert (
        _grants(
            ("networking.k8s.io", "networkpolicies", "get list watch", ""),
            ("k8s.cni.cncf.io", "multi-networkpolicies", "get list watch", ""),
            ("", "namespaces", "get list watch", ""),
            ("", "pods", "get list watch", ""),
        )
        <= grants
    )
    policy_resources = {"networkpolicies", "multi-networkpolicies", "namespaces"}
    assert {g[2] for g in grants if g[1] in policy_resources} == {"get", "list", "watch"}
    assert {g[2] for g in grants if g[1] == "pods"} == {"get", "list", "watch"}


def test_the_kustomization_lists_the_crd() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert "crds/multi-networkpolicies.yaml" in kustomization["resources"]
    assert Path(DEPLOY / "crds/multi-networkpolicies.yaml").is_file()
