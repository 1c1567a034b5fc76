"""The CRDs in deploy/crds/ say what `cnispec.vfpool_api` says, and refuse what they can.

- Field names, required fields, enums and numeric bounds of the CRD schemas are read against the
  pydantic models field by field: the API server and both sides' code agree on every name.
- Every example VFPool validates against the CRD's openAPIV3Schema (with `jsonschema`) and as a
  `VFPool`; what the node agent and the controller write (the models, dumped as they dump them)
  validates against the CRDs' status schemas.
- Negative examples: each one breaks one rule and the CRD refuses it, for the reason given.
- The CRDs' `x-kubernetes-validations`, the ValidatingAdmissionPolicy's CEL and the webhook's
  matchConditions are evaluated with `cel-python` (a CEL interpreter; RE2 for `matches`, like
  the API server). Without an API server, two things are not checked here: Kubernetes' own CEL
  extension libraries (only `split` of its strings library is used, and is supplied below with
  its documented meaning) and the API server's CEL cost estimate (the rules are small and every
  string and list they walk has a maxLength/maxItems, which is what the estimate needs).
- Fuzzing (hypothesis): what the CRD admits, the models admit (so an object the API server
  accepted never fails on a node); canonical values the models admit, the CRD admits.
"""

from __future__ import annotations

import copy
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import annotated_types
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from cnispec import vfpool_api
from cnispec.vfpool_api import (
    Condition,
    LabelSelector,
    NodeCount,
    NodeStateStatus,
    PfEntry,
    PoolRef,
    SelectorRequirement,
    VfEntry,
    VFPool,
    VFPoolSpec,
    VFPoolStatus,
    pools_for_node,
)
from cnispec.vfpools import DeviceType, Selectors

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the dev extra")
celpy = pytest.importorskip("celpy", reason="cel-python is in the dev extra")
from celpy import celtypes  # noqa: E402 - after the skip: only when cel-python is installed

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

Json = dict[str, Any]


def _crd(name: str) -> Json:
    (doc,) = yaml.safe_load_all((DEPLOY / "crds" / name).read_text())
    return typing.cast(Json, doc)


POOL_CRD = _crd("vfpools.yaml")
STATE_CRD = _crd("vfpoolnodestates.yaml")
MCAST_CRD = _crd("multicastnodestates.yaml")


def _schema(crd: Json) -> Json:
    (version,) = crd["spec"]["versions"]
    return typing.cast(Json, version["schema"]["openAPIV3Schema"])


POOL_SCHEMA = _schema(POOL_CRD)
STATE_SCHEMA = _schema(STATE_CRD)


# --- the CRD as the API server applies it: OpenAPI schema, then CEL ------------------------------


def _json_schema(node: Any) -> Any:
    """OpenAPI v3 → JSON Schema: `nullable: true` becomes a "null" type (the rest is the same
    vocabulary; x-kubernetes-* keywords are ignored by the validator)."""
    if isinstance(node, dict):
        out = {k: _json_schema(v) for k, v in node.items()}
        if out.pop("nullable", False):
            out["type"] = [out["type"], "null"]
        return out
    if isinstance(node, list):
        return [_json_schema(v) for v in node]
    return node


def _split(text: Any, sep: Any) -> Any:
    # Kubernetes' CEL strings library: `'a,b'.split(',')` == ['a', 'b'] (Go strings.Split).
    return celtypes.ListType([celtypes.StringType(x) for x in str(text).split(str(sep))])


_CEL = celpy.Environment()
_PROGRAMS: dict[str, Any] = {}


def cel(expression: str, **activation: Any) -> Any:
    """`expression` evaluated with `activation` (JSON values); a CEL runtime error is returned
    as the error (the API server counts it as a failed rule)."""
    program = _PROGRAMS.get(expression)
    if program is None:
        program = _CEL.program(_CEL.compile(expression), functions={"split": _split})
        _PROGRAMS[expression] = program
    try:
        result = program.evaluate({k: celpy.json_to_cel(v) for k, v in activation.items()})
    except celpy.CELEvalError as exc:
        return exc
    return bool(result) if isinstance(result, celtypes.BoolType) else result


def _rules(node: Json, value: Any, path: str) -> Iterator[str]:
    """Every CEL rule of `node` and below that `value` breaks, as "path: message". Transition
    rules (those reading oldSelf) are skipped, as on a create."""
    if value is None:
        return
    for rule in node.get("x-kubernetes-validations", ()):
        if "oldSelf" in rule["rule"]:
            continue
        if cel(rule["rule"], self=value) is not True:
            yield f"{path}: {rule['message']}"
    if isinstance(value, dict):
        for key, sub in value.items():
            child = node.get("properties", {}).get(key) or node.get("additionalProperties")
            if isinstance(child, dict):
                yield from _rules(child, sub, f"{path}.{key}")
    elif isinstance(value, list) and "items" in node:
        for i, sub in enumerate(value):
            yield from _rules(node["items"], sub, f"{path}[{i}]")


def refusals(schema: Json, obj: Json) -> list[str]:
    """Why the API server would refuse `obj` under `schema` ([] = admitted)."""
    validator = jsonschema.Draft7Validator(
        _json_schema(schema), format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
    )
    found = [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(obj)
    ]
    return found or list(_rules(schema, obj, "<root>"))


def pool(spec: Json, name: str = "p") -> Json:
    return {
        "apiVersion": "plexus.dev/v1alpha1",
        "kind": "VFPool",
        "metadata": {"name": name},
        "spec": spec,
    }


def model_refusal(spec: Json) -> str:
    """Why the node agent would refuse a VFPool with `spec` ('' = it serves it)."""
    try:
        VFPoolSpec.model_validate(spec).pool_spec()
    except ValidationError as exc:
        return str(exc)
    return ""


GOOD: Json = {
    "resourceName": "plexus.dev/intel_vf",
    "nicSelector": {"vendors": ["8086"], "pfNames": ["ens1f0#0-7"]},
    "numVfs": 8,
}


def _with(path: str, value: Any) -> Json:
    """GOOD with one field (dotted path) set; value None removes it."""
    spec = copy.deepcopy(GOOD)
    *parents, leaf = path.split(".")
    node = spec
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return spec


# --- the schemas are well formed ------------------------------------------------------------------


def _nodes(node: Json, path: str = "") -> Iterator[tuple[str, Json]]:
    yield path, node
    for key, child in node.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{key}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        yield from _nodes(node["items"], f"{path}[]")


@pytest.mark.parametrize(
    "crd",
    [POOL_CRD, STATE_CRD, MCAST_CRD],
    ids=["vfpools", "vfpoolnodestates", "multicastnodestates"],
)
def test_crd_is_structural_cluster_scoped_with_status(crd: Json) -> None:
    spec = crd["spec"]
    assert spec["group"] == vfpool_api.GROUP
    assert spec["scope"] == "Cluster"
    assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}"
    (version,) = spec["versions"]
    assert version["name"] == vfpool_api.VERSION
    assert version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    assert version["additionalPrinterColumns"]
    schema = version["schema"]["openAPIV3Schema"]
    jsonschema.Draft7Validator.check_schema(_json_schema(schema))
    for path, node in _nodes(schema):
        # structural: every node typed; properties and additionalProperties never together
        assert "type" in node, f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        for rule in node.get("x-kubernetes-validations", ()):
            assert rule["message"], path
            _CEL.compile(rule["rule"])  # parses
            # the API server's cost estimate needs bounds on what a rule walks
            if node["type"] == "string" and "oldSelf" not in rule["rule"]:
                assert "maxLength" in node, f"{path}: a CEL rule on an unbounded string"
            if node["type"] == "array":
                assert "maxItems" in node, f"{path}: a CEL rule on an unbounded list"
            # a map's keys have no maxLength: a rule walking them is estimated unbounded
            assert "additionalProperties" not in node, f"{path}: a CEL rule on a map"


def test_crd_kinds_match_the_api_module() -> None:
    names = POOL_CRD["spec"]["names"]
    assert (names["kind"], names["plural"]) == (vfpool_api.POOL_KIND, vfpool_api.POOL_PLURAL)
    names = STATE_CRD["spec"]["names"]
    assert (names["kind"], names["plural"]) == (vfpool_api.STATE_KIND, vfpool_api.STATE_PLURAL)


# --- field for field against the models ------------------------------------------------------------


def _at(schema: Json, path: str) -> Json:
    node = schema
    for part in path.split("."):
        node = node["items"] if part == "[]" else node["properties"][part]
    return node


CONTRACT: list[tuple[Json, str, type[BaseModel]]] = [
    (POOL_SCHEMA, "spec", VFPoolSpec),
    (POOL_SCHEMA, "spec.nicSelector", Selectors),
    (POOL_SCHEMA, "spec.nodeSelector", LabelSelector),
    (POOL_SCHEMA, "spec.nodeSelector.matchExpressions.[]", SelectorRequirement),
    (POOL_SCHEMA, "status", VFPoolStatus),
    (POOL_SCHEMA, "status.nodes.[]", NodeCount),
    (POOL_SCHEMA, "status.conditions.[]", Condition),
    (STATE_SCHEMA, "status", NodeStateStatus),
    (STATE_SCHEMA, "status.pfs.[]", PfEntry),
    (STATE_SCHEMA, "status.vfs.[]", VfEntry),
    (STATE_SCHEMA, "status.pools.[]", PoolRef),
]
# Required by the CRD though the model has a default: metav1.Condition requires it, and the
# controller always sets it (the model's "" is only a placeholder before it does).
STRICTER_REQUIRED = {(Condition, "lastTransitionTime")}


@pytest.mark.parametrize(("schema", "path", "model"), CONTRACT, ids=[c[1] for c in CONTRACT])
def test_crd_fields_are_the_models_fields(schema: Json, path: str, model: type[BaseModel]) -> None:
    node = _at(schema, path)
    fields = {(f.alias or name): f for name, f in model.model_fields.items()}
    assert set(node["properties"]) == set(fields), path
    required = {a for a, f in fields.items() if f.is_required()}
    stricter = {a for m, a in STRICTER_REQUIRED if m is model}
    assert set(node.get("required", ())) == required | stricter, path
    for alias, field in fields.items():
        prop = node["properties"][alias]
        literal = [a for a in get_args(field.annotation) if isinstance(a, str)]
        if typing.get_origin(field.annotation) is typing.Literal:
            assert prop["enum"] == list(get_args(field.annotation)), f"{path}.{alias}"
        elif literal:
            pytest.fail(f"{path}.{alias}: a Literal inside a union: compare it by hand")
        for bound in field.metadata:
            if isinstance(bound, annotated_types.Ge):
                assert prop["minimum"] == bound.ge, f"{path}.{alias}"
            if isinstance(bound, annotated_types.Le):
                assert prop["maximum"] == bound.le, f"{path}.{alias}"
        if field.default is not None and "default" in prop:
            assert prop["default"] == field.default, f"{path}.{alias}"


def test_enums_the_models_do_not_spell_as_literals() -> None:
    spec = _at(POOL_SCHEMA, "spec")["properties"]
    assert spec["deviceType"]["enum"] == list(get_args(DeviceType))
    for link in _at(POOL_SCHEMA, "spec.nicSelector.linkTypes")["items"]["enum"]:
        Selectors.model_validate({"linkTypes": [link]})  # every spelling the CRD admits


# --- examples, and what the two sides write ---------------------------------------------------------


def _examples() -> list[Json]:
    docs = yaml.safe_load_all((DEPLOY / "examples" / "vfpools.yaml").read_text())
    return [d for d in docs if d]


def test_example_vfpools_pass_the_crd_and_the_models() -> None:
    examples = _examples()
    assert len(examples) >= 3
    for obj in examples:
        assert obj["apiVersion"] == vfpool_api.API_VERSION and obj["kind"] == "VFPool"
        assert refusals(POOL_SCHEMA, obj) == [], obj["metadata"]["name"]
        model = VFPool.model_validate({"name": obj["metadata"]["name"], "spec": obj["spec"]})
        model.spec.pool_spec()
    # one node the first two select, in the order the node assigns VFs: priority first
    pools = [
        VFPool.model_validate({"name": o["metadata"]["name"], "spec": o["spec"]}) for o in examples
    ]
    labels = {
        "feature.node.kubernetes.io/network-sriov.capable": "true",
        "topology.kubernetes.io/zone": "rack-a",
    }
    served = pools_for_node(pools, labels)
    assert [p.resource_name for p in served.pools] == [
        "plexus.dev/intel_vf",
        "plexus.dev/intel_dpdk",
    ]
    assert served.pools[1].device_type == "vfio-pci"
    served = pools_for_node(pools, {"node-role.kubernetes.io/dataplane": ""})
    assert [p.resource_name for p in served.pools] == ["example.com/cx6_vfio"]


def _pool_status() -> VFPoolStatus:
    return VFPoolStatus(
        observed_generation=3,
        nodes=(NodeCount(node="node-1", total=8, healthy=7, free=5, in_use=2, unhealthy=1),),
        conditions=(
            Condition(
                type="Ready",
                status="True",
                reason="Serving",
                message="1 node, 7/8 VFs healthy, 5 free",
                observed_generation=3,
                last_transition_time="2026-12-04T06:00:00Z",
            ),
            Condition(
                type="Degraded",
                status="True",
                reason="VFsUnhealthy",
                message="node-1: 1 VF unhealthy: PF ens1f0 has no link",
                observed_generation=3,
                last_transition_time="2026-12-04T06:00:01Z",
            ),
        ),
    )


def _node_status() -> NodeStateStatus:
    return NodeStateStatus(
        pfs=(
            PfEntry(
                pci="0000:3b:00.0",
                name="ens1f0",
                vendor="8086",
                device="1593",
                driver="ice",
                link_type="ether",
                num_vfs=2,
                total_vfs=64,
                link_up=True,
            ),
            PfEntry(pci="0000:5e:00.0", driver="vfio-pci"),  # no netdev: names unknown
        ),
        vfs=(
            VfEntry(
                pci="0000:3b:01.0",
                pf="0000:3b:00.0",
                index=0,
                netdev="ens1f0v0",
                driver="iavf",
                pool="plexus.dev/intel_vf",
                state="attached",
                pod="default/web-1",
            ),
            VfEntry(
                pci="0000:3b:01.1",
                pf="0000:3b:00.0",
                index=1,
                driver="iavf",
                pool="plexus.dev/intel_vf",
                state="unhealthy",
                healthy=False,
                reason="PF ens1f0 has no link",
            ),
        ),
        pools=(PoolRef(name="intel", resource_name="plexus.dev/intel_vf", generation=3),),
        problems=("pool intel-dpdk: numVfs 8 waits: VF 3 is held by default/dpdk-0",),
        updated="2026-12-04T06:00:00.123456+00:00",
    )


@pytest.mark.parametrize("exclude_none", [True, False])
def test_what_the_controller_and_the_node_write_passes_the_crds(exclude_none: bool) -> None:
    status = _pool_status().model_dump(mode="json", by_alias=True, exclude_none=exclude_none)
    obj = pool(GOOD) | {"status": status}
    assert refusals(POOL_SCHEMA, obj) == []
    state = _node_status().model_dump(mode="json", by_alias=True, exclude_none=exclude_none)
    obj = {
        "apiVersion": vfpool_api.API_VERSION,
        "kind": vfpool_api.STATE_KIND,
        "metadata": {"name": "node-1"},
        "spec": {"nodeName": "node-1"},
        "status": state,
    }
    assert refusals(STATE_SCHEMA, obj) == []
    # the freshly created object (status not written yet), and an empty status
    assert refusals(STATE_SCHEMA, {**obj, "status": {}}) == []
    empty = NodeStateStatus().model_dump(mode="json", by_alias=True, exclude_none=exclude_none)
    assert refusals(STATE_SCHEMA, {**obj, "status": empty}) == []


def test_node_state_is_named_after_its_node() -> None:
    obj = {"metadata": {"name": "node-1"}, "spec": {"nodeName": "node-2"}}
    assert refusals(STATE_SCHEMA, obj) == [
        "<root>: a VFPoolNodeState is named after its node (metadata.name == spec.nodeName)"
    ]
    assert refusals(STATE_SCHEMA, {**obj, "spec": {"nodeName": "node-1"}}) == []
    # and the node name stays (a transition rule: the API server runs it on updates)
    (rule,) = _at(STATE_SCHEMA, "spec.nodeName")["x-kubernetes-validations"]
    assert cel(rule["rule"], self="node-1", oldSelf="node-2") is False
    assert cel(rule["rule"], self="node-1", oldSelf="node-1") is True


def test_node_state_status_is_refused_when_malformed() -> None:
    base = {"metadata": {"name": "n"}, "spec": {"nodeName": "n"}}
    vf = {"pci": "0000:3b:01.0", "pf": "0000:3b:00.0", "index": 0}
    for bad in (
        {"vfs": [{**vf, "state": "busy"}]},
        {"vfs": [{**vf, "pci": "3b:01.0.1"}]},
        {"vfs": [{**vf, "index": -1}]},
        {"vfs": [{**vf, "pod": "no-namespace"}]},
        {"vfs": [{"pci": "0000:3b:01.0", "index": 0}]},  # no pf
        {"pfs": [{"pci": "0000:3b:00.0", "numVfs": 65537}]},
        {"updated": "yesterday"},
    ):
        assert refusals(STATE_SCHEMA, {**base, "status": bad}), bad


# --- negative examples: each breaks one rule ----------------------------------------------------

# (field path, value, why the CRD refuses). The node agent refuses every one of these too,
# except those in CRD_ONLY: Kubernetes' own LabelSelector rules, which the model does not
# repeat (it would read them as "matches nothing"), and an unquoted PCI id, which the pools
# file's loader takes as a YAML int but an API object must spell as a string.
NEGATIVE: list[tuple[str, Any, str]] = [
    ("nicSelector.vendors", ["808"], "does not match"),
    ("nicSelector.vendors", ["80866"], "does not match"),
    ("nicSelector.vendors", [8086], "is not of type 'string'"),
    ("nicSelector.vendors", ["0y8086"], "does not match"),
    ("nicSelector.vendors", [], "should be non-empty"),
    ("nicSelector.devices", ["15b"], "does not match"),
    ("nicSelector.drivers", ["ice driver"], "does not match"),
    ("nicSelector.drivers", ["../ice"], "does not match"),
    ("nicSelector.pfNames", ["ens1f0#7-3"], "a VF range runs backwards"),
    ("nicSelector.pfNames", ["ens1f0#65536"], "does not match"),
    ("nicSelector.pfNames", ["ens1f0#-1"], "does not match"),
    ("nicSelector.pfNames", ["ens1f0#"], "does not match"),
    ("nicSelector.pfNames", ["ens1f0#0-3,"], "does not match"),
    ("nicSelector.pfNames", ["ens1f0#0-3-5"], "does not match"),
    ("nicSelector.pfNames", ["averyverylongname0"], "does not match"),
    ("nicSelector.pfNames", ["ens/1"], "does not match"),
    ("nicSelector.pfNames", ["ens 1"], "does not match"),
    ("nicSelector.rootDevices", ["0000:3b:00.8"], "does not match"),
    ("nicSelector.rootDevices", ["0000:3b:20.0"], "does not match"),
    ("nicSelector.rootDevices", ["3b:00"], "does not match"),
    ("nicSelector.rootDevices", ["0000:3b:00.0#9-2"], "a VF range runs backwards"),
    ("nicSelector.linkTypes", ["wifi"], "is not one of"),
    ("nicSelector", {}, "should be non-empty"),
    ("resourceName", "intel_vf", "does not match"),
    ("resourceName", "Plexus.dev/intel_vf", "does not match"),
    ("resourceName", "plexus.dev/intel vf", "does not match"),
    ("resourceName", "plexus.dev/-vf", "does not match"),
    ("resourceName", "plexus..dev/vf", "does not match"),
    ("resourceName", "kubernetes.io/vf", "kubernetes.io names are kubelet's own"),
    ("resourceName", "sriov.kubernetes.io/vf", "kubernetes.io names are kubelet's own"),
    ("resourceName", "requests.plexus.dev/vf", "reserved for quota"),
    ("resourceName", ".".join(["a" * 60] * 5) + "/vf", "at most 253 characters"),
    ("deviceType", "vfio", "is not one of"),
    ("numVfs", -1, "is less than the minimum"),
    ("numVfs", 65537, "is greater than the maximum"),
    ("mtu", 67, "is less than the minimum"),
    ("mtu", 9703, "is greater than the maximum"),
    ("priority", 100, "is greater than the maximum"),
    ("priority", "high", "is not of type 'integer'"),
    ("nicSelector.pfNames", None, "numVfs needs nicSelector.rootDevices or nicSelector.pfNames"),
    ("nodeSelector.matchExpressions", [{"key": "a", "operator": "In"}], "In and NotIn need values"),
    (
        "nodeSelector.matchExpressions",
        [{"key": "a", "operator": "Exists", "values": ["x"]}],
        "Exists and DoesNotExist take none",
    ),
    ("nodeSelector.matchExpressions", [{"key": "a", "operator": "Has"}], "is not one of"),
    ("nodeSelector.matchExpressions", [{"operator": "Exists"}], "'key' is a required property"),
    ("nodeSelector.matchLabels", {"zone": "a b"}, "does not match"),
]
CRD_ONLY = {
    "nodeSelector.matchExpressions",
    "nodeSelector.matchLabels",
    "nicSelector.vendors=[8086]",
}


@pytest.mark.parametrize(
    ("path", "value", "why"), NEGATIVE, ids=[f"{p}={v!r}" for p, v, _ in NEGATIVE]
)
def test_negative_example_is_refused(path: str, value: Any, why: str) -> None:
    spec = _with(path, value)
    found = refusals(POOL_SCHEMA, pool(spec))
    assert found, f"the CRD admits {path}={value!r}"
    assert any(why in f for f in found), found
    if path not in CRD_ONLY and f"{path}={value!r}" not in CRD_ONLY:
        assert model_refusal(spec), f"the node agent admits {path}={value!r}"


def test_missing_required_fields_are_refused() -> None:
    assert refusals(POOL_SCHEMA, {"metadata": {"name": "p"}}) == [
        "<root>: 'spec' is a required property"
    ]
    for field in ("resourceName", "nicSelector"):
        found = refusals(POOL_SCHEMA, pool(_with(field, None)))
        assert found == [f"spec: '{field}' is a required property"]


def test_good_spellings_are_admitted() -> None:
    for path, value in [
        ("nicSelector.vendors", ["0x8086", "15B3", "0X15b3"]),
        ("nicSelector.pfNames", ["ens1f0", "ens1f0#0", "ens1f0#0-3,6,8-65535", "eth-0.100"]),
        ("nicSelector.rootDevices", ["0000:3b:00.0", "3b:00.1#0-1", "10000:AF:1f.7"]),
        ("resourceName", "example.com/Intel.VF_1"),
        ("nodeSelector", {}),
        ("nodeSelector.matchLabels", {"kubernetes.io/hostname": "node-1", "empty": ""}),
        ("numVfs", 0),
        ("numVfs", 65536),
        ("mtu", 68),
        ("mtu", 9702),
        ("priority", 99),
    ]:
        spec = _with(path, value)
        assert refusals(POOL_SCHEMA, pool(spec)) == [], (path, value)
        assert model_refusal(spec) == "", (path, value)


# --- fuzzing: the CRD never admits what a node refuses ---------------------------------------------

_ALPHABET = "0123456789abcdefABCDEFxX:.#-,/_ e"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(
    field=st.sampled_from(
        [
            "nicSelector.vendors",
            "nicSelector.devices",
            "nicSelector.pfNames",
            "nicSelector.rootDevices",
        ]
    ),
    text=st.text(alphabet=_ALPHABET, min_size=0, max_size=24),
)
def test_fuzz_crd_admits_only_what_the_models_admit(field: str, text: str) -> None:
    spec = _with(field, [text])
    if field.endswith("vendors") or field.endswith("devices"):
        spec = _with("numVfs", None) | {"nicSelector": {field.split(".")[1]: [text]}}
    if not refusals(POOL_SCHEMA, pool(spec)):
        assert model_refusal(spec) == ""


@FUZZ
@given(text=st.text(alphabet="abcdefkubernetsio0123456789.-/_R", min_size=0, max_size=40))
def test_fuzz_resource_names(text: str) -> None:
    spec = _with("resourceName", text)
    if not refusals(POOL_SCHEMA, pool(spec)):
        assert model_refusal(spec) == ""


_INDEX = st.integers(min_value=0, max_value=65535)
_RANGE = st.tuples(_INDEX, _INDEX).map(
    lambda r: f"{min(r)}-{max(r)}" if r[0] != r[1] else str(r[0])
)
_RANGES = st.lists(_RANGE, min_size=1, max_size=4).map(lambda rs: "#" + ",".join(rs))
_PF_NAME = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="#/"),
    min_size=1,
    max_size=15,
)
_PCI = st.builds(
    lambda dom, bus, dev, fn: f"{dom}{bus:02x}:{dev:02x}.{fn}",
    st.sampled_from(["", "0000:", "0001:", "abcd1234:"]),
    st.integers(0, 255),
    st.integers(0, 31),
    st.integers(0, 7),
)


@FUZZ
@given(
    pf_name=st.tuples(_PF_NAME, st.one_of(st.just(""), _RANGES)).map("".join),
    root=st.tuples(_PCI, st.one_of(st.just(""), _RANGES)).map("".join),
    vendor=st.builds(
        lambda prefix, n: prefix + f"{n:04x}", st.sampled_from(["", "0x"]), st.integers(0, 0xFFFF)
    ),
)
def test_fuzz_canonical_values_the_models_admit_the_crd_admits(
    pf_name: str, root: str, vendor: str
) -> None:
    spec = {
        "resourceName": "plexus.dev/vf",
        "nicSelector": {"vendors": [vendor], "pfNames": [pf_name], "rootDevices": [root]},
    }
    assert model_refusal(spec) == ""
    assert refusals(POOL_SCHEMA, pool(spec)) == []


# --- the ValidatingAdmissionPolicy: node agents write only their own node's state --------------------


def _render_doc(name: str, kind: str) -> Json:
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]
    (doc,) = [d for d in docs if d["kind"] == kind]
    return typing.cast(Json, doc)


POLICY = _render_doc("node-state-policy.yaml", "ValidatingAdmissionPolicy")
NODE_AGENT = "system:serviceaccount:kube-system:plexus"
NODE_NAME_KEY = "authentication.kubernetes.io/node-name"


def _policy_verdict(
    username: str,
    extra: dict[str, list[str]] | None,
    name: str,
    kind: str = "VFPoolNodeState",
) -> str | None:
    """None when the policy does not apply (matchConditions), '' when it admits, else its
    message: as the API server evaluates a ValidatingAdmissionPolicy."""
    user: Json = {"username": username} | ({"extra": extra} if extra is not None else {})
    gvk = {"group": "plexus.dev", "version": "v1alpha1", "kind": kind}
    request = {"userInfo": user, "operation": "UPDATE", "kind": gvk}
    obj = {"metadata": {"name": name}, "spec": {"nodeName": name}}
    spec = POLICY["spec"]
    if not all(
        cel(m["expression"], request=request, object=obj) is True for m in spec["matchConditions"]
    ):
        return None
    variables = {
        v["name"]: cel(v["expression"], request=request, object=obj) for v in spec["variables"]
    }
    for v in variables.values():
        assert not isinstance(v, Exception), v
    variables = {k: str(v) for k, v in variables.items()}
    for check in spec["validations"]:
        act = {"request": request, "object": obj, "variables": variables}
        if cel(check["expression"], **act) is not True:
            return str(cel(check["messageExpression"], **act))
    return ""


def test_policy_admits_a_node_agent_writing_its_own_node_state() -> None:
    assert _policy_verdict(NODE_AGENT, {NODE_NAME_KEY: ["node-1"]}, "node-1") == ""


@pytest.mark.parametrize("kind", ["VFPoolNodeState", "MulticastNodeState"])
def test_policy_refuses_a_node_agent_writing_another_nodes_state(kind: str) -> None:
    verdict = _policy_verdict(NODE_AGENT, {NODE_NAME_KEY: ["node-1"]}, "node-2", kind)
    assert verdict == f"the node agent on node-1 may write only {kind} node-1, not node-2"


@pytest.mark.parametrize(
    "extra", [None, {}, {"authentication.kubernetes.io/pod-name": ["plexusd-x"]}]
)
def test_policy_refuses_a_token_that_names_no_node(extra: dict[str, list[str]] | None) -> None:
    verdict = _policy_verdict(NODE_AGENT, extra, "node-1")
    assert verdict is not None and "names no node" in verdict


def test_policy_leaves_other_users_to_rbac() -> None:
    assert _policy_verdict("kubernetes-admin", None, "node-1") is None
    assert (
        _policy_verdict("system:serviceaccount:plexus-system:plexus-controller", None, "n") is None
    )


def test_policy_covers_the_object_and_its_status() -> None:
    (rule,) = POLICY["spec"]["matchConstraints"]["resourceRules"]
    assert rule["apiGroups"] == [vfpool_api.GROUP]
    assert rule["apiVersions"] == [vfpool_api.VERSION]
    assert set(rule["resources"]) == {
        "vfpoolnodestates",
        "vfpoolnodestates/status",
        "multicastnodestates",  # its spec; its status is the controller's
    }
    assert set(rule["operations"]) == {"CREATE", "UPDATE"}
    binding = _render_doc("node-state-policy.yaml", "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {
        "policyName": POLICY["metadata"]["name"],
        "validationActions": ["Deny"],
    }
    # the username it names is the DaemonSet's ServiceAccount
    ds = _render_doc("daemonset.yaml", "DaemonSet")
    sa = ds["spec"]["template"]["spec"]["serviceAccountName"]
    assert f"system:serviceaccount:{ds['metadata']['namespace']}:{sa}" == NODE_AGENT


# --- the webhook's matchConditions ------------------------------------------------------------------


def test_pod_webhook_sees_only_pods_asking_for_networks() -> None:
    vwc = _render_doc("webhook.yaml", "ValidatingWebhookConfiguration")
    (pods,) = [w for w in vwc["webhooks"] if w["name"] == "pods.plexus.dev"]
    (cond,) = pods["matchConditions"]

    def sent(annotations: dict[str, str] | None) -> Any:
        meta: Json = {"name": "p"} | (
            {"annotations": annotations} if annotations is not None else {}
        )
        return cel(cond["expression"], object={"metadata": meta}, request={})

    assert sent({"k8s.v1.cni.cncf.io/networks": "macvlan-conf"}) is True
    assert sent({"v1.multus-cni.io/default-network": "kube-system/cbr0"}) is True
    assert sent({"app": "web"}) is False
    assert sent({}) is False
    assert sent(None) is False


def test_patterns_are_re2_and_python_compatible() -> None:
    # the API server compiles patterns with Go's RE2; jsonschema above uses Python's re
    for path, node in [*_nodes(POOL_SCHEMA), *_nodes(STATE_SCHEMA)]:
        if "pattern" in node:
            pattern = node["pattern"]
            re.compile(pattern)
            assert not re.search(r"\(\?[=!<]|\\[0-9]", pattern), f"{path}: lookaround/backref"
