"""`plexus-ipvlan`: the reference ipvlan plugin's job done in-process (same keys: master,
mode l2|l3|l3s, mtu, ipam) plus the kernel's port flags bridge|private|vepa (`flag`). A kernel
without ipvlan gets a clear error (CNI code 109)."""

from __future__ import annotations

from typing import Any

from cnispec.builtin_conf import IpvlanConf
from delegates._sublink import SubLinkPlugin
from delegates.plugin import PluginRequest
from kernel.netlink import IPVLAN_FLAGS, IPVLAN_MODES


class Ipvlan(SubLinkPlugin):
    type = "plexus-ipvlan"
    kind = "ipvlan"
    conf_model = IpvlanConf

    def link_data(self, conf: Any, req: PluginRequest) -> list[tuple[str, Any]]:
        return [
            ("IFLA_IPVLAN_MODE", IPVLAN_MODES[conf.mode]),
            ("IFLA_IPVLAN_FLAGS", IPVLAN_FLAGS[conf.flag]),
        ]
