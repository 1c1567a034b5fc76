"""The checks behind the admission webhook and `plexusctl validate` (cnispec.validation): what
a user is told about a NAD or a pod's network annotations, before any pod fails on them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest

from cnispec import builtin_conf
from cnispec.validation import (
    ALLOW_MISSING_LABEL,
    ISOLATION_LABEL,
    LookupUnavailable,
    check_manifests,
    check_nad,
    check_pod,
    dns1123_subdomain_problem,
)


def nad(name: str, config: Any, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "team-a"}
    if annotations:
        meta["annotations"] = annotations
    text = config if isinstance(config, str) else json.dumps(config)
    return {"kind": "NetworkAttachmentDefinition", "metadata": meta, "spec": {"config": text}}


def errors(obj: dict[str, Any], **kw: Any) -> list[str]:
    return [str(e) for e in check_nad(obj, **kw).errors]


def one_error(obj: dict[str, Any], **kw: Any) -> str:
    found = errors(obj, **kw)
    assert len(found) == 1, found
    return found[0]


class FakeApi:
    """Lookups as the API would answer them."""

    def __init__(
        self,
        nads: set[tuple[str, str]] = frozenset(),  # type: ignore[assignment]
        labels: dict[str, dict[str, str]] | None = None,
        pools: frozenset[str] = frozenset(),
        down: bool = False,
    ) -> None:
        self.nads, self.labels, self.pools, self.down = nads, labels or {}, pools, down

    def pool_resource_names(self) -> frozenset[str]:
        if self.down:
            raise LookupUnavailable("API unreachable: connection refused")
        return self.pools

    def nad_exists(self, namespace: str, name: str) -> bool:
        if self.down:
            raise LookupUnavailable("API unreachable: connection refused")
        return (namespace, name) in self.nads

    def namespace_labels(self, namespace: str) -> Mapping[str, str]:
        if self.down:
            raise LookupUnavailable("API unreachable: connection refused")
        return self.labels.get(namespace, {})


MACVLAN = {"cniVersion": "1.0.0", "type": "plexus-macvlan", "master": "eth0", "mode": "bridge"}


# --- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "0",
        "net-1",
        "my.net.example",
        "1-2.3-4",
        "a" * 253,
        # Kubernetes sets no 63 limit on a label inside a subdomain (IsDNS1123Subdomain).
        "a" * 64 + ".b",
        ".".join(["abc"] * 63)[:253].rstrip("."),
    ],
)
def test_names_kubernetes_accepts_are_accepted(name: str) -> None:
    assert dns1123_subdomain_problem(name) == ""
    assert errors(nad(name, MACVLAN)) == []


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "must not be empty"),
        ("a" * 254, "254 characters long; at most 253"),
        ("Net", "only lower-case letters"),
        ("net_1", "'_'"),
        ("-net", "must start and end with a letter or digit"),
        ("net-", "must start and end with a letter or digit"),
        ("a.-b", "label '-b'"),
        ("a..b", "empty label"),
        (".a", "empty label"),
        ("a.", "empty label"),
        ("nét", "'é'"),
        ("a b", "' '"),
        ("a\n", "'\\n'"),
    ],
)
def test_names_kubernetes_refuses_are_refused_saying_why(name: str, why: str) -> None:
    problem = dns1123_subdomain_problem(name)
    assert why in problem
    message = one_error(nad(name, MACVLAN))
    assert message.startswith("metadata.name: ")
    assert "is not a DNS-1123 subdomain" in message


# --- config --------------------------------------------------------------------------------


def test_a_good_conf_and_conflist_are_admitted() -> None:
    assert check_nad(nad("mv", MACVLAN)).allowed
    conflist = {"cniVersion": "1.0.0", "name": "x", "plugins": [MACVLAN, {"type": "tuning"}]}
    verdict = check_nad(nad("mv", conflist))
    assert verdict.allowed and verdict.warnings == []


def test_a_conflist_without_name_takes_the_nads() -> None:
    conflist = {"cniVersion": "1.0.0", "plugins": [MACVLAN]}
    assert errors(nad("mv", conflist)) == []


@pytest.mark.parametrize(
    ("config", "why"),
    [
        ("{not json", "spec.config: is not valid JSON"),
        ("[1, 2]", "spec.config: must be a JSON object, not list"),
        ({"cniVersion": "1.0.0"}, "neither 'type' nor 'plugins'"),
        ({"cniVersion": "1.0.0", "plugins": []}, "'plugins' must be a non-empty list"),
        ({"cniVersion": "1.0.0", "plugins": [{"master": "x"}]}, "plugin 0 has no string 'type'"),
        ({"cniVersion": "9.9.9", "type": "bridge"}, "cniVersion 9.9.9"),
        ({"cniVersion": "1.0.0", "name": "bad name", "type": "bridge"}, "'bad name'"),
    ],
)
def test_a_malformed_config_is_refused_with_where_and_why(config: Any, why: str) -> None:
    message = one_error(nad("n", config))
    assert message.startswith("spec.config")
    assert why in message


def test_a_config_that_is_not_a_string_is_refused() -> None:
    obj = nad("n", MACVLAN)
    obj["spec"]["config"] = {"type": "bridge"}
    assert one_error(obj) == "spec.config: must be a string holding JSON"


def test_an_empty_config_is_admitted_with_a_warning_the_nodes_must_hold_the_file() -> None:
    verdict = check_nad(nad("n", ""))
    assert verdict.allowed
    assert "every node must have a CNI config named 'n'" in str(verdict.warnings[0])


def test_external_plugins_keys_are_theirs_to_judge() -> None:
    config = {"cniVersion": "1.0.0", "type": "macvlan", "mode": "nonsense", "mtu": 1}
    assert errors(nad("n", config)) == []


# --- built-ins, each with its own model ----------------------------------------------------


def test_every_built_in_type_has_a_model_and_nothing_else_does() -> None:
    from delegates.builtins import builtin_plugins
    from delegates.external import RawExec
    from delegates.ipam import IpamPaths

    plugins = builtin_plugins(
        exec_=RawExec(), timeout=1, ipam_data_dir="/x", ipam_paths=IpamPaths(), fabric=None
    )
    assert set(plugins) == set(builtin_conf.MODELS)


@pytest.mark.parametrize(
    ("plugin", "where", "why"),
    [
        ({"type": "plexus-macvlan", "mode": "l2"}, "plugins[0].mode", "'bridge', 'private'"),
        ({"type": "plexus-macvlan", "mtu": 67}, "plugins[0].mtu", "greater than or equal to 68"),
        ({"type": "plexus-macvlan", "mtu": 65536}, "plugins[0].mtu", "less than or equal"),
        ({"type": "plexus-macvlan", "mac": "zz"}, "plugins[0].mac", "is not a MAC address"),
        ({"type": "plexus-ipvlan", "mode": "l4"}, "plugins[0].mode", "'l2', 'l3' or 'l3s'"),
        ({"type": "plexus-ipvlan", "flag": "loud"}, "plugins[0].flag", "'bridge'"),
        ({"type": "plexus-routed", "mtu": 1279}, "plugins[0].mtu", "1280"),
        ({"type": "plexus-sriov", "vlan": 4095}, "plugins[0].vlan", "4094"),
        ({"type": "plexus-sriov", "vlanQoS": 2}, "plugins[0]", "vlanQoS needs vlan"),
        ({"type": "plexus-sriov", "spoofchk": "yes"}, "plugins[0].spoofchk", "'on' or 'off'"),
        ({"type": "plexus-sriov", "link_state": "up"}, "plugins[0].link_state", "'auto'"),
        ({"type": "plexus-sbr", "table": "main"}, "plugins[0].table", "integer"),
        ({"type": "plexus-bogus"}, "plugins[0].type", "no built-in of Plexus"),
        (
            {"type": "plexus-macvlan", "linkInContainer": True},
            "plugins[0].linkInContainer",
            "not supported",
        ),
    ],
)
def test_each_built_in_refuses_a_bad_key_naming_it(
    plugin: dict[str, Any], where: str, why: str
) -> None:
    conflist = {"cniVersion": "1.0.0", "plugins": [plugin]}
    message = one_error(nad("n", conflist))
    assert message.startswith(f"spec.config: {where}"), message
    assert why in message


@pytest.mark.parametrize(
    ("ipam", "why"),
    [
        ({"type": "host-local", "subnet": "10.1.0.1/24"}, "has host bits set; did you mean"),
        ({"type": "host-local", "subnet": "10.1.0.0"}, "needs a prefix length"),
        ({"type": "host-local", "subnet": "10.1.0.0/31"}, "too small to allocate from"),
        (
            {"type": "host-local", "subnet": "10.1.0.0/24", "rangeStart": "10.2.0.5"},
            "rangeStart 10.2.0.5 is not in network 10.1.0.0/24",
        ),
        (
            {
                "type": "host-local",
                "subnet": "10.1.0.0/24",
                "rangeStart": "10.1.0.9",
                "rangeEnd": "10.1.0.3",
            },
            "rangeStart 10.1.0.9 is after rangeEnd 10.1.0.3",
        ),
        (
            {
                "type": "host-local",
                "ranges": [[{"subnet": "10.1.0.0/24"}], [{"subnet": "10.1.0.0/25"}]],
            },
            "range set 0 overlaps with range set 1",
        ),
        (
            {
                "type": "host-local",
                "ranges": [[{"subnet": "10.1.0.0/24"}, {"subnet": "fd00::/64"}]],
            },
            "mixes IPv4 and IPv6",
        ),
        ({"type": "host-local"}, "no IP ranges"),
        ({"type": "host-local", "subnet": "10.1.0.0/24", "routes": [{"dst": "x"}]}, "routes[0]"),
        ({"type": "static", "addresses": [{"address": "10.1.0.5"}]}, "must be in CIDR notation"),
        (
            {"type": "static", "addresses": [{"address": "10.1.0.5/24", "gateway": "fd00::1"}]},
            "not of the same family",
        ),
        ({"type": "static", "addresses": "10.1.0.5/24"}, "addresses"),
        ({"subnet": "10.1.0.0/24"}, "must be an object with a string 'type'"),
    ],
)
def test_in_process_ipam_ranges_and_cidrs_are_checked(ipam: dict[str, Any], why: str) -> None:
    message = one_error(nad("n", {**MACVLAN, "ipam": ipam}))
    assert message.startswith("spec.config: ipam"), message
    assert why in message


def test_ipam_ranges_may_come_from_the_ip_ranges_capability() -> None:
    config = {**MACVLAN, "capabilities": {"ipRanges": True}, "ipam": {"type": "host-local"}}
    assert errors(nad("n", config)) == []


def test_an_exec_d_ipam_is_not_judged_here() -> None:
    config = {**MACVLAN, "ipam": {"type": "whereabouts", "range": "not-checked"}}
    assert errors(nad("n", config)) == []


def test_every_problem_is_reported_at_once() -> None:
    config = {"cniVersion": "1.0.0", "plugins": [{"type": "plexus-macvlan", "mode": "x", "mtu": 1}]}
    assert len(errors(nad("Bad", config))) == 3


# --- resourceName ----------------------------------------------------------------------------

RESOURCE = "k8s.v1.cni.cncf.io/resourceName"
SRIOV = {"cniVersion": "1.0.0", "type": "plexus-sriov", "vlan": 10}


def test_a_resource_name_must_be_one_a_vfpool_provides() -> None:
    api = FakeApi(pools=frozenset({"plexus.dev/intel_a"}))
    good = nad("vf", SRIOV, {RESOURCE: "plexus.dev/intel_a"})
    assert check_nad(good, lookups=api).allowed
    bad = nad("vf", SRIOV, {RESOURCE: "plexus.dev/intel_b"})
    assert one_error(bad, lookups=api) == (
        "metadata.annotations[k8s.v1.cni.cncf.io/resourceName]: no VFPool provides resource "
        "'plexus.dev/intel_b' (VFPools provide: plexus.dev/intel_a)"
    )


def test_a_malformed_resource_name_is_refused_without_the_api() -> None:
    assert "is not a resource name" in one_error(nad("vf", SRIOV, {RESOURCE: "intel"}))


def test_without_the_api_the_resource_name_is_admitted_with_a_warning() -> None:
    verdict = check_nad(nad("vf", SRIOV, {RESOURCE: "plexus.dev/intel_a"}))
    assert verdict.allowed
    assert "no API to check that a VFPool provides it" in str(verdict.warnings[0])
    verdict = check_nad(nad("vf", SRIOV, {RESOURCE: "plexus.dev/a"}), lookups=FakeApi(down=True))
    assert verdict.allowed
    assert "VFPools could not be listed (API unreachable" in str(verdict.warnings[0])


# --- pods --------------------------------------------------------------------------------------

NETWORKS = "k8s.v1.cni.cncf.io/networks"
DEFAULT_NET = "v1.multus-cni.io/default-network"


def pod(annotations: dict[str, str], namespace: str = "team-a") -> dict[str, Any]:
    return {
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": namespace, "annotations": annotations},
    }


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("a/b/c", "more than one '/'"),
        ("net@if0@if1", "more than one '@'"),
        ("Net", "not a DNS-1123 label"),
        ("net@bad:if", "not a legal interface name"),
        ('[{"name": "n", "ips": ["10.0.0.300/24"]}]', "ips"),
        ('[{"name": "n", "mac": "zz"}]', "mac"),
        ('{"name": "n"}', "must be a list of objects"),
        ("[{", "not valid JSON"),
    ],
)
def test_annotation_syntax_is_the_node_parsers(value: str, why: str) -> None:
    verdict = check_pod(pod({NETWORKS: value}))
    assert not verdict.allowed
    message = str(verdict.errors[0])
    assert message.startswith(f"metadata.annotations[{NETWORKS}]: ")
    assert why in message


def test_every_referenced_nad_must_exist() -> None:
    api = FakeApi(nads={("team-a", "a"), ("shared", "b")})
    assert check_pod(pod({NETWORKS: "a, shared/b@net1"}), lookups=api).allowed
    verdict = check_pod(pod({NETWORKS: "a, c"}), lookups=api)
    assert [str(e) for e in verdict.errors] == [
        f"metadata.annotations[{NETWORKS}]: team-a/c: no NetworkAttachmentDefinition 'c' in "
        "namespace 'team-a'"
    ]


def test_the_default_network_annotation_is_checked_too() -> None:
    api = FakeApi(nads={("team-a", "a")})
    verdict = check_pod(pod({DEFAULT_NET: "gone"}), lookups=api)
    assert "team-a/gone: no NetworkAttachmentDefinition" in str(verdict.errors[0])
    verdict = check_pod(pod({DEFAULT_NET: "a,a"}), lookups=api)
    assert "must name exactly one network, not 2" in str(verdict.errors[0])


def test_a_namespace_label_admits_a_pod_before_its_nad_with_a_warning() -> None:
    api = FakeApi(labels={"team-a": {ALLOW_MISSING_LABEL: "true"}})
    verdict = check_pod(pod({NETWORKS: "later"}), lookups=api)
    assert verdict.allowed
    assert "team-a/later: no NetworkAttachmentDefinition 'later'" in str(verdict.warnings[0])
    assert "admitted" in str(verdict.warnings[0])


@pytest.mark.parametrize(
    ("labels", "refused", "why"),
    [
        ({}, False, ""),
        ({"team-a": {ISOLATION_LABEL: "namespace"}}, True, "its pods may use only its own NADs"),
        ({"shared": {ISOLATION_LABEL: "namespace"}}, True, "its NADs serve only its own pods"),
        ({"team-a": {ISOLATION_LABEL: "other"}}, False, ""),
    ],
)
def test_isolated_namespaces_neither_borrow_nor_lend_nads(
    labels: dict[str, dict[str, str]], refused: bool, why: str
) -> None:
    api = FakeApi(nads={("shared", "b"), ("team-a", "a")}, labels=labels)
    verdict = check_pod(pod({NETWORKS: "a, shared/b"}), lookups=api)
    assert verdict.allowed is not refused
    if refused:
        assert len(verdict.errors) == 1
        assert "shared/b: namespace" in str(verdict.errors[0])
        assert why in str(verdict.errors[0])


def test_references_without_the_api_are_admitted_with_a_warning() -> None:
    verdict = check_pod(pod({NETWORKS: "a"}))
    assert verdict.allowed
    assert "no API" in str(verdict.warnings[0])
    verdict = check_pod(pod({NETWORKS: "a"}), lookups=FakeApi(down=True))
    assert verdict.allowed
    assert "could not be looked up (API unreachable" in str(verdict.warnings[0])


def test_a_pod_without_networks_has_nothing_to_check() -> None:
    verdict = check_pod({"kind": "Pod", "metadata": {"name": "p"}}, lookups=FakeApi())
    assert verdict.allowed and verdict.warnings == []


# --- manifest files ----------------------------------------------------------------------------


def test_manifests_give_each_problem_its_line() -> None:
    text = (
        "kind: NetworkAttachmentDefinition\n"  # 1
        "metadata:\n"
        "  name: ok\n"
        "spec:\n"
        '  config: \'{"cniVersion": "1.0.0", "type": "bridge"}\'\n'
        "---\n"  # 6
        "kind: NetworkAttachmentDefinition\n"  # 7
        "metadata:\n"
        "  name: Bad\n"  # 9
        "spec:\n"
        "  config: |\n"  # 11
        '    {"cniVersion": "1.0.0", "type": "plexus-ipvlan", "mode": "l9"}\n'
        "---\n"
        "kind: Deployment\n"  # 14
        "metadata: {name: d}\n"
        "spec:\n"
        "  template:\n"
        "    metadata:\n"
        "      annotations:\n"
        "        k8s.v1.cni.cncf.io/networks: a/b/c\n"  # 20
    )
    docs = check_manifests(text, "f.yaml")
    assert [(d.line, d.kind, d.verdict is not None and d.verdict.allowed) for d in docs] == [
        (1, "NetworkAttachmentDefinition", True),
        (7, "NetworkAttachmentDefinition", False),
        (14, "Deployment", False),
    ]
    assert [line for line, _ in docs[1].errors] == [9, 11]
    assert [line for line, _ in docs[2].errors] == [20]
