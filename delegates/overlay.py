"""`plexus-overlay`: an L2 network that spans the fabric's nodes, needing nothing from the
underlay but unicast between nodes.

Per network a VXLAN segment: the NAD's `vni`, or one derived from the network's name
(`derived_vni`). On each node that hosts a pod of the network, a bridge `pxo<vni hex>` with a
VXLAN port `pxv<vni hex>` (id = VNI, on the fabric's underlay interface and UDP port, from this
node's underlay address), both made by the first pod's ADD and removed by the DEL (or GC) that
takes the last pod's port away; one lock per VNI makes "is it there / is it still used" and the
change that follows one step. Pods attach by veth: the node's end a port of the bridge.

Replication is head-end: the VXLAN device's all-zeros FDB entry lists every other node of the
fabric (`Fabric.peers`, kept in step when they change), so broadcast, unknown unicast and
multicast without an MDB entry go to each of them once, and to no one else. Remote MACs are
learned from arriving traffic (unicast then goes to its one node). The bridge snoops IGMP/MLD
and is a querier (`SNOOPING`): a group's frames reach only the local ports that joined it, and
the VXLAN port only when a remote member answered a query (reports cross the segment like any
broadcast). So in local mode a node with a member of some group gets every other node's
traffic for it, and its bridge drops what no local pod asked for. `set_group_members` is the
pruning mechanism cluster mode's controller feeds: VXLAN MDB entries that send one group to
exactly the named nodes.

The segment's owner is written in the bridge's alias (`plexus-overlay <network>`). A VNI
collision is refused at the ADD that would make the segment: with another network's bridge on
this node, or with any other overlay NAD the daemon's NAD source knows on the same VNI (then
no node makes a segment for either until one gets another `vni`; a node already carrying one
keeps serving it).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from cnispec.builtin_conf import OverlayConf
from cnispec.cni import Interface, Result
from cnispec.errors import CheckFailed, InvalidConfig, PlexusError
from cnispec.nad import NetworkAttachmentDefinition, network_config
from cnispec.netconf import plugin_configs
from delegates import _multicast
from delegates._common import best_effort, parse
from delegates._iface import check, configure, result_for
from delegates._ipam import Ipam
from delegates.fabric import VXLAN_OVERHEAD, Fabric, Peer
from delegates.ipam.host_local import valid_attachments
from delegates.plugin import BuiltinPlugin, PluginRequest
from delegates.podlinks import PLEXUS_GROUP
from delegates.routed import host_veth_name
from kernel.netlink import ZERO_MAC, Link, Netlink, family_of
from kernel.netns import netns_fd

TYPE: Final = "plexus-overlay"
ALIAS_PREFIX: Final = f"{TYPE} "
# Derived VNIs come from 0x010000 up: VNIs people pick by hand (and the fabric's default 4242)
# sit below, so a derived one rarely meets an explicit one.
DERIVED_FIRST: Final = 0x010000
DERIVED_LAST: Final = 0xFFFFFF
_NAME: Final = re.compile(r"^pxv([0-9a-f]{6})$")

# IGMP/MLD snooping with the bridge as querier. Intervals in centiseconds (the kernel's clock_t):
# a query every 5 s, answers within 1 s, a membership lapses 11 s after the last report (two
# queries missed: a pod that died), a leave is acted on after 2 group queries 0.5 s apart;
# after the bridge comes up, 4 startup queries 0.5 s apart.
QUERY_INTERVAL_S: Final = 5
SNOOPING: Final[list[tuple[str, Any]]] = [
    ("IFLA_BR_MCAST_SNOOPING", 1),
    ("IFLA_BR_MCAST_QUERIER", 1),
    ("IFLA_BR_MCAST_IGMP_VERSION", 3),
    ("IFLA_BR_MCAST_MLD_VERSION", 2),
    ("IFLA_BR_MCAST_QUERY_INTVL", QUERY_INTERVAL_S * 100),
    ("IFLA_BR_MCAST_QUERY_RESPONSE_INTVL", 100),
    ("IFLA_BR_MCAST_STARTUP_QUERY_INTVL", 50),
    ("IFLA_BR_MCAST_STARTUP_QUERY_CNT", 4),
    ("IFLA_BR_MCAST_MEMBERSHIP_INTVL", 2 * QUERY_INTERVAL_S * 100 + 100),
    ("IFLA_BR_MCAST_QUERIER_INTVL", 2 * QUERY_INTERVAL_S * 100 + 50),
    ("IFLA_BR_MCAST_LAST_MEMBER_INTVL", 50),
    ("IFLA_BR_MCAST_LAST_MEMBER_CNT", 2),
]

# (NAD key "namespace/name", its network config) of every NAD the daemon knows.
NetworkLister = Callable[[], Iterable[tuple[str, Mapping[str, Any]]]]

log = structlog.get_logger(__name__)


def bridge_name(vni: int) -> str:
    return f"pxo{vni:06x}"


def vxlan_name(vni: int) -> str:
    return f"pxv{vni:06x}"


def derived_vni(network: str, *, avoid: int) -> int:
    """The VNI of a network that names none: a hash of its name into 0x010000-0xFFFFFF, the
    next one up when that is the fabric's own VNI (`avoid`)."""
    span = DERIVED_LAST - DERIVED_FIRST + 1
    digest = int.from_bytes(hashlib.sha256(f"{TYPE}/{network}".encode()).digest()[:8], "big")
    vni = DERIVED_FIRST + digest % span
    if vni == avoid:
        vni = DERIVED_FIRST + (vni - DERIVED_FIRST + 1) % span
    return vni


def nad_networks(
    nads: Iterable[NetworkAttachmentDefinition], conf_dir: str
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """The overlay NADs among `nads` with their network configs (for the VNI collision check;
    a NAD whose config names no overlay, or does not parse, is passed over)."""
    for nad in nads:
        if nad.config.strip() and TYPE not in nad.config:
            continue  # cheap: most NADs are not overlays
        try:
            yield nad.key, network_config(nad, conf_dir)
        except PlexusError:
            continue


@dataclass(frozen=True, slots=True)
class _Segment:
    bridge: Link
    vxlan: Link


class Overlay(BuiltinPlugin):
    type = TYPE

    def __init__(
        self, *, ipam: Ipam, fabric: Fabric | None, networks: NetworkLister | None = None
    ) -> None:
        self._ipam = ipam
        self._fabric = fabric
        self._networks = networks
        self._guard = threading.Lock()
        self._locks: dict[int, threading.RLock] = {}
        # Cluster mode (`follow_controller`): which nodes a group goes to is the controller's
        # list, never the bridge's guess.
        self._listed = False
        if fabric is not None:
            fabric.watch_peers(self._peers_changed)

    # --- the plugin interface --------------------------------------------------------------

    def prepare(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The VNI is decided once and recorded with the attachment: DEL, CHECK and GC find
        the segment by it even if the fabric's VNI (which a derived one avoids) changed."""
        out = dict(config)
        if "vni" not in out and self._fabric is not None and isinstance(out.get("name"), str):
            out["vni"] = derived_vni(out["name"], avoid=self._fabric.config.vni)
        return out

    def add(self, req: PluginRequest) -> Result:
        conf = parse(OverlayConf, req)
        fabric = self._require_fabric(req)
        vni = self._vni(conf, req, fabric)
        mtu = self._mtu(conf, req, fabric)
        host = host_veth_name(req.container_id, req.ifname)
        with ExitStack() as undo:
            with self._lock(vni), Netlink.open() as node:
                self._claim(node, req, vni, fabric)
                undo.callback(self._detach, vni, host)
                segment = self._build(node, req, vni, fabric)
                host_link = self._attach(node, segment, host, req, mtu)
            addresses = Result()
            if Ipam.configured(req.config):
                addresses = self._ipam.add(req)
                undo.callback(self._ipam.delete, req)
            with Netlink.open(req.netns) as pod:
                link = pod.require(req.ifname)
                configure(pod, link, addresses)
                _multicast.enable(pod, link, req, conf, addresses)
            undo.pop_all()
        extra = [Interface(name=host_link.name, mac=host_link.mac, mtu=host_link.mtu)]
        return result_for(link, req.netns, addresses, extra=extra)

    def delete(self, req: PluginRequest) -> None:
        host = host_veth_name(req.container_id, req.ifname)
        vni = _recorded_vni(req)
        steps: list[Callable[[], Any]] = [
            (lambda: self._detach(vni, host)) if vni is not None else (lambda: self._sweep(host))
        ]
        if Ipam.configured(req.config):
            steps.append(lambda: self._ipam.delete(req))
        best_effort(req, *steps)

    def check(self, req: PluginRequest, prev: Result) -> None:
        conf = parse(OverlayConf, req)
        vni = _recorded_vni(req)
        if vni is None:
            raise CheckFailed(f"network {req.network_name}: the attachment recorded no VNI")
        host = host_veth_name(req.container_id, req.ifname)
        with Netlink.open(req.netns) as pod:
            link = check(pod, req.ifname, "veth", prev)
            if conf.multicast:
                _multicast.check(pod, link, req)
        with Netlink.open() as node:
            segment = self._segment(node, vni)
            if segment is None:
                raise CheckFailed(
                    f"network {req.network_name}: the node's bridge {bridge_name(vni)} or its "
                    f"VXLAN port {vxlan_name(vni)} is missing"
                )
            ports = {p.name for p in node.ports(segment.bridge.index)}
            if vxlan_name(vni) not in ports:
                raise CheckFailed(
                    f"{vxlan_name(vni)} is no longer a port of bridge {bridge_name(vni)}"
                )
            if host not in ports:
                raise CheckFailed(
                    f"the node's end {host} of {req.ifname} is not a port of bridge "
                    f"{bridge_name(vni)}"
                )
        if Ipam.configured(req.config):
            self._ipam.check(req)

    def gc(self, req: PluginRequest) -> None:
        """Ports of this network's bridge that no valid attachment owns go (their pods died
        with no DEL), then the segment when nothing is left on it; then IPAM's own GC."""
        exact, _ = valid_attachments(req.config)
        keep = {host_veth_name(cid, ifname or "") for cid, ifname in exact}
        vni = _recorded_vni(req)
        if vni is not None:
            with self._lock(vni), Netlink.open() as node:
                segment = self._segment(node, vni)
                if segment is not None:
                    for port in node.ports(segment.bridge.index):
                        if port.kind == "veth" and port.name not in keep:
                            log.info("overlay_gc_port", network=req.network_name, port=port.name)
                            node.delete(port.name)
                    self._remove_if_unused(node, vni)
        if Ipam.configured(req.config):
            self._ipam.gc(req)

    # --- multicast replication (cluster mode's controller feeds it) ---------------------------

    def set_group_members(self, network: str, group: str, node_addresses: Iterable[str]) -> bool:
        """`set_vni_group_members` for the segment of overlay `network` (found by its bridge's
        alias). False when the network has no segment on this node."""
        with Netlink.open() as node:
            vni = self._vni_of(node, network)
        if vni is None:
            return False
        return self.set_vni_group_members(vni, group, node_addresses)

    def set_vni_group_members(self, vni: int, group: str, node_addresses: Iterable[str]) -> bool:
        """Send `group`'s traffic of overlay segment `vni` from this node to exactly the VTEPs
        at `node_addresses` (VXLAN MDB entries), instead of to every node of the fabric. An
        empty list removes the group's entries: it is flooded to every node again. False when
        the segment is not on this node (nothing to program; cluster mode's membership sync
        calls again once it is)."""
        group = str(ipaddress.ip_address(group))
        with self._lock(vni), Netlink.open() as node:
            segment = self._segment(node, vni)
            if segment is None:
                return False
            local = self._local_address()
            want = {str(ipaddress.ip_address(a)) for a in node_addresses} - {local}
            have = {r for g, r in node.mdb_remotes(segment.vxlan.index) if g == group}
            if self._listed and not want:  # first: else the group is flooded in between
                self._port_membership(node, segment, group, remote_members=False)
            for remote in have - want:
                node.mdb_delete(segment.vxlan.index, group, remote)
            for remote in want - have:
                node.mdb_add(segment.vxlan.index, group, remote)
            if self._listed and want:
                self._port_membership(node, segment, group, remote_members=True)
            log.info("overlay_group_members", vni=vni, group=group, nodes=sorted(want))
        return True

    def follow_controller(self) -> None:
        """Cluster mode: the VXLAN port of every segment (those here now and those made later)
        is never a multicast router port — otherwise the bridge sends it every group nobody
        joined, as soon as it hears another node's querier through it — and is a member of a
        group exactly when `set_vni_group_members` lists other nodes for it (whatever IGMP/MLD
        version the pods speak: IGMPv2/MLDv1 reports go to router ports only)."""
        self._listed = True
        self._each_segment(lambda node, segment: node.set_multicast_router(segment.vxlan.index, 0))

    @staticmethod
    def _port_membership(
        node: Netlink, segment: _Segment, group: str, *, remote_members: bool
    ) -> None:
        bridge, port = segment.bridge.index, segment.vxlan.index
        if remote_members:
            node.port_mdb_add(bridge, port, group)
        else:
            # Permanent or learned: other nodes' reports (IGMPv3/MLDv2 cross the segment) make
            # the port a member for a membership interval; with no member node left, the group
            # would go out of the port to every node (no MDB entry: the flood list) till then.
            node.port_mdb_delete(bridge, port, group)

    # --- the segment ---------------------------------------------------------------------

    def _lock(self, vni: int) -> threading.RLock:
        with self._guard:
            return self._locks.setdefault(vni, threading.RLock())

    def _require_fabric(self, req: PluginRequest) -> Fabric:
        if self._fabric is None:
            raise InvalidConfig(
                f"network {req.network_name}: {TYPE} needs the daemon's 'fabric' config (its "
                "underlay interface and the set of nodes the segment spans)"
            )
        return self._fabric

    def _local_address(self) -> str:
        assert self._fabric is not None
        return self._fabric.underlay()[1]

    @staticmethod
    def _vni(conf: OverlayConf, req: PluginRequest, fabric: Fabric) -> int:
        vni = conf.vni if conf.vni is not None else derived_vni(conf.name, avoid=fabric.config.vni)
        if vni == fabric.config.vni:
            raise InvalidConfig(
                f"network {req.network_name}: vni {vni} is the fabric's own VNI (the daemon "
                "config's fabric.vni); give the overlay another"
            )
        return vni

    @staticmethod
    def _mtu(conf: OverlayConf, req: PluginRequest, fabric: Fabric) -> int:
        underlay, local = fabric.underlay()
        ceiling = underlay.mtu - VXLAN_OVERHEAD[family_of(local)]
        if conf.mtu is not None and conf.mtu > ceiling:
            raise InvalidConfig(
                f"network {req.network_name}: mtu {conf.mtu} is above what the overlay carries "
                f"({underlay.name}'s {underlay.mtu} minus "
                f"{VXLAN_OVERHEAD[family_of(local)]} of VXLAN encapsulation = {ceiling})"
            )
        return conf.mtu or ceiling

    def _segment(self, node: Netlink, vni: int) -> _Segment | None:
        bridge, vxlan = node.link(bridge_name(vni)), node.link(vxlan_name(vni))
        if bridge is None or vxlan is None:
            return None
        return _Segment(bridge, vxlan)

    def _claim(self, node: Netlink, req: PluginRequest, vni: int, fabric: Fabric) -> None:
        """Refuse a VNI another network holds: its bridge here, or its NAD anywhere (only
        checked when this node makes the segment: a segment already here was checked then)."""
        bridge = node.link(bridge_name(vni))
        if bridge is not None:
            owner = bridge.alias.removeprefix(ALIAS_PREFIX)
            if not _ours(bridge):
                raise InvalidConfig(
                    f"network {req.network_name}: the node has a link {bridge.name} that is not "
                    f"an overlay bridge of Plexus; remove it or give the network another vni"
                )
            if owner and owner != req.network_name:  # no alias: a crash right after creating
                raise InvalidConfig(
                    f"network {req.network_name}: VNI {vni} is already the segment of overlay "
                    f"network {owner} on this node; two networks on one VNI would share one L2 "
                    "segment: give one of them another 'vni'"
                )
        else:
            self._refuse_collisions(req, vni, fabric)

    def _refuse_collisions(self, req: PluginRequest, vni: int, fabric: Fabric) -> None:
        """Refuse a VNI that more than one NAD claims. Counted by NAD ("namespace/name"), not
        by the config's `name` (which is all a delegate is told of its network): two NADs of
        two namespaces with the same config name would otherwise share one L2 segment, and a
        NAD in any namespace could join another's by copying its name or its `vni`."""
        if self._networks is None:
            return
        claims: set[str] = set()
        for key, config in self._networks():
            for plugin in plugin_configs(dict(config)):
                if plugin.get("type") != TYPE:
                    continue
                explicit = plugin.get("vni")
                theirs = (
                    explicit
                    if isinstance(explicit, int)
                    else derived_vni(str(config.get("name", "")), avoid=fabric.config.vni)
                )
                if theirs == vni:
                    claims.add(key)
        if len(claims) > 1:
            raise InvalidConfig(
                f"network {req.network_name}: VNI {vni} is claimed by the overlay networks "
                f"{', '.join(sorted(claims))}; two networks on one VNI would share one L2 "
                "segment: give each its own 'vni' (a derived VNI comes from the config's "
                "'name', so two NADs with the same name need one)"
            )

    def _build(self, node: Netlink, req: PluginRequest, vni: int, fabric: Fabric) -> _Segment:
        """The bridge and its VXLAN port, each made when missing (a half-made segment of an
        earlier crash is completed), and the flood list."""
        underlay, local = fabric.underlay()
        mtu = underlay.mtu - VXLAN_OVERHEAD[family_of(local)]
        name = bridge_name(vni)
        if node.link(name) is None:
            node.create(name, "bridge", what=f"bridge {name}", mtu=mtu, data=SNOOPING)
            _no_dad(name)
        bridge = node.require(name)
        if not bridge.alias:
            node.modify(bridge.index, what=f"bridge {name}", alias=ALIAS_PREFIX + req.network_name)
        vx = vxlan_name(vni)
        if node.link(vx) is None:
            v4 = family_of(local) == socket.AF_INET
            data: list[tuple[str, Any]] = [
                ("IFLA_VXLAN_ID", vni),
                ("IFLA_VXLAN_PORT", fabric.config.port),
                ("IFLA_VXLAN_LINK", underlay.index),
                ("IFLA_VXLAN_LOCAL" if v4 else "IFLA_VXLAN_LOCAL6", local),
                ("IFLA_VXLAN_LEARNING", 1),
            ]
            node.create(vx, "vxlan", what=f"VXLAN device {vx}", mtu=mtu, up=True, data=data)
        vxlan = node.require(vx)
        node.enslave(vxlan.index, bridge.index, what=f"{vx} into bridge {name}")
        if self._listed:
            node.set_multicast_router(vxlan.index, 0)
        # Up only now, with a port (carrier) and no DAD: its link-local address is usable at
        # once, and the MLD querier (which needs one) is on from the first startup query; till
        # then the bridge would flood every IPv6 group to every port.
        node.set_up(bridge.index)
        self._flood_list(node, vxlan, fabric.peers or ())
        log.info("overlay_segment", network=req.network_name, vni=vni, bridge=name)
        return _Segment(bridge, vxlan)

    def _flood_list(self, node: Netlink, vxlan: Link, peers: Iterable[Peer]) -> None:
        """The all-zeros FDB entry: one remote per other node of the fabric."""
        assert self._fabric is not None
        local = self._local_address()
        family = family_of(local)
        want = {
            address
            for peer in peers
            if peer.name != self._fabric.config.node_name
            and (address := peer.address_of(family)) is not None
            and address != local
        }
        have = {remote for mac, remote in node.fdb_entries(vxlan.index) if mac == ZERO_MAC}
        for remote in have - want:
            node.delete_fdb(vxlan.index, ZERO_MAC, remote)
        for remote in want - have:
            node.flood_to(vxlan.index, remote)

    def _peers_changed(self, peers: tuple[Peer, ...]) -> None:
        self._each_segment(lambda node, segment: self._flood_list(node, segment.vxlan, peers))

    def _each_segment(self, change: Callable[[Netlink, _Segment], object]) -> None:
        """`change` every segment on this node, each under its VNI's lock."""
        with Netlink.open() as node:
            vnis = [int(m.group(1), 16) for link in node.links() if (m := _NAME.match(link.name))]
        for vni in vnis:
            with self._lock(vni), Netlink.open() as node:
                segment = self._segment(node, vni)
                if segment is not None:
                    change(node, segment)

    @staticmethod
    def _attach(node: Netlink, segment: _Segment, host: str, req: PluginRequest, mtu: int) -> Link:
        """The veth pair, the pod's end born in the pod under its final name, the node's end a
        port of the bridge."""
        with netns_fd(req.netns) as fd:
            peer = {"name": req.ifname, "netns_fd": fd, "group": PLEXUS_GROUP, "mtu": mtu}
            node.create(
                host, "veth", what=f"veth {host} <-> {req.ifname}", mtu=mtu, up=True, peer=peer
            )
        link = node.require(host)
        node.enslave(link.index, segment.bridge.index, what=f"{host} into {segment.bridge.name}")
        return link

    def _detach(self, vni: int, host: str) -> None:
        """The pod's pair goes (its pod end with it), and the segment when that was its last
        pod."""
        with self._lock(vni), Netlink.open() as node:
            node.delete(host)
            self._remove_if_unused(node, vni)

    def _sweep(self, host: str) -> None:
        """DEL without a recorded VNI: the pair, then every segment left without a pod."""
        with Netlink.open() as node:
            node.delete(host)
            vnis = [int(m.group(1), 16) for link in node.links() if (m := _NAME.match(link.name))]
        for vni in vnis:
            with self._lock(vni), Netlink.open() as node:
                self._remove_if_unused(node, vni)

    @staticmethod
    def _remove_if_unused(node: Netlink, vni: int) -> None:
        bridge = node.link(bridge_name(vni))
        if bridge is not None and not _ours(bridge):
            return  # not ours: never touched
        if bridge is not None and any(p.name != vxlan_name(vni) for p in node.ports(bridge.index)):
            return  # a pod still uses it
        node.delete(vxlan_name(vni))
        if bridge is not None:
            node.delete(bridge.name)
        log.info("overlay_segment_removed", vni=vni)

    @staticmethod
    def _vni_of(node: Netlink, network: str) -> int | None:
        for link in node.links():
            if link.alias == ALIAS_PREFIX + network and link.name.startswith("pxo"):
                return int(link.name[3:], 16)
        return None


def _ours(bridge: Link) -> bool:
    """A bridge of ours: the alias names its network (none only if plexusd stopped between
    making it and naming it)."""
    return bridge.kind == "bridge" and (not bridge.alias or bridge.alias.startswith(ALIAS_PREFIX))


def _no_dad(bridge: str) -> None:
    """No duplicate address detection on the bridge's link-local address (derived from its own
    MAC, on a segment of our own): the MLD querier needs that address at once."""
    path = Path("/proc/sys/net/ipv6/conf") / bridge / "accept_dad"
    if path.exists():  # no such directory when IPv6 is off on the node
        path.write_text("0")


def _recorded_vni(req: PluginRequest) -> int | None:
    vni = req.config.get("vni")
    return vni if isinstance(vni, int) and not isinstance(vni, bool) else None


def replication(vni: int) -> dict[str, list[str]] | None:
    """Where this node sends each group of overlay segment `vni`: the VTEPs its VXLAN MDB
    lists per group (`set_group_members`); a group not listed goes to every fabric node. None
    when the segment is not on this node."""
    with Netlink.open() as node:
        vxlan = node.link(vxlan_name(vni))
        if vxlan is None:
            return None
        out: dict[str, list[str]] = {}
        for group, remote in node.mdb_remotes(vxlan.index):
            out.setdefault(group, []).append(remote)
    return {group: sorted(remotes) for group, remotes in out.items()}
