"""The in-process static IPAM: config addresses, CNI_ARGS IP/GATEWAY, the args and capability
overrides, validation and CHECK."""

from __future__ import annotations

from typing import Any

import pytest

from cnispec.errors import InvalidConfig
from delegates.ipam import StaticIpam
from delegates.ipam.static import StaticCheckFailed
from delegates.plugin import PluginRequest


def _req(ipam: dict[str, Any], cni_args: str = "", **top: Any) -> PluginRequest:
    config = {"cniVersion": "1.1.0", "name": "s", "ipam": {"type": "static", **ipam}, **top}
    return PluginRequest(container_id="c1", ifname="eth0", cni_args=cni_args, config=config)


def _ips(req: PluginRequest) -> list[tuple[str, str | None]]:
    return [(ip.address, ip.gateway) for ip in StaticIpam().add(req).ips]


CONFIGURED = {
    "addresses": [
        {"address": "10.0.0.5/24", "gateway": "10.0.0.1"},
        {"address": "FD00::5/64"},
    ],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0.1"}],
    "dns": {"nameservers": ["10.0.0.53"], "search": ["example.org"]},
}


def test_add_returns_the_configured_addresses_routes_and_dns() -> None:
    wire = StaticIpam().add(_req(CONFIGURED)).to_wire("1.0.0")
    assert wire == {
        "cniVersion": "1.0.0",
        "ips": [{"address": "10.0.0.5/24", "gateway": "10.0.0.1"}, {"address": "fd00::5/64"}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0.1"}],
        "dns": {"nameservers": ["10.0.0.53"], "search": ["example.org"]},
    }


def test_cni_args_ips_are_appended_and_gateway_applies_only_to_them() -> None:
    args = "IgnoreUnknown=1;IP=10.1.0.5/24,10.2.0.5/24;GATEWAY=10.0.0.254,10.1.0.1"
    assert _ips(_req(CONFIGURED, args)) == [
        ("10.0.0.5/24", "10.0.0.1"),  # the reference leaves configured addresses alone
        ("fd00::5/64", None),
        ("10.1.0.5/24", "10.1.0.1"),
        ("10.2.0.5/24", None),
    ]


def test_args_replace_the_list_and_the_capability_replaces_args() -> None:
    args_only = _req(CONFIGURED, args={"cni": {"ips": ["10.8.0.5/24"]}})
    assert _ips(args_only) == [("10.8.0.5/24", None)]
    both = _req(
        CONFIGURED,
        "IP=10.1.0.5/24",
        args={"cni": {"ips": ["10.8.0.5/24"]}},
        runtimeConfig={"ips": ["10.7.0.5/24", "fd00::7/64"]},
    )
    assert _ips(both) == [("10.7.0.5/24", None), ("fd00::7/64", None)]


def test_empty_overrides_leave_the_configured_list() -> None:
    req = _req(CONFIGURED, args={"cni": {"ips": []}}, runtimeConfig={"ips": []})
    assert len(_ips(req)) == 2


def test_no_addresses_is_an_empty_result() -> None:
    result = StaticIpam().add(_req({}))
    assert result.ips == [] and result.routes == []


@pytest.mark.parametrize(
    ("ipam", "cni_args", "top", "fragment"),
    [
        (
            {"addresses": [{"address": "10.0.0.5"}]},
            "",
            {},
            "ipam.addresses[0]: '10.0.0.5' must be in CIDR",
        ),
        (
            {"addresses": [{"address": "10.0.0.5/24", "gateway": "bogus"}]},
            "",
            {},
            "'bogus' is not an IP",
        ),
        ({"addresses": [{"address": "10.0.0.5/24", "gateway": "fd00::1"}]}, "", {}, "same family"),
        ({"addresses": [{"address": "nope/24"}]}, "", {}, "not an address in CIDR"),
        ({}, "IP=10.1.0.5", {}, "CNI_ARGS IP: '10.1.0.5' must be in CIDR"),
        ({}, "IP=10.1.0.5/24;GATEWAY=x", {}, "CNI_ARGS GATEWAY"),
        ({}, "", {"runtimeConfig": {"ips": ["10.7.0.5"]}}, "runtimeConfig.ips[0]"),
        ({}, "", {"runtimeConfig": {"ips": "10.7.0.5/24"}}, "must be a list"),
        ({"addresses": "10.0.0.5/24"}, "", {}, "static ipam config is invalid"),
        ({"routes": [{"gw": "10.0.0.1"}]}, "", {}, "ipam.routes[0]"),
    ],
)
def test_invalid_config_is_code_7(
    ipam: dict[str, Any], cni_args: str, top: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(InvalidConfig) as err:
        StaticIpam().add(_req(ipam, cni_args, **top))
    assert err.value.code == 7
    assert fragment in err.value.msg


def test_missing_ipam_section_is_code_7() -> None:
    req = PluginRequest(container_id="c1", ifname="eth0", config={"name": "s"})
    with pytest.raises(InvalidConfig, match="'ipam'"):
        StaticIpam().add(req)


def test_delete_and_gc_keep_no_state() -> None:
    ipam = StaticIpam()
    assert ipam.delete(_req(CONFIGURED)) is None
    assert ipam.gc(_req(CONFIGURED)) is None


def test_check_parses_the_config() -> None:
    StaticIpam().check(_req(CONFIGURED))
    with pytest.raises(InvalidConfig):
        StaticIpam().check(_req({"addresses": [{"address": "10.0.0.5"}]}))


def test_check_compares_with_prev_result_when_given() -> None:
    prev = {
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "eth0", "sandbox": "/proc/self/ns/net"}],
        "ips": [
            {"address": "10.0.0.5/24", "gateway": "10.0.0.1", "interface": 0},
            {"address": "fd00::5/64", "interface": 0},
        ],
    }
    StaticIpam().check(_req(CONFIGURED, prevResult=prev))
    wrong_gw = {**prev, "ips": [{**prev["ips"][0], "gateway": "10.0.0.2"}, prev["ips"][1]]}
    with pytest.raises(StaticCheckFailed, match=r"gateway 10\.0\.0\.2"):
        StaticIpam().check(_req(CONFIGURED, prevResult=wrong_gw))
    with pytest.raises(StaticCheckFailed, match="fd00::5/64 is not in prevResult"):
        StaticIpam().check(_req(CONFIGURED, prevResult={**prev, "ips": prev["ips"][:1]}))
