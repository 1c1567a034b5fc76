"""What every built-in delegate does to an interface once it exists in the pod: addresses and
routes from the IPAM result, link up, the CNI result that describes it, and the CHECK that
verifies all of that is still there."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from cnispec import failpoints
from cnispec.cni import Interface, IPConfig, Result, Route
from cnispec.errors import CheckFailed
from kernel.netlink import MAIN_TABLE, Link, Netlink


def gateway_for(route: Route, ips: Sequence[IPConfig]) -> str | None:
    """A route without `gw` goes via the gateway of the address of its family (as the
    reference plugins' ConfigureIface does)."""
    if route.gw:
        return route.gw
    version = ipaddress.ip_network(route.dst, strict=False).version
    for ip in ips:
        if ip.gateway and ipaddress.ip_address(ip.gateway).version == version:
            return ip.gateway
    return None


def configure(nl: Netlink, link: Link, ipam: Result) -> None:
    """Addresses, link up (IPv6 ones past duplicate address detection), then the IPAM routes
    with every CNI 1.1 route field honoured. A route is added beside any route of the same
    prefix already in the pod, never over it (so a secondary's IPAM default route cannot erase
    the primary's, and deleting the secondary brings nothing back that was lost); NPWG
    `default-route` is the way to move it."""
    for ip in ipam.ips:
        nl.add_address(link.index, ip.address)
        failpoints.hit("iface_address_added")
    if not link.up:
        nl.set_up(link.index)
        failpoints.hit("iface_up")
    if any(ip.ip.version == 6 for ip in ipam.ips):
        nl.settle_addresses(link.index)
    for route in ipam.routes:
        nl.add_route(
            route.dst,
            oif=link.index,
            gateway=gateway_for(route, ipam.ips),
            table=route.table or MAIN_TABLE,
            priority=route.priority,
            scope=route.scope,
            mtu=route.mtu,
            advmss=route.advmss,
        )
        failpoints.hit("iface_route_added")


def result_for(
    link: Link, netns: str, ipam: Result, *, index: int = 0, extra: Sequence[Interface] = ()
) -> Result:
    """The CNI result: `extra` interfaces (host side) first, then the pod's interface."""
    interfaces = [*extra, Interface(name=link.name, mac=link.mac, mtu=link.mtu, sandbox=netns)]
    pod_index = len(extra) + index
    ips = [ip.model_copy(update={"interface": pod_index}) for ip in ipam.ips]
    return Result(interfaces=interfaces, ips=ips, routes=ipam.routes, dns=ipam.dns)


def check(nl: Netlink, ifname: str, kind: str, prev: Result) -> Link:
    """Verify the interface, its addresses and its routes against the recorded result."""
    link = nl.link(ifname)
    if link is None:
        raise CheckFailed(f"interface {ifname} is missing from the pod")
    if kind and link.kind != kind:
        raise CheckFailed(f"interface {ifname} is a {link.kind or 'plain'} link, not {kind}")
    have = set(nl.addresses(link.index))
    for ip in prev.ips:
        if _normal(ip.address) not in {_normal(a) for a in have}:
            raise CheckFailed(f"interface {ifname} lost its address {ip.address}")
    routes = nl.routes(table=None)
    for route in prev.routes:
        dst = str(ipaddress.ip_network(route.dst, strict=False))
        table = route.table or MAIN_TABLE
        if not any(r.dst == dst and r.oif == link.index and r.table == table for r in routes):
            where = "" if table == MAIN_TABLE else f" in table {table}"
            raise CheckFailed(f"route to {route.dst} via {ifname}{where} is missing")
    return link


def _normal(cidr: str) -> str:
    return str(ipaddress.ip_interface(cidr))
