"""Multicast on the routed primary (`fabric.multicast: true`): the node replicates its pods'
group traffic with tc, not with the kernel's multicast routing.

Why tc: kernel multicast routing (CONFIG_IP_MROUTE / CONFIG_IPV6_MROUTE) is missing from some
node kernels, and where present it allows 32 virtual interfaces per table (MAXVIFS) — a node
has more pods than that. u32 classifiers with mirred actions are in every kernel that runs
pods.

The data path. Every routed pod's node-side veth gets a clsact qdisc; on its ingress hook:
  * TTL (hop limit) <= 1, and link-local scope groups (224.0.0.0/24, ff0X:: with scope <= 3),
    pass untouched: they are the pod's business with the node (IGMP/MLD reports among them)
    and are never forwarded;
  * per group with members (`PRIO_GROUPS` on): a copy out of every other member pod's veth,
    and out of the multicast VXLAN device when other nodes want the group; the packet itself
    goes no further (the last copy is a redirect);
  * local mode only: any other group goes to the VXLAN device (the flood, below).
On the VXLAN device's ingress (traffic from other nodes), per group with members here: a copy
to each member pod. Nothing is sent back out of the port it came from, nothing leaves a node
for a group no node asked for (cluster mode), and no TTL is decremented: the sender's TTL of
2 or more is what makes a datagram leave its pod's link (docs/multicast.md).

Between nodes. The VXLAN device is the fabric's own (`plexus.vxlan`, VXLAN mode) or a device
for group traffic only (`plexus.mcast`, native mode), so the underlay needs only unicast. In
local mode its all-zeros FDB entry lists every other node (head-end flood) and each node
delivers to its own members only (prune on arrival). In cluster mode `set_group_members` (fed
by the controller's aggregate of every node's membership) writes VXLAN MDB entries: a group
goes to exactly the nodes with members, and to none when there are none.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

import structlog

from cnispec.errors import PlexusError
from delegates.fabric import Fabric
from kernel.netlink import Netlink
from kernel.tc import ETH_P_IP, ETH_P_IPV6, Tc, u32_key

log = structlog.get_logger(__name__)

PRIO_GROUPS: Final = 100  # one priority per group from here on
_PRIO_FLOOD: Final = {4: 65000, 6: 65001}
_PROTO: Final = {4: ETH_P_IP, 6: ETH_P_IPV6}
_FULL: Final = 0xFFFFFFFF


def clear(hosts: Iterable[str]) -> int:
    """Multicast turned off: the replication filters on these pod veths go (a filter left
    would copy group traffic to a device that is no longer there). The number cleared."""
    cleared = 0
    with Netlink.open() as node, Tc.open() as tc:
        index = {link.name: link.index for link in node.links()}
        for host in hosts:
            if host in index and tc.filters(index[host], "ingress"):
                tc.delete_clsact(index[host])
                cleared += 1
    return cleared


# What is never forwarded: (priority, protocol, keys).
_LOCAL_ONLY: Final = (
    (1, ETH_P_IP, (u32_key(0, 0xFE000000, 8),)),  # TTL 0 or 1
    (2, ETH_P_IP, (u32_key(0xE0000000, 0xFFFFFF00, 16),)),  # 224.0.0.0/24
    (3, ETH_P_IPV6, (u32_key(0, 0x000000FE, 4),)),  # hop limit 0 or 1
    (4, ETH_P_IPV6, (u32_key(0xFF000000, 0xFF0C0000, 24),)),  # scope <= 3 (ff00..ff03)
)
_ANY_GROUP: Final = {
    4: (u32_key(0xE0000000, 0xF0000000, 16),),  # 224.0.0.0/4
    6: (u32_key(0xFF000000, 0xFF000000, 24),),  # ff00::/8
}

FilterKey = tuple[int, int]  # (priority, protocol)
Filter = tuple[tuple[str, ...], tuple[int, ...]]  # (u32 keys, devices a copy goes out of)


def group_keys(group: str) -> tuple[int, tuple[str, ...]]:
    """(IP version, u32 keys matching exactly the destination `group`)."""
    ip = ipaddress.ip_address(group)
    packed = ip.packed
    if ip.version == 4:
        return 4, (u32_key(int.from_bytes(packed, "big"), _FULL, 16),)
    words = [int.from_bytes(packed[i : i + 4], "big") for i in range(0, 16, 4)]
    return 6, tuple(u32_key(w, _FULL, 24 + 4 * i) for i, w in enumerate(words))


@dataclass
class _State:
    members: dict[str, frozenset[str]] = field(default_factory=dict)  # group -> member veths
    ports: frozenset[str] = frozenset()  # every routed pod veth
    remote: dict[str, frozenset[str]] = field(default_factory=dict)  # group -> node addresses


class FabricMulticast:
    """The replicator of one node. `listed`: cluster mode (remote members come from
    `set_group_members`); else local mode (every group is flooded to every node)."""

    def __init__(self, fabric: Fabric, *, listed: bool) -> None:
        self._fabric = fabric
        self._listed = listed
        self._lock = threading.Lock()
        self._state = _State()
        self._prio: dict[str, int] = {}
        # What is on each device now, by (name, ifindex): a device made again is new.
        self._programmed: dict[tuple[str, int], dict[FilterKey, Filter]] = {}
        # Cluster mode: the MDB is read back once, so a restarted plexusd goes on replicating
        # as before until the controller's lists arrive (they correct it).
        self._mdb_loaded = False

    @property
    def listed(self) -> bool:
        """Cluster mode: groups go to the nodes `set_group_members` lists, not to all."""
        return self._listed

    @property
    def device(self) -> str:
        name = self._fabric.multicast_device()
        if name is None:
            raise PlexusError("the fabric carries no multicast (fabric.multicast is off)")
        return name

    def set_local(self, members: Mapping[str, frozenset[str]], ports: Iterable[str]) -> None:
        """This node's pods: group -> member veths, and every routed pod veth."""
        with self._lock:
            self._state.members = {g: frozenset(h) for g, h in members.items() if h}
            self._state.ports = frozenset(ports)
        self.reconcile()

    def set_group_members(self, group: str, node_addresses: Iterable[str]) -> bool:
        """Cluster mode: `group` goes to exactly the nodes at `node_addresses` (this node's own
        address ignored; empty: to no other node). False in local mode (flooded there)."""
        if not self._listed:
            return False
        group = str(ipaddress.ip_address(group))
        _, local = self._fabric.underlay()
        want = frozenset(str(ipaddress.ip_address(a)) for a in node_addresses) - {local}
        with self._lock:
            if want:
                self._state.remote[group] = want
            else:
                self._state.remote.pop(group, None)
        self.reconcile()
        return True

    def replication(self) -> dict[str, list[str]]:
        """group -> where this node sends it (the MDB's nodes in cluster mode)."""
        with self._lock:
            return {g: sorted(r) for g, r in sorted(self._state.remote.items())}

    def reconcile(self) -> None:
        """Bring the MDB and every port's and the VXLAN device's filters in line with the
        state. A device that cannot be programmed is logged; the others still are."""
        with self._lock, Netlink.open() as node, Tc.open() as tc:
            index = {link.name: link.index for link in node.links()}
            tunnel = index.get(self.device)
            if tunnel is None:
                log.warning("fabric_multicast_no_device", device=self.device)
                return
            if self._listed:
                if not self._mdb_loaded:
                    self._load_mdb(node, tunnel)
                self._program_mdb(node, tunnel)
            wanted = self._wanted(index, tunnel)
            for key in list(self._programmed):
                if key not in wanted:
                    del self._programmed[key]  # the pod (and its veth's filters) went
            for (name, ifindex), filters in wanted.items():
                try:
                    self._program(tc, name, ifindex, filters)
                except PlexusError as exc:
                    self._programmed.pop((name, ifindex), None)  # read it again next time
                    log.warning("fabric_multicast_program_failed", device=name, error=exc.msg)

    # --- internals ------------------------------------------------------------------------

    def _group_prio(self, group: str) -> int:
        if group not in self._prio:
            used = set(self._prio.values())
            self._prio[group] = next(p for p in range(PRIO_GROUPS, 60000) if p not in used)
        return self._prio[group]

    def _wanted(
        self, index: Mapping[str, int], tunnel: int
    ) -> dict[tuple[str, int], dict[FilterKey, Filter]]:
        state = self._state
        groups = set(state.members) | set(state.remote)
        for gone in set(self._prio) - groups:
            del self._prio[gone]
        ports = {host: index[host] for host in state.ports if host in index}
        members = {g: {index[h] for h in hosts if h in index} for g, hosts in state.members.items()}
        out: dict[tuple[str, int], dict[FilterKey, Filter]] = {}
        for host, ifindex in ports.items():
            filters: dict[FilterKey, Filter] = {
                (prio, proto): (keys, ()) for prio, proto, keys in _LOCAL_ONLY
            }
            for group in sorted(groups):
                version, keys = group_keys(group)
                copies = sorted(members.get(group, set()) - {ifindex})
                if state.remote.get(group) or (not self._listed):
                    copies.append(tunnel)
                if copies:
                    filters[(self._group_prio(group), _PROTO[version])] = (keys, tuple(copies))
            if not self._listed:
                for version, keys in _ANY_GROUP.items():
                    filters[(_PRIO_FLOOD[version], _PROTO[version])] = (keys, (tunnel,))
            out[(host, ifindex)] = filters
        arriving: dict[FilterKey, Filter] = {}
        for group in sorted(state.members):
            version, keys = group_keys(group)
            if members.get(group):
                key = (self._group_prio(group), _PROTO[version])
                arriving[key] = (keys, tuple(sorted(members[group])))
        out[(self.device, tunnel)] = arriving
        return out

    def _program(self, tc: Tc, name: str, ifindex: int, filters: dict[FilterKey, Filter]) -> None:
        have = self._programmed.get((name, ifindex))
        if have is None:  # first sight: whatever the kernel holds is unknown
            tc.ensure_clsact(ifindex)
            have = dict.fromkeys(tc.filters(ifindex, "ingress"), ((), (-1,)))
        for key in have.keys() - filters.keys():
            tc.delete_filter(ifindex, "ingress", *key)
        for key, (keys, copies) in filters.items():
            if have.get(key) != (keys, copies):
                tc.set_filter(ifindex, "ingress", *key, keys=keys, copy_to=copies)
        self._programmed[(name, ifindex)] = dict(filters)

    def _load_mdb(self, node: Netlink, tunnel: int) -> None:
        remote: dict[str, set[str]] = {}
        for group, address in node.mdb_remotes(tunnel):
            remote.setdefault(group, set()).add(address)
        for group, addresses in remote.items():
            self._state.remote.setdefault(group, frozenset(addresses))
        self._mdb_loaded = True

    def _program_mdb(self, node: Netlink, tunnel: int) -> None:
        want = {(g, r) for g, remotes in self._state.remote.items() for r in remotes}
        have = node.mdb_remotes(tunnel)
        for group, remote in have - want:
            node.mdb_delete(tunnel, group, remote)
        for group, remote in want - have:
            node.mdb_add(tunnel, group, remote)
