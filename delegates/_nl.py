"""The one thin adaptor over pyroute2: typed helpers for the netlink work Plexus does itself,
with pyroute2's errors translated once (rule 12 of the house style). Sockets are opened in the
target namespace with `IPRoute(netns=path)`; no thread of ours ever changes namespace.

Today: the pod's default routes (NPWG default-route). The built-in delegates grow this module.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError

from metaplugin.errors import InvalidConfig, PlexusError

MAIN_TABLE: Final = 254
_DUMP_RETRIES: Final = 5


class LinkNotFound(PlexusError):
    cni_code = 7


@dataclass(frozen=True, slots=True)
class DefaultRoute:
    family: int
    oif: int
    gateway: str | None


@contextmanager
def _ipr(netns: str) -> Iterator[Any]:
    ipr = IPRoute(netns=netns)
    try:
        yield ipr
    finally:
        ipr.close()


def _dump(call: Any, *args: Any, **kwargs: Any) -> list[Any]:
    for attempt in range(_DUMP_RETRIES):
        try:
            return list(call(*args, **kwargs))
        except NetlinkDumpInterrupted:
            if attempt == _DUMP_RETRIES - 1:
                raise
    return []


def family_of(address: str) -> int:
    return socket.AF_INET if ipaddress.ip_address(address).version == 4 else socket.AF_INET6


def move_default_route(netns: str, ifname: str, gateways: list[str]) -> set[int]:
    """Make `ifname` the pod's way out: for each family of `gateways`, drop every other default
    route of that family and route via that gateway on `ifname`. With no gateways, keep the
    default routes `ifname` already has and drop the others of those families. Returns the
    families that changed hands (NPWG §4.1.2.1.9, default-route)."""
    with _ipr(netns) as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise LinkNotFound(f"interface {ifname} is not in {netns}")
        oif = found[0]
        routes = [
            _default(r)
            for fam in (socket.AF_INET, socket.AF_INET6)
            for r in _dump(ipr.get_routes, family=fam, table=MAIN_TABLE)
            if r.get("dst_len") == 0
        ]
        wanted = {family_of(gw): gw for gw in gateways}
        families = set(wanted) or {r.family for r in routes if r.oif == oif}
        try:
            for route in routes:
                keep = route.oif == oif and (
                    not wanted or route.gateway == wanted.get(route.family)
                )
                if route.family in families and not keep:
                    ipr.route(
                        "del",
                        family=route.family,
                        dst_len=0,
                        oif=route.oif,
                        gateway=route.gateway,
                        table=MAIN_TABLE,
                    )
            for family, gateway in wanted.items():
                dst = "0.0.0.0/0" if family == socket.AF_INET else "::/0"
                ipr.route(
                    "replace", family=family, dst=dst, gateway=gateway, oif=oif, table=MAIN_TABLE
                )
        except NetlinkError as exc:
            if exc.code in (errno.ENETUNREACH, errno.EINVAL):
                raise InvalidConfig(
                    f"default-route via {', '.join(gateways)} on {ifname}: the gateway is not "
                    f"reachable on that interface ({exc.args[-1] if exc.args else exc})",
                ) from None
            raise
    return families


def _default(msg: Any) -> DefaultRoute:
    return DefaultRoute(
        int(msg["family"]), int(msg.get_attr("RTA_OIF") or 0), msg.get_attr("RTA_GATEWAY")
    )
