"""The multicast membership object in the Kubernetes API (`plexus.dev/v1alpha1`), shared by the
node agent and the cluster controller (issue 13, cluster mode):

- `MulticastNodeState` (cluster-scoped, one per node, named after the Node and owner-referenced
  to it, like `VFPoolNodeState`). `spec` is written only by that node's plexusd: per replication
  domain the groups that have at least one member pod on the node. `status` is written only by
  the controller (status subresource): per domain and group, the OTHER nodes with members, i.e.
  where this node must replicate the group's traffic to.

A replication domain is `overlay/<vni>` (decimal VNI, a `plexus-overlay` segment) or `fabric`
(the routed primary's multicast). Groups are multicast addresses in canonical text
(`ipaddress`' `str`: lowercase, compressed IPv6).

Pure models and functions: no API calls (those are `metaplugin.mcast_sync` and
`nad_controller.k8s`). Field names are the API's (camelCase); Python attributes snake_case.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from cnispec.vfpool_api import API_VERSION, GROUP, VERSION

__all__ = ["API_VERSION", "GROUP", "VERSION"]

KIND, PLURAL = "MulticastNodeState", "multicastnodestates"
FABRIC_DOMAIN: Final = "fabric"
OVERLAY_PREFIX: Final = "overlay/"
MAX_VNI: Final = 0xFFFFFF
# Bounds the CRD states too (the API server's CEL cost estimate needs them).
MAX_DOMAINS: Final = 1024
MAX_GROUPS: Final = 4096
MAX_NODES: Final = 5000
_DOMAIN: Final = re.compile(r"^(fabric|overlay/(0|[1-9][0-9]{0,7}))$")


class _Model(BaseModel):
    # Unknown fields are ignored: an older agent must read a newer object.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)


def overlay_domain(vni: int) -> str:
    return f"{OVERLAY_PREFIX}{vni}"


def domain_vni(domain: str) -> int | None:
    """The VNI of an `overlay/<vni>` domain; None for any other domain."""
    if not domain.startswith(OVERLAY_PREFIX) or not valid_domain(domain):
        return None
    return int(domain.removeprefix(OVERLAY_PREFIX))


def valid_domain(domain: object) -> bool:
    if not isinstance(domain, str) or not _DOMAIN.match(domain):
        return False
    return (
        not domain.startswith(OVERLAY_PREFIX) or 0 < int(domain[len(OVERLAY_PREFIX) :]) <= MAX_VNI
    )


def canonical_group(text: object) -> str:
    """`text` as a multicast address in canonical form; ValueError naming what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"a multicast group is an address string, not {type(text).__name__}")
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None
    if not address.is_multicast:
        raise ValueError(f"{text!r} is not a multicast address (224.0.0.0/4 or ff00::/8)")
    return str(address)


def _check_domain(domain: object) -> str:
    if not valid_domain(domain):
        raise ValueError(
            f"replication domain {domain!r} is neither 'fabric' nor 'overlay/<vni>' "
            f"(decimal VNI 1-{MAX_VNI})"
        )
    return str(domain)


class MulticastNodeSpec(_Model):
    """What one node's plexusd publishes: per domain, the groups with a member pod here."""

    node_name: str = Field(min_length=1, max_length=253)
    groups: dict[str, tuple[str, ...]] = Field(default_factory=dict)

    @field_validator("groups")
    @classmethod
    def _groups(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        if len(value) > MAX_DOMAINS:
            raise ValueError(f"more than {MAX_DOMAINS} replication domains")
        out: dict[str, tuple[str, ...]] = {}
        for domain, groups in value.items():
            canonical = sorted({canonical_group(g) for g in groups})
            if len(canonical) > MAX_GROUPS:
                raise ValueError(f"domain {domain}: more than {MAX_GROUPS} groups")
            if canonical:  # a domain without groups is no domain
                out[_check_domain(domain)] = tuple(canonical)
        return out


class MulticastNodeStatus(_Model):
    """What the controller writes: per domain and group, the other nodes with members."""

    replicate_to: dict[str, dict[str, tuple[str, ...]]] = Field(default_factory=dict)


def clean_groups(
    raw: Mapping[str, Iterable[str]] | Any,
) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """Per-entry validation at a boundary: every valid domain and group of `raw` in canonical
    form (sorted, domains without a valid group left out), and one problem line per entry
    refused. One bad group never costs the node its other groups."""
    problems: list[str] = []
    out: dict[str, tuple[str, ...]] = {}
    if not isinstance(raw, Mapping):
        return out, [f"groups is not a map of domain to groups: {type(raw).__name__}"]
    for domain, groups in raw.items():
        if not valid_domain(domain):
            problems.append(f"domain {domain!r}: not 'fabric' or 'overlay/<vni>'; skipped")
            continue
        if isinstance(groups, str) or not isinstance(groups, Iterable):
            problems.append(f"domain {domain}: groups is not a list; skipped")
            continue
        kept: set[str] = set()
        for group in groups:
            try:
                kept.add(canonical_group(group))
            except ValueError as exc:
                problems.append(f"domain {domain}: {exc}; skipped")
        if len(kept) > MAX_GROUPS:
            problems.append(f"domain {domain}: more than {MAX_GROUPS} groups; kept the first")
            kept = set(sorted(kept)[:MAX_GROUPS])
        if kept:
            out[domain] = tuple(sorted(kept))
    return out, problems


Membership = dict[str, dict[str, frozenset[str]]]  # domain -> group -> nodes


def aggregate(per_node: Mapping[str, Mapping[str, Iterable[str]]]) -> Membership:
    """node -> domain -> groups, turned around: domain -> group -> the nodes with members."""
    out: Membership = {}
    for node, domains in per_node.items():
        for domain, groups in domains.items():
            for group in groups:
                out.setdefault(domain, {}).setdefault(group, frozenset())
                out[domain][group] |= {node}
    return out


def replicate_to(membership: Membership, node: str) -> dict[str, dict[str, list[str]]]:
    """`node`'s status: every group with a member on another node, and those nodes (sorted).
    A group whose only members are on `node` itself is not listed: there is no one to send it
    to (and the node's own pods get it from its bridge or router)."""
    out: dict[str, dict[str, list[str]]] = {}
    for domain, groups in sorted(membership.items()):
        for group, nodes in sorted(groups.items()):
            others = sorted(nodes - {node})
            if others:
                out.setdefault(domain, {})[group] = others
    return out


def clean_replicate_to(raw: Any) -> tuple[dict[str, dict[str, tuple[str, ...]]], list[str]]:
    """A status's `replicateTo` read entry by entry, like `clean_groups`: valid domains, their
    valid groups in canonical form, each with its node names (non-empty strings)."""
    problems: list[str] = []
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    if not isinstance(raw, Mapping):
        return out, ([] if raw is None else ["replicateTo is not a map"])
    for domain, groups in raw.items():
        if not valid_domain(domain) or not isinstance(groups, Mapping):
            problems.append(f"replicateTo domain {domain!r}: not a valid domain map; skipped")
            continue
        for group, nodes in groups.items():
            try:
                canonical = canonical_group(group)
            except ValueError as exc:
                problems.append(f"replicateTo {domain}: {exc}; skipped")
                continue
            if isinstance(nodes, str) or not isinstance(nodes, Iterable):
                problems.append(f"replicateTo {domain} {canonical}: nodes is not a list")
                continue
            names = sorted({n for n in nodes if isinstance(n, str) and n})
            if names:
                out.setdefault(domain, {})[canonical] = tuple(names)
    return out, problems
