"""The in-process delegates, by CNI `type`. A NAD switches to one by changing its `type`
(`macvlan` -> `plexus-macvlan`); every other type is still exec'd from the CNI path."""

from __future__ import annotations

from delegates._ipam import Ipam
from delegates.external import Exec
from delegates.fabric import Fabric
from delegates.ipam import IpamPaths
from delegates.ipvlan import Ipvlan
from delegates.macvlan import Macvlan
from delegates.overlay import NetworkLister, Overlay
from delegates.plugin import Plugin
from delegates.routed import Routed
from delegates.sbr import SourceRouting
from delegates.sriov import Sriov
from sriov.owner import VfOwner


def builtin_plugins(
    *,
    exec_: Exec,
    timeout: float,
    ipam_data_dir: str,
    ipam_paths: IpamPaths,
    fabric: Fabric | None,
    vf_owner: VfOwner | None = None,
    overlay_networks: NetworkLister | None = None,
) -> dict[str, Plugin]:
    ipam = Ipam(exec_=exec_, timeout=timeout, data_dir=ipam_data_dir, paths=ipam_paths)
    plugins: list[Plugin] = [
        Macvlan(ipam=ipam),
        Ipvlan(ipam=ipam),
        Routed(ipam=ipam, fabric=fabric),
        SourceRouting(),
        Sriov(ipam=ipam, owner=vf_owner),  # without VF pools it answers with how to set them
        # overlay_networks: every NAD the daemon knows, for the VNI collision check
        Overlay(ipam=ipam, fabric=fabric, networks=overlay_networks),
    ]
    return {plugin.type: plugin for plugin in plugins}
