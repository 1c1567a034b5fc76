"""Making an attachment the pod's way to multicast (`"multicast": true` on a NAD).

An application that joins a group with INADDR_ANY / interface index 0, or sends to a group
without IP_MULTICAST_IF, gets the interface the kernel's route lookup for the group address
picks. A pod with only eth0 finds none for IPv4 (join fails with ENODEV) and the first device's
`ff00::/8` for IPv6. So a multicast attachment adds group routes through itself:
`224.0.0.0/4` in the main table, and a `multicast ff00::/8` route in the local table (where the
kernel keeps one per device at metric 256, so ours must sit there, below it, to be chosen).

More than one multicast attachment in a pod: the routes' metric decides. By default the one
added first wins: attachments are added in the order of the pod's networks annotation, and each
takes the next metric after the group routes already there (100, 101, ...). The pod may name
its choice in the annotation's JSON form with `"cni-args": {"multicastDefault": true}`: that
attachment takes metrics from 50, below every default one. The routes go with the link on DEL.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Final

from cnispec.builtin_conf import MulticastKeys
from cnispec.cni import Result
from cnispec.errors import CheckFailed, InvalidConfig
from delegates.plugin import PluginRequest
from kernel.netlink import (
    LOCAL_TABLE,
    MAIN_TABLE,
    RT_SCOPE_LINK,
    RTN_MULTICAST,
    Link,
    Netlink,
    RouteInfo,
)
from kernel.netns import run_in_netns

IPV4_GROUPS: Final = "224.0.0.0/4"
IPV6_GROUPS: Final = "ff00::/8"
DEFAULT_METRIC: Final = 100  # first multicast attachment of a pod; later ones count up
CHOSEN_METRIC: Final = 50  # an attachment the pod chose with cni-args multicastDefault
_OURS: Final = range(CHOSEN_METRIC, DEFAULT_METRIC + 100)  # metrics we hand out
_PROC: Final = Path("/proc/sys/net")


def chosen_by_pod(req: PluginRequest) -> bool:
    """The pod's choice: `"cni-args": {"multicastDefault": true}` in its networks annotation
    (the resolver puts annotation cni-args under `args.cni`)."""
    args = req.config.get("args")
    cni_args = args.get("cni") if isinstance(args, dict) else None
    if not isinstance(cni_args, dict) or "multicastDefault" not in cni_args:
        return False
    value = cni_args["multicastDefault"]
    if not isinstance(value, bool):
        raise InvalidConfig(
            f"network {req.network_name}: cni-args multicastDefault must be true or false, "
            f"not {value!r}"
        )
    return value


def enable(
    nl: Netlink, link: Link, req: PluginRequest, conf: MulticastKeys, addresses: Result
) -> None:
    """Group routes through `link` in the pod (`nl` is the pod's namespace), and the pinned
    IGMP/MLD versions. Nothing to undo separately: it all goes with the link."""
    if not conf.multicast:
        return
    _pin_versions(req.netns, link.name, conf)
    metric = _next_metric(nl, link.index, chosen=chosen_by_pod(req))
    families = {ipaddress.ip_interface(ip.address).version for ip in addresses.ips} or {4, 6}
    if 4 in families:
        nl.add_route(IPV4_GROUPS, oif=link.index, scope=RT_SCOPE_LINK, priority=metric)
    if 6 in families and _ipv6_on(req.netns, link.name):
        nl.add_route(
            IPV6_GROUPS,
            oif=link.index,
            table=LOCAL_TABLE,
            route_type=RTN_MULTICAST,
            priority=metric,
        )


def _next_metric(nl: Netlink, index: int, *, chosen: bool) -> int:
    base = CHOSEN_METRIC if chosen else DEFAULT_METRIC
    taken = {
        r.priority
        for r in nl.routes(table=None)
        if r.dst in (IPV4_GROUPS, IPV6_GROUPS) and r.oif != index and r.priority in _OURS
    }
    metric = base
    while metric in taken:
        metric += 1
    return metric


def _pin_versions(netns: str, ifname: str, conf: MulticastKeys) -> None:
    if conf.igmp_version is None and conf.mld_version is None:
        return  # the kernel's own choice: IGMPv3 / MLDv2, following an older querier
    # /proc/sys/net is the namespace of the thread that opens it.
    writes: list[tuple[Path, int]] = []
    if conf.igmp_version is not None:
        writes.append(
            (Path("/proc/sys/net/ipv4/conf") / ifname / "force_igmp_version", conf.igmp_version)
        )
    if conf.mld_version is not None:
        writes.append(
            (Path("/proc/sys/net/ipv6/conf") / ifname / "force_mld_version", conf.mld_version)
        )

    def write() -> None:
        for path, value in writes:
            if path.parent.exists():  # no ipv6/conf/<if> when IPv6 is off in the pod
                path.write_text(str(value))

    run_in_netns(netns, write)


def _ipv6_on(netns: str, ifname: str) -> bool:
    path = _PROC / "ipv6/conf" / ifname / "disable_ipv6"
    return run_in_netns(netns, lambda: path.exists() and path.read_text().strip() == "0")


def routes_of(nl: Netlink, index: int) -> list[RouteInfo]:
    """The group routes through link `index`."""
    return [
        r
        for r in nl.routes(table=None)
        if r.oif == index
        and r.dst in (IPV4_GROUPS, IPV6_GROUPS)
        and r.table in (MAIN_TABLE, LOCAL_TABLE)
        and r.priority in _OURS
    ]


def check(nl: Netlink, link: Link, req: PluginRequest) -> None:
    """CHECK: a multicast attachment still has a group route through it."""
    if not routes_of(nl, link.index):
        raise CheckFailed(
            f"interface {link.name} of multicast network {req.network_name} lost its group "
            f"routes ({IPV4_GROUPS}, {IPV6_GROUPS})"
        )
