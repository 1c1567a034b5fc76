"""Gratuitous ARP for a freshly addressed interface: host-local hands a released address to the
next pod, and the neighbours on a shared segment would otherwise keep sending to the old pod's
MAC until their ARP entry times out (the reference macvlan plugin announces for the same
reason).

The kernel sends it: with `arp_notify` on, bringing the link up announces every IPv4 address it
already has (and any later MAC change announces again). A packet socket of our own would cost
an RCU grace period on close (~20 ms per interface, every ADD)."""

from __future__ import annotations

from pathlib import Path

from delegates.netns import run_in_netns


def announce_on_up(netns: str, ifname: str) -> None:
    """Turn `arp_notify` on for `ifname` in the pod (before its link goes up)."""
    # /proc/sys/net is the namespace of the thread that opens it.
    path = Path("/proc/sys/net/ipv4/conf") / ifname / "arp_notify"
    run_in_netns(netns, lambda: path.write_text("1"))
