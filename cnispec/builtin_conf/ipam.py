"""The in-process IPAM's config: `host-local` (legacy `subnet`/`rangeStart`/`rangeEnd`/`gateway`,
`ranges` as range sets, `routes`, `dataDir`, `resolvConf`) and `static` (`addresses`, `routes`,
`dns`), with the range rules of the reference host-local (plugins/ipam/host-local/backend/
allocator: the default gateway, rangeStart and rangeEnd, overlaps).

The delegates allocate from these ranges (`delegates.ipam`); the admission webhook and
`plexusctl validate` refuse a NAD whose ranges the delegates would refuse, with the same
messages. Everything here is pure: no files, no kernel.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cnispec.cni import DNS, IPConfig, Route
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


class HostLocalConf(BaseModel):
    """`ipam` of type host-local."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    subnet: str | None = None
    range_start: str | None = Field(default=None, alias="rangeStart")
    range_end: str | None = Field(default=None, alias="rangeEnd")
    gateway: str | None = None
    ranges: list[list[RangeConf]] = Field(default_factory=list)
    routes: Any = None
    data_dir: str = Field(default="", alias="dataDir")
    resolv_conf: str = Field(default="", alias="resolvConf")

    def configured_range_sets(self) -> list[list[RangeConf]]:
        """The range sets the config names: the legacy single range (`subnet`, `rangeStart`,
        ...) first, then `ranges`, as the reference reads them (the `ipRanges` capability,
        when given at ADD, comes before both)."""
        sets = list(self.ranges)
        if self.subnet:
            legacy = RangeConf(
                subnet=self.subnet,
                rangeStart=self.range_start,
                rangeEnd=self.range_end,
                gateway=self.gateway,
            )
            sets.insert(0, [legacy])
        return sets


class StaticAddressConf(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    address: str
    gateway: str | None = None


class StaticConf(BaseModel):
    """`ipam` of type static."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    addresses: list[StaticAddressConf] = Field(default_factory=list)
    routes: Any = None
    dns: DNS = Field(default_factory=DNS)


@dataclass(frozen=True, slots=True)
class StaticAddress:
    interface: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    gateway: IPAddress | None = None

    def to_ip_config(self) -> IPConfig:
        gateway = None if self.gateway is None else str(self.gateway)
        return IPConfig(address=str(self.interface), gateway=gateway)


def static_address(text: str, gateway: str | None, *, what: str) -> StaticAddress:
    """One `static` address: CIDR notation required (the reference refuses a bare address),
    its gateway, if any, of the same family."""
    if "/" not in text:
        raise InvalidConfig(f"{what}: {text!r} must be in CIDR notation, e.g. 10.1.0.5/24")
    try:
        interface = ipaddress.ip_interface(text.strip())
    except ValueError:
        raise InvalidConfig(f"{what}: {text!r} is not an address in CIDR notation") from None
    gw = plain_ip(gateway, what=f"{what}.gateway") if gateway else None
    if gw is not None and gw.version != interface.version:
        raise InvalidConfig(f"{what}: gateway {gw} is not of the same family as {interface}")
    return StaticAddress(interface, gw)


def plain_ip(text: str, *, what: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise InvalidConfig(f"{what}: {text!r} is not an IP address") from None
