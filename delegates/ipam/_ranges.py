"""Address ranges for the IPAM delegates: the allocation order and the requested addresses.

Owns what the reference host-local calls `Range` and `RangeSet` (plugins/ipam/host-local/backend/
allocator). Parsing and validating a configured range (default gateway, rangeStart and rangeEnd,
the overlap rules) and the small address, route and list parsers both IPAM types share live on
the ground floor (`cnispec.builtin_conf.ipam`: the admission webhook checks NADs with them) and
are re-exported here; this module adds the round-robin order in which free addresses are tried.
Everything here is pure: no files, no kernel.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from cnispec.builtin_conf.ipam import (
    IPAddress,
    IPNetwork,
    IpRange,
    RangeConf,
    RangeSet,
    build_range,
    build_range_set,
    build_range_sets,
    describe,
    describe_error,
    ipam_section,
    parse_ip,
    parse_routes,
    range_for,
    str_list,
)
from cnispec.cni import parse_cni_args
from cnispec.errors import InvalidConfig

__all__ = [
    "IPAddress",
    "IPNetwork",
    "IpRange",
    "RangeConf",
    "RangeSet",
    "allocation_order",
    "assign_requested",
    "build_range",
    "build_range_set",
    "build_range_sets",
    "describe",
    "describe_error",
    "ipam_section",
    "parse_ip",
    "parse_routes",
    "range_for",
    "requested_ips",
    "str_list",
]

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
