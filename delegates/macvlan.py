"""`plexus-macvlan`: the reference macvlan plugin's job done in-process (same config keys:
master, mode, mtu, mac, bcqueuelen, ipam; runtimeConfig.mac through the `mac` capability)."""

from __future__ import annotations

from typing import Any

from cnispec.builtin_conf import MacvlanConf
from delegates._sublink import SubLinkPlugin
from delegates.plugin import PluginRequest
from kernel.netlink import MACVLAN_MODES


class Macvlan(SubLinkPlugin):
    type = "plexus-macvlan"
    kind = "macvlan"
    conf_model = MacvlanConf
    announces = True

    def link_data(self, conf: Any, req: PluginRequest) -> list[tuple[str, Any]]:
        data: list[tuple[str, Any]] = [("IFLA_MACVLAN_MODE", MACVLAN_MODES[conf.mode])]
        if conf.bcqueuelen is not None:
            # IFLA_MACVLAN_BC_QUEUE_LEN exists from Linux 5.11; older kernels ignore it.
            data.append(("IFLA_MACVLAN_BC_QUEUE_LEN", conf.bcqueuelen))
        return data

    def link_mac(self, conf: Any, req: PluginRequest) -> str | None:
        mac = req.runtime_config.get("mac") or conf.mac  # the pod's request wins
        return str(mac).lower() if mac else None
