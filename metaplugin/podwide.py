"""Pod-wide steps: what the orchestrator does across a pod's attachments once every one of them
is in place, each with its own undo on ADD's undo stack. Today that is the NPWG `default-route`
(which interface carries the pod's default route); multicast routes and network policy are the
next ones, and each is one more `PodStep`.

A step may change recorded results (a default route that moved away from an interface leaves
that interface's result): it returns the attachments as they now are, and the orchestrator
records them, because DEL, CHECK and network-status read them.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from cnispec.cni import Result, Route
from cnispec.errors import InvalidConfig, PlexusError
from kernel.netlink import Netlink, RouteInfo, family_of
from metaplugin.store import Attachment

_DEFAULTS: Final[dict[int, str]] = {socket.AF_INET: "0.0.0.0/0", socket.AF_INET6: "::/0"}


@dataclass
class Applied:
    """What a step did: the attachments with their results as they now are, and its undo."""

    attachments: list[Attachment]
    undo: Callable[[], None]


class PodStep(Protocol):
    name: str

    def apply(self, netns: str, attachments: list[Attachment]) -> Applied:
        """Act on the pod at `netns` across `attachments` (all added, in ADD order). Errors
        name the attachment they are about; the undo must be safe to run after any of the
        pod's interfaces is gone."""
        ...


@dataclass
class MovedRoutes:
    """What moving a pod's default route did, so it can be undone."""

    families: set[int]  # the address families whose default route changed hands
    removed: list[RouteInfo] = field(default_factory=list)
    added: list[tuple[str, int, str]] = field(default_factory=list)  # (dst, oif, gateway)


class PodRoutes(Protocol):
    def move_default_route(self, netns: str, ifname: str, gateways: list[str]) -> MovedRoutes: ...

    def put_back(self, netns: str, moved: MovedRoutes) -> None: ...


class KernelRoutes:
    """`PodRoutes` in the pod's namespace, through rtnetlink."""

    def move_default_route(self, netns: str, ifname: str, gateways: list[str]) -> MovedRoutes:
        return move_default_route(netns, ifname, gateways)

    def put_back(self, netns: str, moved: MovedRoutes) -> None:
        put_back(netns, moved)


def move_default_route(netns: str, ifname: str, gateways: list[str]) -> MovedRoutes:
    """Make `ifname` the pod's way out: for each family of `gateways`, drop every other default
    route of that family and route via that gateway on `ifname`. With no gateways, keep the
    default routes `ifname` already has and drop the others of those families."""
    with Netlink.open(netns) as nl:
        oif = nl.require(ifname).index
        defaults = [r for r in nl.routes() if r.dst in _DEFAULTS.values()]
        wanted = {family_of(gw): gw for gw in gateways}
        moved = MovedRoutes(set(wanted) or {r.family for r in defaults if r.oif == oif})
        for route in defaults:
            keep = route.oif == oif and (not wanted or route.gateway == wanted.get(route.family))
            if route.family in moved.families and not keep:
                nl.delete_route(
                    route.dst, oif=route.oif, gateway=route.gateway, priority=route.priority
                )
                moved.removed.append(route)
        for family, gateway in wanted.items():
            try:
                nl.add_route(_DEFAULTS[family], oif=oif, gateway=gateway)
            except PlexusError as exc:
                raise InvalidConfig(
                    f"default-route via {gateway} on {ifname}: {exc.msg}; the gateway must be "
                    "reachable on that interface",
                ) from None
            moved.added.append((_DEFAULTS[family], oif, gateway))
    return moved


def put_back(netns: str, moved: MovedRoutes) -> None:
    """Undo of `move_default_route`, best effort: an interface may already be gone."""
    with Netlink.open(netns) as nl:
        for dst, oif, gateway in moved.added:
            with contextlib.suppress(PlexusError):
                nl.delete_route(dst, oif=oif, gateway=gateway)
        for route in moved.removed:
            with contextlib.suppress(PlexusError):
                nl.add_route(
                    route.dst, oif=route.oif, gateway=route.gateway, priority=route.priority
                )


class DefaultRoute:
    """NPWG default-route: the attachment that asks for it carries the pod's default route for
    that family; every other attachment's default route of that family goes, in the pod and in
    the recorded results."""

    name = "default-route"

    def __init__(self, *, routes: PodRoutes | None = None) -> None:
        self._routes = routes or KernelRoutes()

    def apply(self, netns: str, attachments: list[Attachment]) -> Applied:
        undos: list[Callable[[], None]] = []
        for chosen in [a for a in attachments if a.default_route is not None]:
            gateways = list(chosen.default_route or [])
            try:
                moved = self._routes.move_default_route(netns, chosen.ifname, gateways)
            except Exception as exc:
                _undo_all(undos)  # this step's earlier moves: the caller's undo never saw them
                if isinstance(exc, PlexusError):
                    raise exc.prefixed(f"network {chosen.label}") from None
                raise
            undos.append(functools.partial(self._routes.put_back, netns, moved))
            attachments = [_with_routes(a, chosen, moved.families) for a in attachments]
        return Applied(attachments, lambda: _undo_all(undos))


def _undo_all(undos: list[Callable[[], None]]) -> None:
    for undo in reversed(undos):
        undo()


def _with_routes(record: Attachment, chosen: Attachment, families: set[int]) -> Attachment:
    """The record with its result rerouted; the same object when its routes do not change."""
    result = _rerouted(record, chosen, families)
    if record.result is not None and result.routes == record.result.routes:
        return record
    return record.model_copy(update={"result": result})


def _rerouted(record: Attachment, chosen: Attachment, families: set[int]) -> Result:
    """The record's result once `chosen` carries the default route of `families`."""
    result = record.result or Result()
    keep = [r for r in result.routes if not (_is_default(r.dst) and _family(r.dst) in families)]
    if record.key == chosen.key:
        keep += [
            Route(dst="0.0.0.0/0" if family_of(gw) == socket.AF_INET else "::/0", gw=gw)
            for gw in chosen.default_route or []
        ]
        keep += [
            r
            for r in result.routes
            if _is_default(r.dst) and _family(r.dst) in families and not chosen.default_route
        ]
    return result.model_copy(update={"routes": keep})


def _is_default(dst: str) -> bool:
    return ipaddress.ip_network(dst, strict=False).prefixlen == 0


def _family(dst: str) -> int:
    version = ipaddress.ip_network(dst, strict=False).version
    return socket.AF_INET if version == 4 else socket.AF_INET6
