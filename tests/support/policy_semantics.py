"""An independent reference for what the network-policy rules say: may this packet pass?

Written straight from the Kubernetes NetworkPolicy documentation (and the MultiNetworkPolicy and
Plexus isolation-mode descriptions in issue 14), one question at a time and deliberately naive:
no indexes, no compilation, nothing shared with `netpolicy.compile` or `netpolicy.selectors`.
The kernel truth table compares the connectivity nftables gives with what this says.

The rules as the docs state them:
- A pod is isolated for ingress (egress) when any NetworkPolicy in its namespace selects it
  (podSelector) and has Ingress (Egress) in its policyTypes; policyTypes unset means Ingress, plus
  Egress if the policy has any egress rule.
- A connection from A to B passes only if A's egress side allows it AND B's ingress side does.
  A non-isolated side allows everything. An isolated side allows what the union of the rules of
  every policy selecting the pod for that direction allows.
- A rule matches when its peer list is empty or some peer matches, and its port list is empty or
  some port matches. A peer: podSelector alone = pods of the policy's namespace; namespaceSelector
  alone = every pod of the selected namespaces; both = the pods the podSelector picks in the
  namespaces the namespaceSelector picks; ipBlock = addresses in cidr and in none of except.
- A port: protocol (default TCP) and port number, or port..endPort, or a name: the container
  port with that name and protocol of the DESTINATION pod (the selected pod for ingress, the
  peer for egress). No port number: every port of that protocol.
- Traffic from the node to its own pods is always allowed (kubelet probes).
- MultiNetworkPolicy: the same, but only for the pod's interfaces on the networks `policy-for`
  names, with peers identified by their addresses on that network. NetworkPolicy covers the
  primary interface only.
- Namespace isolation (namespace annotation plexus.dev/isolation=namespace): every pod of the
  namespace, on every interface, accepts only pods of the same namespace (plus what policies
  allow). App isolation (pod label plexus.dev/app=X): the pod accepts only pods whose label has
  the same value (any namespace), plus what policies allow.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from netpolicy.model import (
    LabelSelector,
    Pod,
    PodInterface,
    Policy,
    PolicyPeer,
    PolicyPort,
    PolicyWorld,
)

APP = "plexus.dev/app"
ISOLATION = "plexus.dev/isolation"


def label_selector_matches(sel: LabelSelector, labels: Mapping[str, str]) -> bool:
    for key, value in sel.match_labels.items():
        if key not in labels or labels[key] != value:
            return False
    for expr in sel.match_expressions:
        has = expr.key in labels
        if expr.operator == "In" and not (has and labels[expr.key] in expr.values):
            return False
        if expr.operator == "NotIn" and has and labels[expr.key] in expr.values:
            return False
        if expr.operator == "Exists" and not has:
            return False
        if expr.operator == "DoesNotExist" and has:
            return False
    return True


def namespace_labels(world: PolicyWorld, name: str) -> dict[str, str]:
    labels = dict(world.namespaces[name].labels) if name in world.namespaces else {}
    labels["kubernetes.io/metadata.name"] = name
    return labels


def interface_of(pod: Pod, ifname: str) -> PodInterface:
    return next(i for i in pod.interfaces if i.ifname == ifname)


def same_network(a: PodInterface, b: PodInterface) -> bool:
    if a.primary or b.primary:
        return a.primary and b.primary
    return a.network == b.network


def address(iface: PodInterface, family: int) -> str | None:
    for a in iface.addresses:
        if ipaddress.ip_address(a).version == family:
            return a
    return None


def policy_covers(policy: Policy, iface: PodInterface) -> bool:
    if policy.kind == "NetworkPolicy":
        return iface.primary
    if policy.kind == "MultiNetworkPolicy":
        if iface.primary:
            return False
        for n in policy.policy_for:
            full = n if "/" in n else policy.namespace + "/" + n
            if full == iface.network:
                return True
    return False


def policy_types_of(policy: Policy) -> list[str]:
    if policy.spec.policy_types:
        return list(policy.spec.policy_types)
    types = ["Ingress"]
    if len(policy.spec.egress) > 0:
        types.append("Egress")
    return types


def selects(world: PolicyWorld, policy: Policy, pod: Pod) -> bool:
    del world
    return pod.namespace == policy.namespace and label_selector_matches(
        policy.spec.pod_selector, pod.labels
    )


class Endpoint:
    """One end of a connection: a pod's interface (and its address of one family), or a bare
    address outside every pod."""

    def __init__(self, ip: str, pod: Pod | None = None, iface: PodInterface | None = None):
        self.ip = ip
        self.pod = pod
        self.iface = iface


def in_ip_block(peer: PolicyPeer, ip_text: str) -> bool:
    assert peer.ip_block is not None
    ip = ipaddress.ip_address(ip_text)
    cidr = ipaddress.ip_network(peer.ip_block.cidr, strict=False)
    if ip.version != cidr.version or ip not in cidr:
        return False
    for e in peer.ip_block.except_:
        net = ipaddress.ip_network(e, strict=False)
        if net.version == ip.version and ip in net:
            return False
    return True


def peer_matches(world: PolicyWorld, policy: Policy, peer: PolicyPeer, other: Endpoint) -> bool:
    if peer.ip_block is not None:
        return in_ip_block(peer, other.ip)
    if other.pod is None:
        return False
    if peer.namespace_selector is None:
        namespace_ok = other.pod.namespace == policy.namespace
    else:
        namespace_ok = label_selector_matches(
            peer.namespace_selector, namespace_labels(world, other.pod.namespace)
        )
    if peer.pod_selector is None:
        return namespace_ok
    return namespace_ok and label_selector_matches(peer.pod_selector, other.pod.labels)


def named_port_number(pod: Pod | None, name: str, protocol: str) -> int | None:
    if pod is None:
        return None
    for cp in pod.named_ports:
        if cp.name == name and cp.protocol == protocol:
            return cp.port
    return None


def port_matches(p: PolicyPort, protocol: str, port: int, dest_pod: Pod | None) -> bool:
    if p.protocol != protocol:
        return False
    if p.port is None:
        return True
    if isinstance(p.port, str) and not p.port.isdigit():
        return named_port_number(dest_pod, p.port, protocol) == port
    number = int(p.port)
    if p.end_port is not None:
        return number <= port <= p.end_port
    return number == port


def ingress_allows(
    world: PolicyWorld, src: Endpoint, dst: Pod, iface: PodInterface, *, protocol: str, port: int
) -> bool:
    if iface.primary and src.pod is None and src.ip in world.node_addresses:
        return True
    isolated = False
    for policy in world.policies:
        if not (
            policy_covers(policy, iface)
            and selects(world, policy, dst)
            and "Ingress" in policy_types_of(policy)
        ):
            continue
        isolated = True
        for rule in policy.spec.ingress:
            peer_ok = not rule.from_ or any(peer_matches(world, policy, p, src) for p in rule.from_)
            port_ok = not rule.ports or any(
                port_matches(p, protocol, port, dst) for p in rule.ports
            )
            if peer_ok and port_ok:
                return True
    # the isolation modes: an extra allow-from-own-kind on every interface
    ns_isolated = (
        dst.namespace in world.namespaces
        and world.namespaces[dst.namespace].annotations.get(ISOLATION) == "namespace"
    )
    if ns_isolated:
        isolated = True
        if src.pod is not None and src.pod.namespace == dst.namespace:
            return True
    if APP in dst.labels:
        isolated = True
        if src.pod is not None and src.pod.labels.get(APP) == dst.labels[APP]:
            return True
    return not isolated


def egress_allows(
    world: PolicyWorld, src: Pod, iface: PodInterface, dst: Endpoint, *, protocol: str, port: int
) -> bool:
    isolated = False
    for policy in world.policies:
        if not (
            policy_covers(policy, iface)
            and selects(world, policy, src)
            and "Egress" in policy_types_of(policy)
        ):
            continue
        isolated = True
        for rule in policy.spec.egress:
            peer_ok = not rule.to or any(peer_matches(world, policy, p, dst) for p in rule.to)
            port_ok = not rule.ports or any(
                port_matches(p, protocol, port, dst.pod) for p in rule.ports
            )
            if peer_ok and port_ok:
                return True
    return not isolated


def allowed(  # noqa: PLR0917 (the signature the plan agreed)
    world: PolicyWorld,
    src: Pod | str,
    dst_pod: Pod,
    dst_ifname: str,
    protocol: str,
    port: int,
    *,
    family: int = 4,
) -> bool:
    """May `src` (a pod, from its interface on the same network as the destination interface,
    or a bare address) open a `protocol` connection to `dst_pod`'s `dst_ifname` on `port`?"""
    dst_iface = interface_of(dst_pod, dst_ifname)
    dst_ip = address(dst_iface, family)
    assert dst_ip is not None, f"{dst_pod.key} has no IPv{family} on {dst_ifname}"
    dst = Endpoint(dst_ip, dst_pod, dst_iface)
    if isinstance(src, str):
        return ingress_allows(
            world, Endpoint(src), dst_pod, dst_iface, protocol=protocol, port=port
        )
    src_iface = next(i for i in src.interfaces if same_network(i, dst_iface))
    src_ip = address(src_iface, family)
    assert src_ip is not None, f"{src.key} has no IPv{family} on {src_iface.ifname}"
    here = Endpoint(src_ip, src, src_iface)
    out_ok = egress_allows(world, src, src_iface, dst, protocol=protocol, port=port)
    return out_ok and ingress_allows(world, here, dst_pod, dst_iface, protocol=protocol, port=port)
