"""`plexus-macvlan`: the reference macvlan plugin's job done in-process (same config keys:
master, mode, mtu, mac, bcqueuelen, ipam; runtimeConfig.mac through the `mac` capability)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator

from delegates._sublink import SubLinkConf, SubLinkPlugin
from delegates.plugin import PluginRequest
from kernel.netlink import MACVLAN_MODES

_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


class MacvlanConf(SubLinkConf):
    mode: Literal["bridge", "private", "vepa", "passthru"] = "bridge"
    mac: str | None = None
    bcqueuelen: int | None = Field(default=None, ge=0)

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str | None) -> str | None:
        if value is not None and not _MAC.match(value):
            raise ValueError(f"{value!r} is not a MAC address")
        return value


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
