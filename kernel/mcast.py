"""Which multicast groups an interface has joined, as the kernel keeps them: /proc/net/igmp
(IPv4) and /proc/net/igmp6 (IPv6) of the namespace the calling thread is in (read through
/proc/thread-self: /proc/self/net is the main thread's namespace, not a netns worker's)."""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path
from typing import Final

from kernel.netns import run_in_netns

_PROC: Final = Path("/proc/thread-self/net")
# Groups every interface is in by itself (all-hosts, all-nodes, solicited-node): not what an
# application joined.
_LINK_LOCAL_V4: Final = ipaddress.ip_network("224.0.0.0/24")
_ALWAYS_V6: Final = (
    ipaddress.ip_network("ff01::1/128"),
    ipaddress.ip_network("ff02::1/128"),
    ipaddress.ip_network("ff02::1:ff00:0/104"),
)


def application_groups(ifname: str) -> list[str]:
    """The groups joined on `ifname` in this thread's namespace, minus the ones every
    interface joins by itself; sorted, IPv4 first."""
    v4: list[str] = []
    v6: list[str] = []
    igmp = _PROC / "igmp"
    if igmp.exists():
        device = ""
        for line in igmp.read_text().splitlines()[1:]:
            if not line.startswith("\t"):
                fields = line.split()
                device = fields[1].rstrip(":") if len(fields) > 1 else ""
            elif device == ifname:
                # the group as the kernel's __be32 printed with %08X: host byte order
                group = ipaddress.IPv4Address(struct.pack("=I", int(line.split()[0], 16)))
                if group not in _LINK_LOCAL_V4:
                    v4.append(str(group))
    igmp6 = _PROC / "igmp6"
    if igmp6.exists():
        for line in igmp6.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[1] == ifname:
                group6 = ipaddress.IPv6Address(bytes.fromhex(fields[2]))
                if not any(group6 in net for net in _ALWAYS_V6):
                    v6.append(socket.inet_ntop(socket.AF_INET6, group6.packed))
    return sorted(set(v4), key=ipaddress.ip_address) + sorted(set(v6), key=ipaddress.ip_address)


def joined_groups(netns: str, ifname: str) -> list[str]:
    """`application_groups` of `ifname` in the namespace at `netns`."""
    return run_in_netns(netns, lambda: application_groups(ifname))
