"""The node forwards for its pods (as the bridge plugin's isGateway does), per address family,
in the node's namespace, without costing the node its own IPv6 default route.

With `net.ipv6.conf.all.forwarding=1` the kernel treats every interface as a router's and
ignores Router Advertisements on those with `accept_ra=1`: a node that learned its IPv6 default
route by SLAAC would lose it when the RA's lifetime runs out. So before turning IPv6 forwarding
on, each interface that holds a route learned from an RA gets `accept_ra=2` (accept RAs even
when forwarding). Other interfaces are left alone: a pod's veth must never accept RAs."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Final

import structlog

from kernel.netlink import RTPROT_RA, Netlink

_FORWARDING: Final = {
    4: Path("/proc/sys/net/ipv4/ip_forward"),
    6: Path("/proc/sys/net/ipv6/conf/all/forwarding"),
}
_PROC_IPV6_CONF: Final = Path("/proc/sys/net/ipv6/conf")

log = structlog.get_logger(__name__)


def ensure_forwarding(versions: set[int]) -> None:
    """Forwarding on for each IP version in `versions` (4, 6) that does not have it yet."""
    for version in sorted(versions):
        path = _FORWARDING[version]
        if path.read_text().strip() == "1":
            continue
        if version == 6:
            _keep_router_advertisements()
        path.write_text("1")
        log.info("forwarding_enabled", ip_version=version)


def _keep_router_advertisements() -> None:
    with Netlink.open() as node:
        ra_links = {
            r.oif for r in node.routes() if r.proto == RTPROT_RA and r.family == socket.AF_INET6
        }
        names = [link.name for link in node.links() if link.index in ra_links]
    for name in names:
        accept_ra = _PROC_IPV6_CONF / name / "accept_ra"
        if accept_ra.exists() and accept_ra.read_text().strip() == "1":
            accept_ra.write_text("2")
            log.info("accept_ra_kept_with_forwarding", interface=name)
