"""The one thin adaptor over rtnetlink (house rule 12): typed results (`Link`, `RouteInfo`),
errors translated once (`kernel.rtnl.translate`), and sockets bound to the right network
namespace without moving any thread.

`Netlink.open(netns)` gives a handle on one namespace: for a pod, its socket is created on a
short-lived thread that entered the pod's namespace, then used from the caller's thread;
without `netns`, on the calling thread itself (`kernel.rtnl.Rtnl`).

Links are created directly in the pod's namespace (IFLA_NET_NS_FD) with their final name, MTU,
MAC, group and state in one request, so they are never visible in the node's namespace and
there is no temporary name to clean up.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

from pyroute2.netlink import (
    NLA_F_NESTED,
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    nla,
    nlmsg,
)
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELMDB,
    RTM_DELNEIGH,
    RTM_DELROUTE,
    RTM_DELRULE,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_GETMDB,
    RTM_GETNEIGH,
    RTM_GETROUTE,
    RTM_GETRULE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWMDB,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    RTM_NEWRULE,
    RTM_SETLINK,
)
from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from cnispec.errors import KernelUnsupported, PlexusError, TryAgainLater
from kernel.rtnl import NLMSG_HDR, LinkNotFound, Rtnl, attributes, message, translate

MAIN_TABLE: Final = 254
LOCAL_TABLE: Final = 255
RT_SCOPE_LINK: Final = 253
_DUMP_RETRIES: Final = 5
IFA_F_NODAD: Final = 0x02
IFA_F_DADFAILED: Final = 0x08
IFA_F_TENTATIVE: Final = 0x40
DAD_TIMEOUT: Final = 10.0
NTF_SELF: Final = 0x02
NUD_PERMANENT: Final = 0x80
IFF_UP: Final = 0x1
IFF_ALLMULTI: Final = 0x200
RTPROT_STATIC: Final = 4
RTN_UNICAST: Final = 1
RTN_MULTICAST: Final = 5
RTN_UNREACHABLE: Final = 7
RTPROT_RA: Final = 9
RT_SCOPE_UNIVERSE: Final = 0
RTNH_F_ONLINK: Final = 4
FR_ACT_TO_TBL: Final = 1
AF_BRIDGE: Final = 7


class AddressInUse(PlexusError):
    """Another host on the segment holds the address (IPv6 DAD failed)."""


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
    data: dict[str, Any]  # IFLA_INFO_DATA; `Netlink.link` decodes it only for `_DATA_READ`
    alias: str = ""  # IFLA_IFALIAS ("" when none)
    # IFLA_PARENT_DEV_NAME (Linux 5.15+): the bus device behind a physical netdev, for a VF its
    # PCI address; "" for virtual links and older kernels.
    parent_dev: str = ""


@dataclass(frozen=True, slots=True)
class RouteInfo:
    family: int
    dst: str  # "0.0.0.0/0", "10.1.0.0/24", ...
    gateway: str | None
    oif: int
    table: int
    scope: int
    proto: int = RTPROT_STATIC
    priority: int = 0
    route_type: int = RTN_UNICAST


def family_of(address: str) -> int:
    return socket.AF_INET if ipaddress.ip_interface(address).version == 4 else socket.AF_INET6


class Netlink:
    """rtnetlink on one namespace (the node's when `netns` is None)."""

    def __init__(self, transport: Rtnl) -> None:
        self._nl = transport

    @classmethod
    @contextmanager
    def open(cls, netns: str | None = None) -> Iterator[Netlink]:
        with Rtnl.open(netns) as transport:
            yield cls(transport)

    # --- links --------------------------------------------------------------------------------

    def link(self, name: str) -> Link | None:
        try:
            raws = self._nl.request_raw(message(ifinfmsg, {}, [("IFLA_IFNAME", name)]), RTM_GETLINK)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise translate(exc, f"link {name}") from None
        return _fast_link(raws[0]) or _link(_decoded(ifinfmsg, raws[0]))

    def require(self, name: str) -> Link:
        link = self.link(name)
        if link is None:
            raise LinkNotFound(f"interface {name} does not exist")
        return link

    def links(self) -> list[Link]:
        return [_link(m) for m in self._dump(ifinfmsg, RTM_GETLINK, {})]

    def default_route_link(self) -> Link | None:
        """The interface of the namespace's default route (IPv4 first), if it has one."""
        for route in self.routes():
            if route.dst in ("0.0.0.0/0", "::/0") and route.oif:
                for link in self.links():
                    if link.index == route.oif:
                        return link
        return None

    def create(
        self,
        name: str,
        kind: str,
        *,
        what: str,
        link: int | None = None,
        netns_fd: int | None = None,
        mtu: int | None = None,
        mac: str | None = None,
        group: int | None = None,
        up: bool = False,
        data: list[tuple[str, Any]] | None = None,
        peer: dict[str, Any] | None = None,
    ) -> None:
        """RTM_NEWLINK for a new link of `kind`, everything in one request. `peer` (veth) takes
        the same keys for the other end: name, netns_fd, mtu, mac, group."""
        info: list[tuple[str, Any]] = [("IFLA_INFO_KIND", kind)]
        if peer is not None:
            peer_attrs = _link_attrs(peer["name"], **{k: v for k, v in peer.items() if k != "name"})
            data = [*(data or []), ("VETH_INFO_PEER", {"attrs": peer_attrs})]
        if data:
            info.append(("IFLA_INFO_DATA", {"attrs": data}))
        attrs = [
            *_link_attrs(name, netns_fd=netns_fd, mtu=mtu, mac=mac, group=group, link=link),
            ("IFLA_LINKINFO", {"attrs": info}),
        ]
        fields = {"flags": IFF_UP, "change": IFF_UP} if up else {}
        try:
            self._nl.request(
                message(ifinfmsg, fields, attrs), RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL
            )
        except NetlinkError as exc:
            if exc.code == errno.EOPNOTSUPP:  # "Unknown device type": no such module
                raise KernelUnsupported(
                    f"{what}: this kernel has no {kind} support (module {kind} missing)"
                ) from None
            raise translate(exc, what, link=True) from None

    def delete(self, name: str) -> bool:
        """Delete a link; False when it was already gone (DEL is idempotent)."""
        try:
            self._nl.request(message(ifinfmsg, {}, [("IFLA_IFNAME", name)]), RTM_DELLINK)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise translate(exc, f"deleting {name}") from None
        return True

    def delete_group(self, group: int) -> None:
        """Delete every link of a device group at once (one RCU wait for all of them)."""
        try:
            self._nl.request(message(ifinfmsg, {}, [("IFLA_GROUP", group)]), RTM_DELLINK)
        except NetlinkError as exc:
            if exc.code not in (errno.ENODEV, errno.ENOENT):
                raise translate(exc, f"deleting device group {group}") from None

    def set_up(self, index: int) -> None:
        try:
            self._nl.request(
                message(ifinfmsg, {"index": index, "flags": IFF_UP, "change": IFF_UP}, []),
                RTM_NEWLINK,
            )
        except NetlinkError as exc:
            raise translate(exc, f"setting link {index} up") from None

    def set_allmulti(self, index: int, *, on: bool = True) -> None:
        """Receive every multicast frame (IFF_ALLMULTI), not only the groups joined: for
        devices whose driver filters multicast by the joined list too strictly (VFs)."""
        try:
            self._nl.request(
                message(
                    ifinfmsg,
                    {"index": index, "flags": IFF_ALLMULTI if on else 0, "change": IFF_ALLMULTI},
                    [],
                ),
                RTM_NEWLINK,
            )
        except NetlinkError as exc:
            raise translate(exc, f"setting allmulticast on link {index}") from None

    def set_down(self, index: int) -> None:
        try:
            self._nl.request(
                message(ifinfmsg, {"index": index, "flags": 0, "change": IFF_UP}, []), RTM_NEWLINK
            )
        except NetlinkError as exc:
            raise translate(exc, f"setting link {index} down") from None

    def modify(
        self,
        index: int,
        *,
        what: str,
        name: str | None = None,
        mac: str | None = None,
        mtu: int | None = None,
        alias: str | None = None,
    ) -> None:
        """Change an existing link in one RTM_NEWLINK: rename it, set its MAC, MTU or alias
        (`alias=""` clears it). EEXIST on a rename is `LinkExists`."""
        attrs: list[tuple[str, Any]] = []
        if name is not None:
            attrs.append(("IFLA_IFNAME", name))
        if mac is not None:
            attrs.append(("IFLA_ADDRESS", mac))
        if mtu is not None:
            attrs.append(("IFLA_MTU", mtu))
        if alias is not None:
            attrs.append(("IFLA_IFALIAS", alias))
        if not attrs:
            return
        try:
            self._nl.request(message(ifinfmsg, {"index": index}, attrs), RTM_NEWLINK)
        except NetlinkError as exc:
            raise translate(exc, what, link=True) from None

    def move(self, index: int, netns_fd: int, *, what: str) -> None:
        """Move an existing link into the namespace open at `netns_fd`, under its current name
        (the kernel takes the link down on the way). EEXIST: the name is taken there."""
        try:
            self._nl.request(
                message(ifinfmsg, {"index": index}, [("IFLA_NET_NS_FD", netns_fd)]), RTM_NEWLINK
            )
        except NetlinkError as exc:
            raise translate(exc, what, link=True) from None

    # --- addresses and routes -----------------------------------------------------------------

    def add_address(self, index: int, cidr: str, *, nodad: bool = False) -> None:
        """Add an address; `nodad` skips IPv6 duplicate address detection (the address is
        ours alone, and DAD would hold it tentative for a second or more)."""
        iface = ipaddress.ip_interface(cidr)
        fields = {
            "family": family_of(cidr),
            "prefixlen": iface.network.prefixlen,
            "index": index,
            "flags": IFA_F_NODAD if nodad and iface.version == 6 else 0,
        }
        attrs = [("IFA_LOCAL", str(iface.ip)), ("IFA_ADDRESS", str(iface.ip))]
        if iface.version == 4 and iface.network.prefixlen < 31:
            attrs.append(("IFA_BROADCAST", str(iface.network.broadcast_address)))
        try:
            self._nl.request(
                message(ifaddrmsg, fields, attrs), RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL
            )
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise translate(exc, f"adding address {cidr}") from None

    def delete_address(self, index: int, cidr: str) -> None:
        iface = ipaddress.ip_interface(cidr)
        fields = {"family": family_of(cidr), "prefixlen": iface.network.prefixlen, "index": index}
        attrs = [("IFA_LOCAL", str(iface.ip)), ("IFA_ADDRESS", str(iface.ip))]
        try:
            self._nl.request(message(ifaddrmsg, fields, attrs), RTM_DELADDR)
        except NetlinkError as exc:
            if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
                raise translate(exc, f"deleting address {cidr}") from None

    def settle_addresses(self, index: int, timeout: float = DAD_TIMEOUT) -> None:
        """Wait until no IPv6 address of the link is tentative (duplicate address detection
        done), so the pod's applications can bind them the moment ADD returns; a duplicate
        found on the segment is an error, as the reference plugins' SettleAddresses makes it."""
        deadline = time.monotonic() + timeout
        while True:
            pending = []
            for msg in self._dump(ifaddrmsg, RTM_GETADDR, {"family": socket.AF_INET6}):
                if msg["index"] != index:
                    continue
                flags = int(msg.get_attr("IFA_FLAGS") or msg["flags"])
                address = f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}"
                if flags & IFA_F_DADFAILED:
                    raise AddressInUse(
                        f"address {address} is already in use on the segment (IPv6 duplicate "
                        "address detection failed)",
                    )
                if flags & IFA_F_TENTATIVE:
                    pending.append(address)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TryAgainLater(
                    f"IPv6 duplicate address detection did not finish in {timeout:.0f}s for "
                    + ", ".join(pending),
                )
            time.sleep(0.05)

    def addresses(self, index: int) -> list[str]:
        return [
            f"{m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}"
            for m in self._dump(ifaddrmsg, RTM_GETADDR, {})
            if m["index"] == index
        ]

    def all_addresses(self) -> list[str]:
        """Every address of every link in the namespace, bare (no prefix length), one dump."""
        return [str(m.get_attr("IFA_ADDRESS")) for m in self._dump(ifaddrmsg, RTM_GETADDR, {})]

    def add_route(
        self,
        dst: str,
        *,
        oif: int | None,
        gateway: str | None = None,
        scope: int | None = None,
        table: int = MAIN_TABLE,
        onlink: bool = False,
        protocol: int = RTPROT_STATIC,
        priority: int | None = None,
        route_type: int = RTN_UNICAST,
        mtu: int | None = None,
        advmss: int | None = None,
        replace: bool = False,
    ) -> None:
        """Add a route. Without `replace` it is added next to any route with the same prefix
        and metric (as the reference plugins' RouteAdd does) and never displaces one; an
        identical route already there is fine. `replace` is for routes Plexus alone owns."""
        net = ipaddress.ip_network(dst, strict=False)
        fields = {
            "family": family_of(dst),
            "dst_len": net.prefixlen,
            "table": min(table, 252),
            "proto": protocol,
            "type": route_type,
            "scope": RT_SCOPE_UNIVERSE if scope is None else scope,
            "flags": RTNH_F_ONLINK if onlink else 0,
        }
        attrs: list[tuple[str, Any]] = [("RTA_TABLE", table)]
        if oif is not None:
            attrs.append(("RTA_OIF", oif))
        if net.prefixlen:
            attrs.append(("RTA_DST", str(net.network_address)))
        if gateway:
            attrs.append(("RTA_GATEWAY", gateway))
        if priority is not None:
            attrs.append(("RTA_PRIORITY", priority))
        metrics = [(k, v) for k, v in (("RTAX_MTU", mtu), ("RTAX_ADVMSS", advmss)) if v]
        if metrics:
            attrs.append(("RTA_METRICS", {"attrs": metrics}))
        flags = NLM_F_CREATE | (NLM_F_REPLACE if replace else 0)
        try:
            self._nl.request(message(rtmsg, fields, attrs), RTM_NEWROUTE, flags)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST and not replace:
                return  # this very route is already there (a repeated ADD, a CHECK repair)
            raise translate(exc, f"route {dst} via {gateway or 'link'}") from None

    def delete_route(
        self,
        dst: str,
        *,
        table: int = MAIN_TABLE,
        oif: int | None = None,
        gateway: str | None = None,
        protocol: int | None = None,
        priority: int | None = None,
    ) -> None:
        """Delete the route matching every key given (the kernel matches on all of them, so a
        protocol or gateway keeps it off anyone else's route with the same prefix)."""
        net = ipaddress.ip_network(dst, strict=False)
        fields = {
            "family": family_of(dst),
            "dst_len": net.prefixlen,
            "table": min(table, 252),
            "proto": protocol or 0,
        }
        attrs: list[tuple[str, Any]] = [("RTA_TABLE", table)]
        if net.prefixlen:
            attrs.append(("RTA_DST", str(net.network_address)))
        if oif is not None:
            attrs.append(("RTA_OIF", oif))
        if gateway:
            attrs.append(("RTA_GATEWAY", gateway))
        if priority is not None:
            attrs.append(("RTA_PRIORITY", priority))
        try:
            self._nl.request(message(rtmsg, fields, attrs), RTM_DELROUTE)
        except NetlinkError as exc:
            if exc.code not in (errno.ESRCH, errno.ENOENT):
                raise translate(exc, f"deleting route {dst}") from None

    def routes(self, *, table: int | None = MAIN_TABLE) -> list[RouteInfo]:
        """Routes of one table (None: of every table), both families, in one dump each."""
        out = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in self._dump(rtmsg, RTM_GETROUTE, {"family": family}):
                route = _route(msg)
                if table is None or route.table == table:
                    out.append(route)
        return out

    def add_rule(self, *, src: str, table: int, priority: int) -> None:
        self._rule(RTM_NEWRULE, src, table, priority, NLM_F_CREATE | NLM_F_EXCL)

    def delete_rule(self, *, src: str, table: int, priority: int) -> None:
        self._rule(RTM_DELRULE, src, table, priority, 0)

    def _rule(self, msg_type: int, src: str, table: int, priority: int, flags: int) -> None:
        iface = ipaddress.ip_interface(src)
        fields = {
            "family": family_of(src),
            "src_len": iface.network.prefixlen,
            "table": min(table, 252),
            "action": FR_ACT_TO_TBL,
        }
        attrs = [("FRA_SRC", str(iface.ip)), ("FRA_TABLE", table), ("FRA_PRIORITY", priority)]
        try:
            self._nl.request(message(fibmsg, fields, attrs), msg_type, flags)
        except NetlinkError as exc:
            if exc.code not in (errno.EEXIST, errno.ENOENT, errno.ESRCH):
                raise translate(exc, f"rule from {src} table {table}") from None

    def rules(self) -> list[tuple[str, int]]:
        out = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in self._dump(fibmsg, RTM_GETRULE, {"family": family}):
                src = msg.get_attr("FRA_SRC")
                if src:
                    out.append((f"{src}/{msg['src_len']}", int(msg.get_attr("FRA_TABLE") or 0)))
        return out

    # --- neighbours and bridge FDB (VXLAN peers) ----------------------------------------------

    def neighbour(self, index: int, address: str, mac: str) -> None:
        fields = {"family": family_of(address), "ifindex": index, "state": NUD_PERMANENT}
        attrs = [("NDA_DST", address), ("NDA_LLADDR", mac)]
        try:
            self._nl.request(
                message(ndmsg, fields, attrs), RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE
            )
        except NetlinkError as exc:
            raise translate(exc, f"neighbour {address}") from None

    def neighbours(self, index: int) -> dict[str, str]:
        """The permanent neighbour entries of a link: address -> MAC."""
        out = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in self._dump(ndmsg, RTM_GETNEIGH, {"family": family}):
                if msg["ifindex"] == index and msg["state"] & NUD_PERMANENT:
                    out[str(msg.get_attr("NDA_DST"))] = str(msg.get_attr("NDA_LLADDR") or "")
        return out

    def delete_neighbour(self, index: int, address: str) -> None:
        fields = {"family": family_of(address), "ifindex": index}
        try:
            self._nl.request(message(ndmsg, fields, [("NDA_DST", address)]), RTM_DELNEIGH)
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.ESRCH):
                raise translate(exc, f"deleting neighbour {address}") from None

    def fdb(self, index: int, mac: str, remote: str) -> None:
        """A permanent FDB entry on the device itself (NTF_SELF: the VXLAN device's own table,
        not a bridge's): frames for `mac` go to the VTEP at `remote`."""
        fields = {"family": AF_BRIDGE, "ifindex": index, "state": NUD_PERMANENT, "flags": NTF_SELF}
        attrs = [("NDA_LLADDR", mac), ("NDA_DST", remote)]
        try:
            self._nl.request(
                message(ndmsg, fields, attrs), RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE
            )
        except NetlinkError as exc:
            raise translate(exc, f"fdb {mac} -> {remote}") from None

    def fdb_entries(self, index: int) -> set[tuple[str, str]]:
        """The permanent FDB entries of a VXLAN device: (MAC, remote) pairs."""
        out = set()
        for msg in self._dump(ndmsg, RTM_GETNEIGH, {"family": AF_BRIDGE}):
            if msg["ifindex"] == index and msg["state"] & NUD_PERMANENT:
                remote = msg.get_attr("NDA_DST")
                if remote:
                    out.add((str(msg.get_attr("NDA_LLADDR")), str(remote)))
        return out

    def delete_fdb(self, index: int, mac: str, remote: str) -> None:
        fields = {"family": AF_BRIDGE, "ifindex": index, "flags": NTF_SELF}
        attrs = [("NDA_LLADDR", mac), ("NDA_DST", remote)]
        try:
            self._nl.request(message(ndmsg, fields, attrs), RTM_DELNEIGH)
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.ESRCH):
                raise translate(exc, f"deleting fdb {mac} -> {remote}") from None

    # --- bridges, their ports, VXLAN flood lists and VXLAN MDB (plexus-overlay) --------------

    def enslave(self, index: int, master: int, *, what: str) -> None:
        """Make link `index` a port of the bridge `master`."""
        try:
            self._nl.request(
                message(ifinfmsg, {"index": index}, [("IFLA_MASTER", master)]), RTM_NEWLINK
            )
        except NetlinkError as exc:
            raise translate(exc, what, link=True) from None

    def ports(self, master: int) -> list[Link]:
        """The links enslaved to `master` (a dump the kernel filters by IFLA_MASTER; each
        answer checked again, for a kernel that would ignore the filter)."""
        request = message(ifinfmsg, {}, [("IFLA_MASTER", master)])
        out = []
        for raw in self._nl.request_raw(request, RTM_GETLINK, dump=True):
            start = NLMSG_HDR.size + _IFINFO.size
            values = dict(attributes(raw, start, len(raw)))
            if _U32.unpack(values.get(IFLA_MASTER, b"\0\0\0\0")[:4])[0] != master:
                continue
            out.append(_fast_link(raw) or _link(_decoded(ifinfmsg, raw)))
        return out

    def flood_to(self, index: int, remote: str) -> None:
        """One more remote VTEP in a VXLAN device's all-zeros FDB entry (head-end replication:
        broadcast, unknown unicast and multicast without an MDB entry go to every such
        remote)."""
        fields = {"family": AF_BRIDGE, "ifindex": index, "state": NUD_PERMANENT, "flags": NTF_SELF}
        attrs = [("NDA_LLADDR", ZERO_MAC), ("NDA_DST", remote)]
        try:
            self._nl.request(
                message(ndmsg, fields, attrs), RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_APPEND
            )
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise translate(exc, f"flood entry -> {remote}") from None

    def mdb_add(self, dev: int, group: str, remote: str) -> None:
        """A permanent VXLAN MDB entry: frames for `group` leave VXLAN device `dev` to the VTEP
        at `remote` (one entry per remote; the FDB's flood list no longer applies to it)."""
        self._mdb_change(_mdb_message(dev, group, remote), add=True, what=f"{group} -> {remote}")

    def mdb_delete(self, dev: int, group: str, remote: str) -> None:
        self._mdb_change(_mdb_message(dev, group, remote), add=False, what=f"{group} -> {remote}")

    def port_mdb_add(self, bridge: int, port: int, group: str) -> None:
        """A permanent bridge MDB entry: `group`'s frames leave `bridge` through `port` (as
        if a member behind it had reported), whatever snooping has heard."""
        msg = _mdb_message(bridge, group, None, port=port)
        self._mdb_change(msg, add=True, what=f"{group} -> port #{port}")

    def port_mdb_delete(self, bridge: int, port: int, group: str) -> None:
        """The port's entry for `group`, permanent or learned from reports (gone already: fine)."""
        msg = _mdb_message(bridge, group, None, port=port)
        self._mdb_change(msg, add=False, what=f"{group} -> port #{port}")

    def _mdb_change(self, msg: Any, *, add: bool, what: str) -> None:
        """One MDB entry added (there already: fine) or deleted (not there: fine)."""
        try:
            if add:
                self._nl.request(msg, RTM_NEWMDB, NLM_F_CREATE | NLM_F_EXCL)
            else:
                self._nl.request(msg, RTM_DELMDB)
        except NetlinkError as exc:
            fine = (errno.EEXIST,) if add else (errno.ENOENT, errno.ESRCH, errno.EINVAL)
            if exc.code not in fine:
                raise translate(exc, f"{'' if add else 'deleting '}mdb {what}") from None

    def set_multicast_router(self, port: int, mode: int) -> None:
        """A bridge port's multicast router mode: 0 never a router port (groups nobody joined
        are not sent through it), 1 learned from queries (the kernel's default), 2 always."""
        msg = message(
            _BridgePortSetLink,
            {"family": AF_BRIDGE, "index": port},
            [("IFLA_PROTINFO", {"attrs": [("IFLA_BRPORT_MULTICAST_ROUTER", mode)]})],
        )
        try:
            self._nl.request(msg, RTM_SETLINK)
        except NetlinkError as exc:
            raise translate(exc, f"multicast_router of port #{port}", link=True) from None

    def mdb_remotes(self, dev: int) -> set[tuple[str, str]]:
        """The (group, remote) pairs of VXLAN device `dev`'s MDB."""
        out: set[tuple[str, str]] = set()
        request = message(_BrPortMsg, {"family": AF_BRIDGE, "ifindex": 0}, [])
        for raw in self._nl.request_raw(request, RTM_GETMDB, dump=True):
            start = NLMSG_HDR.size + _BR_PORT_MSG.size
            if _BR_PORT_MSG.unpack_from(raw, NLMSG_HDR.size)[1] != dev:
                continue
            for kind, mdb in attributes(raw, start, len(raw)):
                if kind != MDBA_MDB:
                    continue
                for kind2, entry in attributes(mdb, 0, len(mdb)):
                    if kind2 != MDBA_MDB_ENTRY:
                        continue
                    for kind3, info in attributes(entry, 0, len(entry)):
                        if kind3 == MDBA_MDB_ENTRY_INFO:
                            out.update(_mdb_remote(info))
        return out

    def _dump(self, cls: Any, msg_type: int, fields: dict[str, Any]) -> list[Any]:
        for attempt in range(_DUMP_RETRIES):
            try:
                return self._nl.request(message(cls, fields, []), msg_type, dump=True)
            except NetlinkDumpInterrupted:
                if attempt == _DUMP_RETRIES - 1:
                    raise
        return []


def _link_attrs(name: str, **values: Any) -> list[tuple[str, Any]]:
    """IFLA_IFNAME plus every given attribute (netns_fd, mtu, mac, group, link) that is set."""
    keys = {
        "netns_fd": "IFLA_NET_NS_FD",
        "mtu": "IFLA_MTU",
        "mac": "IFLA_ADDRESS",
        "group": "IFLA_GROUP",
        "link": "IFLA_LINK",
    }
    attrs: list[tuple[str, Any]] = [("IFLA_IFNAME", name)]
    attrs += [(keys[k], v) for k, v in values.items() if v is not None]
    return attrs


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
        alias=str(msg.get_attr("IFLA_IFALIAS") or ""),
        parent_dev=str(msg.get_attr("IFLA_PARENT_DEV_NAME") or ""),
    )


_IFINFO: Final = struct.Struct("=BxHiII")  # family, type, index, flags, change
_U32: Final = struct.Struct("=I")
IFLA_ADDRESS: Final = 1
IFLA_IFNAME: Final = 3
IFLA_MTU: Final = 4
IFLA_LINKINFO: Final = 18
IFLA_IFALIAS: Final = 20
IFLA_GROUP: Final = 27
IFLA_PARENT_DEV_NAME: Final = 56
IFLA_INFO_KIND: Final = 1
IFLA_INFO_DATA: Final = 2
# Kinds whose IFLA_INFO_DATA someone reads (`Link.data`: the fabric's VTEP): decoded in full.
_DATA_READ: Final = frozenset({"vxlan"})


def _decoded(cls: Any, raw: bytes) -> Any:
    msg = cls(raw)
    msg.decode()
    return msg


def _text(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode(errors="replace")


def _fast_link(raw: bytes) -> Link | None:
    """A link from its RTM_NEWLINK bytes, reading only the attributes `Link` has (a GETLINK
    answered ~10x faster than pyroute2's full decode, twice per attachment). None for a kind
    whose IFLA_INFO_DATA is read (`_DATA_READ`): pyroute2 decodes that one."""
    start = NLMSG_HDR.size
    _family, _type, index, flags, _change = _IFINFO.unpack_from(raw, start)
    values: dict[int, bytes] = dict(attributes(raw, start + _IFINFO.size, len(raw)))
    kind, has_data = "", False
    if (info := values.get(IFLA_LINKINFO)) is not None:
        nested = dict(attributes(info, 0, len(info)))
        kind = _text(nested.get(IFLA_INFO_KIND, b""))
        has_data = IFLA_INFO_DATA in nested
    if has_data and kind in _DATA_READ:
        return None
    mtu, group = values.get(IFLA_MTU), values.get(IFLA_GROUP)
    return Link(
        index=index,
        name=_text(values.get(IFLA_IFNAME, b"")),
        kind=kind,
        mac=":".join(f"{b:02x}" for b in values.get(IFLA_ADDRESS, b"")),
        mtu=_U32.unpack(mtu[:4])[0] if mtu else 0,
        up=bool(flags & IFF_UP),
        group=_U32.unpack(group[:4])[0] if group else 0,
        data={},
        alias=_text(values.get(IFLA_IFALIAS, b"")),
        parent_dev=_text(values.get(IFLA_PARENT_DEV_NAME, b"")),
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
        proto=int(msg["proto"]),
        priority=int(msg.get_attr("RTA_PRIORITY") or 0),
        route_type=int(msg["type"]),
    )


# --- VXLAN MDB (RTM_*MDB): pyroute2 0.9 has no message class for it --------------------------
IFLA_MASTER: Final = 10
ZERO_MAC: Final = "00:00:00:00:00:00"
MDBA_MDB: Final = 1
MDBA_MDB_ENTRY: Final = 1
MDBA_MDB_ENTRY_INFO: Final = 1
MDBA_MDB_EATTR_DST: Final = 6
MDB_PERMANENT: Final = 1
_BR_PORT_MSG: Final = struct.Struct("=B3xI")  # struct br_port_msg: family, ifindex
# struct br_mdb_entry: ifindex, state, flags, vid, addr (16-byte union, proto, 2 bytes padding)
_BR_MDB_ENTRY: Final = struct.Struct("=IBBH16s2s2x")
_ETH_P: Final = {4: b"\x08\x00", 6: b"\x86\xdd"}  # ETH_P_IP, ETH_P_IPV6, big-endian


class _MdbEntryAttrs(nla):  # type: ignore[misc] # MDBA_SET_ENTRY_ATTRS (MDBE_ATTR_*)
    nla_map = (
        ("MDBE_ATTR_UNSPEC", "none"),
        ("MDBE_ATTR_SOURCE", "cdata"),
        ("MDBE_ATTR_SRC_LIST", "cdata"),
        ("MDBE_ATTR_GROUP_MODE", "uint8"),
        ("MDBE_ATTR_RTPROT", "uint8"),
        ("MDBE_ATTR_DST", "cdata"),
    )


class _BridgePortSetLink(nlmsg):  # type: ignore[misc] # ifinfomsg + a nested IFLA_PROTINFO
    """RTM_SETLINK of a bridge port's options: pyroute2's ifinfmsg sends IFLA_PROTINFO without
    NLA_F_NESTED, which the bridge reads as the legacy one-byte STP state."""

    fields = (
        ("family", "B"),
        ("__align", "x"),
        ("ifi_type", "H"),
        ("index", "i"),
        ("flags", "I"),
        ("change", "I"),
    )
    nla_map = ((12, "IFLA_PROTINFO", "protinfo"),)

    class protinfo(nla):  # type: ignore[misc]
        nla_flags = NLA_F_NESTED
        nla_map = ((25, "IFLA_BRPORT_MULTICAST_ROUTER", "uint8"),)


class _BrPortMsg(nlmsg):  # type: ignore[misc] # struct br_port_msg and the MDBA_SET_* attributes
    fields = (("family", "B"), ("__pad", "3x"), ("ifindex", "I"))
    nla_map = (
        ("MDBA_SET_ENTRY_UNSPEC", "none"),
        ("MDBA_SET_ENTRY", "cdata"),
        ("MDBA_SET_ENTRY_ATTRS", "mdb_attrs | nested"),  # the kernel parses it strictly
    )
    mdb_attrs = _MdbEntryAttrs


def _mdb_message(dev: int, group: str, remote: str | None, *, port: int | None = None) -> Any:
    """`bridge mdb add dev DEV port DEV grp GROUP permanent dst REMOTE` (a VXLAN device's
    entry), or without `remote`, `... port PORT grp GROUP permanent` (a bridge port's)."""
    ip = ipaddress.ip_address(group)
    entry = _BR_MDB_ENTRY.pack(
        dev if port is None else port,
        MDB_PERMANENT,
        0,
        0,
        ip.packed.ljust(16, b"\0"),
        _ETH_P[ip.version],
    )
    attrs: list[tuple[str, Any]] = [("MDBA_SET_ENTRY", entry)]
    if remote is not None:
        dst = ipaddress.ip_address(remote).packed
        attrs.append(("MDBA_SET_ENTRY_ATTRS", {"attrs": [("MDBE_ATTR_DST", dst)]}))
    return message(_BrPortMsg, {"family": AF_BRIDGE, "ifindex": dev}, attrs)


def _mdb_remote(info: bytes) -> Iterator[tuple[str, str]]:
    """(group, remote) of one MDBA_MDB_ENTRY_INFO: a br_mdb_entry, then its attributes."""
    if len(info) < _BR_MDB_ENTRY.size:
        return
    _ifindex, _state, _flags, _vid, raw, proto = _BR_MDB_ENTRY.unpack_from(info, 0)
    version = 4 if proto == _ETH_P[4] else 6 if proto == _ETH_P[6] else 0
    if not version:
        return
    group = str(ipaddress.ip_address(raw[: 4 if version == 4 else 16]))
    for kind, value in attributes(info, _BR_MDB_ENTRY.size, len(info)):
        if kind == MDBA_MDB_EATTR_DST and len(value) in (4, 16):
            yield group, str(ipaddress.ip_address(value))
