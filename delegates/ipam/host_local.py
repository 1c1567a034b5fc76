"""In-process `host-local` IPAM: the reference plugin's allocator, run inside the daemon.

Built-in delegates call `HostLocalIpam` instead of exec'ing /opt/cni/bin/host-local. It reads the
same config (legacy `subnet`/`rangeStart`/`rangeEnd`/`gateway`, `ranges` as a list of range sets
with one address per set per attachment, `routes`, `dataDir`, `resolvConf`, the `ips` and
`ipRanges` capabilities, `args.cni.ips` and CNI_ARGS `IP=`) and keeps its leases in the reference's
on-disk format (`delegates.ipam._disk`), so the Go binary and Plexus can serve one network from one
dataDir at the same time. Config parsing is pure; files are touched only inside the store's lock.
Every call first confines `dataDir` and `resolvConf` (`delegates.ipam.paths`): a config that
points elsewhere is refused before a directory is made or a file read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cnispec.builtin_conf.ipam import HostLocalConf as _IpamConf
from cnispec.cni import (
    DNS,
    LEGACY_ATTACHMENTS_KEY,
    VALID_ATTACHMENTS_KEY,
    IPConfig,
    Result,
    Route,
    valid_network_name,
)
from cnispec.errors import InvalidConfig, InvalidEnvironment, PlexusError
from delegates.ipam._disk import DiskStore, ReservationStore
from delegates.ipam._ranges import (
    IPAddress,
    IpRange,
    RangeConf,
    RangeSet,
    allocation_order,
    assign_requested,
    build_range_sets,
    describe,
    describe_error,
    ipam_section,
    parse_routes,
    range_for,
    requested_ips,
)
from delegates.ipam.paths import DEFAULT_DATA_DIR, IpamPaths, read_bounded
from delegates.plugin import PluginRequest


class AllocationFailed(PlexusError):
    """No address could be reserved: the range set is full, the requested address is taken, or
    the attachment already holds one. The reference reports these as plain errors, which its
    skel maps to 999; the code is kept so a runtime sees the same whichever implementation ran."""

    cni_code = 999


class ReservationMissing(PlexusError):
    """CHECK: the attachment holds no address in a range set (999, as the reference)."""

    cni_code = 999


@dataclass(frozen=True, slots=True)
class HostLocalNet:
    """One request's parsed config: where the leases live and what to allocate."""

    name: str
    directory: Path
    range_sets: tuple[RangeSet, ...]
    routes: list[Route] = field(default_factory=list)
    resolv_conf: str = ""
    requested: Mapping[int, IPAddress] = field(default_factory=dict)


class HostLocalIpam:
    """The four verbs of host-local. Stateless between calls: every call takes the network's
    flock for its whole read-modify-write, so any number of threads (and the Go binary) may call
    at once."""

    def __init__(
        self, *, default_data_dir: str = DEFAULT_DATA_DIR, paths: IpamPaths | None = None
    ) -> None:
        self._default_data_dir = default_data_dir
        # Without the node admin's roots, only the default directory may be written.
        self._paths = paths or IpamPaths(data_roots=(default_data_dir,))

    def add(self, req: PluginRequest) -> Result:
        net = load_net(req, default_data_dir=self._default_data_dir, paths=self._paths)
        _require_attachment(req)
        dns = DNS()
        if net.resolv_conf:
            dns = read_resolv_conf(str(self._paths.resolv_conf(net.resolv_conf)))
        with DiskStore(net.directory) as store:
            ips = allocate(store, net, req.container_id, req.ifname)
        return Result(ips=ips, routes=net.routes, dns=dns)

    def delete(self, req: PluginRequest) -> None:
        # DEL needs only where the leases live, so a config whose ranges went bad still cleans up.
        _require_attachment(req)
        directory = network_dir(req, default_data_dir=self._default_data_dir, paths=self._paths)
        if not directory.is_dir():
            return
        with DiskStore(directory) as store:
            store.release(store.find(req.container_id, req.ifname))

    def check(self, req: PluginRequest) -> None:
        net = load_net(req, default_data_dir=self._default_data_dir, paths=self._paths)
        _require_attachment(req)
        held: list[IPAddress] = []
        if net.directory.is_dir():
            with DiskStore(net.directory) as store:
                held = store.find(req.container_id, req.ifname)
        missing = [
            f"range set {i} ({describe(rs)})"
            for i, rs in enumerate(net.range_sets)
            if not any(range_for(rs, ip) for ip in held)
        ]
        if missing:
            raise ReservationMissing(
                f"host-local: container {req.container_id} interface {req.ifname} holds no "
                f"address in {', '.join(missing)} of network {net.name} (looked in "
                f"{net.directory}); the lease was released or never made: DEL and ADD again"
            )

    def gc(self, req: PluginRequest) -> None:
        exact, container_ids = valid_attachments(req.config)
        # NOTE: a GC runs for every NAD, and most never leased here: with no directory there is
        # nothing to collect, and no need to resolve (and confine) its path first.
        data_dir = ipam_section(req.config).get("dataDir") or self._default_data_dir
        name = req.network_name
        if (
            isinstance(data_dir, str)
            and valid_network_name(name)
            and not os.path.lexists(os.path.join(data_dir, name))
        ):
            return
        directory = network_dir(req, default_data_dir=self._default_data_dir, paths=self._paths)
        if not directory.is_dir():
            return
        with DiskStore(directory) as store:
            stale = [
                ip
                for ip, owner in store.reservations().items()
                if not (
                    (owner.container_id, owner.ifname) in exact
                    # A legacy lease names no interface: keep it while its container is valid.
                    or (owner.ifname is None and owner.container_id in container_ids)
                )
            ]
            store.release(stale)


# --- allocation (lock held) -------------------------------------------------------------------


def allocate(
    store: ReservationStore, net: HostLocalNet, container_id: str, ifname: str
) -> list[IPConfig]:
    """One address per range set; on any failure the ones reserved by this call are released."""
    held = store.find(container_id, ifname)
    out = []
    with ExitStack() as undo:
        for index, range_set in enumerate(net.range_sets):
            duplicate = next((ip for ip in held if range_for(range_set, ip)), None)
            if duplicate is not None:
                raise AllocationFailed(
                    f"{duplicate} in range set {index} is already allocated to container "
                    f"{container_id} interface {ifname} in network {net.name}; duplicate "
                    "allocation is not allowed (DEL the attachment before adding it again)"
                )
            rng, ip = _reserve_one(store, net, index, container_id, ifname)
            undo.callback(store.release, [ip])
            out.append(IPConfig(address=f"{ip}/{rng.subnet.prefixlen}", gateway=str(rng.gateway)))
        undo.pop_all()
    return out


def _reserve_one(
    store: ReservationStore, net: HostLocalNet, index: int, container_id: str, ifname: str
) -> tuple[IpRange, IPAddress]:
    range_set = net.range_sets[index]
    requested = net.requested.get(index)
    if requested is not None:
        return _reserve_requested(store, net, index, requested, owner=(container_id, ifname))
    for rng, ip in allocation_order(range_set, store.last_reserved(index)):
        if store.reserve(ip, container_id, ifname, index):
            return rng, ip
    raise AllocationFailed(
        f"no IP addresses available in range set {index} ({describe(range_set)}) of network "
        f"{net.name}: every address is reserved in {net.directory}. Release stale leases "
        "(DEL or GC the attachments that hold them) or widen the range"
    )


def _reserve_requested(
    store: ReservationStore,
    net: HostLocalNet,
    index: int,
    ip: IPAddress,
    *,
    owner: tuple[str, str],
) -> tuple[IpRange, IPAddress]:
    rng = range_for(net.range_sets[index], ip)
    if rng is None:  # assign_requested() maps an address only to a set that contains it
        raise InvalidConfig(f"requested IP {ip} is not in range set {index}")
    if store.reserve(ip, *owner, index):
        return rng, ip
    held = store.reservations().get(ip)
    holder = f" by container {held.container_id} ({held.ifname or 'any interface'})" if held else ""
    raise AllocationFailed(f"requested IP {ip} is already reserved{holder} in network {net.name}")


# --- config (pure) ----------------------------------------------------------------------------


def network_dir(req: PluginRequest, *, default_data_dir: str, paths: IpamPaths) -> Path:
    """`<dataDir>/<network name>`, symlinks resolved, inside the node admin's data roots."""
    ipam = ipam_section(req.config)
    name = req.network_name
    if not valid_network_name(name):
        raise InvalidConfig(
            f"host-local needs the network 'name' to name its lease directory; {name!r} must "
            "start with a letter or digit and contain only letters, digits, '_', '.' and '-'"
        )
    return paths.lease_dir(ipam.get("dataDir") or default_data_dir, name)


def load_net(req: PluginRequest, *, default_data_dir: str, paths: IpamPaths) -> HostLocalNet:
    directory = network_dir(req, default_data_dir=default_data_dir, paths=paths)
    try:
        conf = _IpamConf.model_validate(ipam_section(req.config))
    except ValidationError as exc:
        raise InvalidConfig(f"host-local ipam config is invalid: {describe_error(exc)}") from None
    range_sets = build_range_sets(_raw_range_sets(conf, req.runtime_config))
    return HostLocalNet(
        name=req.network_name,
        directory=directory,
        range_sets=range_sets,
        routes=parse_routes(conf.routes, what="ipam.routes"),
        resolv_conf=conf.resolv_conf,
        requested=assign_requested(range_sets, requested_ips(req.config, req.cni_args)),
    )


def _raw_range_sets(conf: _IpamConf, runtime: Mapping[str, Any]) -> list[list[RangeConf]]:
    """As the reference: the `ipRanges` capability first, then the legacy single range, then
    `ranges`."""
    sets = conf.configured_range_sets()
    ip_ranges = runtime.get("ipRanges")
    if ip_ranges:
        try:
            extra = [[RangeConf.model_validate(r) for r in rs] for rs in ip_ranges]
        except (ValidationError, TypeError) as exc:
            raise InvalidConfig(
                f"runtimeConfig.ipRanges is invalid: {describe_error(exc)}"
            ) from None
        sets = extra + sets
    return sets


def valid_attachments(config: Mapping[str, Any]) -> tuple[set[tuple[str, str | None]], set[str]]:
    """GC's keep-list from both libcni keys: exact (container, ifname) pairs and container IDs."""
    keys = [k for k in (VALID_ATTACHMENTS_KEY, LEGACY_ATTACHMENTS_KEY) if k in config]
    if not keys:
        # Without the list every lease would look stale; refuse rather than empty the network.
        raise InvalidConfig(f"GC needs {VALID_ATTACHMENTS_KEY} in the config; nothing released")
    exact: set[tuple[str, str | None]] = set()
    for key in keys:
        items = config[key]
        if not isinstance(items, list):
            raise InvalidConfig(f"{key} must be a list of {{containerID, ifname}} objects")
        for item in items:
            cid = item.get("containerID") if isinstance(item, Mapping) else None
            ifname = item.get("ifname") if isinstance(item, Mapping) else None
            if not isinstance(cid, str) or not isinstance(ifname, str):
                raise InvalidConfig(f"{key}: {item!r} needs string containerID and ifname")
            exact.add((cid.strip(), ifname))
    return exact, {cid for cid, _ in exact}


def read_resolv_conf(path: str) -> DNS:
    """nameserver, domain, search and options of a resolv.conf, as the reference reads it
    (the caller has checked the path against the allow-list)."""
    text = read_bounded(Path(path))
    nameservers: list[str] = []
    search: list[str] = []
    options: list[str] = []
    domain: str | None = None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0].startswith(("#", ";")):
            continue
        if fields[0] == "nameserver":
            nameservers.append(fields[1])
        elif fields[0] == "domain":
            domain = fields[1]
        elif fields[0] == "search":
            search += fields[1:]
        elif fields[0] == "options":
            options += fields[1:]
    return DNS(nameservers=nameservers, domain=domain, search=search, options=options)


def _require_attachment(req: PluginRequest) -> None:
    if not req.container_id.strip() or not req.ifname:
        raise InvalidEnvironment("host-local needs CNI_CONTAINERID and CNI_IFNAME")
