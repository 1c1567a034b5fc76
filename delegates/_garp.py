"""Gratuitous ARP for a freshly addressed interface: host-local hands a released address to the
next pod, and the neighbours on a shared segment would otherwise keep sending to the old pod's
MAC until their ARP entry times out (the reference macvlan plugin announces for the same
reason). One broadcast ARP request per IPv4 address, sender = target = the address."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Sequence
from typing import Final

import structlog

from delegates.netns import run_in_netns

_ETH_P_ARP: Final = 0x0806
_BROADCAST: Final = b"\xff" * 6

log = structlog.get_logger(__name__)


def arp_announcement(mac: str, address: str) -> bytes:
    """An Ethernet frame carrying a gratuitous ARP request for `address` at `mac`."""
    hw = bytes.fromhex(mac.replace(":", ""))
    ip = ipaddress.IPv4Address(address).packed
    ethernet = _BROADCAST + hw + struct.pack("!H", _ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + hw + ip + b"\x00" * 6 + ip
    return ethernet + arp


def announce(netns: str, ifname: str, mac: str, addresses: Sequence[str]) -> None:
    """Announce the IPv4 `addresses` of `ifname` in the pod. Best effort: a lost announcement
    only delays the neighbours' update until their ARP entry expires."""
    frames = [
        arp_announcement(mac, str(ipaddress.ip_interface(a).ip))
        for a in addresses
        if ipaddress.ip_interface(a).version == 4
    ]
    if not frames or not mac:
        return

    def send() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ARP)) as sock:
            sock.bind((ifname, _ETH_P_ARP))
            for frame in frames:
                sock.send(frame)

    try:
        run_in_netns(netns, send)
    except OSError as exc:
        log.warning("gratuitous_arp_failed", ifname=ifname, error=str(exc))
