"""network-status entries (NPWG v1.3 §5): which keys, from which part of a result, for results
of every CNI version a delegate may answer in."""

from __future__ import annotations

from typing import Any

from cnispec.cni import Result
from cnispec.identity import Holder
from cnispec.netconf import PreparedNetwork, PreparedPlugin
from metaplugin.status import entry, network_status
from metaplugin.store import Attachment

SPEC_KEYS = {"name", "interface", "ips", "mac", "default", "dns", "default-route", "device-info"}


def record(
    result: dict[str, Any] | None,
    *,
    network: str = "default/net-a",
    ifname: str = "net1",
    version: str = "1.0.0",
    seq: int = 1,
    **extra: Any,
) -> Attachment:
    plugin = PreparedPlugin(type="macvlan", path="/opt/cni/bin/macvlan", version=version, config={})
    return Attachment(
        holder=Holder(container_id="c1", ifname=ifname, netns="/run/netns/p"),
        network=network,
        seq=seq,
        is_default=seq == 0,
        runtime_ifname="eth0",
        prepared=PreparedNetwork(name=network.rsplit("/", maxsplit=1)[-1], plugins=(plugin,)),
        state="added",
        result=Result.from_wire(result) if result is not None else None,
        **extra,
    )


def test_a_0_2_0_result_gives_ip4_and_ip6_the_asked_interface_and_no_mac() -> None:
    legacy = {
        "cniVersion": "0.2.0",
        "ip4": {"ip": "10.9.0.2/16", "gateway": "10.9.0.1"},
        "ip6": {"ip": "fd00::2/64"},
        "dns": {"nameservers": ["10.9.0.10"], "domain": "pods.local"},
    }
    assert entry(record(legacy, version="0.2.0")) == {
        "name": "default/net-a",
        "interface": "net1",
        "ips": ["10.9.0.2", "fd00::2"],
        "dns": {"nameservers": ["10.9.0.10"], "domain": "pods.local"},
        "default": False,
    }


def test_the_interface_is_the_results_even_without_a_mac() -> None:
    result = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "host-side"}, {"name": "ib0", "sandbox": "/run/netns/p"}],
        "ips": [{"address": "10.1.0.5/24", "interface": 1}, {"address": "10.2.0.5/24"}],
    }
    got = entry(record(result))
    assert got["interface"] == "ib0"
    assert "mac" not in got
    assert got["ips"] == ["10.1.0.5"]  # the addresses on the picked interface only


def test_the_interface_named_like_the_attachment_wins_and_brings_its_addresses() -> None:
    result = {
        "cniVersion": "1.1.0",
        "interfaces": [
            {"name": "vrf-a", "sandbox": "/run/netns/p"},
            {"name": "net1", "mac": "0a:58:0a:01:00:05", "sandbox": "/run/netns/p"},
        ],
        "ips": [
            {"address": "10.1.0.5/24", "interface": 1},
            {"address": "fd00::5/64", "interface": 1},
        ],
    }
    got = entry(record(result))
    assert (got["interface"], got["mac"], got["ips"]) == (
        "net1",
        "0a:58:0a:01:00:05",
        ["10.1.0.5", "fd00::5"],
    )


def test_entries_carry_only_spec_keys_in_attachment_order_with_one_default() -> None:
    one = {
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "eth0", "mac": "0a:00:00:00:00:01", "sandbox": "/p", "mtu": 1400}],
        "ips": [{"address": "10.0.0.5/24", "gateway": "10.0.0.1", "interface": 0}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0.1"}],
    }
    records = [
        record(one, network="cluster", ifname="eth0", seq=0),
        record(None, ifname="net1", seq=1),
        record(one, network="default/net-b", ifname="net2", seq=2, default_route=("10.0.0.1",)),
    ]
    status = network_status(records)
    assert [(e["name"], e["interface"], e["default"]) for e in status] == [
        ("cluster", "eth0", True),
        ("default/net-a", "net1", False),
        ("default/net-b", "eth0", False),
    ]
    assert all(set(e) <= SPEC_KEYS for e in status)  # no Multus `gateway`/`mtu`
    assert status[1] == {"name": "default/net-a", "interface": "net1", "default": False}
    assert status[2]["default-route"] == ["10.0.0.1"]
