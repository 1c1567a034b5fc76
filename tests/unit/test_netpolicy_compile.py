"""The compiler, one upstream rule at a time (what a user would read in `plexusctl policy`: which
interface and direction is isolated, by which policies, and what is let through), then as a
whole: for generated policies, what the compiled rules let through equals what the independent
reference (tests/support/policy_semantics.py) says, pair by pair."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netpolicy.compile import compile_world, ip_block_nets, isolation_policies, policy_types
from netpolicy.model import (
    APP_LABEL,
    ISOLATION_ANNOTATION,
    Allow,
    ContainerPort,
    DirectionRules,
    IPBlock,
    Namespace,
    Pod,
    PodInterface,
    PodRules,
    Policy,
    PolicyWorld,
    PortRange,
)
from netpolicy.nft import render
from tests.support.policy_semantics import allowed

SEC = "default/sec"


def pod(
    ns: str,
    name: str,
    n: int,
    labels: dict[str, str] | None = None,
    *,
    local: bool = True,
    ports: tuple[ContainerPort, ...] = (),
    secondary: str | None = SEC,
) -> Pod:
    ifaces = [
        PodInterface(
            ifname="eth0", network="cluster", primary=True, addresses=(f"10.0.0.{n}", f"fd00::{n}")
        )
    ]
    if secondary:
        ifaces.append(
            PodInterface(
                ifname="net1",
                network=secondary,
                primary=False,
                addresses=(f"10.1.0.{n}", f"fd01::{n}"),
            )
        )
    return Pod(
        namespace=ns,
        name=name,
        labels=labels or {},
        interfaces=tuple(ifaces),
        named_ports=ports,
        netns=f"/run/netns/{name}" if local else "",
    )


def policy(
    ns: str, name: str, spec: dict[str, Any], kind: str = "NetworkPolicy", **kw: Any
) -> Policy:
    return Policy.model_validate({"kind": kind, "namespace": ns, "name": name, "spec": spec, **kw})


A = pod("alpha", "a", 1, {"app": "web"}, ports=(ContainerPort(name="http", port=8080),))
B = pod("alpha", "b", 2, {"app": "db"}, ports=(ContainerPort(name="http", port=8081),))
C = pod("beta", "c", 3, {"app": "web"}, local=False, ports=(ContainerPort(name="http", port=9000),))
NAMESPACES = {
    "alpha": Namespace(name="alpha", labels={"team": "a"}),
    "beta": Namespace(name="beta", labels={"team": "b"}),
}


def compiled(
    *policies: Policy, pods: tuple[Pod, ...] = (A, B, C), **kw: Any
) -> dict[str, PodRules]:
    world = PolicyWorld(policies=policies, namespaces=NAMESPACES, pods=pods, **kw)
    return compile_world(world)


def eth0(rules: dict[str, PodRules], key: str) -> Any:
    return next(i for i in rules[key].interfaces if i.ifname == "eth0")


def net1(rules: dict[str, PodRules], key: str) -> Any:
    return next(i for i in rules[key].interfaces if i.ifname == "net1")


def test_no_policy_no_enforcement_and_only_local_pods() -> None:
    rules = compiled()
    assert sorted(rules) == ["alpha/a", "alpha/b"]  # beta/c has no netns here
    assert not any(r.enforcing for r in rules.values())
    assert render(rules["alpha/a"]).count("table inet plexus_policy") == 2  # the removal only


def test_a_policy_with_no_rules_is_a_default_deny_of_its_namespace_only() -> None:
    rules = compiled(policy("alpha", "deny", {"podSelector": {}}))
    for key in ("alpha/a", "alpha/b"):
        i = eth0(rules, key)
        assert i.ingress == DirectionRules(
            isolated=True, allows=(), selected_by=("NetworkPolicy:alpha/deny",)
        )
        assert not i.egress.isolated  # policyTypes defaulted to Ingress only
        assert not net1(rules, key).ingress.isolated  # NetworkPolicy: the primary only
    other = compiled(policy("beta", "deny", {"podSelector": {}}))
    assert not any(r.enforcing for r in other.values())


@pytest.mark.parametrize(
    ("spec", "types"),
    [
        ({}, ("Ingress",)),
        ({"egress": [{}]}, ("Ingress", "Egress")),
        ({"policyTypes": ["Egress"]}, ("Egress",)),
        ({"policyTypes": [], "egress": [{}]}, ("Ingress", "Egress")),
        ({"policyTypes": ["Egress"], "ingress": [{}]}, ("Egress",)),
    ],
)
def test_policy_types_defaulting(spec: dict[str, Any], types: tuple[str, ...]) -> None:
    assert policy_types(policy("alpha", "p", spec).spec) == types


def test_pod_selector_picks_pods_and_peers_in_the_policys_namespace() -> None:
    p = policy(
        "alpha",
        "web",
        {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"podSelector": {}}]}],
        },
    )
    rules = compiled(p)
    assert not eth0(rules, "alpha/b").ingress.isolated
    (allow,) = eth0(rules, "alpha/a").ingress.allows
    # both alpha pods, never beta/c (same labels, other namespace)
    assert allow == Allow(
        cidrs=("10.0.0.1/32", "10.0.0.2/32", "fd00::1/128", "fd00::2/128"),
        ports=None,
        by=("NetworkPolicy:alpha/web",),
    )


def test_empty_from_and_empty_ports_mean_everything() -> None:
    rules = compiled(policy("alpha", "all", {"podSelector": {}, "ingress": [{}]}))
    assert eth0(rules, "alpha/a").ingress.allows == (
        Allow(cidrs=None, ports=None, by=("NetworkPolicy:alpha/all",)),
    )


def test_namespace_selector_alone_and_with_a_pod_selector() -> None:
    by_team = {"namespaceSelector": {"matchLabels": {"team": "b"}}}
    rules = compiled(policy("alpha", "ns", {"podSelector": {}, "ingress": [{"from": [by_team]}]}))
    assert eth0(rules, "alpha/a").ingress.allows[0].cidrs == ("10.0.0.3/32", "fd00::3/128")
    # the automatic name label selects a namespace with no labels of its own
    by_name = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "alpha"}}}
    both = {**by_name, "podSelector": {"matchLabels": {"app": "db"}}}
    rules = compiled(policy("alpha", "both", {"podSelector": {}, "ingress": [{"from": [both]}]}))
    assert eth0(rules, "alpha/a").ingress.allows[0].cidrs == ("10.0.0.2/32", "fd00::2/128")


def test_a_rule_whose_peers_select_nobody_allows_nothing() -> None:
    nobody = {"podSelector": {"matchLabels": {"app": "nope"}}}
    rules = compiled(policy("alpha", "p", {"podSelector": {}, "ingress": [{"from": [nobody]}]}))
    assert eth0(rules, "alpha/a").ingress == DirectionRules(
        isolated=True, selected_by=("NetworkPolicy:alpha/p",)
    )


def test_ip_block_except_is_subtracted_into_prefixes() -> None:
    from netpolicy.compile import collapse

    block = IPBlock.model_validate(
        {"cidr": "10.0.0.0/24", "except": ["10.0.0.64/26", "10.0.0.7/32"]}
    )
    assert collapse(ip_block_nets(block)) == (
        "10.0.0.0/30",
        "10.0.0.4/31",
        "10.0.0.6/32",
        "10.0.0.8/29",
        "10.0.0.16/28",
        "10.0.0.32/27",
        "10.0.0.128/25",
    )
    v6 = IPBlock.model_validate({"cidr": "fd00::/64", "except": ["fd00::/65", "10.0.0.0/8"]})
    assert collapse(ip_block_nets(v6)) == ("fd00::8000:0:0:0/65",)
    everything_excepted = IPBlock.model_validate({"cidr": "10.0.0.0/24", "except": ["10.0.0.0/16"]})
    assert ip_block_nets(everything_excepted) == frozenset()
    assert collapse(ip_block_nets(IPBlock(cidr="10.0.0.5/24"))) == ("10.0.0.0/24",)


def test_ports_ranges_protocols_and_merging() -> None:
    ports = [
        {"port": 80},
        {"port": 81, "endPort": 90},
        {"port": 85},
        {"protocol": "UDP", "port": 53},
        {"protocol": "SCTP"},
    ]
    rules = compiled(policy("alpha", "p", {"podSelector": {}, "ingress": [{"ports": ports}]}))
    (allow,) = eth0(rules, "alpha/a").ingress.allows
    assert allow.cidrs is None
    assert allow.ports == (
        PortRange(protocol="SCTP", first=0, last=65535),
        PortRange(protocol="TCP", first=80, last=90),
        PortRange(protocol="UDP", first=53, last=53),
    )


def test_named_ports_ingress_resolve_on_the_selected_pod_itself() -> None:
    ports = [{"port": "http"}, {"port": "nosuch"}, {"protocol": "UDP", "port": "http"}]
    rules = compiled(policy("alpha", "p", {"podSelector": {}, "ingress": [{"ports": ports}]}))
    assert eth0(rules, "alpha/a").ingress.allows[0].ports == (
        PortRange(protocol="TCP", first=8080, last=8080),
    )
    assert eth0(rules, "alpha/b").ingress.allows[0].ports == (
        PortRange(protocol="TCP", first=8081, last=8081),
    )
    # a named port that resolves to nothing matches nothing (not everything)
    none = compiled(
        policy("alpha", "p", {"podSelector": {}, "ingress": [{"ports": [{"port": "nosuch"}]}]})
    )
    assert eth0(none, "alpha/a").ingress.allows == ()


def test_named_ports_egress_expand_per_destination_pod() -> None:
    spec = {
        "podSelector": {"matchLabels": {"app": "db"}},
        "policyTypes": ["Egress"],
        "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": "http"}, {"port": 22}]}],
    }
    egress = eth0(compiled(policy("alpha", "p", spec)), "alpha/b").egress
    by_port = {a.ports[0].first: a.cidrs for a in egress.allows if a.ports}
    assert by_port == {
        22: ("10.0.0.1/32", "10.0.0.2/31", "fd00::1/128", "fd00::2/127"),  # collapsed
        8080: ("10.0.0.1/32", "fd00::1/128"),
        8081: ("10.0.0.2/32", "fd00::2/128"),
        9000: ("10.0.0.3/32", "fd00::3/128"),
    }


def test_allows_add_up_across_policies_and_keep_their_sources() -> None:
    one = policy(
        "alpha",
        "one",
        {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": 80}]}]},
    )
    two = policy(
        "alpha",
        "two",
        {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 80}]}],
        },
    )
    three = policy("alpha", "three", {"podSelector": {}})
    rules = compiled(one, two, three)
    ingress = eth0(rules, "alpha/a").ingress
    assert ingress.selected_by == (
        "NetworkPolicy:alpha/one",
        "NetworkPolicy:alpha/three",
        "NetworkPolicy:alpha/two",
    )
    (allow,) = ingress.allows
    assert allow.by == ("NetworkPolicy:alpha/one", "NetworkPolicy:alpha/two")
    assert allow.cidrs == (
        "10.0.0.1/32",
        "10.0.0.2/31",
        "fd00::1/128",
        "fd00::2/127",
    )
    assert eth0(rules, "alpha/b").ingress.selected_by == (
        "NetworkPolicy:alpha/one",
        "NetworkPolicy:alpha/three",
    )


def test_multi_network_policy_governs_its_networks_with_peers_on_that_network() -> None:
    other = pod("alpha", "d", 4, {"app": "web"}, secondary="default/other")
    mnp = policy(
        "alpha",
        "m",
        {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]},
        kind="MultiNetworkPolicy",
        policy_for=("sec",),  # a bare name: the policy's namespace
    )
    assert not any(r.enforcing for r in compiled(mnp, pods=(A, B, C, other)).values())
    mnp = mnp.model_copy(update={"policy_for": (SEC,)})
    rules = compiled(mnp, pods=(A, B, C, other))
    assert not eth0(rules, "alpha/a").ingress.isolated
    assert not net1(rules, "alpha/d").ingress.isolated  # on default/other
    assert net1(rules, "alpha/a").ingress.allows[0].cidrs == (
        "10.1.0.1/32",
        "10.1.0.2/31",
        "fd01::1/128",
        "fd01::2/127",
    )  # peers by their default/sec addresses: never alpha/d's, never a primary address
    assert net1(rules, "alpha/a").trusted_sources == ()


def test_the_node_is_trusted_on_the_primary_only() -> None:
    rules = compiled(policy("alpha", "deny", {"podSelector": {}}), node_addresses=("192.0.2.1",))
    assert eth0(rules, "alpha/a").trusted_sources == ("192.0.2.1",)
    assert net1(rules, "alpha/a").trusted_sources == ()


def test_namespace_isolation_mode() -> None:
    namespaces = {
        **NAMESPACES,
        "alpha": Namespace(name="alpha", annotations={ISOLATION_ANNOTATION: "namespace"}),
    }
    world = PolicyWorld(namespaces=namespaces, pods=(A, B, C))
    (iso,) = isolation_policies(world)
    assert iso.ref == "Isolation:alpha/namespace"
    rules = compile_world(world)
    for iface in ("eth0", "net1"):
        i = next(x for x in rules["alpha/a"].interfaces if x.ifname == iface)
        assert i.ingress.selected_by == ("Isolation:alpha/namespace",)
        assert not i.egress.isolated
        n = "0" if iface == "eth0" else "1"
        assert i.ingress.allows[0].cidrs == (
            f"10.{n}.0.1/32",
            f"10.{n}.0.2/32",
            f"fd0{n}::1/128",
            f"fd0{n}::2/128",
        )


def test_app_isolation_mode_spans_namespaces() -> None:
    a = A.model_copy(update={"labels": {APP_LABEL: "shop"}})
    c = C.model_copy(update={"labels": {APP_LABEL: "shop"}})
    b = B.model_copy(update={"labels": {APP_LABEL: "blog"}})
    rules = compile_world(PolicyWorld(namespaces=NAMESPACES, pods=(a, b, c)))
    ingress = eth0(rules, "alpha/a").ingress
    assert ingress.selected_by == ("Isolation:alpha/app=shop",)
    assert ingress.allows[0].cidrs == ("10.0.0.1/32", "10.0.0.3/32", "fd00::1/128", "fd00::3/128")
    assert eth0(rules, "alpha/b").ingress.allows[0].cidrs == ("10.0.0.2/32", "fd00::2/128")


def test_output_is_deterministic_whatever_the_input_order() -> None:
    policies = [
        policy(
            "alpha",
            f"p{n}",
            {
                "podSelector": {},
                "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 80 + n}]}],
            },
        )
        for n in range(5)
    ]
    pods = [A, B, C, pod("beta", "e", 5), pod("alpha", "f", 6, {"app": "web"})]
    first = compiled(*policies, pods=tuple(pods))
    rng = random.Random(3)
    for _ in range(3):
        rng.shuffle(policies)
        rng.shuffle(pods)
        again = compiled(*policies, pods=tuple(pods))
        assert list(again) == list(first)
        assert [render(r) for r in again.values()] == [render(r) for r in first.values()]


# ---- the compiled rules against the reference ----------------------------------------------


def _side(d: DirectionRules, ip: str, proto: str, port: int, trusted: tuple[str, ...] = ()) -> bool:
    import ipaddress

    if not d.isolated or ip in trusted:
        return True
    addr = ipaddress.ip_address(ip)
    for a in d.allows:
        ok_addr = a.cidrs is None or any(
            addr in ipaddress.ip_network(c)
            for c in a.cidrs
            if ipaddress.ip_network(c).version == addr.version
        )
        ok_port = a.ports is None or any(
            p.protocol == proto and p.first <= port <= p.last for p in a.ports
        )
        if ok_addr and ok_port:
            return True
    return False


def _compiled_allows(
    rules: dict[str, PodRules],
    *,
    src: Pod,
    dst: Pod,
    ifname: str,
    proto: str,
    port: int,
    family: int,
) -> bool:
    dst_iface = next(i for i in dst.interfaces if i.ifname == ifname)
    src_iface = next(
        i
        for i in src.interfaces
        if (i.primary and dst_iface.primary)
        or (not i.primary and not dst_iface.primary and i.network == dst_iface.network)
    )
    pick = lambda addrs: next(a for a in addrs if (":" in a) == (family == 6))  # noqa: E731
    src_ip, dst_ip = pick(src_iface.addresses), pick(dst_iface.addresses)
    out = next(i for i in rules[src.key].interfaces if i.ifname == src_iface.ifname).egress
    inn = next(i for i in rules[dst.key].interfaces if i.ifname == ifname)
    return _side(out, dst_ip, proto, port) and _side(
        inn.ingress, src_ip, proto, port, inn.trusted_sources
    )


LABEL_POOL = [("app", "web"), ("app", "db"), ("tier", "x")]
sel_st = st.one_of(
    st.just({}),
    st.sampled_from(LABEL_POOL).map(lambda kv: {"matchLabels": {kv[0]: kv[1]}}),
    st.tuples(
        st.sampled_from(LABEL_POOL), st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"])
    ).map(
        lambda t: {
            "matchExpressions": [
                {
                    "key": t[0][0],
                    "operator": t[1],
                    **({"values": [t[0][1]]} if t[1] in ("In", "NotIn") else {}),
                }
            ]
        }
    ),
)
ns_sel_st = st.one_of(
    st.just({}), st.sampled_from(["a", "b"]).map(lambda t: {"matchLabels": {"team": t}})
)
peer_st = st.one_of(
    sel_st.map(lambda s: {"podSelector": s}),
    ns_sel_st.map(lambda s: {"namespaceSelector": s}),
    st.tuples(ns_sel_st, sel_st).map(lambda t: {"namespaceSelector": t[0], "podSelector": t[1]}),
    st.sampled_from(
        [
            {"ipBlock": {"cidr": "10.0.0.0/30", "except": ["10.0.0.2/32"]}},
            {"ipBlock": {"cidr": "fd00::/124", "except": ["fd00::1/128"]}},
            {"ipBlock": {"cidr": "10.1.0.0/24"}},
        ]
    ),
)
port_st = st.sampled_from(
    [
        {"port": 80},
        {"port": 80, "endPort": 8080},
        {"port": "http"},
        {"protocol": "UDP", "port": 53},
        {"protocol": "UDP"},
    ]
)
rule_st = st.fixed_dictionaries(
    {},
    optional={
        "peers": st.lists(peer_st, min_size=1, max_size=2),
        "ports": st.lists(port_st, min_size=1, max_size=2),
    },
)


@st.composite
def policy_st(draw: st.DrawFn, n: int) -> Policy:
    spec: dict[str, Any] = {"podSelector": draw(sel_st)}
    for direction, key in (("ingress", "from"), ("egress", "to")):
        rules = draw(st.lists(rule_st, max_size=2))
        if rules:
            spec[direction] = [
                {
                    **({key: r["peers"]} if "peers" in r else {}),
                    **({"ports": r["ports"]} if "ports" in r else {}),
                }
                for r in rules
            ]
    types = draw(st.sampled_from([None, ["Ingress"], ["Egress"], ["Ingress", "Egress"]]))
    if types:
        spec["policyTypes"] = types
    kind = draw(st.sampled_from(["NetworkPolicy", "NetworkPolicy", "MultiNetworkPolicy"]))
    extra = {"policy_for": (SEC,)} if kind == "MultiNetworkPolicy" else {}
    return policy(draw(st.sampled_from(["alpha", "beta"])), f"p{n}", spec, kind=kind, **extra)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_compiled_rules_agree_with_the_reference(data: st.DataObject) -> None:
    policies = tuple(data.draw(policy_st(n)) for n in range(data.draw(st.integers(1, 3))))
    pods = (
        pod("alpha", "a", 1, {"app": "web"}, ports=(ContainerPort(name="http", port=8080),)),
        pod(
            "alpha",
            "b",
            2,
            {"app": "db", "tier": "x"},
            ports=(ContainerPort(name="http", port=80),),
        ),
        pod("beta", "c", 3, {"app": "web"}),
    )
    world = PolicyWorld(
        policies=policies, namespaces=NAMESPACES, pods=pods, node_addresses=("10.0.0.254",)
    )
    rules = compile_world(world)
    for src, dst in itertools.permutations(pods, 2):
        for ifname, family, (proto, port) in itertools.product(
            ("eth0", "net1"),
            (4, 6),
            (("TCP", 80), ("TCP", 8080), ("TCP", 443), ("UDP", 53), ("SCTP", 80)),
        ):
            want = allowed(world, src, dst, ifname, proto, port, family=family)
            got = _compiled_allows(
                rules, src=src, dst=dst, ifname=ifname, proto=proto, port=port, family=family
            )
            assert got == want, (src.key, dst.key, ifname, family, proto, port)
    for dst in pods:
        assert allowed(world, "10.0.0.254", dst, "eth0", "TCP", 443)
        assert _side(
            eth0(rules, dst.key).ingress,
            "10.0.0.254",
            "TCP",
            443,
            eth0(rules, dst.key).trusted_sources,
        )


def test_malformed_addresses_and_blocks_are_skipped_not_fatal() -> None:
    odd = Pod(
        namespace="alpha",
        name="odd",
        interfaces=(
            PodInterface(
                ifname="eth0",
                network="cluster",
                primary=True,
                addresses=("10.0.0.9", "not-an-ip", "fe80::1%eth0", "10.0.0.300", "fd00::9/64"),
            ),
        ),
    )
    peers = [{"podSelector": {}}, {"ipBlock": {"cidr": "bogus"}}]
    rules = compiled(
        policy("alpha", "p", {"podSelector": {}, "ingress": [{"from": peers}]}), pods=(A, odd)
    )
    assert eth0(rules, "alpha/a").ingress.allows[0].cidrs == (
        "10.0.0.1/32",
        "10.0.0.9/32",
        "fd00::1/128",
        "fd00::9/128",
    )
