from __future__ import annotations

import json
import os

import pytest

from cnispec import cni
from cnispec.cni import Result
from cnispec.errors import (
    DecodeFailure,
    DelegateFailed,
    IncompatibleVersion,
    InvalidEnvironment,
)

RESULT_100 = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:bb:cc:00:00:01"},
        {"name": "eth0", "mac": "aa:bb:cc:00:00:02", "sandbox": "/var/run/netns/x"},
    ],
    "ips": [
        {"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 1},
        {"address": "fd00::5/64", "gateway": "fd00::1", "interface": 1},
    ],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}],
    "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]},
}


def env(**over: str) -> dict[str, str]:
    base = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "abc123",
        "CNI_NETNS": "/proc/self/ns/net",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "",
        "CNI_PATH": "/opt/cni/bin:/usr/lib/cni",
    }
    base.update(over)
    return base


CONF = json.dumps({"cniVersion": "1.0.0", "name": "plexus", "type": "plexus"})


def test_parse_request_reads_every_cni_variable() -> None:
    req = cni.parse_request(
        env(CNI_ARGS="K8S_POD_NAME=p;IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_UID=u"), CONF
    )
    assert req.command == "ADD"
    assert req.container_id == "abc123"
    assert req.ifname == "eth0"
    assert req.path == ("/opt/cni/bin", "/usr/lib/cni")
    assert (req.pod_namespace, req.pod_name, req.pod_uid) == ("ns", "p", "u")
    assert req.cni_version == "1.0.0"


@pytest.mark.parametrize(
    "raw",
    [
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p",
        "K8S_POD_NAME=p;K8S_POD_NAMESPACE=ns;IgnoreUnknown=1",
        ";K8S_POD_NAMESPACE=ns; K8S_POD_NAME=p ;IgnoreUnknown=1;",
    ],
)
def test_cni_args_are_an_unordered_set(raw: str) -> None:
    assert cni.parse_cni_args(raw) == {
        "IgnoreUnknown": "1",
        "K8S_POD_NAMESPACE": "ns",
        "K8S_POD_NAME": "p",
    }


def test_cni_args_value_may_contain_equals() -> None:
    assert cni.parse_cni_args("A=b=c") == {"A": "b=c"}


def test_malformed_cni_args_is_code_4() -> None:
    with pytest.raises(InvalidEnvironment) as err:
        cni.parse_request(env(CNI_ARGS="K8S_POD_NAME"), CONF)
    assert err.value.code == 4
    assert "K8S_POD_NAME" in err.value.msg


@pytest.mark.parametrize(
    ("var", "value", "fragment"),
    [
        ("CNI_COMMAND", "FROB", "CNI_COMMAND"),
        ("CNI_CONTAINERID", "", "CNI_CONTAINERID is required"),
        ("CNI_CONTAINERID", "-bad", "CNI_CONTAINERID"),
        ("CNI_CONTAINERID", "a/b", "CNI_CONTAINERID"),
        ("CNI_IFNAME", "", "CNI_IFNAME is required"),
        ("CNI_IFNAME", "a" * 16, "CNI_IFNAME"),
        ("CNI_IFNAME", "eth/0", "CNI_IFNAME"),
        ("CNI_IFNAME", "eth 0", "CNI_IFNAME"),
        ("CNI_IFNAME", "eth:0", "CNI_IFNAME"),
        ("CNI_IFNAME", "..", "CNI_IFNAME"),
        ("CNI_NETNS", "", "CNI_NETNS is required"),
        ("CNI_NETNS", "/nonexistent/netns", "not a network namespace"),
        ("CNI_NETNS", "/proc/self/ns/mnt", "not a network namespace"),
        ("CNI_NETNS", "/etc/hostname", "not a network namespace"),
    ],
)
def test_bad_environment_is_code_4_and_names_the_variable(
    var: str, value: str, fragment: str
) -> None:
    with pytest.raises(InvalidEnvironment) as err:
        cni.parse_request(env(**{var: value}), CONF)
    assert err.value.code == 4
    assert fragment in err.value.msg


def test_fifteen_byte_ifname_is_legal() -> None:
    assert cni.parse_request(env(CNI_IFNAME="a" * 15), CONF).ifname == "a" * 15


def test_del_needs_no_netns() -> None:
    req = cni.parse_request(env(CNI_COMMAND="DEL", CNI_NETNS=""), CONF)
    assert req.netns == ""


def test_del_with_vanished_netns_is_accepted() -> None:
    req = cni.parse_request(env(CNI_COMMAND="DEL", CNI_NETNS="/run/netns/gone"), CONF)
    assert req.netns == "/run/netns/gone"


def test_undecodable_stdin_is_code_6() -> None:
    with pytest.raises(DecodeFailure) as err:
        cni.parse_request(env(), b"{not json")
    assert err.value.code == 6


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0", "2.0.0", "banana"])
def test_unsupported_config_version_is_code_1(version: str) -> None:
    conf = json.dumps({"cniVersion": version, "name": "n", "type": "plexus"})
    with pytest.raises(IncompatibleVersion) as err:
        cni.parse_request(env(), conf)
    assert err.value.code == 1
    assert "0.3.0" in err.value.msg


@pytest.mark.parametrize(
    ("command", "version"), [("CHECK", "0.3.1"), ("GC", "1.0.0"), ("STATUS", "1.0.0")]
)
def test_verbs_newer_than_the_config_version_are_refused(command: str, version: str) -> None:
    conf = json.dumps({"cniVersion": version, "name": "n", "type": "plexus"})
    with pytest.raises(IncompatibleVersion):
        cni.parse_request(env(CNI_COMMAND=command), conf)


def test_status_and_gc_need_no_container() -> None:
    conf = json.dumps({"cniVersion": "1.1.0", "name": "n", "type": "plexus"})
    for command in ("STATUS", "GC"):
        req = cni.parse_request({"CNI_COMMAND": command}, conf)
        assert req.command == command


def test_version_answer_lists_0_3_0_to_1_1_0() -> None:
    out = cni.version_result("0.4.0")
    assert out == {
        "cniVersion": "0.4.0",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
    }


def test_is_netns_accepts_a_real_netns() -> None:
    assert cni.is_netns(f"/proc/{os.getpid()}/ns/net")
    assert not cni.is_netns(f"/proc/{os.getpid()}/ns/uts")


# --- results ------------------------------------------------------------------------------


def test_result_round_trips_at_1_0_0() -> None:
    assert Result.from_wire(RESULT_100).to_wire("1.0.0") == RESULT_100


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0"])
def test_down_conversion_adds_ip_version(version: str) -> None:
    out = Result.from_wire(RESULT_100).to_wire(version)
    assert out["cniVersion"] == version
    assert [ip["version"] for ip in out["ips"]] == ["4", "6"]
    assert out["interfaces"] == RESULT_100["interfaces"]


def test_up_conversion_from_0_4_0_drops_ip_version() -> None:
    old = Result.from_wire(RESULT_100).to_wire("0.4.0")
    assert Result.from_wire(old).to_wire("1.0.0") == RESULT_100


def test_1_1_0_fields_survive_at_1_1_0_and_are_dropped_below() -> None:
    data = json.loads(json.dumps(RESULT_100))
    data["cniVersion"] = "1.1.0"
    data["interfaces"][1] |= {"mtu": 1450, "pciID": "0000:03:02.3"}
    data["routes"][0] |= {"mtu": 1400, "table": 100, "scope": 0, "priority": 5, "advmss": 1360}
    result = Result.from_wire(data)
    assert result.to_wire("1.1.0") == data
    older = result.to_wire("1.0.0")
    assert "mtu" not in older["interfaces"][1] and "pciID" not in older["interfaces"][1]
    assert older["routes"][0] == {"dst": "0.0.0.0/0", "gw": "10.1.0.1"}


def test_0_2_0_result_is_converted_up() -> None:
    old = {
        "cniVersion": "0.2.0",
        "ip4": {"ip": "10.9.0.2/16", "gateway": "10.9.0.1", "routes": [{"dst": "0.0.0.0/0"}]},
        "dns": {},
    }
    out = Result.from_wire(old).to_wire("1.0.0")
    assert out["ips"] == [{"address": "10.9.0.2/16", "gateway": "10.9.0.1"}]
    assert out["routes"] == [{"dst": "0.0.0.0/0"}]


LEGACY = {
    "cniVersion": "0.2.0",
    "ip4": {
        "ip": "10.9.0.2/16",
        "gateway": "10.9.0.1",
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "10.8.0.0/16", "gw": "10.9.0.254"}],
    },
    "ip6": {"ip": "fd00::2/64", "routes": [{"dst": "::/0", "gw": "fd00::1"}]},
    "dns": {"nameservers": ["10.9.0.10"], "search": ["svc.local"]},
}


def test_0_2_0_result_with_both_families_is_read_in_libcni_order() -> None:
    result = Result.from_wire(LEGACY)
    assert result.interfaces == []
    assert [(ip.address, ip.gateway, ip.interface) for ip in result.ips] == [
        ("10.9.0.2/16", "10.9.0.1", None),
        ("fd00::2/64", None, None),
    ]
    assert [(r.dst, r.gw) for r in result.routes] == [
        ("0.0.0.0/0", None),
        ("10.8.0.0/16", "10.9.0.254"),
        ("::/0", "fd00::1"),
    ]
    assert result.dns.nameservers == ["10.9.0.10"]
    assert [ip["version"] for ip in result.to_wire("0.4.0")["ips"]] == ["4", "6"]


def test_0_2_0_result_goes_back_down_unchanged() -> None:
    # A plugin after a 0.2.0 one in a 0.2.0 network gets its prevResult in 0.2.0 (libcni does).
    assert Result.from_wire(LEGACY).to_wire("0.2.0") == LEGACY


def test_a_newer_result_goes_down_to_0_2_0_as_libcni_converts_it() -> None:
    data = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "net1", "sandbox": "/run/netns/p"}],
        "ips": [
            {"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 0},
            {"address": "10.1.0.6/24", "interface": 0},
            {"address": "fd00::5/64", "interface": 0},
        ],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}, {"dst": "::/0"}],
    }
    assert Result.from_wire(data).to_wire("0.1.0") == {
        "cniVersion": "0.1.0",
        "ip4": {
            "ip": "10.1.0.5/24",
            "gateway": "10.1.0.1",
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}],
        },
        "ip6": {"ip": "fd00::5/64", "routes": [{"dst": "::/0"}]},
        "dns": {},
    }
    with pytest.raises(IncompatibleVersion, match="without an IP address"):
        Result.from_wire({"cniVersion": "1.0.0"}).to_wire("0.2.0")


@pytest.mark.parametrize(
    "block", [{}, {"gateway": "10.0.0.1"}, "10.0.0.2/24", {"ip": "10.0.0.2/24", "routes": "x"}]
)
def test_malformed_0_2_0_result_is_a_decode_failure_not_a_traceback(block: object) -> None:
    with pytest.raises(DecodeFailure) as err:
        Result.from_wire({"cniVersion": "0.2.0", "ip4": block})
    assert err.value.code == 6


@pytest.mark.parametrize(
    "ips",
    [
        [{"gateway": "1.2.3.4"}],
        [{"address": "10.1.0.256/24"}],
        [{"address": "10.1.0.2/24", "gateway": "nope"}],
    ],
)
def test_malformed_result_is_a_decode_failure(ips: list[dict[str, str]]) -> None:
    with pytest.raises(DecodeFailure):
        Result.from_wire({"cniVersion": "1.0.0", "ips": ips})


def test_to_cni_error_keeps_code_msg_details() -> None:
    out = cni.to_cni_error(DelegateFailed("network x failed", '{"code":7}'), "0.4.0")
    assert out == {
        "cniVersion": "0.4.0",
        "code": 101,
        "msg": "network x failed",
        "details": '{"code":7}',
    }


def test_to_cni_error_wraps_bugs_as_999_without_traceback() -> None:
    out = cni.to_cni_error(KeyError("boom"))
    assert out["code"] == 999
    assert "KeyError" in out["msg"] and "Traceback" not in out["msg"]


def test_pick_version_falls_back_to_the_highest_older_one() -> None:
    ref = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"]
    assert cni.pick_version("1.1.0", ref) == "1.0.0"
    assert cni.pick_version("0.4.0", ref) == "0.4.0"
    assert cni.pick_version("0.3.0", ["1.0.0"]) is None
