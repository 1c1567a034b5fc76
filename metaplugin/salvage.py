"""What Plexus undoes itself for an attachment whose delegates' DEL cannot succeed.

Some DELs fail for ever: an exec'd reference macvlan whose master is gone cannot even load its
config, so it neither removes its link nor releases its lease, however often it is retried.
When no DEL will come after this one (the runtime's last DEL, GC of a container the runtime no
longer knows, a spooled DEL out of retries), the orchestrator gives the attachment up, and this
module releases what Plexus can release without the delegate, from the record alone:

- **host-local leases** of every plugin of the record whose `ipam.type` is `host-local`, through
  the in-process allocator (`delegates.ipam.HostLocalIpam`), which keeps the reference plugin's
  on-disk format and lock. Only this attachment's leases (container ID and interface) go. Where
  the config names no `dataDir`, a built-in used the daemon's `hostLocalDataDir` and an exec'd
  plugin the reference binary's own default. Any other IPAM type (dhcp, whereabouts, a vendor's)
  keeps state Plexus cannot see: it is named in the report, not guessed at.
- **the links named in the record**: the attachment's own interface in the pod's netns while that
  still exists (pod-side links die with the netns otherwise), and, in the node's namespace, each
  host-side interface of the recorded result (no `sandbox`) that is a veth with the recorded MAC:
  the node end of the pod's pair (bridge, ptp, plexus-routed). Anything else the result names on
  the node (a bridge, a master, a physical device) is shared and never touched, and a veth with
  another MAC is another pod's that happens to have the name.

A pod-side removal never runs in the daemon's own namespace, whatever the record says: a pod's
netns is never the node's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import structlog

from cnispec.errors import PlexusError
from delegates.ipam.host_local import HostLocalIpam, network_dir
from delegates.ipam.paths import DEFAULT_DATA_DIR, IpamPaths
from delegates.plugin import PluginRequest
from kernel.netlink import Netlink
from metaplugin.store import Attachment

log = structlog.get_logger(__name__)


class Links(Protocol):
    """The kernel operations salvage needs (faked in unit tests: they never touch the host)."""

    def remove_pod_link(self, netns: str, ifname: str) -> bool:
        """Delete `ifname` in the pod's netns; False when it is not there."""
        ...

    def remove_host_veth(self, ifname: str, mac: str) -> bool:
        """Delete the node's veth `ifname` if its MAC is `mac`; False when there is no such
        veth (gone, another kind, or another MAC)."""
        ...


class KernelLinks:
    """`Links` over rtnetlink, in the daemon's namespace (the node's) and the pod's."""

    def remove_pod_link(self, netns: str, ifname: str) -> bool:
        if _is_own_netns(netns):
            log.error("salvage_refused_own_netns", netns=netns, ifname=ifname)
            return False
        with Netlink.open(netns) as pod:
            return pod.delete(ifname)

    def remove_host_veth(self, ifname: str, mac: str) -> bool:
        with Netlink.open() as node:
            link = node.link(ifname)
            if link is None or link.kind != "veth" or link.mac.lower() != mac.lower():
                return False
            return node.delete(ifname)


def _is_own_netns(netns: str) -> bool:
    """`netns` is the calling thread's own namespace (the daemon's: the node's)."""
    own, other = os.stat("/proc/thread-self/ns/net"), os.stat(netns)
    return (own.st_dev, own.st_ino) == (other.st_dev, other.st_ino)


@dataclass
class Salvaged:
    """What was done for one attachment, for the log line, the Event and the quarantine file."""

    released: list[str] = field(default_factory=list)  # lease directories cleaned
    removed_links: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)  # what Plexus could not release, and why

    def describe(self) -> str:
        parts = []
        if self.released:
            parts.append("released the host-local leases in " + ", ".join(self.released))
        if self.removed_links:
            parts.append("removed " + ", ".join(self.removed_links))
        if self.left:
            parts.append("could not release " + "; ".join(self.left))
        return "; ".join(parts) or "had nothing of its own to release"

    def as_dict(self) -> dict[str, Any]:
        return {"released": self.released, "removed_links": self.removed_links, "left": self.left}


class Salvage:
    def __init__(
        self, *, host_local_data_dir: str, paths: IpamPaths, links: Links | None = None
    ) -> None:
        # (default lease directory, allocator, where it may reach): a built-in's, then an exec'd
        # plugin's, whose own default is the reference host-local's.
        exec_paths = IpamPaths(
            data_roots=(*paths.data_roots, DEFAULT_DATA_DIR), resolv_confs=paths.resolv_confs
        )
        self._builtin = (
            host_local_data_dir,
            HostLocalIpam(default_data_dir=host_local_data_dir, paths=paths),
            paths,
        )
        self._exec = (
            DEFAULT_DATA_DIR,
            HostLocalIpam(default_data_dir=DEFAULT_DATA_DIR, paths=exec_paths),
            exec_paths,
        )
        self._links = links if links is not None else KernelLinks()

    def everything(self, record: Attachment, netns: str) -> Salvaged:
        """Leases and links of an attachment given up (`netns`: the pod's, "" when gone)."""
        done = Salvaged()
        self._release_leases(record, done)
        self._remove_links(record, netns, done)
        return done

    def links(self, record: Attachment, netns: str) -> Salvaged:
        """Only the links: an ADD's rollback keeps the record, so its leases wait for the DEL."""
        done = Salvaged()
        self._remove_links(record, netns, done)
        return done

    def _release_leases(self, record: Attachment, done: Salvaged) -> None:
        for plugin in record.prepared.plugins:
            ipam = plugin.config.get("ipam")
            ipam_type = ipam.get("type") if isinstance(ipam, Mapping) else None
            if not ipam_type:
                continue
            if ipam_type != "host-local":
                done.left.append(f"the leases of IPAM {ipam_type} (plugin {plugin.type})")
                continue
            req = PluginRequest(
                container_id=record.container_id,
                ifname=record.ifname,
                cni_args=record.cni_args,
                config=plugin.config,
            )
            default_dir, allocator, reach = self._exec if plugin.path else self._builtin
            try:
                # Only where host-local may write: a record's dataDir outside is never touched.
                where = network_dir(req, default_data_dir=default_dir, paths=reach)
                allocator.delete(req)
            except Exception as exc:  # noqa: BLE001 - best effort: named in the report
                done.left.append(f"the host-local leases of plugin {plugin.type}: {_msg(exc)}")
                continue
            done.released.append(str(where))

    def _remove_links(self, record: Attachment, netns: str, done: Salvaged) -> None:
        # The node's ends first: removing one takes the pod's end of its pair with it.
        steps: list[tuple[str, Callable[[], bool]]] = []
        for itf in record.result.interfaces if record.result else ():
            if itf.sandbox or not itf.mac:
                continue  # in the pod (dies with it), or nothing proves the node's link is ours
            steps.append(
                (
                    f"veth {itf.name} on the node",
                    partial(self._links.remove_host_veth, itf.name, itf.mac),
                )
            )
        if netns:
            steps.append(
                (
                    f"{record.ifname} in the pod",
                    partial(self._links.remove_pod_link, netns, record.ifname),
                )
            )
        for what, step in steps:
            try:
                if step():
                    done.removed_links.append(what)
            except Exception as exc:  # noqa: BLE001 - best effort: named in the report
                done.left.append(f"{what}: {_msg(exc)}")


def _msg(exc: BaseException) -> str:
    return exc.msg if isinstance(exc, PlexusError) else f"{type(exc).__name__}: {exc}"
