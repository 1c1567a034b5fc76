"""`plexus-sbr`: source-based routing for a secondary interface, the reference `sbr` plugin's
job done in-process. Chained after the plugin that made the interface (a NAD conflist opts in
with `{"type": "plexus-sbr"}`): every address of the interface gets a policy rule
`from <address> lookup <table>`, and the table holds the interface's routes (its subnets) and a
default route via its gateway, so a reply leaves through the interface the request came in on."""

from __future__ import annotations

import ipaddress
from typing import Any

from cnispec import cni
from cnispec.cni import IPConfig, Result
from cnispec.errors import CheckFailed, InvalidConfig
from delegates.plugin import BuiltinPlugin, PluginRequest
from kernel.netlink import MAIN_TABLE, Netlink

FIRST_TABLE = 100
RULE_PRIORITY = 30000


class SourceRouting(BuiltinPlugin):
    type = "plexus-sbr"

    def add(self, req: PluginRequest) -> Result:
        prev = _prev(req)
        addresses = _addresses(prev, req.ifname)
        with Netlink.open(req.netns) as pod:
            link = pod.require(req.ifname)
            table = self._table(pod, req.config)
            copied = set()
            for route in pod.routes():
                if route.oif == link.index and route.table == MAIN_TABLE:
                    pod.add_route(
                        route.dst,
                        oif=link.index,
                        gateway=route.gateway,
                        table=table,
                        scope=route.scope if not route.gateway else None,
                    )
                    copied.add(route.dst)
            # As the sbr plugin does: the table's way out is the interface's own gateway, even
            # when IPAM gave the interface no default route in the main table.
            for ip in _ips(prev, req.ifname):
                default = "0.0.0.0/0" if ip.ip.version == 4 else "::/0"
                if ip.gateway is not None and default not in copied:
                    pod.add_route(default, oif=link.index, gateway=str(ip.gateway), table=table)
                    copied.add(default)
            for address in addresses:
                pod.add_rule(src=address, table=table, priority=RULE_PRIORITY)
        return prev

    @staticmethod
    def _table(pod: Netlink, config: Any) -> int:
        if isinstance(config.get("table"), int):
            return int(config["table"])
        used = {table for _, table in pod.rules()} | {r.table for r in pod.routes(table=None)}
        table = FIRST_TABLE
        while table in used:
            table += 1
        return table

    def delete(self, req: PluginRequest) -> None:
        if not (req.netns and cni.is_netns(req.netns)):
            return  # the rules went with the namespace
        prev = req.config.get("prevResult")
        with Netlink.open(req.netns) as pod:
            if isinstance(prev, dict):
                addresses = set(_addresses(Result.from_wire(prev), req.ifname))
            else:
                # A rollback has no result yet: the interface's own addresses say which rules.
                link = pod.link(req.ifname)
                if link is None:
                    return
                addresses = {str(ipaddress.ip_interface(a).ip) for a in pod.addresses(link.index)}
            for src, table in pod.rules():
                if str(ipaddress.ip_interface(src).ip) in addresses:
                    pod.delete_rule(src=src, table=table, priority=RULE_PRIORITY)

    def check(self, req: PluginRequest, prev: Result) -> None:
        addresses = _addresses(prev, req.ifname)
        with Netlink.open(req.netns) as pod:
            sources = {str(ipaddress.ip_interface(src).ip) for src, _ in pod.rules()}
        for address in addresses:
            if address not in sources:
                raise CheckFailed(f"source routing rule for {address} on {req.ifname} is missing")


def _prev(req: PluginRequest) -> Result:
    prev = req.config.get("prevResult")
    if not isinstance(prev, dict):
        raise InvalidConfig(
            f"network {req.network_name}: plexus-sbr must be chained after the plugin that "
            "creates the interface (it needs prevResult)",
        )
    return Result.from_wire(prev)


def _ips(prev: Result, ifname: str) -> list[IPConfig]:
    index = next((i for i, itf in enumerate(prev.interfaces) if itf.name == ifname), None)
    return [ip for ip in prev.ips if ip.interface in (index, None)]


def _addresses(prev: Result, ifname: str) -> list[str]:
    return [str(ip.ip.ip) for ip in _ips(prev, ifname)]
