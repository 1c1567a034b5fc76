"""Which multicast groups this node's pods hold, per replication domain, kept current.

A replication domain is what carries group traffic between nodes: `"fabric"` (the routed
primary with `fabric.multicast`) or `"overlay/<vni>"` (one `plexus-overlay` segment). A port
is one pod attachment in a domain, named by its node-side veth.

When: a membership report arriving on a port (kernel.mcast_reports: the pod's kernel announces
every join and leave at once) re-reads that port; an ADD or DEL (`refresh`) and a periodic
resync re-read every port. What: the pod kernel's own membership on that interface
(kernel.mcast), exact — no report parsing and no expiry timers, so a report that was lost costs
at most one resync period, and a pod that is deleted drops out with its DEL.

Who listens: `subscribe`rs get the node-level view (domain -> groups) after every change: the
routed primary's replicator (delegates.fabric_mcast) and, in cluster mode, the publisher that
tells the controller.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import structlog

from cnispec.errors import PlexusError
from delegates.overlay import TYPE as OVERLAY
from delegates.routed import host_veth_name
from kernel.mcast import joined_groups
from metaplugin.store import Attachment

log = structlog.get_logger(__name__)

FABRIC: Final = "fabric"
ROUTED: Final = "plexus-routed"
RESYNC_S: Final = 10.0
_LINK_LOCAL_V4: Final = ipaddress.ip_network("224.0.0.0/24")

Snapshot = dict[str, frozenset[str]]  # domain -> groups with a member on this node


def overlay_domain(vni: int) -> str:
    return f"overlay/{vni}"


@dataclass(frozen=True, slots=True)
class Port:
    domain: str
    pod: str  # "namespace/name (ifname)", for logs and views
    netns: str
    ifname: str  # in the pod
    host: str  # the node's end of the pod's veth


class _Watch(Protocol):
    def wait(self, timeout: float) -> set[str]: ...

    def close(self) -> None: ...


def ports_of(records: Iterable[Attachment], *, fabric_multicast: bool) -> list[Port]:
    """The ports among `records`: every overlay attachment (its VNI is recorded in its
    prepared config), and every routed-primary attachment when the fabric carries multicast."""
    out: list[Port] = []
    for record in records:
        if record.state != "added" or not record.netns:
            continue
        domain = _domain(record, fabric_multicast=fabric_multicast)
        if domain is None:
            continue
        host = host_veth_name(record.container_id, record.ifname)
        pod = f"{record.holder.pod_ref} ({record.ifname})"
        out.append(Port(domain, pod, record.netns, record.ifname, host))
    return out


def _domain(record: Attachment, *, fabric_multicast: bool) -> str | None:
    for plugin in record.prepared.plugins:
        vni: Any = plugin.config.get("vni")
        if plugin.type == OVERLAY and isinstance(vni, int) and not isinstance(vni, bool):
            return overlay_domain(vni)
        if plugin.type == ROUTED and fabric_multicast:
            return FABRIC
    return None


def _routable(group: str) -> bool:
    """Not link-local scope: only such groups ever leave a node (the overlay's bridges flood
    link-local groups to every port anyway; the routed primary never forwards them)."""
    ip = ipaddress.ip_address(group)
    if ip.version == 4:
        return ip not in _LINK_LOCAL_V4
    return (ip.packed[1] & 0x0F) > 2


class LocalMembership:
    def __init__(
        self,
        ports: Callable[[], Iterable[Port]],
        *,
        read: Callable[[str, str], list[str]] = joined_groups,
        watch: Callable[[], _Watch] | None = None,
        resync_s: float = RESYNC_S,
    ) -> None:
        self._list_ports = ports
        self._read = read
        self._make_watch = watch
        self._resync_s = resync_s
        self._lock = threading.Lock()
        self._ports: dict[str, Port] = {}  # host -> port
        self._groups: dict[str, frozenset[str]] = {}  # host -> groups
        self._subscribers: list[Callable[[Snapshot], None]] = []
        self._wanted = threading.Event()  # a full pass is wanted (ADD, DEL)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # --- what others read -----------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """domain -> the groups at least one of this node's pods in that domain holds."""
        with self._lock:
            out: dict[str, set[str]] = {}
            for host, port in self._ports.items():
                out.setdefault(port.domain, set()).update(self._groups.get(host, ()))
        return {domain: frozenset(groups) for domain, groups in out.items() if groups}

    def members(self, domain: str) -> dict[str, frozenset[str]]:
        """group -> the ports (node-side veths) in `domain` whose pod holds it."""
        with self._lock:
            out: dict[str, set[str]] = {}
            for host, port in self._ports.items():
                if port.domain == domain:
                    for group in self._groups.get(host, ()):
                        out.setdefault(group, set()).add(host)
        return {group: frozenset(hosts) for group, hosts in out.items()}

    def ports(self, domain: str) -> frozenset[str]:
        """Every port of `domain` on this node, member or not (any of them may send)."""
        with self._lock:
            return frozenset(h for h, p in self._ports.items() if p.domain == domain)

    def subscribe(self, callback: Callable[[Snapshot], None]) -> None:
        """`callback(snapshot)` after every change of the ports or their groups (from the
        membership thread; a callback that raises is logged and the others still run)."""
        self._subscribers.append(callback)

    # --- driving it -----------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-list the ports and re-read them all soon (after an ADD or DEL)."""
        self._wanted.set()

    def pass_once(self, hosts: Iterable[str] | None = None) -> bool:
        """Re-read `hosts` (None: re-list and re-read every port) now; True when anything
        changed (the subscribers have then been told)."""
        with self._lock:
            before = (dict(self._ports), dict(self._groups))
        if hosts is None:
            ports = {p.host: p for p in self._list_ports()}
        else:
            with self._lock:
                ports = dict(self._ports)
        targets = ports.keys() if hosts is None else set(hosts) & ports.keys()
        read = {host: self._groups_of(ports[host]) for host in targets}
        with self._lock:
            self._ports = ports
            self._groups = {h: g for h, g in self._groups.items() if h in ports} | read
            changed = (self._ports, self._groups) != before
        if changed:
            self._tell()
        return changed

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mcast-members", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    # --- internals ------------------------------------------------------------------------

    def _groups_of(self, port: Port) -> frozenset[str]:
        try:
            return frozenset(g for g in self._read(port.netns, port.ifname) if _routable(g))
        except (OSError, PlexusError) as exc:  # the pod's netns went with its pod
            log.debug("mcast_members_unreadable", pod=port.pod, error=str(exc))
            return frozenset()

    def _tell(self) -> None:
        snapshot = self.snapshot()
        log.info("mcast_members", groups={d: sorted(g) for d, g in snapshot.items()})
        for callback in list(self._subscribers):
            try:
                callback(snapshot)
            except Exception:  # one listener must not starve the others
                log.exception("mcast_members_subscriber_failed")

    def _run(self) -> None:
        watch: _Watch | None = None
        next_full = retry_watch = 0.0
        try:
            while not self._stopping.is_set():
                # The report socket exists only while there are ports: a node without
                # multicast pods runs no packet filter at all.
                with self._lock:
                    has_ports = bool(self._ports)
                if has_ports and watch is None and time.monotonic() >= retry_watch:
                    watch = self._open_watch()
                    if watch is None:  # try again at the next resync, not every loop
                        retry_watch = time.monotonic() + self._resync_s
                elif not has_ports and watch is not None:
                    watch.close()
                    watch = None
                try:
                    hosts = watch.wait(0.25) if watch is not None else set()
                except OSError as exc:  # the socket broke: a new one at the next turn
                    log.warning("mcast_reports_failed", error=str(exc))
                    assert watch is not None
                    watch.close()
                    watch, hosts = None, set()
                if watch is None:
                    self._stopping.wait(0.25)
                now = time.monotonic()
                try:
                    if self._wanted.is_set() or now >= next_full:
                        self._wanted.clear()
                        next_full = now + self._resync_s
                        self.pass_once()
                    elif hosts:
                        self.pass_once(hosts)
                except Exception:  # the thread must outlive any one bad pass
                    log.exception("mcast_members_pass_failed")
        finally:
            if watch is not None:
                watch.close()

    def _open_watch(self) -> _Watch | None:
        if self._make_watch is None:
            return None
        try:
            return self._make_watch()
        except OSError as exc:  # no AF_PACKET (no CAP_NET_RAW): the resync still runs
            log.warning("mcast_reports_unavailable", error=str(exc), resync_s=self._resync_s)
            return None
