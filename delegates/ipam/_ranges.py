"""Address ranges for the IPAM delegates: parsing, validation and the allocation order.

Owns what the reference host-local calls `Range` and `RangeSet` (plugins/ipam/host-local/backend/
allocator): canonicalising a configured range (default gateway, rangeStart and rangeEnd), the
overlap rules, and the round-robin order in which free addresses are tried. Also holds the small
address, route and list parsers both IPAM types share. Everything here is pure: no files, no kernel.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cnispec.cni import Route, parse_cni_args
from cnispec.errors import InvalidConfig

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


class RangeConf(BaseModel):
    """One range as written in the config (`ipam.ranges[i][j]` or the legacy top-level keys)."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    subnet: str
    range_start: str | None = Field(default=None, alias="rangeStart")
    range_end: str | None = Field(default=None, alias="rangeEnd")
    gateway: str | None = None


@dataclass(frozen=True, slots=True)
class IpRange:
    """A canonical range: every address of [start, end] may be handed out except `gateway`."""

    subnet: IPNetwork
    start: IPAddress
    end: IPAddress
    gateway: IPAddress

    def contains(self, ip: IPAddress) -> bool:
        return ip.version == self.start.version and int(self.start) <= int(ip) <= int(self.end)

    def overlaps(self, other: IpRange) -> bool:
        if self.start.version != other.start.version:
            return False
        return not (int(self.end) < int(other.start) or int(other.end) < int(self.start))

    def __str__(self) -> str:
        # The reference prints a range as "start-end"; keep it so messages read the same.
        return f"{self.start}-{self.end}"


RangeSet: TypeAlias = tuple[IpRange, ...]


def describe(range_set: RangeSet) -> str:
    return ",".join(str(r) for r in range_set)


def range_for(range_set: RangeSet, ip: IPAddress) -> IpRange | None:
    return next((r for r in range_set if r.contains(ip)), None)


# --- parsing ----------------------------------------------------------------------------------


def parse_ip(text: str, *, what: str) -> IPAddress:
    """An address written plain ("10.0.0.5") or with a prefix ("10.0.0.5/24"); IPv4-mapped IPv6
    becomes IPv4, as Go's To4() canonicalisation does."""
    try:
        ip = ipaddress.ip_interface(text.strip()).ip
    except ValueError:
        raise InvalidConfig(f"{what}: {text!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _address(text: str | None, *, what: str, default: IPAddress) -> IPAddress:
    if text is None or text == "":
        return default
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InvalidConfig(f"{what}: {text!r} is not an IP address") from None


def _subnet(text: str, *, what: str) -> IPNetwork:
    if "/" not in text:
        raise InvalidConfig(f"{what} {text!r} needs a prefix length, e.g. 10.1.0.0/24")
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise InvalidConfig(f"{what} {text!r} is not a network: {exc}") from None
    if ipaddress.ip_interface(text).ip != loose.network_address:
        # The reference rejects host bits too; say which network was probably meant.
        raise InvalidConfig(f"{what} {text!r} has host bits set; did you mean {loose}?")
    return loose


def build_range(raw: RangeConf, *, where: str) -> IpRange:
    """Canonicalise one range the way the reference does, with stricter checks where it would
    hand out an unusable address (start after end, the network or broadcast address)."""
    subnet = _subnet(raw.subnet, what=f"{where}.subnet")
    if subnet.num_addresses < 4:
        # As the reference: a /31 or /32 (/127, /128) leaves nothing to allocate.
        raise InvalidConfig(f"{where}: network {subnet} is too small to allocate from")
    first_usable = subnet.network_address + 1
    last_usable = subnet.broadcast_address - (1 if subnet.version == 4 else 0)
    start = _address(raw.range_start, what=f"{where}.rangeStart", default=first_usable)
    end = _address(raw.range_end, what=f"{where}.rangeEnd", default=last_usable)
    for key, ip in (("rangeStart", start), ("rangeEnd", end)):
        _require_usable(ip, subnet, first_usable, last_usable, what=f"{where}.{key}")
    if int(start) > int(end):
        raise InvalidConfig(f"{where}: rangeStart {start} is after rangeEnd {end}")
    # The reference accepts a gateway outside the subnet (e.g. a link-local next hop); so do we.
    gateway = _address(raw.gateway, what=f"{where}.gateway", default=first_usable)
    if gateway.version != subnet.version:
        raise InvalidConfig(f"{where}: gateway {gateway} is not of the same family as {subnet}")
    return IpRange(subnet=subnet, start=start, end=end, gateway=gateway)


def _require_usable(
    ip: IPAddress, subnet: IPNetwork, first: IPAddress, last: IPAddress, *, what: str
) -> None:
    if ip.version != subnet.version or ip not in subnet:
        raise InvalidConfig(f"{what} {ip} is not in network {subnet}")
    if not int(first) <= int(ip) <= int(last):
        raise InvalidConfig(
            f"{what} {ip} is the network or broadcast address of {subnet}; "
            f"usable addresses are {first}-{last}"
        )


def build_range_set(raws: Sequence[RangeConf], *, index: int) -> RangeSet:
    where = f"ipam range set {index}"
    if not raws:
        raise InvalidConfig(f"{where} is empty; give it at least one range with a subnet")
    ranges = tuple(build_range(raw, where=f"{where}[{j}]") for j, raw in enumerate(raws))
    if len({r.subnet.version for r in ranges}) > 1:
        raise InvalidConfig(f"{where} mixes IPv4 and IPv6; use one range set per family")
    for i, first in enumerate(ranges):
        for second in ranges[i + 1 :]:
            if first.overlaps(second):
                raise InvalidConfig(f"{where}: ranges {first} and {second} overlap")
    return ranges


def build_range_sets(raw_sets: Sequence[Sequence[RangeConf]]) -> tuple[RangeSet, ...]:
    if not raw_sets:
        raise InvalidConfig("ipam has no IP ranges: give 'subnet' or 'ranges'")
    sets = tuple(build_range_set(raws, index=i) for i, raws in enumerate(raw_sets))
    for i, first in enumerate(sets):
        for j in range(i + 1, len(sets)):
            if any(a.overlaps(b) for a in first for b in sets[j]):
                raise InvalidConfig(f"ipam range set {i} overlaps with range set {j}")
    return sets


def parse_routes(raw: Any, *, what: str) -> list[Route]:
    """`routes` as the CNI spec writes them: `dst` a CIDR (host bits allowed), `gw` an IP."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidConfig(f"{what} must be a list of {{dst, gw}} objects")
    routes = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise InvalidConfig(f"{what}[{i}] must be an object with 'dst'")
        try:
            route = Route.model_validate(item)
            ipaddress.ip_interface(route.dst)
            if route.gw:
                ipaddress.ip_address(route.gw)
        except (ValidationError, ValueError) as exc:
            raise InvalidConfig(
                f"{what}[{i}] is not a valid route: {describe_error(exc)}"
            ) from None
        routes.append(route)
    return routes


def ipam_section(config: Mapping[str, Any]) -> Mapping[str, Any]:
    ipam = config.get("ipam")
    if not isinstance(ipam, Mapping):
        raise InvalidConfig("IPAM config missing 'ipam' key (it must be an object)")
    return ipam


def str_list(container: Any, key: str, *, what: str) -> list[str]:
    """`container[key]` as a list of strings; absent or null is empty."""
    if not isinstance(container, Mapping) or container.get(key) is None:
        return []
    value = container[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidConfig(f"{what} must be a list of address strings")
    return value


def describe_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return str(exc)


# --- requested addresses ---------------------------------------------------------------------


def requested_ips(config: Mapping[str, Any], cni_args: str) -> list[IPAddress]:
    """Specific addresses asked for, in the reference's order (CNI_ARGS `IP=`, `args.cni.ips`,
    the `ips` capability) and all of them honoured; each may carry a prefix, which is ignored."""
    raw: list[tuple[str, str]] = []
    env_ip = parse_cni_args(cni_args).get("IP", "")
    # The reference takes one address here; a comma list is accepted as the static plugin does.
    raw += [("CNI_ARGS IP", item) for item in env_ip.split(",") if item.strip()]
    args = config.get("args")
    cni = args.get("cni") if isinstance(args, Mapping) else None
    raw += [("args.cni.ips", item) for item in str_list(cni, "ips", what="args.cni.ips")]
    raw += [
        ("runtimeConfig.ips", i)
        for i in str_list(config.get("runtimeConfig"), "ips", what="runtimeConfig.ips")
    ]
    out: list[IPAddress] = []
    for what, text in raw:
        ip = parse_ip(text, what=what)
        if ip not in out:
            out.append(ip)
    return out


def assign_requested(
    range_sets: Sequence[RangeSet], ips: Sequence[IPAddress]
) -> dict[int, IPAddress]:
    """Each requested address to the range set that contains it, at most one per set, never a
    gateway."""
    out: dict[int, IPAddress] = {}
    for ip in ips:
        index, rng = next(
            ((i, r) for i, rs in enumerate(range_sets) if (r := range_for(rs, ip))), (-1, None)
        )
        if rng is None:
            sets = "; ".join(f"{i}: {describe(rs)}" for i, rs in enumerate(range_sets))
            raise InvalidConfig(f"requested IP {ip} is in none of the range sets ({sets})")
        if ip == rng.gateway:
            raise InvalidConfig(f"requested IP {ip} is the gateway of range {rng}")
        if index in out:
            raise InvalidConfig(
                f"requested IPs {out[index]} and {ip} are both in range set {index} "
                f"({describe(range_sets[index])}); an attachment gets one address per range set"
            )
        out[index] = ip
    return out


# --- allocation order -------------------------------------------------------------------------


def allocation_order(
    range_set: RangeSet, last_reserved: IPAddress | None
) -> Iterator[tuple[IpRange, IPAddress]]:
    """Every allocatable address of the set exactly once, round-robin like the reference: start
    just after the last address reserved in this set (so a crash-looping pod does not get the
    same address back at once), wrap through the following ranges, and skip each gateway."""
    index, first = _starting_point(range_set, last_reserved)
    count = len(range_set)
    head = range_set[index]
    segments = [(head, int(first), int(head.end))]
    for k in range(1, count):
        rng = range_set[(index + k) % count]
        segments.append((rng, int(rng.start), int(rng.end)))
    if int(first) > int(head.start):
        segments.append((head, int(head.start), int(first) - 1))
    for rng, low, high in segments:
        make = type(rng.start)
        for value in range(low, high + 1):
            ip = make(value)
            if ip != rng.gateway:
                yield rng, ip


def _starting_point(range_set: RangeSet, last: IPAddress | None) -> tuple[int, IPAddress]:
    for i, rng in enumerate(range_set):
        if last is not None and rng.contains(last):
            if last == rng.end:
                following = (i + 1) % len(range_set)
                return following, range_set[following].start
            return i, last + 1
    return 0, range_set[0].start
