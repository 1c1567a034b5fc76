"""The policy compiler: a `PolicyWorld` in, per local pod what its nftables table must say out.

The upstream NetworkPolicy semantics, per governed interface and direction:

- a policy selects the pods of ITS namespace that its `podSelector` matches, for the directions
  in its `policyTypes` (default: Ingress, plus Egress when it has egress rules);
- a direction selected by at least one policy is isolated: only what some rule of some
  selecting policy allows passes (allows add up, order does not matter; a policy with no rules
  for the direction is a default-deny);
- a rule allows traffic when the peer matches ANY of its peers (none listed: every peer) AND the
  port matches ANY of its ports (none listed: every port and protocol); a peer is a podSelector
  (the policy's namespace), a namespaceSelector (every pod of the namespaces it selects), both
  (those pods of those namespaces), or an ipBlock (its cidr minus its `except`s);
- a named port means, for ingress, the selected pod's own container port of that name and
  protocol; for egress, each destination pod's own one (a name that resolves to nothing matches
  nothing).

Which interfaces a policy governs and where its peers' addresses come from depends on its kind:
a NetworkPolicy governs the primary interface and its peers are pods' primary addresses; a
MultiNetworkPolicy governs the secondary interfaces on the networks its `policy_for` names and
its peers are pods' addresses on the governed interface's network; an isolation mode (`Isolation`,
see `isolation_policies`) governs every interface, peers on the same network.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from netpolicy.model import (
    APP_LABEL,
    ISOLATION_ANNOTATION,
    Allow,
    DirectionRules,
    EgressRule,
    IngressRule,
    InterfaceRules,
    IPBlock,
    LabelSelector,
    Namespace,
    Pod,
    PodInterface,
    PodRules,
    Policy,
    PolicyPeer,
    PolicyPort,
    PolicySpec,
    PolicyWorld,
    PortRange,
)
from netpolicy.selectors import LabelIndex

# Every namespace carries its own name as this label (the API server sets it, immutably), so a
# namespaceSelector can name a namespace even when no Namespace object reached us.
NAMESPACE_NAME_LABEL: Final = "kubernetes.io/metadata.name"
PRIMARY: Final = ""  # the network key of primary interfaces (their NAD name varies by node)

Direction = Literal["ingress", "egress"]
# An address range: (IP version, first, last), integers, inclusive. Integer ranges keep the set
# arithmetic (excepts, merging thousands of peers) cheap; prefixes come back only at the end.
Net = tuple[int, int, int]
Nets = frozenset[Net]
PortKey = tuple[tuple[str, int, int], ...]  # (protocol, first, last), merged and sorted
# One allowed slice before merging: peer networks (None: any), ports (None: any), policy ref.
Piece = tuple[Nets | None, PortKey | None, str]


def isolation_policies(world: PolicyWorld) -> tuple[Policy, ...]:
    """The isolation modes as policies: a namespace annotated `plexus.dev/isolation: namespace`
    gets one that selects all its pods and lets in only its own pods; each value of the pod
    label `plexus.dev/app` gets, in every namespace with such pods, one that selects them and
    lets in only pods (of any namespace) with the same value."""
    out: list[Policy] = []
    for name in sorted(world.namespaces):
        if world.namespaces[name].annotations.get(ISOLATION_ANNOTATION) == "namespace":
            spec = PolicySpec(
                pod_selector=LabelSelector(),
                ingress=(IngressRule(from_=(PolicyPeer(pod_selector=LabelSelector()),)),),
                policy_types=("Ingress",),
            )
            out.append(Policy(kind="Isolation", namespace=name, name="namespace", spec=spec))
    apps = sorted({(p.namespace, p.labels[APP_LABEL]) for p in world.pods if APP_LABEL in p.labels})
    for namespace, value in apps:
        same_app = LabelSelector(match_labels={APP_LABEL: value})
        peer = PolicyPeer(namespace_selector=LabelSelector(), pod_selector=same_app)
        spec = PolicySpec(
            pod_selector=same_app,
            ingress=(IngressRule(from_=(peer,)),),
            policy_types=("Ingress",),
        )
        out.append(Policy(kind="Isolation", namespace=namespace, name=f"app={value}", spec=spec))
    return tuple(out)


def compile_world(world: PolicyWorld) -> dict[str, PodRules]:
    """Every local pod's (`netns` set) rules, keyed by pod key, in a deterministic order."""
    return _Compiler(world).run()


def policy_types(spec: PolicySpec) -> tuple[str, ...]:
    """The directions a policy isolates: as written, or the API's defaulting when not (an empty
    list is the same as none: the API omits it)."""
    if spec.policy_types:
        return tuple(spec.policy_types)
    return ("Ingress", "Egress") if spec.egress else ("Ingress",)


def ip_block_nets(block: IPBlock) -> Nets:
    """The cidr minus every `except` inside it (`collapse` turns the result into prefixes)."""
    try:
        base = _net(block.cidr)
    except ValueError:
        return frozenset()
    ranges = [base]
    for text in block.except_:
        try:
            hole_v, hole_first, hole_last = _net(text)
        except ValueError:
            continue
        if hole_v != base[0]:
            continue
        kept: list[Net] = []
        for v, first, last in ranges:
            if hole_last < first or hole_first > last:
                kept.append((v, first, last))
                continue
            if first < hole_first:
                kept.append((v, first, hole_first - 1))
            if hole_last < last:
                kept.append((v, hole_last + 1, last))
        ranges = kept
    return frozenset(ranges)


def _net(text: str) -> Net:
    n = ipaddress.ip_network(text, strict=False)
    return (n.version, int(n.network_address), int(n.broadcast_address))


def governs(policy: Policy, iface: PodInterface) -> bool:
    """Whether a policy of this kind governs this interface (given it selects the pod)."""
    if policy.kind == "NetworkPolicy":
        return iface.primary
    if policy.kind == "MultiNetworkPolicy":
        return not iface.primary and iface.network in policy_networks(policy)
    return True


def policy_networks(policy: Policy) -> frozenset[str]:
    """`policy_for` as "namespace/name" keys (a bare name is in the policy's namespace)."""
    return frozenset(n if "/" in n else f"{policy.namespace}/{n}" for n in policy.policy_for)


def _net_key(policy: Policy, iface: PodInterface) -> str:
    """Which of its peers' addresses a policy compares against on this interface."""
    if policy.kind == "NetworkPolicy" or iface.primary:
        return PRIMARY
    return iface.network


def _parse_addresses(addresses: Iterable[str]) -> tuple[Net, ...]:
    return tuple(n for n in map(_parse_address, addresses) if n is not None)


@functools.lru_cache(maxsize=1 << 16)
def _parse_address(text: str) -> Net | None:
    """A pod address as a one-address range; None for a malformed one (an annotation's typo
    must not stop the rest). Cached: the same pods come back on every recompute."""
    bare = text.split("/", 1)[0]
    for version, family in ((4, socket.AF_INET), (6, socket.AF_INET6)):
        try:
            value = int.from_bytes(socket.inet_pton(family, bare), "big")
        except OSError:
            continue
        return (version, value, value)
    return None


def _merge_ranges(ranges: Iterable[tuple[str, int, int]]) -> PortKey:
    by_proto: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for proto, first, last in ranges:
        by_proto[proto].append((first, last))
    out: list[tuple[str, int, int]] = []
    for proto in sorted(by_proto):
        spans = sorted(by_proto[proto])
        cur_first, cur_last = spans[0]
        for first, last in spans[1:]:
            if first <= cur_last + 1:
                cur_last = max(cur_last, last)
            else:
                out.append((proto, cur_first, cur_last))
                cur_first, cur_last = first, last
        out.append((proto, cur_first, cur_last))
    return tuple(out)


def _numeric_range(port: PolicyPort) -> tuple[str, int, int]:
    if port.port is None:
        return (port.protocol, 0, 65535)
    first = int(port.port)
    last = port.end_port if port.end_port is not None and port.end_port >= first else first
    return (port.protocol, first, last)


def _is_named(port: PolicyPort) -> bool:
    return isinstance(port.port, str) and not port.port.isdigit()


def _named_port(pod: Pod, port: PolicyPort) -> int | None:
    for cp in pod.named_ports:
        if cp.name == port.port and cp.protocol == port.protocol:
            return cp.port
    return None


def _contains(nets: Iterable[Net], addr: Net) -> bool:
    version, first, last = addr
    return any(v == version and f <= first and last <= la for v, f, la in nets)


@dataclass
class _Compiler:
    world: PolicyWorld
    pods: list[Pod] = field(init=False)
    _pod_index: LabelIndex = field(init=False)
    _ns_pods: dict[str, frozenset[int]] = field(init=False)
    _ns_index: LabelIndex = field(init=False)
    _ns_names: list[str] = field(init=False)
    _addrs: dict[str, dict[int, tuple[Net, ...]]] = field(init=False)
    world_policies: tuple[Policy, ...] = field(init=False)
    _peer_cache: dict[tuple[int, Direction, int, str], Nets | None] = field(default_factory=dict)
    _piece_cache: dict[tuple[int, Direction, str], list[Piece]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.world_policies = (*self.world.policies, *isolation_policies(self.world))
        seen: set[str] = set()
        self.pods = []
        # A pod listed twice (local record and API object) counts once: the local one first.
        for pod in sorted(self.world.pods, key=lambda p: (p.netns == "", p.key)):
            if pod.key not in seen:
                seen.add(pod.key)
                self.pods.append(pod)
        self._pod_index = LabelIndex(p.labels for p in self.pods)
        ns_pods: dict[str, set[int]] = defaultdict(set)
        for i, pod in enumerate(self.pods):
            ns_pods[pod.namespace].add(i)
        self._ns_pods = {k: frozenset(v) for k, v in ns_pods.items()}
        self._ns_names = sorted(set(self.world.namespaces) | set(ns_pods))
        self._ns_index = LabelIndex(self._namespace_labels(n) for n in self._ns_names)
        self._addrs = defaultdict(dict)
        for i, pod in enumerate(self.pods):
            for iface in pod.interfaces:
                key = PRIMARY if iface.primary else iface.network
                parsed = _parse_addresses(iface.addresses)
                self._addrs[key][i] = self._addrs[key].get(i, ()) + parsed

    def _namespace_labels(self, name: str) -> dict[str, str]:
        ns = self.world.namespaces.get(name, Namespace(name=name))
        return {**ns.labels, NAMESPACE_NAME_LABEL: name}

    # ---- selection --------------------------------------------------------------------------

    def _selected_pods(self, policy: Policy) -> frozenset[int]:
        in_ns = self._ns_pods.get(policy.namespace, frozenset())
        return in_ns & self._pod_index.select(policy.spec.pod_selector)

    def _peer_pods(self, policy: Policy, peer: PolicyPeer) -> frozenset[int]:
        if peer.namespace_selector is None:
            pods = self._ns_pods.get(policy.namespace, frozenset())
        else:
            pods = frozenset().union(
                *(
                    self._ns_pods.get(self._ns_names[i], frozenset())
                    for i in self._ns_index.select(peer.namespace_selector)
                )
            )
        if peer.pod_selector is not None:
            pods = pods & self._pod_index.select(peer.pod_selector)
        return pods

    def _peer_nets(
        self, pi: int, direction: Direction, ri: int, peers: Sequence[PolicyPeer], net: str
    ) -> Nets | None:
        """The addresses a rule's peers stand for (None: every address)."""
        if not peers:
            return None
        key = (pi, direction, ri, net)
        if key in self._peer_cache:
            return self._peer_cache[key]
        pods, blocks = self._peer_parts(pi, peers)
        addrs = self._addrs.get(net, {})
        out: set[Net] = set(blocks)
        for i in pods:
            out.update(addrs.get(i, ()))
        result = frozenset(out)
        self._peer_cache[key] = result
        return result

    def _peer_parts(self, pi: int, peers: Sequence[PolicyPeer]) -> tuple[frozenset[int], Nets]:
        """A rule's peers as the pods its selectors pick and the ranges its ipBlocks cover."""
        policy = self.world_policies[pi]
        pods: set[int] = set()
        blocks: set[Net] = set()
        for peer in peers:
            if peer.ip_block is not None:
                blocks |= ip_block_nets(peer.ip_block)
            else:
                pods |= self._peer_pods(policy, peer)
        return frozenset(pods), frozenset(blocks)

    # ---- rules ------------------------------------------------------------------------------

    def _pieces(self, pi: int, direction: Direction, pod: Pod, net: str) -> list[Piece]:
        """What one policy allows in one direction on one network, for this pod."""
        policy = self.world_policies[pi]
        rules: Sequence[IngressRule | EgressRule] = (
            policy.spec.ingress if direction == "ingress" else policy.spec.egress
        )
        per_pod = direction == "ingress" and any(
            _is_named(p) for r in rules for p in r.ports
        )  # named ingress ports resolve against this pod's own ports
        cache_key = (pi, direction, net)
        if not per_pod and cache_key in self._piece_cache:
            return self._piece_cache[cache_key]
        out: list[Piece] = []
        for ri, rule in enumerate(rules):
            peers = rule.from_ if isinstance(rule, IngressRule) else rule.to
            nets = self._peer_nets(pi, direction, ri, peers, net)
            if nets is not None and not nets:
                continue
            if not rule.ports:
                out.append((nets, None, policy.ref))
                continue
            ranges = [_numeric_range(p) for p in rule.ports if not _is_named(p)]
            named = [p for p in rule.ports if _is_named(p)]
            if direction == "ingress":
                for p in named:
                    number = _named_port(pod, p)
                    if number is not None:
                        ranges.append((p.protocol, number, number))
            else:
                parts = self._peer_parts(pi, peers) if peers else None
                out.extend(self._egress_named(named, parts, net, policy.ref))
            if ranges:
                out.append((nets, _merge_ranges(ranges), policy.ref))
        if not per_pod:
            self._piece_cache[cache_key] = out
        return out

    def _egress_named(
        self,
        named: Sequence[PolicyPort],
        peers: tuple[frozenset[int], Nets] | None,
        net: str,
        ref: str,
    ) -> list[Piece]:
        """Egress to a named port: each destination pod's own port of that name, towards that
        pod's addresses (those the rule's peers cover)."""
        out: list[Piece] = []
        addrs = self._addrs.get(net, {})
        for port in named:
            by_number: dict[int, set[Net]] = defaultdict(set)
            for i, pod_addrs in addrs.items():
                number = _named_port(self.pods[i], port)
                if number is None:
                    continue
                for a in pod_addrs:
                    if peers is None or i in peers[0] or _contains(peers[1], a):
                        by_number[number].add(a)
            for number, dests in sorted(by_number.items()):
                out.append((frozenset(dests), ((port.protocol, number, number),), ref))
        return out

    # ---- per pod ----------------------------------------------------------------------------

    def run(self) -> dict[str, PodRules]:
        local = [i for i, p in enumerate(self.pods) if p.netns]
        local_set = frozenset(local)
        selecting: dict[int, list[int]] = defaultdict(list)
        for pi, policy in enumerate(self.world_policies):
            for i in self._selected_pods(policy) & local_set:
                selecting[i].append(pi)
        out: dict[str, PodRules] = {}
        for i in sorted(local, key=lambda i: self.pods[i].key):
            pod = self.pods[i]
            ifaces = tuple(
                self._interface(pod, iface, selecting.get(i, []))
                for iface in sorted(pod.interfaces, key=lambda f: f.ifname)
            )
            out[pod.key] = PodRules(
                pod=pod.key, netns=pod.netns, container_id=pod.container_id, interfaces=ifaces
            )
        return out

    def _interface(self, pod: Pod, iface: PodInterface, policies: list[int]) -> InterfaceRules:
        governing = [pi for pi in policies if governs(self.world_policies[pi], iface)]
        trusted = tuple(sorted(set(self.world.node_addresses))) if iface.primary else ()
        return InterfaceRules(
            ifname=iface.ifname,
            network=iface.network,
            primary=iface.primary,
            ingress=self._direction("ingress", pod, iface, governing),
            egress=self._direction("egress", pod, iface, governing),
            trusted_sources=trusted,
        )

    def _direction(
        self, direction: Direction, pod: Pod, iface: PodInterface, governing: list[int]
    ) -> DirectionRules:
        wanted = "Ingress" if direction == "ingress" else "Egress"
        chosen = [pi for pi in governing if wanted in policy_types(self.world_policies[pi].spec)]
        if not chosen:
            return DirectionRules()
        pieces: list[Piece] = []
        for pi in chosen:
            net = _net_key(self.world_policies[pi], iface)
            pieces.extend(self._pieces(pi, direction, pod, net))
        refs = tuple(sorted({self.world_policies[pi].ref for pi in chosen}))
        return DirectionRules(isolated=True, allows=merge_pieces(pieces), selected_by=refs)


def merge_pieces(pieces: Iterable[Piece]) -> tuple[Allow, ...]:
    """Allows with the same ports become one (their networks collapsed into the fewest
    prefixes); an allow of everything makes every other one redundant."""
    groups: dict[PortKey | None, tuple[set[Net] | None, set[str]]] = {}
    for nets, ports, ref in pieces:
        cur = groups.get(ports)
        if cur is None:
            groups[ports] = (None if nets is None else set(nets), {ref})
            continue
        cur_nets, refs = cur
        refs.add(ref)
        if cur_nets is not None:
            if nets is None:
                groups[ports] = (None, refs)
            else:
                cur_nets.update(nets)
    everything = groups.get(None)
    if everything is not None and everything[0] is None:
        groups = {None: everything}
    allows = [
        Allow(
            cidrs=None if nets is None else collapse(nets),
            ports=None
            if ports is None
            else tuple(PortRange(protocol=p, first=f, last=last) for p, f, last in ports),
            by=tuple(sorted(refs)),
        )
        for ports, (nets, refs) in groups.items()
    ]
    allows.sort(key=_allow_order)
    return tuple(allows)


def _allow_order(a: Allow) -> tuple[bool, tuple[tuple[str, int, int], ...], bool, tuple[str, ...]]:
    ports = tuple((p.protocol, p.first, p.last) for p in a.ports or ())
    return (a.ports is not None, ports, a.cidrs is not None, a.cidrs or ())


def collapse(nets: Iterable[Net]) -> tuple[str, ...]:
    """The fewest prefixes covering exactly `nets`, IPv4 first, in address order."""
    out: list[str] = []
    for version, bits, family in ((4, 32, socket.AF_INET), (6, 128, socket.AF_INET6)):
        spans = sorted((f, la) for v, f, la in nets if v == version)
        merged: list[list[int]] = []
        for first, last in spans:
            if merged and first <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], last)
            else:
                merged.append([first, last])
        for first, last in merged:
            out.extend(_prefixes(family, bits, first, last))
    return tuple(out)


def _prefixes(family: int, bits: int, first: int, last: int) -> Iterator[str]:
    """[first, last] as aligned prefixes, largest first."""
    while first <= last:
        size = (first & -first) if first else 1 << bits
        while size > last - first + 1:
            size >>= 1
        text = socket.inet_ntop(family, first.to_bytes(bits // 8, "big"))
        yield f"{text}/{bits - size.bit_length() + 1}"
        first += size
