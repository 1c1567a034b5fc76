"""A pod's `PodRules` as one nft script that replaces its `inet plexus_policy` table atomically.

The script creates the table (a no-op when it exists), deletes it and declares the whole new
one: nft applies a script as ONE transaction, so a packet sees the old rule set or the new one,
never a mix, and conntrack keeps established flows across the swap.

Inside the table, per hook (`input` for ingress, `output` for egress), only when some interface
is isolated in that direction:

    ct state established,related accept; ct state invalid drop; loopback accept;
    ICMPv6 neighbour/router discovery accept;
    per isolated interface: iifname/oifname "X" jump to its chain,

and in an interface's chain: the node's addresses (primary ingress: kubelet probes), the allows,
then a named counter and drop. Addresses live in named interval sets (one per allow and family),
so `nft list table` stays readable and a pod with many peers stays one rule per allow.

Names: the chains, sets and counters carry the interface name encoded as an nft identifier
(letters and digits kept, every other byte as `_xx` hex, `_` too), so any Linux interface name
gives a valid, unique, reversible identifier.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal

from netpolicy.model import Allow, DirectionRules, InterfaceRules, PodRules, PortRange

TABLE: Final = "plexus_policy"
FAMILY: Final = "inet"

Direction = Literal["ingress", "egress"]
_SHORT: Final[Mapping[Direction, str]] = {"ingress": "in", "egress": "out"}
_HOOK: Final[Mapping[Direction, str]] = {"ingress": "input", "egress": "output"}
_IFMATCH: Final[Mapping[Direction, str]] = {"ingress": "iifname", "egress": "oifname"}
_ADDR: Final[Mapping[Direction, str]] = {"ingress": "saddr", "egress": "daddr"}
_ND_TYPES: Final = "nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert"
_COUNTER_PREFIX: Final = "drop_"


def encode_ifname(ifname: str) -> str:
    """An interface name as the tail of an nft identifier: reversible, ASCII letters/digits."""
    out: list[str] = []
    for byte in ifname.encode():
        ch = chr(byte)
        out.append(ch if ch.isascii() and ch.isalnum() else f"_{byte:02x}")
    return "".join(out)


def decode_ifname(encoded: str) -> str:
    raw = bytearray()
    i = 0
    while i < len(encoded):
        if encoded[i] == "_":
            raw.append(int(encoded[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(ord(encoded[i]))
            i += 1
    return raw.decode(errors="replace")


def drop_counter_name(ifname: str, direction: Direction) -> str:
    return f"{_COUNTER_PREFIX}{_SHORT[direction]}_{encode_ifname(ifname)}"


def _parse_counter_name(name: str) -> tuple[str, Direction] | None:
    for direction, short in _SHORT.items():
        prefix = f"{_COUNTER_PREFIX}{short}_"
        if name.startswith(prefix):
            try:
                return decode_ifname(name[len(prefix) :]), direction
            except (ValueError, IndexError):
                return None
    return None


def parse_drop_counters(nft_json: Mapping[str, Any]) -> dict[tuple[str, str], int]:
    """(ifname, direction) -> dropped packets, from `nft -j list table inet plexus_policy`."""
    out: dict[tuple[str, str], int] = {}
    for item in nft_json.get("nftables", ()):
        counter = item.get("counter") if isinstance(item, Mapping) else None
        if not isinstance(counter, Mapping) or counter.get("table", TABLE) != TABLE:
            continue
        parsed = _parse_counter_name(str(counter.get("name", "")))
        if parsed is not None:
            out[parsed] = int(counter.get("packets", 0))
    return out


def removal_script() -> str:
    """Deletes the table whether or not it exists (declaring it first makes the delete safe)."""
    return f"table {FAMILY} {TABLE} {{}}\ndelete table {FAMILY} {TABLE}\n"


def render(rules: PodRules) -> str:
    """The whole replacement, or only the removal when nothing about this pod is isolated."""
    if not rules.enforcing:
        return removal_script()
    body: list[str] = []
    chains: list[str] = []
    for direction in ("ingress", "egress"):
        isolated = [i for i in rules.interfaces if _dir(i, direction).isolated]
        if not isolated:
            continue
        chains.append(_base_chain(direction, isolated))
        for iface in isolated:
            sets, chain = _interface_chain(iface, direction)
            body.extend(sets)
            body.append(f"\tcounter {drop_counter_name(iface.ifname, direction)} {{\n\t}}")
            chains.append(chain)
    lines = [removal_script().rstrip("\n"), f"table {FAMILY} {TABLE} {{", *body, *chains, "}", ""]
    return "\n".join(lines)


def _dir(iface: InterfaceRules, direction: Direction) -> DirectionRules:
    return iface.ingress if direction == "ingress" else iface.egress


def _quoted_ifname(ifname: str) -> str:
    # nft's quoted strings have no escapes, and a trailing `*` is a wildcard: such a name
    # cannot be matched exactly, and a rule for a different interface would be worse.
    if '"' in ifname or ifname.endswith("*") or not ifname:
        raise ValueError(f"interface name {ifname!r} cannot be matched exactly by nftables")
    return f'"{ifname}"'


def _chain_name(ifname: str, direction: Direction) -> str:
    return f"{_SHORT[direction]}_{encode_ifname(ifname)}"


def _base_chain(direction: Direction, isolated: Iterable[InterfaceRules]) -> str:
    match = _IFMATCH[direction]
    lines = [
        f"\tchain pod_{_SHORT[direction]} {{",
        f"\t\ttype filter hook {_HOOK[direction]} priority filter; policy accept;",
        "\t\tct state established,related accept",
        "\t\tct state invalid drop",
        f'\t\t{match} "lo" accept',
        f"\t\ticmpv6 type {{ {_ND_TYPES} }} accept",
    ]
    lines += [
        f"\t\t{match} {_quoted_ifname(i.ifname)} jump {_chain_name(i.ifname, direction)}"
        for i in isolated
    ]
    lines.append("\t}")
    return "\n".join(lines)


def _split_families(cidrs: Iterable[str]) -> tuple[list[str], list[str]]:
    v4: list[str] = []
    v6: list[str] = []
    for c in cidrs:
        (v6 if ":" in c else v4).append(c)
    return v4, v6


def _interface_chain(iface: InterfaceRules, direction: Direction) -> tuple[list[str], str]:
    rules = _dir(iface, direction)
    chain = _chain_name(iface.ifname, direction)
    addr = _ADDR[direction]
    sets: list[str] = []
    lines = [f"\tchain {chain} {{"]
    if direction == "ingress" and iface.trusted_sources:
        v4, v6 = _split_families(iface.trusted_sources)
        if v4:
            lines.append(f"\t\tip saddr {{ {', '.join(v4)} }} accept")
        if v6:
            lines.append(f"\t\tip6 saddr {{ {', '.join(v6)} }} accept")
    for n, allow in enumerate(rules.allows):
        comment = _comment(allow)
        for match in _allow_matches(allow, f"{chain}_{n}", addr, sets):
            lines.append(f"\t\t{match}accept{comment}")
    lines.append(f"\t\tcounter name {drop_counter_name(iface.ifname, direction)} drop")
    lines.append("\t}")
    return sets, "\n".join(lines)


def _comment(allow: Allow) -> str:
    # nft comments are at most 128 bytes and have no escapes: the refs, clipped, printable
    # ASCII without quotes (refs are API names: anything else is replaced, never passed on).
    text = "".join(c if " " <= c <= "~" and c != '"' else "?" for c in " ".join(allow.by))
    if not text:
        return ""
    if len(text) > 120:
        text = text[:117] + "..."
    return f' comment "{text}"'


def _allow_matches(allow: Allow, set_prefix: str, addr: str, sets: list[str]) -> list[str]:
    """The rule bodies (each ending in a space, or empty) for one allow; its address sets are
    appended to `sets`. Empty list: the allow matches nothing."""
    if allow.cidrs is None:
        addr_matches = [""]
    else:
        addr_matches = []
        for family, cidrs, nft_type in zip(
            ("ip", "ip6"), _split_families(allow.cidrs), ("ipv4_addr", "ipv6_addr"), strict=True
        ):
            if not cidrs:
                continue
            name = f"{set_prefix}_{family}"
            sets.append(
                f"\tset {name} {{\n\t\ttype {nft_type}\n\t\tflags interval\n"
                f"\t\telements = {{ {', '.join(cidrs)} }}\n\t}}"
            )
            addr_matches.append(f"{family} {addr} @{name} ")
    port_matches = [""] if allow.ports is None else _port_matches(allow.ports)
    return [a + p for a in addr_matches for p in port_matches]


def _port_matches(ports: Iterable[PortRange]) -> list[str]:
    by_proto: dict[str, list[PortRange]] = {}
    for p in ports:
        by_proto.setdefault(p.protocol.lower(), []).append(p)
    out: list[str] = []
    for proto in sorted(by_proto):
        ranges = by_proto[proto]
        if any(r.first <= 0 and r.last >= 65535 for r in ranges):
            out.append(f"meta l4proto {proto} ")
            continue
        items = [str(r.first) if r.first == r.last else f"{r.first}-{r.last}" for r in ranges]
        spec = items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"
        out.append(f"meta l4proto {proto} th dport {spec} ")
    return out
