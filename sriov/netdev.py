"""Moving a VF netdev between the node and a pod, and finding it again.

A VF netdev is a physical link: it keeps its identity (PCI parent, ifalias) across namespaces,
and when the namespace holding it dies the kernel returns it to the initial namespace, under its
current name or as "devN" when that name is taken there. So:

- before it leaves the node it gets the alias "plexus-vf <pci> <host name>", which is how DEL, a
  restarted daemon or the audit recognise it wherever it ended up and learn its host name;
- it is renamed only inside a private temporary namespace, so its pod name never appears in the
  node and its host name never meets the pod's interfaces (the reference host-device plugin's
  temp-netns rename, done here without moving any thread: house rule 11).

Used by the `plexus-sriov` delegate (ADD) and by `sriov.release` (its DEL and the audit).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Final

from cnispec import cni
from cnispec.errors import PlexusError
from kernel.netlink import Link, Netlink
from kernel.netns import netns_fd, temporary_netns
from sriov.records import HostState

# How long a DEL waits for the kernel to hand a dead pod netns's VF back to the node.
REFUND_WAIT: Final = 2.0

ALIAS_PREFIX: Final = "plexus-vf"


def vf_alias(pci: str, host_name: str) -> str:
    return f"{ALIAS_PREFIX} {pci} {host_name}"


def alias_host_name(alias: str, pci: str) -> str | None:
    """The host name recorded in a VF's alias, or None when the alias is not ours for `pci`."""
    prefix = f"{ALIAS_PREFIX} {pci} "
    if not alias.startswith(prefix):
        return None
    return alias[len(prefix) :] or None


@dataclass(frozen=True, slots=True)
class Located:
    """Where a VF netdev is: `netns` None is the node's namespace."""

    netns: str | None
    link: Link


def move_into_pod(host_name: str, ifname: str, pod_netns: str) -> None:
    """Node `host_name` -> temporary namespace -> renamed `ifname` -> pod. On failure the VF is
    back in the node under `host_name` (LinkExists when the pod already has `ifname`)."""
    with ExitStack() as stack:
        tmp = stack.enter_context(temporary_netns())
        pod_fd = stack.enter_context(netns_fd(pod_netns))
        node_fd = stack.enter_context(netns_fd(None))
        with Netlink.open() as node:
            link = node.require(host_name)
            node.move(link.index, tmp.fd, what=f"moving VF {host_name} out of the node")
        with Netlink.open(tmp.path) as staged, ExitStack() as undo:
            undo.callback(_leave_temp, staged, host_name, node_fd)
            vf = staged.require(host_name)
            staged.modify(vf.index, name=ifname, what=f"renaming VF {host_name} to {ifname}")
            staged.move(vf.index, pod_fd, what=f"moving VF {host_name} into the pod as {ifname}")
            undo.pop_all()


def _leave_temp(staged: Netlink, name: str, to_fd: int) -> None:
    """Undo: whatever is in the temporary namespace goes to `to_fd` under `name`."""
    for link in staged.links():
        if link.name != "lo":
            staged.modify(link.index, name=name, what=f"renaming VF {link.name} back to {name}")
            staged.move(link.index, to_fd, what=f"moving VF {name} back")


def locate(pci: str, pod_netns: str, host_name: str | None) -> Located | None:
    """Find a VF netdev: in the pod by our alias, else in the node by our alias, by its PCI
    parent, or (a crash before the alias was set) under its host name without an alias."""
    if pod_netns and cni.is_netns(pod_netns):
        try:
            with Netlink.open(pod_netns) as pod:
                links = pod.links()
        except (OSError, PlexusError):
            links = []  # the netns went between the check and the open: look in the node
        for link in links:
            if alias_host_name(link.alias, pci) is not None:
                return Located(pod_netns, link)
    with Netlink.open() as node:
        links = node.links()
    matches: tuple[Callable[[Link], bool], ...] = (
        lambda lk: alias_host_name(lk.alias, pci) is not None,
        lambda lk: lk.parent_dev == pci,
        lambda lk: lk.name == host_name and not lk.alias and lk.parent_dev in ("", pci),
    )
    for match in matches:
        for link in links:
            if match(link):
                return Located(None, link)
    return None


def restore_to_node(where: Located, host: HostState) -> None:
    """Bring the VF down, take it through a temporary namespace to rename it `host.name`, into
    the node; then its MAC and MTU, and last its alias cleared (until then an interrupted
    restore is found again by alias)."""
    name = where.link.name
    with ExitStack() as stack:
        tmp = stack.enter_context(temporary_netns())
        node_fd = stack.enter_context(netns_fd(None))
        back_fd = stack.enter_context(netns_fd(where.netns))
        with Netlink.open(where.netns) as source:
            source.set_down(where.link.index)
            source.move(where.link.index, tmp.fd, what=f"moving VF {name} out")
        with Netlink.open(tmp.path) as staged, ExitStack() as undo:
            undo.callback(_leave_temp, staged, name, back_fd)
            vf = staged.require(name)
            staged.modify(vf.index, name=host.name, what=f"renaming VF {name} to {host.name}")
            staged.move(vf.index, node_fd, what=f"returning VF {host.name} to the node")
            undo.pop_all()
    with Netlink.open() as node:
        vf = node.require(host.name)
        node.modify(vf.index, mac=host.mac, what=f"restoring the MAC of VF {host.name}")
        node.modify(vf.index, mtu=host.mtu, what=f"restoring the MTU of VF {host.name}")
        if host.up:
            node.set_up(vf.index)
        # Last: until here an interrupted restore is found again by our alias.
        node.modify(vf.index, alias=host.alias or "", what=f"restoring the alias of VF {host.name}")


def put_back(pci: str, pod_netns: str, host: HostState, *, patient: bool = False) -> str | None:
    """Find the VF netdev wherever it got to and restore it in the node; the reason when it is
    nowhere to be found (then there is nothing left to restore)."""
    where = locate(pci, pod_netns, host.name)
    deadline = time.monotonic() + (REFUND_WAIT if patient else 0.0)
    while where is None and time.monotonic() < deadline:
        # When a pod's netns has just died the kernel hands its physical netdevs back to the
        # node from a work queue, a moment later: wait for it before calling the VF lost.
        time.sleep(0.05)
        where = locate(pci, pod_netns, host.name)
    if where is None:
        return f"its netdev {host.name} is in neither the pod's nor the node's namespace"
    restore_to_node(where, host)
    return None
