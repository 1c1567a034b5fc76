"""The node side of the flat, routable pod network: every pod reaches every pod and node without
NAT. Each node owns pod subnets (podCIDRs); a pod's address is a host route on its node; and
the other nodes' pod subnets are routed either natively (next hop = that node's underlay
address, when the nodes share a segment or the underlay routes pod subnets) or over a VXLAN
overlay (one `plexus.vxlan` device per node; per peer a route via the peer's VTEP address, a
permanent neighbour entry and an FDB entry pointing at the peer's underlay address).

`Fabric.reconcile(peers)` keeps those routes and entries in step with the set of nodes; the
daemon feeds it from the API (Node objects) or from the local config. Routes Plexus owns carry
its own routing protocol number (RTPROT_PLEXUS): only those are ever replaced or removed, and a
route someone else put on the same prefix wins (Plexus logs the conflict and leaves it). The
node's own pod subnets get `unreachable` routes, so a packet for an address no pod holds is
refused here instead of bouncing between node and router. One peer that cannot be programmed
never stops the others. No masquerade anywhere.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import structlog

from cnispec.errors import InvalidConfig, PlexusError
from delegates.forwarding import ensure_forwarding
from kernel.netlink import (
    RTN_UNICAST,
    RTN_UNREACHABLE,
    ZERO_MAC,
    Link,
    Netlink,
    RouteInfo,
    family_of,
)

VXLAN_DEVICE: Final = "plexus.vxlan"
# Native mode with multicast: a VXLAN device that carries only group traffic between nodes, so
# the underlay needs no multicast routing (VXLAN mode carries it on VXLAN_DEVICE).
MULTICAST_DEVICE: Final = "plexus.mcast"
RTPROT_PLEXUS: Final = 0x50  # our routes' rtm_protocol ("P"), unused by the kernel and daemons
VXLAN_OVERHEAD: Final[dict[int, int]] = {socket.AF_INET: 50, socket.AF_INET6: 70}

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Peer:
    name: str
    addresses: tuple[str, ...]  # underlay addresses (one per family at most is used)
    pod_cidrs: tuple[str, ...]

    @property
    def address(self) -> str:
        """The underlay address VXLAN uses: the IPv4 one when there is one."""
        ordered = sorted(self.addresses, key=lambda a: family_of(a) != socket.AF_INET)
        return ordered[0] if ordered else ""

    def address_of(self, family: int) -> str | None:
        return next((a for a in self.addresses if family_of(a) == family), None)


@dataclass
class FabricConfig:
    mode: Literal["native", "vxlan"]
    node_name: str
    pod_cidrs: tuple[str, ...]
    interface: str | None = None  # underlay; default: the default-route interface
    address: str | None = None  # this node's underlay address; default: the interface's first
    vni: int = 4242
    port: int = 4789
    peers: tuple[Peer, ...] = field(default_factory=tuple)
    multicast: bool = False  # group traffic between nodes (delegates.fabric_mcast)
    multicast_vni: int = 4243  # native mode: the VNI of MULTICAST_DEVICE


def vtep_mac(node_name: str) -> str:
    """A stable VTEP MAC per node, derived from its name: every node computes the same MAC for
    a peer whatever addresses the peer has (multi-NIC nodes, VIPs), so it needs no publishing."""
    digest = hashlib.sha256(node_name.encode()).digest()
    return "0e:" + ":".join(f"{b:02x}" for b in digest[:5])


def _same_ip(have: object, want: str) -> bool:
    try:
        return ipaddress.ip_address(str(have)) == ipaddress.ip_address(want)
    except ValueError:
        return False


def vtep_address(pod_cidr: str) -> str:
    """The node's VTEP address: the first address of its pod subnet (never given to a pod)."""
    return str(ipaddress.ip_network(pod_cidr, strict=False).network_address)


@dataclass(frozen=True, slots=True)
class _WantedRoute:
    owner: str  # the peer it is for, or this node
    gateway: str | None
    oif: int | None
    onlink: bool = False
    route_type: int = RTN_UNICAST

    def matches(self, route: RouteInfo) -> bool:
        return (
            route.route_type == self.route_type
            and (route.gateway or None) == self.gateway
            and (self.oif is None or route.oif == self.oif)
        )


class Fabric:
    def __init__(self, config: FabricConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._underlay: Link | None = None
        self._address: str | None = None
        # The peers of the last reconcile (None before the first), and who wants to hear of a
        # change: the overlay networks (delegates.overlay) replicate to the same nodes.
        self._peers: tuple[Peer, ...] | None = None
        self._peer_watchers: list[Callable[[tuple[Peer, ...]], None]] = []

    @property
    def pod_cidrs(self) -> tuple[str, ...]:
        """This node's pod subnets; empty until the node has been assigned them."""
        return self.config.pod_cidrs

    def setup(self) -> None:
        """Find the underlay, and in VXLAN mode make the VTEP, in the node's namespace."""
        with self._lock, Netlink.open() as node:
            self._underlay = self._find_underlay(node)
            self._address = self.config.address or self._first_address(node, self._underlay)
            if self.config.mode == "vxlan":
                self._ensure_vtep(node)
            self._ensure_multicast_device(node)
        self._enable_forwarding()
        log.info(
            "fabric_ready",
            mode=self.config.mode,
            underlay=self._underlay.name,
            address=self._address,
            pod_cidrs=list(self.pod_cidrs),
            pod_mtu=self.pod_mtu(),
        )

    def set_pod_cidrs(self, pod_cidrs: tuple[str, ...]) -> bool:
        """Take this node's pod subnets as assigned now (the API assigns them after the node
        registers); True when they changed, and the next reconcile must run in full."""
        if pod_cidrs == self.config.pod_cidrs:
            return False
        log.info("fabric_pod_cidrs", old=list(self.config.pod_cidrs), new=list(pod_cidrs))
        with self._lock:
            self.config.pod_cidrs = pod_cidrs
        self._enable_forwarding()
        return True

    def pod_mtu(self) -> int:
        underlay = self._require_underlay()
        if self.config.mode == "native":
            return underlay.mtu
        return underlay.mtu - VXLAN_OVERHEAD[family_of(self._require_address())]

    def reconcile(self, peers: list[Peer]) -> list[str]:
        """Bring routes (and VTEP entries) in line with `peers`. Returns what could not be
        programmed (one line per problem, each also logged); everything else is done."""
        problems: list[str] = []
        with self._lock, Netlink.open() as node:
            others = [p for p in peers if p.name != self.config.node_name]
            vtep = self._ensure_vtep(node) if self.config.mode == "vxlan" else None
            wanted = self._wanted_routes(others, vtep)
            existing = node.routes()
            ours = [r for r in existing if r.proto == RTPROT_PLEXUS]
            foreign = {r.dst for r in existing if r.proto != RTPROT_PLEXUS}
            for route in ours:
                if route.dst not in wanted or not wanted[route.dst].matches(route):
                    node.delete_route(
                        route.dst,
                        oif=route.oif or None,
                        gateway=route.gateway,
                        protocol=RTPROT_PLEXUS,
                        priority=route.priority,
                    )
            current = {r.dst for r in ours if r.dst in wanted and wanted[r.dst].matches(r)}
            for dst, want in wanted.items():
                if dst in current:
                    continue
                if dst in foreign:
                    problems.append(f"{dst} ({want.owner}): another route to it exists; kept")
                    log.warning("fabric_route_conflict", dst=dst, peer=want.owner)
                    continue
                try:
                    node.add_route(
                        dst,
                        oif=want.oif,
                        gateway=want.gateway,
                        onlink=want.onlink,
                        route_type=want.route_type,
                        protocol=RTPROT_PLEXUS,
                        replace=True,
                    )
                except PlexusError as exc:
                    problems.append(f"{dst} ({want.owner}): {exc.msg}")
                    log.warning("fabric_peer_unroutable", dst=dst, peer=want.owner, error=exc.msg)
            if vtep is not None:
                self._program_vtep(node, vtep, others)
            elif (device := self._ensure_multicast_device(node)) is not None:
                self._program_flood_list(node, device, others)
            self._peers = tuple(peers)
        for watcher in self._peer_watchers:
            try:
                watcher(tuple(peers))
            except PlexusError as exc:
                problems.append(f"peer watcher: {exc.msg}")
                log.warning("fabric_peer_watcher_failed", error=exc.msg)
        return problems

    @property
    def peers(self) -> tuple[Peer, ...] | None:
        """Every node of the fabric (this one included) as of the last reconcile; None while
        the set is unknown (cluster mode before the API listed the nodes)."""
        return self._peers

    def watch_peers(self, watcher: Callable[[tuple[Peer, ...]], None]) -> None:
        """Call `watcher` with the peers after every reconcile (changes and resyncs)."""
        self._peer_watchers.append(watcher)

    def multicast_device(self) -> str | None:
        """The VXLAN device group traffic leaves and arrives on (None: multicast is off)."""
        if not self.config.multicast:
            return None
        return VXLAN_DEVICE if self.config.mode == "vxlan" else MULTICAST_DEVICE

    def underlay(self) -> tuple[Link, str]:
        """The underlay interface and this node's underlay address (after `setup`)."""
        return self._require_underlay(), self._require_address()

    # --- internals -------------------------------------------------------------------------

    def _enable_forwarding(self) -> None:
        versions: set[int] = {ipaddress.ip_network(c, strict=False).version for c in self.pod_cidrs}
        ensure_forwarding(versions)

    def _wanted_routes(self, peers: list[Peer], vtep: Link | None) -> dict[str, _WantedRoute]:
        out: dict[str, _WantedRoute] = {}
        underlay = self._require_underlay()
        for cidr in self.pod_cidrs:
            dst = str(ipaddress.ip_network(cidr, strict=False))
            out[dst] = _WantedRoute(self.config.node_name, None, None, route_type=RTN_UNREACHABLE)
        for peer in peers:
            for cidr in peer.pod_cidrs:
                dst = str(ipaddress.ip_network(cidr, strict=False))
                if vtep is not None:
                    out[dst] = _WantedRoute(peer.name, vtep_address(cidr), vtep.index, True)
                elif (next_hop := peer.address_of(family_of(cidr))) is not None:
                    out[dst] = _WantedRoute(peer.name, next_hop, underlay.index)
                else:
                    log.warning("fabric_no_next_hop", peer=peer.name, pod_cidr=cidr)
        return out

    def _ensure_vtep(self, node: Netlink) -> Link:
        """The VTEP as configured: made when missing, made again when someone changed it (its
        VNI, port, local address or MAC), and holding exactly this node's VTEP addresses."""
        underlay = self._require_underlay()
        address = self._require_address()
        v4 = family_of(address) == socket.AF_INET
        local = "IFLA_VXLAN_LOCAL" if v4 else "IFLA_VXLAN_LOCAL6"
        mac = vtep_mac(self.config.node_name)
        vtep = node.link(VXLAN_DEVICE)
        if vtep is not None and not (
            vtep.kind == "vxlan"
            and vtep.data.get("IFLA_VXLAN_ID") == self.config.vni
            and vtep.data.get("IFLA_VXLAN_PORT") == self.config.port
            and _same_ip(vtep.data.get(local), address)
            and vtep.mac == mac
        ):
            log.warning("fabric_vtep_recreated", reason="its settings differ from the config")
            node.delete(VXLAN_DEVICE)
            vtep = None
        if vtep is None:
            data = [
                ("IFLA_VXLAN_ID", self.config.vni),
                ("IFLA_VXLAN_PORT", self.config.port),
                ("IFLA_VXLAN_LINK", underlay.index),
                ("IFLA_VXLAN_LEARNING", 0),
                (local, address),
            ]
            node.create(
                VXLAN_DEVICE,
                "vxlan",
                what=f"VXLAN device {VXLAN_DEVICE}",
                mac=mac,
                mtu=self.pod_mtu(),
                up=True,
                data=data,
            )
            vtep = node.require(VXLAN_DEVICE)
        wanted = set()
        for cidr in self.pod_cidrs:
            prefix = 32 if ipaddress.ip_network(cidr, strict=False).version == 4 else 128
            wanted.add(f"{vtep_address(cidr)}/{prefix}")
        for have in node.addresses(vtep.index):
            if have not in wanted and not ipaddress.ip_interface(have).ip.is_link_local:
                node.delete_address(vtep.index, have)
        for cidr in wanted:
            node.add_address(vtep.index, cidr)
        return vtep

    def _ensure_multicast_device(self, node: Netlink) -> Link | None:
        """Native mode with multicast: MULTICAST_DEVICE as configured (made again when its
        settings differ); without multicast, or in VXLAN mode, none (an old one removed)."""
        device = node.link(MULTICAST_DEVICE)
        if not (self.config.multicast and self.config.mode == "native"):
            if device is not None and device.kind == "vxlan":
                node.delete(MULTICAST_DEVICE)
            return None
        underlay = self._require_underlay()
        address = self._require_address()
        local = "IFLA_VXLAN_LOCAL" if family_of(address) == socket.AF_INET else "IFLA_VXLAN_LOCAL6"
        if device is not None and not (
            device.kind == "vxlan"
            and device.data.get("IFLA_VXLAN_ID") == self.config.multicast_vni
            and device.data.get("IFLA_VXLAN_PORT") == self.config.port
            and _same_ip(device.data.get(local), address)
        ):
            log.warning("fabric_multicast_device_recreated", reason="settings differ")
            node.delete(MULTICAST_DEVICE)
            device = None
        if device is None:
            data = [
                ("IFLA_VXLAN_ID", self.config.multicast_vni),
                ("IFLA_VXLAN_PORT", self.config.port),
                ("IFLA_VXLAN_LINK", underlay.index),
                ("IFLA_VXLAN_LEARNING", 0),
                (local, address),
            ]
            mtu = underlay.mtu - VXLAN_OVERHEAD[family_of(address)]
            what = f"VXLAN device {MULTICAST_DEVICE}"
            node.create(MULTICAST_DEVICE, "vxlan", what=what, mtu=mtu, up=True, data=data)
            device = node.require(MULTICAST_DEVICE)
            _quiet_ipv6(MULTICAST_DEVICE)
        return device

    def _program_flood_list(self, node: Netlink, device: Link, peers: list[Peer]) -> None:
        """The multicast device's all-zeros FDB entry: every other node (head-end flooding of
        groups without an MDB entry; see delegates.fabric_mcast for which ones are sent)."""
        want = {(ZERO_MAC, p.address) for p in peers if p.address}
        have = {(mac, remote) for mac, remote in node.fdb_entries(device.index) if mac == ZERO_MAC}
        for mac, remote in have - want:
            node.delete_fdb(device.index, mac, remote)
        for _mac, remote in want - have:
            node.flood_to(device.index, remote)

    def _program_vtep(self, node: Netlink, vtep: Link, peers: list[Peer]) -> None:
        """FDB and neighbour entries: one per peer VTEP, the departed ones removed; with
        multicast, the all-zeros entry lists every peer too (group traffic is flooded)."""
        fdb = {(vtep_mac(p.name), p.address) for p in peers if p.address}
        if self.config.multicast:
            fdb |= {(ZERO_MAC, p.address) for p in peers if p.address}
        neighbours = {
            vtep_address(cidr): vtep_mac(p.name) for p in peers if p.address for cidr in p.pod_cidrs
        }
        have_fdb = node.fdb_entries(vtep.index)
        for mac, remote in have_fdb - fdb:
            node.delete_fdb(vtep.index, mac, remote)
        for mac, remote in fdb - have_fdb:
            if mac == ZERO_MAC:
                node.flood_to(vtep.index, remote)
            else:
                node.fdb(vtep.index, mac, remote)
        have_neighbours = node.neighbours(vtep.index)
        for address in have_neighbours.keys() - neighbours.keys():
            node.delete_neighbour(vtep.index, address)
        for address, mac in neighbours.items():
            if have_neighbours.get(address) != mac:
                node.neighbour(vtep.index, address, mac)

    def _find_underlay(self, node: Netlink) -> Link:
        if self.config.interface:
            link = node.link(self.config.interface)
            if link is None:
                raise InvalidConfig(f"fabric interface {self.config.interface} does not exist")
            return link
        link = node.default_route_link()
        if link is None:
            raise InvalidConfig("no fabric 'interface' given and the node has no default route")
        return link

    @staticmethod
    def _first_address(node: Netlink, link: Link) -> str:
        for cidr in node.addresses(link.index):
            ip = ipaddress.ip_interface(cidr).ip
            if not ip.is_link_local:
                return str(ip)
        raise InvalidConfig(f"fabric interface {link.name} has no address to use as the node's")

    def _require_underlay(self) -> Link:
        if self._underlay is None:
            raise InvalidConfig("the fabric is not set up yet")
        return self._underlay

    def _require_address(self) -> str:
        if self._address is None:
            raise InvalidConfig("the fabric is not set up yet")
        return self._address


def _quiet_ipv6(device: str) -> None:
    """No IPv6 on a device that only carries pods' group traffic: the node would otherwise send
    its own MLD reports and router solicitations to every node through it."""
    path = Path("/proc/sys/net/ipv6/conf") / device / "disable_ipv6"
    if path.exists():
        path.write_text("1")
