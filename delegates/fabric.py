"""The node side of the flat, routable pod network: every pod reaches every pod and node without
NAT. Each node owns pod subnets (podCIDRs); a pod's address is a host route on its node; and
the other nodes' pod subnets are routed either natively (next hop = that node's underlay
address, when the nodes share a segment or the underlay routes pod subnets) or over a VXLAN
overlay (one `plexus.vxlan` device per node; per peer a route via the peer's VTEP address, a
permanent neighbour entry and an FDB entry pointing at the peer's underlay address).

`Fabric.reconcile(peers)` keeps those routes and entries in step with the set of nodes; the
daemon feeds it from the API (Node objects) or from the local config. Routes Plexus owns carry
its own routing protocol number, so stale ones are found and removed without touching anyone
else's. No masquerade anywhere.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import structlog

from delegates._nl import Link, Netlink, family_of
from metaplugin.errors import InvalidConfig

VXLAN_DEVICE: Final = "plexus.vxlan"
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


def vtep_mac(address: str) -> str:
    """A stable VTEP MAC per node, derived from its underlay address (no need to publish it)."""
    digest = hashlib.sha256(address.encode()).digest()
    return "0e:" + ":".join(f"{b:02x}" for b in digest[:5])


def vtep_address(pod_cidr: str) -> str:
    """The node's VTEP address: the first address of its pod subnet (never given to a pod)."""
    return str(ipaddress.ip_network(pod_cidr, strict=False).network_address)


class Fabric:
    def __init__(self, config: FabricConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._underlay: Link | None = None
        self._address: str | None = None

    @property
    def pod_cidrs(self) -> tuple[str, ...]:
        return self.config.pod_cidrs

    def setup(self) -> None:
        """Forwarding on, and in VXLAN mode the VTEP device, in the node's namespace."""
        for path in ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"):
            Path(path).write_text("1")
        with Netlink.open() as node:
            self._underlay = self._find_underlay(node)
            self._address = self.config.address or self._first_address(node, self._underlay)
            if self.config.mode == "vxlan":
                self._ensure_vtep(node)
        log.info(
            "fabric_ready",
            mode=self.config.mode,
            underlay=self._underlay.name,
            address=self._address,
            pod_mtu=self.pod_mtu(),
        )

    def pod_mtu(self) -> int:
        underlay = self._require_underlay()
        if self.config.mode == "native":
            return underlay.mtu
        return underlay.mtu - VXLAN_OVERHEAD[family_of(self._require_address())]

    def reconcile(self, peers: list[Peer]) -> None:
        with self._lock, Netlink.open() as node:
            others = [p for p in peers if p.name != self.config.node_name]
            wanted = self._routes(node, others)
            for route in node.routes():
                if route.dst not in wanted and self._ours(node, route.dst):
                    node.delete_route(route.dst, oif=route.oif)
            for dst, (gateway, oif, onlink) in wanted.items():
                node.add_route(dst, oif=oif, gateway=gateway, onlink=onlink, protocol=RTPROT_PLEXUS)
            if self.config.mode == "vxlan":
                self._program_vtep(node, others)

    # --- internals -------------------------------------------------------------------------

    def _routes(self, node: Netlink, peers: list[Peer]) -> dict[str, tuple[str, int, bool]]:
        out: dict[str, tuple[str, int, bool]] = {}
        underlay = self._require_underlay()
        vxlan = node.require(VXLAN_DEVICE) if self.config.mode == "vxlan" else None
        for peer in peers:
            for cidr in peer.pod_cidrs:
                dst = str(ipaddress.ip_network(cidr, strict=False))
                if vxlan is not None:
                    out[dst] = (vtep_address(cidr), vxlan.index, True)
                elif (next_hop := peer.address_of(family_of(cidr))) is not None:
                    out[dst] = (next_hop, underlay.index, False)
                else:
                    log.warning("fabric_no_next_hop", peer=peer.name, pod_cidr=cidr)
        return out

    def _ours(self, node: Netlink, dst: str) -> bool:
        return dst in node.protocol_routes(RTPROT_PLEXUS)

    def _ensure_vtep(self, node: Netlink) -> None:
        underlay = self._require_underlay()
        address = self._require_address()
        vtep = node.link(VXLAN_DEVICE)
        if vtep is None:
            local = (
                "IFLA_VXLAN_LOCAL" if family_of(address) == socket.AF_INET else "IFLA_VXLAN_LOCAL6"
            )
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
                mac=vtep_mac(address),
                mtu=self.pod_mtu(),
                up=True,
                data=data,
            )
            vtep = node.require(VXLAN_DEVICE)
        for cidr in self.config.pod_cidrs:
            prefix = 32 if ipaddress.ip_network(cidr, strict=False).version == 4 else 128
            node.add_address(vtep.index, f"{vtep_address(cidr)}/{prefix}")

    def _program_vtep(self, node: Netlink, peers: list[Peer]) -> None:
        vtep = node.require(VXLAN_DEVICE)
        for peer in peers:
            mac = vtep_mac(peer.address)
            node.fdb(vtep.index, mac, peer.address)
            for cidr in peer.pod_cidrs:
                node.neighbour(vtep.index, vtep_address(cidr), mac)

    def _find_underlay(self, node: Netlink) -> Link:
        if self.config.interface:
            link = node.link(self.config.interface)
            if link is None:
                raise InvalidConfig(f"fabric interface {self.config.interface} does not exist")
            return link
        from delegates._sublink import default_route_link

        return default_route_link(node)

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
