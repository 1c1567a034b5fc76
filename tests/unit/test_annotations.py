from __future__ import annotations

import json

import pytest

from cnispec.annotations import parse_default_network, parse_networks
from cnispec.errors import InvalidConfig


def test_short_form_all_shapes() -> None:
    got = parse_networks("net-a, other/net-b@data0 ,net-c@x, ns2/net-d")
    assert [(s.namespace, s.name, s.requested_ifname) for s in got] == [
        (None, "net-a", None),
        ("other", "net-b", "data0"),
        (None, "net-c", "x"),
        ("ns2", "net-d", None),
    ]


def test_empty_annotation_asks_for_nothing() -> None:
    assert parse_networks(None) == []
    assert parse_networks("  ") == []


def test_same_network_twice_is_two_selections() -> None:
    assert [s.name for s in parse_networks("net-a,net-a")] == ["net-a", "net-a"]


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("Net-A", "DNS-1123"),
        ("net-a,,net-b", "empty network name"),
        ("a/b/c", "more than one '/'"),
        ("net-a@this-is-far-too-long", "legal interface name"),
        ("net_a", "DNS-1123"),
        ("ns/", "empty network name"),
        ("@data0", "empty network name"),
        ("ns/net-a@da ta0", "legal interface name"),
        ("net.a", "the JSON form selects a NAD whose name has '.'"),
        ("n" * 254, "at most 253"),
        ("a" * 64 + "/net-a", "at most 63"),
    ],
)
def test_short_form_errors_name_the_item(value: str, fragment: str) -> None:
    with pytest.raises(InvalidConfig) as err:
        parse_networks(value)
    assert err.value.code == 7
    assert fragment in err.value.msg
    assert "k8s.v1.cni.cncf.io/networks" in err.value.msg


def test_a_second_at_sign_is_refused_naming_the_item() -> None:
    # Multus refuses it; Plexus used to make an interface literally named "if1@if2".
    with pytest.raises(InvalidConfig) as err:
        parse_networks("net-a, net1@if1@if2")
    assert err.value.code == 7
    assert "item 1 ('net1@if1@if2')" in err.value.msg
    assert "more than one '@'" in err.value.msg


def test_short_form_parts_are_trimmed_as_multus_trims_them() -> None:
    got = parse_networks(" ns2 / net-a @ data0 ,\tnet-b\n")
    assert [(s.namespace, s.name, s.requested_ifname) for s in got] == [
        ("ns2", "net-a", "data0"),
        (None, "net-b", None),
    ]


def test_short_form_empty_namespace_and_interface_ask_for_nothing() -> None:
    # As in Multus: "/net" is the pod's namespace, "net@" gets the next netN name.
    got = parse_networks("/net-a, net-b@, net-c@ ")
    assert [(s.namespace, s.name, s.requested_ifname) for s in got] == [
        (None, "net-a", None),
        (None, "net-b", None),
        (None, "net-c", None),
    ]


def test_a_network_name_may_be_longer_than_a_label() -> None:
    # NPWG only recommends 63; Kubernetes allows object names up to 253.
    (sel,) = parse_networks("n" * 100)
    assert sel.name == "n" * 100


def test_the_json_form_names_any_nad_kubernetes_allows() -> None:
    # A NAD may be called "net.v2" (a DNS-1123 subdomain); Multus's JSON form selects it.
    (sel,) = parse_networks(json.dumps([{"name": "net.v2", "namespace": "team-a"}]))
    assert sel.reference("x") == "team-a/net.v2"
    with pytest.raises(InvalidConfig, match="DNS-1123 subdomain"):
        parse_networks(json.dumps([{"name": "net..v2"}]))


def test_json_form_every_key() -> None:
    value = json.dumps(
        [
            {
                "name": "net-a",
                "namespace": "ns1",
                "interface": "data0",
                "ips": ["10.1.0.7/24", "fd00::7"],
                "mac": "0a:58:0a:01:00:07",
                "default-route": ["10.1.0.1"],
                "cni-args": {"foo": "bar"},
                "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "udp"}],
                "bandwidth": {"ingressRate": 1000, "ingressBurst": 2000},
                "infiniband-guid": "c2:11:22:33:44:55:66:77",
                "deviceID": "0000:03:02.3",
                "example.com/vendor-key": {"anything": True},
            },
            {"name": "net-b", "ipam-claim-reference": "claim-1", "interfaceRequest": "legacy0"},
        ]
    )
    a, b = parse_networks(value)
    assert a.requested_ifname == "data0"
    assert a.ips == ["10.1.0.7/24", "fd00::7"]
    assert a.default_route == ["10.1.0.1"]
    assert a.cni_args == {"foo": "bar"}
    assert a.port_mappings is not None
    assert a.port_mappings[0].runtime_config() == {
        "hostPort": 8080,
        "containerPort": 80,
        "protocol": "udp",
    }
    assert a.bandwidth is not None
    assert a.bandwidth.runtime_config() == {"ingressRate": 1000, "ingressBurst": 2000}
    assert a.infiniband_guid == "c2:11:22:33:44:55:66:77"
    assert a.device_id == "0000:03:02.3"
    assert b.ipam_claim_reference == "claim-1"
    assert b.requested_ifname == "legacy0"


@pytest.mark.parametrize(
    ("element", "fragment"),
    [
        ({"namespace": "x"}, "name"),
        ({"name": "n", "ips": ["10.0.0.300"]}, "IPv4/IPv6"),
        ({"name": "n", "mac": "0a:58:0a"}, "6-byte MAC"),
        ({"name": "n", "default-route": ["nope"]}, "IPv4/IPv6"),
        ({"name": "n", "portMappings": [{"hostPort": 0, "containerPort": 80}]}, "hostPort"),
        (
            {
                "name": "n",
                "portMappings": [{"hostPort": 1, "containerPort": 80, "protocol": "ICMP"}],
            },
            "protocol",
        ),
        ({"name": "n", "bandwidth": {"egressBurst": 10}}, "egressBurst needs egressRate"),
        ({"name": "n", "infiniband-guid": "c2:11"}, "8-byte GUID"),
        ({"name": "n", "ips": ["fe80::1%eth0"]}, "IPv4/IPv6"),
        ({"name": "n", "default-route": ["10.1.0.1/24"]}, "no /prefix"),
        ({"name": "n", "mac": "0a:58:0a:00:00:05:06:07"}, "6-byte"),
        ({"name": "n", "mac": "0a:58-0a:00:00:05"}, "6-byte"),
        (
            {"name": "n", "portMappings": [{"hostPort": 1, "containerPort": 2, "hostIP": "::/0"}]},
            "no /prefix",
        ),
        ({"name": "n", "ips": ["10.0.0.1"], "IPs": ["10.0.0.2"]}, "'ips' is given twice"),
        ({"name": "n", "namespace": "Team_A"}, "DNS-1123"),
    ],
)
def test_json_form_errors_name_element_and_key(element: dict, fragment: str) -> None:
    with pytest.raises(InvalidConfig) as err:
        parse_networks(json.dumps([element]))
    assert "element 0" in err.value.msg
    assert fragment in err.value.msg


def test_json_form_must_be_a_list() -> None:
    with pytest.raises(InvalidConfig, match="must be a list"):
        parse_networks('{"name": "net-a"}')
    with pytest.raises(InvalidConfig, match="not valid JSON"):
        parse_networks('[{"name": "net-a"')


def test_default_network_override() -> None:
    assert parse_default_network("kube-system/other") == ("kube-system", "other")
    assert parse_default_network("other") == (None, "other")
    assert parse_default_network(None) is None
    with pytest.raises(InvalidConfig, match="exactly one"):
        parse_default_network("a,b")


def test_unknown_keys_are_ignored_and_reported() -> None:
    # Multus and the NAD client decode with Go's encoding/json, which ignores unknown keys.
    value = json.dumps(
        [
            {
                "name": "net-a",
                "colour": "blue",
                "default_route": ["10.1.0.1"],
                "example.com/vendor-key": {"x": 1},
                "interface": "data0",
            }
        ]
    )
    (sel,) = parse_networks(value)
    assert sel.requested_ifname == "data0"
    assert sel.default_route is None  # "default_route" is not "default-route"
    assert sorted(sel.ignored_keys) == ["colour", "default_route", "example.com/vendor-key"]
    assert sel.respelled_keys == {}


def test_known_keys_are_read_in_any_case_as_go_reads_them() -> None:
    value = json.dumps([{"Name": "net-a", "IPs": ["10.1.0.7/24"], "Interface": "data0"}])
    (sel,) = parse_networks(value)
    assert (sel.name, sel.ips, sel.requested_ifname) == ("net-a", ["10.1.0.7/24"], "data0")
    assert sel.respelled_keys == {"Name": "name", "IPs": "ips", "Interface": "interface"}
    assert sel.ignored_keys == ()
    (pm,) = (
        parse_networks(
            json.dumps([{"name": "n", "portMappings": [{"hostport": 8080, "ContainerPort": 80}]}])
        )[0].port_mappings
        or []
    )
    assert pm.runtime_config() == {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}


def test_empty_namespace_is_the_pods() -> None:
    # NPWG §4.1.2.1.1: missing or empty, the network is in the pod's namespace.
    (sel,) = parse_networks(json.dumps([{"name": "net-a", "namespace": ""}]))
    assert sel.namespace is None
    assert sel.reference("team-a") == "team-a/net-a"


def test_empty_values_ask_for_nothing() -> None:
    element = {
        "name": "net-a",
        "interface": "",
        "interfaceRequest": "",
        "ips": [],
        "mac": "",
        "portMappings": [],
        "bandwidth": {},
        "infiniband-guid": "",
        "deviceID": "",
        "cni-args": {},
    }
    (sel,) = parse_networks(json.dumps([element]))
    assert sel.requested_ifname is None
    assert (sel.ips, sel.mac, sel.port_mappings, sel.bandwidth) == (None, None, None, None)
    assert (sel.infiniband_guid, sel.device_id) == (None, None)
    (keeps,) = parse_networks(json.dumps([{"name": "net-a", "default-route": []}]))
    assert keeps.default_route == []  # an empty default-route list is a request (NPWG)


@pytest.mark.parametrize(
    ("given", "read"),
    [
        ("0A:58:0A:00:00:05", "0a:58:0a:00:00:05"),
        ("0a-58-0a-00-00-05", "0a:58:0a:00:00:05"),
        ("0a58.0a00.0005", "0a:58:0a:00:00:05"),
    ],
)
def test_mac_in_every_notation_multus_reads(given: str, read: str) -> None:
    (sel,) = parse_networks(json.dumps([{"name": "n", "mac": given}]))
    assert sel.mac == read


def test_infiniband_guid_notations() -> None:
    (sel,) = parse_networks(json.dumps([{"name": "n", "infiniband-guid": "c211.2233.4455.6677"}]))
    assert sel.infiniband_guid == "c2:11:22:33:44:55:66:77"


def test_ipam_claim_reference_is_ignored_even_with_ips() -> None:
    # Plexus has no IPAMClaims; v1.3 §4.1.2.1.11 says such an implementation ignores the key,
    # and Multus ignores it too, applying ips.
    value = json.dumps([{"name": "n", "ips": ["10.0.0.1"], "ipam-claim-reference": "claim-1"}])
    (sel,) = parse_networks(value)
    assert sel.ips == ["10.0.0.1"]
    assert sel.ignored_keys == ("ipam-claim-reference",)


@pytest.mark.parametrize(
    "value", ["net1", "default/net1", "net1@my_interface", "default/net1@my_interface"]
)
def test_multus_short_forms_that_parse(value: str) -> None:
    # The cases Multus's own parser test accepts (pkg/k8sclient k8sclient_test.go).
    assert len(parse_networks(value)) == 1


@pytest.mark.parametrize(
    "value",
    [
        "root@someIP/root@someOtherIP/root@thirdIP",
        "root@someIP/root@someOtherIP@garbagevalue",
        "root@someIP/root@someOtherIP",
        "default/net1@myIfc Name",
        "default/net1@very_long_interface_name",
    ],
)
def test_multus_short_forms_that_are_refused(value: str) -> None:
    # ... and those it refuses; Plexus refuses them too, with code 7.
    with pytest.raises(InvalidConfig) as err:
        parse_networks(value)
    assert err.value.code == 7
