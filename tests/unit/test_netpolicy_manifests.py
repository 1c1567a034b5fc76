"""API objects made into the policy compiler's inputs: what a user writes in a NetworkPolicy,
MultiNetworkPolicy, Namespace or sees on a Pod arrives intact, and a bad object is refused with a
message that names it."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnispec.errors import InvalidConfig
from netpolicy.manifests import (
    namespace_from_object,
    pod_from_object,
    policy_from_object,
)
from netpolicy.model import ContainerPort, PodInterface


def netpol(spec: dict[str, Any], name: str = "web", namespace: str = "team-a") -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def mnp(policy_for: str | None, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "sec", "namespace": "team-a"}
    if policy_for is not None:
        meta["annotations"] = {"k8s.v1.cni.cncf.io/policy-for": policy_for}
    return {
        "apiVersion": "k8s.cni.cncf.io/v1beta1",
        "kind": "MultiNetworkPolicy",
        "metadata": meta,
        "spec": spec or {"podSelector": {}},
    }


def test_a_network_policy_keeps_every_field_the_api_has() -> None:
    policy = policy_from_object(
        netpol(
            {
                "podSelector": {"matchLabels": {"app": "web"}},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [
                    {
                        "from": [
                            {
                                "namespaceSelector": {
                                    "matchExpressions": [
                                        {"key": "team", "operator": "In", "values": ["a", "b"]}
                                    ]
                                },
                                "podSelector": {"matchLabels": {"role": "client"}},
                            },
                            {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
                        ],
                        "ports": [
                            {"protocol": "UDP", "port": 53},
                            {"port": 8000, "endPort": 8100},
                            {"port": "http"},
                        ],
                    }
                ],
                "egress": [{"to": [{"ipBlock": {"cidr": "fd00::/64"}}]}],
            }
        )
    )
    assert (policy.kind, policy.namespace, policy.name) == ("NetworkPolicy", "team-a", "web")
    assert policy.ref == "NetworkPolicy:team-a/web"
    assert policy.policy_for == ()
    spec = policy.spec
    assert spec.pod_selector.match_labels == {"app": "web"}
    assert spec.policy_types == ("Ingress", "Egress")
    peer, block = spec.ingress[0].from_
    assert peer.namespace_selector is not None
    assert peer.namespace_selector.match_expressions[0].values == ("a", "b")
    assert peer.pod_selector is not None and peer.pod_selector.match_labels == {"role": "client"}
    assert block.ip_block is not None and block.ip_block.except_ == ("10.1.0.0/16",)
    ports = spec.ingress[0].ports
    assert [(p.protocol, p.port, p.end_port) for p in ports] == [
        ("UDP", 53, None),
        ("TCP", 8000, 8100),
        ("TCP", "http", None),
    ]
    assert spec.egress[0].to[0].ip_block is not None


def test_a_default_deny_policy_is_an_empty_spec_with_no_policy_types() -> None:
    policy = policy_from_object(netpol({"podSelector": {}}))
    assert policy.spec.ingress == () and policy.spec.policy_types is None
    assert policy.spec.pod_selector.match_labels == {}


def test_a_namespace_left_out_means_default() -> None:
    obj = netpol({})
    del obj["metadata"]["namespace"]
    assert policy_from_object(obj).namespace == "default"


@pytest.mark.parametrize(
    ("annotation", "keys"),
    [
        ("macvlan", ("team-a/macvlan",)),
        ("other/net, macvlan", ("other/net", "team-a/macvlan")),
        ("a,a,team-a/a", ("team-a/a",)),
        (" x ,, y ", ("team-a/x", "team-a/y")),
    ],
)
def test_policy_for_names_networks_in_the_policys_namespace_or_qualified(
    annotation: str, keys: tuple[str, ...]
) -> None:
    policy = policy_from_object(mnp(annotation))
    assert policy.kind == "MultiNetworkPolicy"
    assert policy.policy_for == keys


@pytest.mark.parametrize("annotation", [None, "", "  ", ","])
def test_a_multi_network_policy_without_policy_for_is_refused_with_the_fix(
    annotation: str | None,
) -> None:
    with pytest.raises(InvalidConfig) as err:
        policy_from_object(mnp(annotation))
    assert "MultiNetworkPolicy team-a/sec" in err.value.msg
    assert "k8s.v1.cni.cncf.io/policy-for" in err.value.msg
    assert err.value.code == 7


def test_policy_for_with_a_malformed_name_says_how_to_write_it() -> None:
    with pytest.raises(InvalidConfig, match=r"'a/b/c'.*'namespace/name'"):
        policy_from_object(mnp("a/b/c"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"spec": {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Is"}]}}},
            "NetworkPolicy team-a/web: spec.podSelector.matchExpressions.0.operator",
        ),
        (
            {"spec": {"ingress": [{"ports": [{"protocol": "ICMP", "port": 1}]}]}},
            "NetworkPolicy team-a/web: spec.ingress.0.ports.0.protocol",
        ),
        ({"spec": ["not", "a", "map"]}, "NetworkPolicy team-a/web: spec is not an object"),
        ({"apiVersion": "networking.k8s.io/v1beta1"}, "apiVersion 'networking.k8s.io/v1beta1'"),
        ({"kind": "Service"}, "kind 'Service' is not a networking.k8s.io/v1 NetworkPolicy"),
        ({"metadata": {"namespace": "x"}}, "metadata.name is missing"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_object_and_the_field(
    change: dict[str, Any], message: str
) -> None:
    obj = {**netpol({}), **change}
    with pytest.raises(InvalidConfig) as err:
        policy_from_object(obj)
    assert message in err.value.msg


def test_a_namespace_has_its_labels_and_annotations() -> None:
    ns = namespace_from_object(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": "team-a",
                "labels": {"kubernetes.io/metadata.name": "team-a", "team": "a"},
                "annotations": {"plexus.dev/isolation": "namespace"},
            },
        }
    )
    assert ns.name == "team-a"
    assert ns.labels["team"] == "a"
    assert ns.annotations == {"plexus.dev/isolation": "namespace"}


def test_a_label_that_is_not_a_string_is_refused() -> None:
    with pytest.raises(InvalidConfig, match=r"Namespace team-a: metadata.labels\['n'\]"):
        namespace_from_object(
            {"kind": "Namespace", "metadata": {"name": "team-a", "labels": {"n": 1}}}
        )


def pod(annotations: dict[str, str] | None = None, **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web-0",
            "namespace": "team-a",
            "uid": "u-1",
            "labels": {"app": "web"},
            "annotations": annotations or {},
        },
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "ports": [
                        {"name": "http", "containerPort": 8080},
                        {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                        {"containerPort": 9999},
                    ],
                },
                {"name": "side"},
            ]
        },
        "status": status,
    }


STATUS = [
    {"name": "plexus-routed", "interface": "eth0", "ips": ["10.244.1.5"], "default": True},
    {"name": "team-a/macvlan", "interface": "net1", "ips": ["192.168.1.5", "fd00::5"]},
    {"name": "kube-system/sriov", "device-info": {"type": "pci"}},  # no netdev in the pod
]


def test_a_pod_has_its_labels_named_ports_and_addresses_per_network() -> None:
    got = pod_from_object(
        pod(
            {"k8s.v1.cni.cncf.io/network-status": json.dumps(STATUS)},
            podIPs=[{"ip": "10.244.1.5"}, {"ip": "fd10::5"}],
        )
    )
    assert (got.key, got.uid, got.labels) == ("team-a/web-0", "u-1", {"app": "web"})
    assert got.netns == ""
    assert got.named_ports == (
        ContainerPort(name="http", protocol="TCP", port=8080),
        ContainerPort(name="dns", protocol="UDP", port=53),
    )
    assert got.interfaces == (
        PodInterface(
            ifname="eth0",
            network="plexus-routed",
            primary=True,
            addresses=("10.244.1.5", "fd10::5"),
        ),
        PodInterface(
            ifname="net1",
            network="team-a/macvlan",
            primary=False,
            addresses=("192.168.1.5", "fd00::5"),
        ),
    )


def test_a_pod_without_network_status_has_its_pod_ips_on_eth0() -> None:
    got = pod_from_object(pod(podIP="10.244.1.5"))
    assert got.interfaces == (
        PodInterface(ifname="eth0", network="", primary=True, addresses=("10.244.1.5",)),
    )


def test_a_pending_pod_has_no_interface_yet() -> None:
    assert pod_from_object(pod()).interfaces == ()


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        ("[{", "network-status is not JSON"),
        ('{"name": "x"}', "network-status is not a list"),
        ('[{"interface": "net1"}]', "network-status[0] has no network name"),
        ('[{"name": "a/b", "interface": "net1", "ips": ["nope"]}]', "holds 'nope'"),
    ],
)
def test_a_pod_with_a_broken_network_status_is_refused_naming_it(
    annotation: str, message: str
) -> None:
    with pytest.raises(InvalidConfig) as err:
        pod_from_object(pod({"k8s.v1.cni.cncf.io/network-status": annotation}))
    assert err.value.msg.startswith("Pod team-a/web-0: ")
    assert message in err.value.msg


def test_a_named_port_with_a_bad_number_names_the_container_port() -> None:
    obj = pod()
    obj["spec"]["containers"][0]["ports"] = [{"name": "http", "containerPort": "x"}]
    with pytest.raises(InvalidConfig, match=r"spec.containers\[0\].ports\[0\].port"):
        pod_from_object(obj)


# ---- whatever an object holds, the answer is a model or InvalidConfig, never a crash -----------

_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
_keys = st.sampled_from(
    ["podSelector", "ingress", "egress", "policyTypes", "from", "to", "ports", "ipBlock",
     "matchLabels", "matchExpressions", "port", "endPort", "protocol", "cidr", "except",
     "containers", "name", "containerPort", "podIPs", "podIP", "ip", "interface", "ips",
     "default", "key", "operator", "values"]
)  # fmt: skip
_specs = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=16,
)


@settings(max_examples=300, deadline=None)
@given(spec=_specs, meta=_json, annotation=_json)
def test_fuzz_any_policy_object_is_a_model_or_invalid_config(
    spec: Any, meta: Any, annotation: Any
) -> None:
    for obj in (
        {**netpol({}), "spec": spec},
        {**mnp(json.dumps(annotation)), "spec": spec},
        {**mnp("net"), "metadata": meta},
    ):
        with contextlib.suppress(InvalidConfig):
            policy_from_object(obj)


_pod_specs = _specs | st.fixed_dictionaries(
    {"containers": st.lists(_specs | st.fixed_dictionaries({"ports": _specs}), max_size=2)}
)
_pod_statuses = _specs | st.fixed_dictionaries({"podIPs": _specs, "podIP": _scalars})
_network_status = _specs | st.lists(
    st.fixed_dictionaries(
        {"name": _scalars, "interface": _scalars, "ips": _specs, "default": _scalars}
    ),
    max_size=2,
)


@settings(max_examples=300, deadline=None)
@given(status=_network_status, pod_spec=_pod_specs, pod_status=_pod_statuses)
def test_fuzz_any_pod_object_is_a_model_or_invalid_config(
    status: Any, pod_spec: Any, pod_status: Any
) -> None:
    for obj in (
        pod({"k8s.v1.cni.cncf.io/network-status": json.dumps(status)}),
        {**pod(), "spec": pod_spec, "status": pod_status},
    ):
        with contextlib.suppress(InvalidConfig):
            pod_from_object(obj)
