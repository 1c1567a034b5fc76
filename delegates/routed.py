"""`plexus-routed`: the primary interface of the flat, routable pod network (no NAT anywhere).

Per pod: a veth pair (the pod's end created straight into its namespace), the pod's address as
a /32 (and /128) on its side and as a host route on the node, and the node as the pod's gateway
through a link-local next hop: 169.254.1.1 and fe80::1, pinned in the pod as permanent
neighbours at the node end's MAC (fe80::1 is also that end's address), so pods never need a
node address in their subnet and never wait on ARP/NDP for their gateway. The MTU
comes from the fabric (the underlay's, minus the VXLAN overhead in overlay mode). Without an
`ipam` section, host-local allocates from the node's pod subnets: that section is derived once,
when the attachment is prepared, and recorded with it, so DEL releases the lease even when the
daemon restarted without knowing the node's pod subnets (the API down at start).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import replace
from typing import Any, Final

from cnispec import failpoints
from cnispec.builtin_conf import RoutedConf
from cnispec.cni import Interface, IPConfig, Result, Route
from cnispec.errors import CheckFailed, InvalidConfig, TryAgainLater
from delegates._common import best_effort, parse
from delegates._iface import check
from delegates._ipam import Ipam
from delegates.fabric import Fabric
from delegates.forwarding import ensure_forwarding
from delegates.plugin import BuiltinPlugin, PluginRequest
from delegates.podlinks import PLEXUS_GROUP
from kernel.netlink import RT_SCOPE_LINK, Link, Netlink
from kernel.netns import netns_fd

GATEWAY_V4: Final = "169.254.1.1"
GATEWAY_V6: Final = "fe80::1"


def host_veth_name(container_id: str, ifname: str) -> str:
    return "px" + hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()[:11]


class Routed(BuiltinPlugin):
    type = "plexus-routed"

    def __init__(self, *, ipam: Ipam, fabric: Fabric | None) -> None:
        self._ipam = ipam
        self._fabric = fabric

    def prepare(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Without an `ipam` section: host-local over this node's pod subnets, in the daemon's
        lease directory, written into the config that is recorded and replayed."""
        out = dict(config)
        if Ipam.configured(out) or self._fabric is None or not self._fabric.pod_cidrs:
            return out  # add() says what is missing
        ranges = [[{"subnet": cidr}] for cidr in self._fabric.pod_cidrs]
        out["ipam"] = {"type": "host-local", "dataDir": self._ipam.data_dir, "ranges": ranges}
        return out

    def add(self, req: PluginRequest) -> Result:
        conf = parse(RoutedConf, req)
        self._require_ipam(req)
        host = host_veth_name(req.container_id, req.ifname)
        with ExitStack() as undo:
            addresses = self._ipam.add(req)
            undo.callback(self._ipam.delete, req)
            failpoints.hit("routed_ipam_added")
            pod_ips = [ipaddress.ip_interface(ip.address).ip for ip in addresses.ips]
            host_link = self._node_side(undo, host, req, conf.mtu or self._fabric_mtu(), pod_ips)
            pod_link = self._configure_pod(req, pod_ips, host_link.mac)
            undo.pop_all()
        return _result(host_link, pod_link, req.netns, pod_ips, addresses)

    def _fabric_mtu(self) -> int | None:
        return self._fabric.pod_mtu() if self._fabric is not None else None

    def _require_ipam(self, req: PluginRequest) -> None:
        if Ipam.configured(req.config):
            return
        if self._fabric is None:
            raise InvalidConfig(
                f"network {req.network_name}: plexus-routed needs an 'ipam' section, or the "
                "daemon's 'fabric' config with this node's podCIDRs",
            )
        raise TryAgainLater(
            f"network {req.network_name}: this node has no pod subnet yet (its Node's "
            "spec.podCIDRs is not assigned, or the API has not been reached); try again",
        )

    def _recorded_ipam(self, req: PluginRequest) -> PluginRequest:
        """The request as prepared at ADD. A record of a plexusd from before IPAM was recorded
        (records version 1) has none: derive it now when the node knows its pod subnets, else
        name host-local alone, which DEL and GC need (leases are found by container and
        interface in the lease directory; the ranges play no part)."""
        if Ipam.configured(req.config):
            return req
        config = self.prepare(req.config)
        if not Ipam.configured(config):
            config["ipam"] = {"type": "host-local", "dataDir": self._ipam.data_dir}
        return replace(req, config=config)

    def _node_side(
        self, undo: ExitStack, host: str, req: PluginRequest, mtu: int | None, pod_ips: list[Any]
    ) -> Link:
        """The veth pair (the pod's end born in the pod), and on the node's end the routes to
        the pod and, for IPv6, fe80::1; one netlink handle for all of it. The pair's removal
        joins `undo` the moment it exists."""
        ensure_forwarding({ip.version for ip in pod_ips})
        with netns_fd(req.netns) as fd, Netlink.open() as node:
            peer = {"name": req.ifname, "netns_fd": fd, "group": PLEXUS_GROUP, "mtu": mtu}
            failpoints.hit("routed_veth_create_before")
            node.create(
                host, "veth", what=f"veth {host} <-> {req.ifname}", mtu=mtu, up=True, peer=peer
            )
            undo.callback(self._remove_pair, host)
            failpoints.hit("routed_veth_created")
            link = node.require(host)
            if any(ip.version == 6 for ip in pod_ips):
                node.add_address(link.index, f"{GATEWAY_V6}/64", nodad=True)
                failpoints.hit("routed_node_address_added")
            for ip in pod_ips:
                node.add_route(f"{ip}/{ip.max_prefixlen}", oif=link.index, scope=RT_SCOPE_LINK)
                failpoints.hit("routed_node_route_added")
            return link

    @staticmethod
    def _remove_pair(host: str) -> None:
        with Netlink.open() as node:
            failpoints.hit("routed_pair_remove_before")
            node.delete(host)  # the pod's end goes with it
            failpoints.hit("routed_pair_removed")

    @staticmethod
    def _configure_pod(req: PluginRequest, pod_ips: list[Any], node_mac: str) -> Link:
        with Netlink.open(req.netns) as pod:
            link = pod.require(req.ifname)
            for ip in pod_ips:
                pod.add_address(link.index, f"{ip}/{ip.max_prefixlen}", nodad=True)
                failpoints.hit("routed_pod_address_added")
            pod.set_up(link.index)
            failpoints.hit("routed_pod_up")
            for ip in pod_ips:
                gateway = GATEWAY_V4 if ip.version == 4 else GATEWAY_V6
                pod.neighbour(link.index, gateway, node_mac)
                # onlink: the gateway is no address of ours, yet right there on the link
                pod.add_route(
                    "0.0.0.0/0" if ip.version == 4 else "::/0",
                    oif=link.index,
                    gateway=gateway,
                    onlink=ip.version == 4,
                )
                failpoints.hit("routed_pod_route_added")
            return link

    def delete(self, req: PluginRequest) -> None:
        best_effort(
            req,
            lambda: self._remove_pair(host_veth_name(req.container_id, req.ifname)),
            lambda: self._ipam.delete(self._recorded_ipam(req)),
        )

    def check(self, req: PluginRequest, prev: Result) -> None:
        with Netlink.open(req.netns) as pod:
            check(pod, req.ifname, "veth", prev)
        host = host_veth_name(req.container_id, req.ifname)
        with Netlink.open() as node:
            link = node.link(host)
            if link is None:
                raise CheckFailed(f"the node's end {host} of {req.ifname} is missing")
            routes = {r.dst for r in node.routes() if r.oif == link.index}
            for ip in prev.ips:
                dst = f"{ip.ip.ip}/{ip.ip.ip.max_prefixlen}"
                if dst not in routes:
                    raise CheckFailed(f"the node has no route to the pod's {ip.ip.ip} via {host}")
        self._ipam.check(self._recorded_ipam(req))

    def gc(self, req: PluginRequest) -> None:
        self._ipam.gc(self._recorded_ipam(req))


def _result(host: Link, pod: Link, netns: str, pod_ips: list[Any], ipam: Result) -> Result:
    ips = [
        IPConfig(
            address=f"{ip}/{ip.max_prefixlen}",
            interface=1,
            gateway=GATEWAY_V4 if ip.version == 4 else GATEWAY_V6,
        )
        for ip in pod_ips
    ]
    routes = [
        Route(
            dst="0.0.0.0/0" if ip.version == 4 else "::/0",
            gw=GATEWAY_V4 if ip.version == 4 else GATEWAY_V6,
        )
        for ip in pod_ips
    ]
    return Result(
        interfaces=[
            Interface(name=host.name, mac=host.mac, mtu=host.mtu),
            Interface(name=pod.name, mac=pod.mac, mtu=pod.mtu, sandbox=netns),
        ],
        ips=ips,
        routes=routes,
        dns=ipam.dns,
    )
