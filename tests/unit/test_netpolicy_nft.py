"""The nft script for one pod: the table replaced in one transaction, the hook order the design
fixes (established, invalid, loopback, neighbour discovery, then per isolated interface), only
isolated interfaces and directions touched, counter names valid and reversible for any Linux
interface name, drop counters read back from `nft -j` output. (That nft accepts every script is
checked against the kernel in tests/netns/test_policy_truth.py.)"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from netpolicy.model import Allow, DirectionRules, InterfaceRules, PodRules, PortRange
from netpolicy.nft import (
    TABLE,
    drop_counter_name,
    parse_drop_counters,
    removal_script,
    render,
)

NFT_IDENTIFIER = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
ISOLATED_IN = DirectionRules(
    isolated=True,
    selected_by=("NetworkPolicy:a/p",),
    allows=(
        Allow(
            cidrs=("10.0.0.0/24", "fd00::/64"),
            ports=(
                PortRange(protocol="TCP", first=80, last=90),
                PortRange(protocol="TCP", first=443, last=443),
                PortRange(protocol="UDP", first=53, last=53),
            ),
            by=("NetworkPolicy:a/p",),
        ),
        Allow(cidrs=None, ports=(PortRange(protocol="SCTP", first=0, last=65535),), by=("x",)),
    ),
)


def rules(*ifaces: InterfaceRules) -> PodRules:
    return PodRules(pod="a/p", netns="/run/netns/p", interfaces=ifaces)


def test_not_enforcing_renders_only_the_removal() -> None:
    open_pod = rules(InterfaceRules(ifname="eth0", network="cluster", primary=True))
    assert render(open_pod) == removal_script()
    assert removal_script() == f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\n"


def test_the_whole_table_in_order() -> None:
    script = render(
        rules(
            InterfaceRules(
                ifname="eth0",
                network="cluster",
                primary=True,
                ingress=ISOLATED_IN,
                trusted_sources=("192.0.2.1", "2001:db8::1"),
            ),
            InterfaceRules(ifname="net1", network="a/sec", primary=False),  # open: untouched
        )
    )
    assert script.startswith(removal_script() + f"table inet {TABLE} {{")
    lines = [line.strip() for line in script.splitlines()]
    base = lines.index("chain pod_in {")
    assert lines[base + 1 : base + 8] == [
        "type filter hook input priority filter; policy accept;",
        "ct state established,related accept",
        "ct state invalid drop",
        'iifname "lo" accept',
        "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, "
        "nd-router-advert } accept",
        'iifname "eth0" jump in_eth0',
        "}",
    ]
    chain = lines.index("chain in_eth0 {")
    assert lines[chain + 1 : chain + 3] == [
        "ip saddr { 192.0.2.1 } accept",
        "ip6 saddr { 2001:db8::1 } accept",
    ]
    assert "ip saddr @in_eth0_0_ip meta l4proto tcp th dport { 80-90, 443 } accept" in script
    assert "ip6 saddr @in_eth0_0_ip6 meta l4proto udp th dport 53 accept" in script
    assert 'meta l4proto sctp accept comment "x"' in script
    assert "counter name drop_in_eth0 drop" in script
    assert "net1" not in script and "pod_out" not in script and "hook output" not in script


def test_default_deny_egress_on_a_secondary() -> None:
    deny = DirectionRules(isolated=True, selected_by=("MultiNetworkPolicy:a/m",))
    script = render(
        rules(InterfaceRules(ifname="net1", network="a/sec", primary=False, egress=deny))
    )
    assert "hook output" in script and "hook input" not in script
    assert 'oifname "net1" jump out_net1' in script
    chain = script[script.index("chain out_net1 {") :]
    assert chain.splitlines()[1].strip() == "counter name drop_out_net1 drop"


def test_the_same_rules_render_the_same_script() -> None:
    one = rules(InterfaceRules(ifname="eth0", network="c", primary=True, ingress=ISOLATED_IN))
    assert render(one) == render(one.model_copy(deep=True))


IFNAMES = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF, blacklist_characters="/:"),
    min_size=1,
    max_size=15,
).filter(lambda s: len(s.encode()) <= 15)


@settings(max_examples=300, deadline=None)
@given(a=IFNAMES, b=IFNAMES)
def test_counter_names_are_identifiers_unique_and_reversible(a: str, b: str) -> None:
    for direction in ("ingress", "egress"):
        name = drop_counter_name(a, direction)
        assert NFT_IDENTIFIER.match(name), name
        assert len(name) < 64
        parsed = parse_drop_counters(
            {"nftables": [{"counter": {"name": name, "table": TABLE, "packets": 3}}]}
        )
        assert parsed == {(a, direction): 3}
    if a != b:
        assert drop_counter_name(a, "ingress") != drop_counter_name(b, "ingress")
    assert drop_counter_name(a, "ingress") != drop_counter_name(a, "egress")


def test_parse_drop_counters_from_nft_json() -> None:
    listing = {
        "nftables": [
            {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"table": {"family": "inet", "name": TABLE, "handle": 5}},
            {
                "counter": {
                    "family": "inet",
                    "name": "drop_in_eth0",
                    "table": TABLE,
                    "handle": 6,
                    "packets": 7,
                    "bytes": 420,
                }
            },
            {
                "counter": {
                    "family": "inet",
                    "name": "drop_out_net1_2dx",
                    "table": TABLE,
                    "handle": 7,
                    "packets": 0,
                    "bytes": 0,
                }
            },
            {"counter": {"family": "inet", "name": "other", "table": TABLE, "packets": 9}},
            {"counter": {"family": "inet", "name": "drop_in_eth0", "table": "x", "packets": 9}},
            {"chain": {"family": "inet", "table": TABLE, "name": "pod_in"}},
        ]
    }
    assert parse_drop_counters(listing) == {("eth0", "ingress"): 7, ("net1-x", "egress"): 0}
    assert parse_drop_counters({}) == {}


def test_an_interface_name_nft_cannot_match_exactly_is_refused() -> None:
    deny = DirectionRules(isolated=True, selected_by=("x",))
    for bad in ('ne"t', "net*"):
        pod = rules(InterfaceRules(ifname=bad, network="n", primary=False, ingress=deny))
        try:
            render(pod)
        except ValueError as exc:
            assert "cannot be matched exactly" in str(exc)
        else:
            raise AssertionError(f"{bad!r} rendered")
    # a `*` elsewhere is an ordinary character for nft
    assert '"n*t"' in render(
        rules(InterfaceRules(ifname="n*t", network="n", primary=False, ingress=deny))
    )


def test_comments_carry_printable_refs_only() -> None:
    allow = Allow(by=("NetworkPolicy:a/" + "x" * 200, 'b"\x00\u00e9'))
    deny = DirectionRules(isolated=True, allows=(allow,), selected_by=("x",))
    script = render(rules(InterfaceRules(ifname="eth0", network="n", primary=True, ingress=deny)))
    comment = re.search(r'comment "([^"]*)"', script)
    assert comment is not None
    assert len(comment.group(1)) == 120 and comment.group(1).endswith("...")
    assert comment.group(1).isascii() and comment.group(1).isprintable()
