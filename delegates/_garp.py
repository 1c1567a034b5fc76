"""Announcing a freshly addressed interface: host-local hands a released address to the next
pod, and the neighbours on a shared segment would otherwise keep sending to the old pod's MAC
until their ARP entry times out (the reference macvlan plugin announces for the same reason).

The kernel sends it: with `arp_notify` on, bringing the link up announces every IPv4 address it
already has (and any later MAC change announces again); `ndisc_notify` does the same for IPv6
with an unsolicited NA. A packet socket of our own would cost an RCU grace period on close
(~20 ms per interface, every ADD)."""

from __future__ import annotations

from pathlib import Path

from kernel.netns import run_in_netns


def announce_on_up(netns: str, ifname: str, *, ipv6: bool = False) -> None:
    """Turn `arp_notify` (and with `ipv6`, `ndisc_notify`) on for `ifname` in the pod, before
    its link goes up."""
    # /proc/sys/net is the namespace of the thread that opens it.
    v4 = Path("/proc/sys/net/ipv4/conf") / ifname / "arp_notify"
    v6 = Path("/proc/sys/net/ipv6/conf") / ifname / "ndisc_notify"

    def write() -> None:
        v4.write_text("1")
        if ipv6 and v6.exists():  # absent when IPv6 is off in the pod
            v6.write_text("1")

    run_in_netns(netns, write)
