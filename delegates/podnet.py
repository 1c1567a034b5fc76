"""Pod-wide network policy the orchestrator applies across attachments, kept out of the netlink
adaptor: which interface carries the pod's default route (NPWG `default-route`), and the
teardown of every link the built-in delegates made in a pod at once."""

from __future__ import annotations

import socket

from delegates._nl import PLEXUS_GROUP, Netlink, family_of
from metaplugin.errors import InvalidConfig, PlexusError

_DEFAULTS: dict[int, str] = {socket.AF_INET: "0.0.0.0/0", socket.AF_INET6: "::/0"}


def move_default_route(netns: str, ifname: str, gateways: list[str]) -> set[int]:
    """Make `ifname` the pod's way out: for each family of `gateways`, drop every other default
    route of that family and route via that gateway on `ifname`. With no gateways, keep the
    default routes `ifname` already has and drop the others of those families. Returns the
    families that changed hands."""
    with Netlink.open(netns) as nl:
        oif = nl.require(ifname).index
        defaults = [r for r in nl.routes() if r.dst in _DEFAULTS.values()]
        wanted = {family_of(gw): gw for gw in gateways}
        families = set(wanted) or {r.family for r in defaults if r.oif == oif}
        for route in defaults:
            keep = route.oif == oif and (not wanted or route.gateway == wanted.get(route.family))
            if route.family in families and not keep:
                nl.delete_route(
                    route.dst, oif=route.oif, gateway=route.gateway, priority=route.priority
                )
        for family, gateway in wanted.items():
            try:
                nl.add_route(_DEFAULTS[family], oif=oif, gateway=gateway)
            except PlexusError as exc:
                raise InvalidConfig(
                    f"default-route via {gateway} on {ifname}: {exc.msg}; the gateway must be "
                    "reachable on that interface",
                ) from None
    return families


def delete_pod_links(netns: str) -> None:
    """Delete every link the built-in delegates made in a pod, in one request (they all carry
    PLEXUS_GROUP): one RCU wait for the pod instead of one per interface."""
    with Netlink.open(netns) as pod:
        pod.delete_group(PLEXUS_GROUP)
