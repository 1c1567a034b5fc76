"""In-process `static` IPAM: the addresses, routes and DNS written in the config, no state.

Follows containernetworking/plugins `plugins/ipam/static` (checked against plugins 1.1.1):
`ipam.addresses` ([{address: CIDR, gateway}]) first; CNI_ARGS `IP=` (comma-separated CIDRs) is
appended and CNI_ARGS `GATEWAY=` sets the gateway of those CNI_ARGS addresses that contain it;
then `args.cni.ips` and, after it, the `ips` capability (`runtimeConfig.ips`) each *replace* the
whole list when non-empty. Every address must carry a prefix length.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from cnispec.builtin_conf.ipam import StaticAddress as _Address
from cnispec.builtin_conf.ipam import StaticConf as _StaticConf
from cnispec.builtin_conf.ipam import plain_ip as _ip
from cnispec.builtin_conf.ipam import static_address as _address
from cnispec.cni import DNS, Result, Route, parse_cni_args
from cnispec.errors import InvalidConfig, PlexusError
from delegates.ipam._ranges import (
    describe_error,
    ipam_section,
    parse_routes,
    str_list,
)
from delegates.plugin import PluginRequest


class StaticCheckFailed(PlexusError):
    """CHECK: the previous result does not carry a configured address (999, as the reference)."""

    cni_code = 999


class StaticIpam:
    """ADD answers from the config; DEL and GC have nothing to release; CHECK re-parses the
    config and, when the request carries a prevResult, requires each address in it."""

    def add(self, req: PluginRequest) -> Result:
        addresses, routes, dns = load_static(req)
        return Result(ips=[a.to_ip_config() for a in addresses], routes=routes, dns=dns)

    def delete(self, req: PluginRequest) -> None:
        return None

    def gc(self, req: PluginRequest) -> None:
        return None

    def check(self, req: PluginRequest) -> None:
        addresses, _, _ = load_static(req)
        prev = req.config.get("prevResult")
        if not isinstance(prev, Mapping):
            return
        found = {ip.ip.ip: ip.gateway for ip in _prev_result(prev, req.cni_version).ips}
        for addr in addresses:
            ip = addr.interface.ip
            if ip not in found:
                raise StaticCheckFailed(f"static: address {addr.interface} is not in prevResult")
            if addr.gateway is not None and found[ip] != str(addr.gateway):
                raise StaticCheckFailed(
                    f"static: address {addr.interface} has gateway {found[ip]} in prevResult, "
                    f"the config says {addr.gateway}"
                )


def load_static(req: PluginRequest) -> tuple[list[_Address], list[Route], DNS]:
    try:
        conf = _StaticConf.model_validate(ipam_section(req.config))
    except ValidationError as exc:
        raise InvalidConfig(f"static ipam config is invalid: {describe_error(exc)}") from None
    addresses = [
        _address(a.address, a.gateway, what=f"ipam.addresses[{i}]")
        for i, a in enumerate(conf.addresses)
    ]
    addresses += _from_cni_args(req.cni_args)
    for what, texts in _overrides(req):
        if texts:
            addresses = [_address(t, None, what=f"{what}[{i}]") for i, t in enumerate(texts)]
    return addresses, parse_routes(conf.routes, what="ipam.routes"), conf.dns


def _from_cni_args(raw: str) -> list[_Address]:
    args = parse_cni_args(raw)
    items = [t.strip() for t in args.get("IP", "").split(",") if t.strip()]
    addresses = [_address(t, None, what="CNI_ARGS IP") for t in items]
    for text in (t.strip() for t in args.get("GATEWAY", "").split(",") if t.strip()):
        gateway = _ip(text, what="CNI_ARGS GATEWAY")
        # As the reference: a GATEWAY applies to the CNI_ARGS addresses whose network holds it.
        addresses = [
            _Address(a.interface, gateway) if gateway in a.interface.network else a
            for a in addresses
        ]
    return addresses


def _overrides(req: PluginRequest) -> list[tuple[str, list[str]]]:
    """`args.cni.ips` then `runtimeConfig.ips`: the later non-empty one wins."""
    args = req.config.get("args")
    cni = args.get("cni") if isinstance(args, Mapping) else None
    return [
        ("args.cni.ips", str_list(cni, "ips", what="args.cni.ips")),
        ("runtimeConfig.ips", str_list(req.runtime_config, "ips", what="runtimeConfig.ips")),
    ]


def _prev_result(prev: Mapping[str, Any], version: str) -> Result:
    body = dict(prev)
    body.setdefault("cniVersion", version)
    return Result.from_wire(body)
