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
        ("a/b/c", "[namespace/]name[@interface]"),
        ("net-a@", "empty interface name"),
        ("net-a@this-is-far-too-long", "legal interface name"),
        ("net_a", "DNS-1123"),
    ],
)
def test_short_form_errors_name_the_item(value: str, fragment: str) -> None:
    with pytest.raises(InvalidConfig) as err:
        parse_networks(value)
    assert err.value.code == 7
    assert fragment in err.value.msg
    assert "k8s.v1.cni.cncf.io/networks" in err.value.msg


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
        ({"name": "n", "ips": ["10.0.0.1"], "ipam-claim-reference": "c"}, "cannot be combined"),
        ({"name": "n", "colour": "blue"}, "unknown key(s) colour"),
        ({"name": "n", "default_route": []}, "unknown key(s) default_route"),
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
