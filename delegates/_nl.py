"""The one thin adaptor over pyroute2 (house rule 12): typed results, pyroute2's errors
translated once, and sockets bound to the right network namespace without moving any thread.

`Netlink.open(netns)` gives a handle on one namespace: for a pod, its netlink socket is created
on a short-lived thread that entered the pod's namespace (a socket stays in the namespace it was
born in), then used from the caller's thread; without `netns`, on the calling thread itself.
That costs ~0.3 ms, against ~8 ms for pyroute2's own `IPRoute(netns=...)`, which forks.

Links are created directly in the pod's namespace (IFLA_NET_NS_FD) with their final name, MTU,
MAC, group and state in one request, so they are never visible in the node's namespace and
there is no temporary name to clean up.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

from pyroute2 import IPRoute
from pyroute2.netlink import nla
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from delegates.netns import run_in_netns
from metaplugin.errors import InvalidConfig, PlexusError

MAIN_TABLE: Final = 254
RT_SCOPE_LINK: Final = 253
# Every link a built-in delegate makes in a pod carries this device group, so a pod's teardown
# can delete them all in one RTM_DELLINK: the kernel then waits for one RCU grace period
# instead of one per link (~22 ms each here).
PLEXUS_GROUP: Final = 0x504C58
_DUMP_RETRIES: Final = 5
IFA_F_NODAD: Final = 0x02
NTF_SELF: Final = 0x02
_NETLINK_ROUTE: Final = 0


class LinkExists(PlexusError):
    cni_code = 7


class LinkNotFound(PlexusError):
    cni_code = 7


class KernelUnsupported(PlexusError):
    """The running kernel lacks a feature (a link kind, a mode)."""

    cni_code = 109


class _MacvlanData(nla):  # type: ignore[misc] # pyroute2 0.9 lacks IFLA_MACVLAN_BC_QUEUE_LEN (Linux 5.11)
    prefix = "IFLA_"
    nla_map = (
        ("IFLA_MACVLAN_UNSPEC", "none"),
        ("IFLA_MACVLAN_MODE", "uint32"),
        ("IFLA_MACVLAN_FLAGS", "uint16"),
        ("IFLA_MACVLAN_MACADDR_MODE", "uint32"),
        ("IFLA_MACVLAN_MACADDR", "l2addr"),
        ("IFLA_MACVLAN_MACADDR_DATA", "hex"),
        ("IFLA_MACVLAN_MACADDR_COUNT", "uint32"),
        ("IFLA_MACVLAN_BC_QUEUE_LEN", "uint32"),
        ("IFLA_MACVLAN_BC_QUEUE_LEN_USED", "uint32"),
    )


class _IpvlanData(nla):  # type: ignore[misc] # pyroute2 0.9 lacks IFLA_IPVLAN_FLAGS (bridge/private/vepa)
    prefix = "IFLA_"
    nla_map = (
        ("IFLA_IPVLAN_UNSPEC", "none"),
        ("IFLA_IPVLAN_MODE", "uint16"),
        ("IFLA_IPVLAN_FLAGS", "uint16"),
    )


# pyroute2's documented extension point for link kinds.
ifinfmsg.ifinfo.register_link_kind(module={"macvlan": _MacvlanData, "ipvlan": _IpvlanData})

MACVLAN_MODES: Final = {"private": 1, "vepa": 2, "bridge": 4, "passthru": 8}
IPVLAN_MODES: Final = {"l2": 0, "l3": 1, "l3s": 2}
IPVLAN_FLAGS: Final = {"bridge": 0, "private": 1, "vepa": 2}


@dataclass(frozen=True, slots=True)
class Link:
    index: int
    name: str
    kind: str
    mac: str
    mtu: int
    up: bool
    group: int
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RouteInfo:
    family: int
    dst: str  # "0.0.0.0/0", "10.1.0.0/24", ...
    gateway: str | None
    oif: int
    table: int
    scope: int


def _translate(exc: NetlinkError, what: str) -> PlexusError:
    if exc.code == errno.EEXIST:
        return LinkExists(f"{what}: already exists")
    if exc.code == errno.ENODEV:
        return LinkNotFound(f"{what}: no such device")
    if exc.code in (errno.EOPNOTSUPP, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
        return KernelUnsupported(f"{what}: not supported by this kernel ({os.strerror(exc.code)})")
    return PlexusError(f"{what}: {os.strerror(exc.code)} (netlink error {exc.code})")


def family_of(address: str) -> int:
    return socket.AF_INET if ipaddress.ip_interface(address).version == 4 else socket.AF_INET6


class Netlink:
    """rtnetlink on one namespace (the node's when `netns` is None)."""

    def __init__(self, ipr: Any) -> None:
        self._ipr = ipr

    @classmethod
    @contextmanager
    def open(cls, netns: str | None = None) -> Iterator[Netlink]:
        # The socket is always made here, by us: pyroute2 would open its own on another thread,
        # and a socket belongs to the namespace of the thread that made it.
        sock = run_in_netns(netns, _netlink_socket) if netns else _netlink_socket()
        ipr = IPRoute(use_socket=sock)
        try:
            yield cls(ipr)
        finally:
            ipr.close()
            sock.close()

    # --- links --------------------------------------------------------------------------------

    def link(self, name: str) -> Link | None:
        try:
            msgs = self._ipr.link("get", ifname=name)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise _translate(exc, f"link {name}") from None
        return _link(msgs[0])

    def require(self, name: str) -> Link:
        link = self.link(name)
        if link is None:
            raise LinkNotFound(f"interface {name} does not exist")
        return link

    def links(self) -> list[Link]:
        return [_link(m) for m in self._dump(self._ipr.get_links)]

    def create(self, name: str, kind: str, *, what: str, **attrs: Any) -> None:
        """RTM_NEWLINK (with IFLA_NET_NS_FD etc. in `attrs`); errors translated."""
        try:
            self._ipr.link("add", ifname=name, kind=kind, **attrs)
        except NetlinkError as exc:
            if exc.code == errno.EOPNOTSUPP:  # "Unknown device type": no such module
                raise KernelUnsupported(
                    f"{what}: this kernel has no {kind} support (module {kind} missing)"
                ) from None
            raise _translate(exc, what) from None

    def delete(self, name: str) -> bool:
        """Delete a link; False when it was already gone (DEL is idempotent)."""
        try:
            self._ipr.link("del", ifname=name)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise _translate(exc, f"deleting {name}") from None
        return True

    def delete_group(self, group: int) -> None:
        """Delete every link of a device group at once (one RCU wait for all of them)."""
        try:
            self._ipr.link("del", group=group)
        except NetlinkError as exc:
            if exc.code not in (errno.ENODEV, errno.ENOENT):
                raise _translate(exc, f"deleting device group {group}") from None

    def set_up(self, index: int) -> None:
        self._ipr.link("set", index=index, state="up")

    # --- addresses and routes -----------------------------------------------------------------

    def add_address(self, index: int, cidr: str, *, nodad: bool = False) -> None:
        """Add an address; `nodad` skips IPv6 duplicate address detection (the address is
        ours alone, and DAD would hold it tentative for a second or more)."""
        iface = ipaddress.ip_interface(cidr)
        attrs: dict[str, Any] = {}
        if nodad and iface.version == 6:
            attrs["flags"] = IFA_F_NODAD
        try:
            self._ipr.addr(
                "add",
                index=index,
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
                family=family_of(cidr),
                **attrs,
            )
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise _translate(exc, f"adding address {cidr}") from None

    def addresses(self, index: int) -> list[str]:
        out = []
        for msg in self._dump(self._ipr.get_addr, index=index):
            out.append(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
        return out

    def add_route(
        self,
        dst: str,
        *,
        oif: int,
        gateway: str | None = None,
        scope: int | None = None,
        table: int = MAIN_TABLE,
        onlink: bool = False,
        src: str | None = None,
        protocol: int | None = None,
    ) -> None:
        attrs: dict[str, Any] = {"dst": dst, "oif": oif, "table": table, "family": family_of(dst)}
        if protocol is not None:
            attrs["proto"] = protocol
        if gateway:
            attrs["gateway"] = gateway
        if scope is not None:
            attrs["scope"] = scope
        if onlink:
            attrs["flags"] = 4  # RTNH_F_ONLINK: a gateway not in any connected subnet
        if src:
            attrs["prefsrc"] = src
        try:
            self._ipr.route("replace", **attrs)
        except NetlinkError as exc:
            raise _translate(exc, f"route {dst} via {gateway or 'link'}") from None

    def delete_route(self, dst: str, *, table: int = MAIN_TABLE, oif: int | None = None) -> None:
        attrs: dict[str, Any] = {"dst": dst, "table": table, "family": family_of(dst)}
        if oif is not None:
            attrs["oif"] = oif
        try:
            self._ipr.route("del", **attrs)
        except NetlinkError as exc:
            if exc.code not in (errno.ESRCH, errno.ENOENT):
                raise _translate(exc, f"deleting route {dst}") from None

    def routes(self, *, table: int | None = MAIN_TABLE) -> list[RouteInfo]:
        """Routes of one table (None: of every table)."""
        out = []
        for family in (socket.AF_INET, socket.AF_INET6):
            kwargs: dict[str, Any] = {"family": family}
            if table is not None:
                kwargs["table"] = table
            for msg in self._dump(self._ipr.get_routes, **kwargs):
                out.append(_route(msg))
        return out

    def protocol_routes(self, protocol: int) -> set[str]:
        """Destinations of the main-table routes installed with rtm_protocol `protocol`."""
        out = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in self._dump(self._ipr.get_routes, family=family, table=MAIN_TABLE):
                if msg["proto"] == protocol:
                    out.add(_route(msg).dst)
        return out

    def add_rule(self, *, src: str, table: int, priority: int) -> None:
        try:
            self._ipr.rule(
                "add",
                src=str(ipaddress.ip_interface(src).ip),
                src_len=ipaddress.ip_interface(src).network.max_prefixlen,
                table=table,
                priority=priority,
                family=family_of(src),
            )
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise _translate(exc, f"rule from {src} table {table}") from None

    def delete_rule(self, *, src: str, table: int, priority: int) -> None:
        iface = ipaddress.ip_interface(src)
        try:
            self._ipr.rule(
                "del",
                src=str(iface.ip),
                src_len=iface.network.prefixlen,
                table=table,
                priority=priority,
                family=family_of(src),
            )
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.ESRCH):
                raise _translate(exc, f"deleting rule from {src}") from None

    def rules(self) -> list[tuple[str, int]]:
        out = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in self._dump(self._ipr.get_rules, family=family):
                src = msg.get_attr("FRA_SRC")
                if src:
                    out.append((f"{src}/{msg['src_len']}", int(msg.get_attr("FRA_TABLE") or 0)))
        return out

    # --- neighbours and bridge FDB (VXLAN peers) ----------------------------------------------

    def neighbour(self, index: int, address: str, mac: str) -> None:
        try:
            self._ipr.neigh(
                "replace",
                ifindex=index,
                dst=address,
                lladdr=mac,
                state=0x80,
                family=family_of(address),
            )  # NUD_PERMANENT
        except NetlinkError as exc:
            raise _translate(exc, f"neighbour {address}") from None

    def fdb(self, index: int, mac: str, remote: str) -> None:
        """A permanent FDB entry on the device itself (NTF_SELF: the VXLAN device's own table,
        not a bridge's): frames for `mac` go to the VTEP at `remote`."""
        try:
            self._ipr.fdb(
                "replace", ifindex=index, lladdr=mac, dst=remote, state=0x80, flags=NTF_SELF
            )
        except NetlinkError as exc:
            raise _translate(exc, f"fdb {mac} -> {remote}") from None

    def _dump(self, call: Any, **kwargs: Any) -> list[Any]:
        for attempt in range(_DUMP_RETRIES):
            try:
                return list(call(**kwargs))
            except NetlinkDumpInterrupted:
                if attempt == _DUMP_RETRIES - 1:
                    raise
        return []


def _netlink_socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_ROUTE)


def _link(msg: Any) -> Link:
    info = msg.get_attr("IFLA_LINKINFO")
    kind, data = "", {}
    if info:
        kind = info.get_attr("IFLA_INFO_KIND") or ""
        raw = info.get_attr("IFLA_INFO_DATA")
        if raw is not None and hasattr(raw, "get"):
            data = dict(raw.get("attrs", []))
    return Link(
        index=int(msg["index"]),
        name=str(msg.get_attr("IFLA_IFNAME")),
        kind=str(kind),
        mac=str(msg.get_attr("IFLA_ADDRESS") or ""),
        mtu=int(msg.get_attr("IFLA_MTU") or 0),
        up=bool(msg["flags"] & 1),
        group=int(msg.get_attr("IFLA_GROUP") or 0),
        data=data,
    )


def _route(msg: Any) -> RouteInfo:
    family = int(msg["family"])
    dst = msg.get_attr("RTA_DST")
    if dst is None:
        dst = "0.0.0.0" if family == socket.AF_INET else "::"
    return RouteInfo(
        family=family,
        dst=f"{dst}/{msg['dst_len']}",
        gateway=msg.get_attr("RTA_GATEWAY"),
        oif=int(msg.get_attr("RTA_OIF") or 0),
        table=int(msg.get_attr("RTA_TABLE") or msg["table"]),
        scope=int(msg["scope"]),
    )


def move_default_route(netns: str, ifname: str, gateways: list[str]) -> set[int]:
    """Make `ifname` the pod's way out: for each family of `gateways`, drop every other default
    route of that family and route via that gateway on `ifname`. With no gateways, keep the
    default routes `ifname` already has and drop the others of those families. Returns the
    families that changed hands (NPWG default-route)."""
    with Netlink.open(netns) as nl:
        oif = nl.require(ifname).index
        defaults = [r for r in nl.routes() if r.dst in ("0.0.0.0/0", "::/0")]
        wanted = {family_of(gw): gw for gw in gateways}
        families = set(wanted) or {r.family for r in defaults if r.oif == oif}
        for route in defaults:
            keep = route.oif == oif and (not wanted or route.gateway == wanted.get(route.family))
            if route.family in families and not keep:
                nl.delete_route(route.dst, oif=route.oif)
        for family, gateway in wanted.items():
            dst = "0.0.0.0/0" if family == socket.AF_INET else "::/0"
            try:
                nl.add_route(dst, oif=oif, gateway=gateway)
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
