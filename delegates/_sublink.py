"""What macvlan and ipvlan share: a link on a master interface of the node, created straight
into the pod's namespace under its final name, addressed from IPAM, undone step by step if any
later step fails."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, ClassVar

from cnispec import cni, failpoints
from cnispec.builtin_conf import SubLinkConf
from cnispec.cni import Result
from cnispec.errors import InvalidConfig
from delegates import _multicast
from delegates._common import best_effort, parse
from delegates._garp import announce_on_up
from delegates._iface import check, configure, result_for
from delegates._ipam import Ipam
from delegates.plugin import BuiltinPlugin, PluginRequest
from delegates.podlinks import PLEXUS_GROUP
from kernel.netlink import Netlink
from kernel.netns import netns_fd


class SubLinkPlugin(BuiltinPlugin):
    kind: ClassVar[str]
    conf_model: ClassVar[type[SubLinkConf]] = SubLinkConf
    # Whether the link has its own MAC to announce (macvlan) or shares the master's (ipvlan).
    announces: ClassVar[bool] = False

    def __init__(self, *, ipam: Ipam) -> None:
        self._ipam = ipam

    def link_data(self, conf: Any, req: PluginRequest) -> list[tuple[str, Any]]:
        """IFLA_INFO_DATA of the link kind."""
        raise NotImplementedError

    def link_mac(self, conf: Any, req: PluginRequest) -> str | None:
        return None

    def add(self, req: PluginRequest) -> Result:
        conf = parse(self.conf_model, req)
        with ExitStack() as undo:
            self._create(conf, req)
            undo.callback(self._remove_link, req)
            addresses = Result()
            if Ipam.configured(req.config):
                addresses = self._ipam.add(req)
                undo.callback(self._ipam.delete, req)
                failpoints.hit("sublink_ipam_added")
            with Netlink.open(req.netns) as pod:
                link = pod.require(req.ifname)
                if self.announces and any(ip.ip.version == 4 for ip in addresses.ips):
                    announce_on_up(req.netns, link.name)  # the kernel announces at link up
                configure(pod, link, addresses)
                _multicast.enable(pod, link, req, conf, addresses)
            failpoints.hit("sublink_configured")
            undo.pop_all()
        return result_for(link, req.netns, addresses)

    def _create(self, conf: Any, req: PluginRequest) -> None:
        with Netlink.open() as node, netns_fd(req.netns) as fd:
            master = node.link(conf.master) if conf.master else node.default_route_link()
            if master is None:
                raise InvalidConfig(
                    f"network {req.network_name}: master interface {conf.master} does not exist "
                    "on this node"
                    if conf.master
                    else "no 'master' given and the node has no default route to take it from",
                )
            failpoints.hit("sublink_create_before")
            node.create(
                req.ifname,
                self.kind,
                what=f"{self.kind} {req.ifname} on {master.name}",
                link=master.index,
                netns_fd=fd,
                mtu=conf.mtu,
                mac=self.link_mac(conf, req),
                group=PLEXUS_GROUP,
                up=not self.announces,  # announcing links go up once addressed
                data=self.link_data(conf, req),
            )
            failpoints.hit("sublink_created")

    @staticmethod
    def _remove_link(req: PluginRequest) -> None:
        with Netlink.open(req.netns) as pod:
            failpoints.hit("sublink_remove_before")
            pod.delete(req.ifname)
            failpoints.hit("sublink_removed")

    def delete(self, req: PluginRequest) -> None:
        steps = []
        if req.netns and cni.is_netns(req.netns):
            steps.append(lambda: self._remove_link(req))
        if Ipam.configured(req.config):
            steps.append(lambda: self._ipam.delete(req))
        best_effort(req, *steps)

    def check(self, req: PluginRequest, prev: Result) -> None:
        conf = parse(self.conf_model, req)
        with Netlink.open(req.netns) as pod:
            link = check(pod, req.ifname, self.kind, prev)
            if conf.multicast:
                _multicast.check(pod, link, req)
        if Ipam.configured(req.config):
            self._ipam.check(req)

    def gc(self, req: PluginRequest) -> None:
        if Ipam.configured(req.config):
            self._ipam.gc(req)
