"""What the policy compiler reads and what it produces.

Inputs mirror the API objects (field aliases are the API's camelCase, so a manifest's `spec`
validates directly); outputs are what one pod's nftables table must say, per interface and
direction, with the policies that made each part kept for `plexusctl policy` and the drop
metrics.
"""

from __future__ import annotations

from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

POLICY_FOR_ANNOTATION: Final = "k8s.v1.cni.cncf.io/policy-for"
ISOLATION_ANNOTATION: Final = "plexus.dev/isolation"  # on a Namespace: "namespace"
APP_LABEL: Final = "plexus.dev/app"  # on a Pod: only pods with the same value reach it

Protocol = Literal["TCP", "UDP", "SCTP"]
Kind = Literal["NetworkPolicy", "MultiNetworkPolicy", "Isolation"]


class _Api(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")


# ---- inputs: the API's objects ----------------------------------------------------------------


class LabelSelectorRequirement(_Api):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[str, ...] = ()


class LabelSelector(_Api):
    """An empty selector selects everything (as the API says)."""

    match_labels: dict[str, str] = Field(default_factory=dict, alias="matchLabels")
    match_expressions: tuple[LabelSelectorRequirement, ...] = Field(
        default=(), alias="matchExpressions"
    )


class IPBlock(_Api):
    cidr: str
    except_: tuple[str, ...] = Field(default=(), alias="except")


class PolicyPeer(_Api):
    pod_selector: LabelSelector | None = Field(default=None, alias="podSelector")
    namespace_selector: LabelSelector | None = Field(default=None, alias="namespaceSelector")
    ip_block: IPBlock | None = Field(default=None, alias="ipBlock")


class PolicyPort(_Api):
    protocol: Protocol = "TCP"
    port: int | str | None = None  # None: every port; str: a named container port
    end_port: int | None = Field(default=None, alias="endPort")


class IngressRule(_Api):
    ports: tuple[PolicyPort, ...] = ()  # empty: every port
    from_: tuple[PolicyPeer, ...] = Field(default=(), alias="from")  # empty: every source


class EgressRule(_Api):
    ports: tuple[PolicyPort, ...] = ()
    to: tuple[PolicyPeer, ...] = ()


class PolicySpec(_Api):
    pod_selector: LabelSelector = Field(default_factory=LabelSelector, alias="podSelector")
    ingress: tuple[IngressRule, ...] = ()
    egress: tuple[EgressRule, ...] = ()
    # None: Ingress, plus Egress when `egress` is set (the API's defaulting)
    policy_types: tuple[Literal["Ingress", "Egress"], ...] | None = Field(
        default=None, alias="policyTypes"
    )


class Policy(_Api):
    """A NetworkPolicy (governs the primary interface), a MultiNetworkPolicy (governs the
    interfaces on the networks in `policy_for`, "namespace/name" NAD keys, resolved against the
    policy's namespace), or an isolation mode turned into a policy (`Isolation`: governs every
    interface, peers matched on the same network)."""

    kind: Kind
    namespace: str
    name: str
    spec: PolicySpec
    policy_for: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.kind}:{self.namespace}/{self.name}"


class Namespace(_Api):
    name: str
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class ContainerPort(_Api):
    name: str
    protocol: Protocol = "TCP"
    port: int


class PodInterface(_Api):
    ifname: str
    network: str  # "namespace/name" of its NAD, or the conf's name for the primary
    primary: bool  # the pod's cluster network interface (eth0): NetworkPolicy governs it
    addresses: tuple[str, ...] = ()  # bare IPv4/IPv6 addresses, no prefix length


class Pod(_Api):
    namespace: str
    name: str
    uid: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    interfaces: tuple[PodInterface, ...] = ()
    named_ports: tuple[ContainerPort, ...] = ()
    netns: str = ""  # set for pods on this node (rules are applied there); "" for peers only
    container_id: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class PolicyWorld(_Api):
    policies: tuple[Policy, ...] = ()
    namespaces: dict[str, Namespace] = Field(default_factory=dict)
    pods: tuple[Pod, ...] = ()
    # The node's own addresses: its health checks (kubelet probes) to its pods' primary
    # interface always pass, as Kubernetes expects.
    node_addresses: tuple[str, ...] = ()


# ---- outputs: what one pod's table says ---------------------------------------------------------


class PortRange(_Api):
    protocol: Protocol
    first: int
    last: int


class Allow(_Api):
    """Traffic this direction lets through: from/to any of `cidrs` (None: any address) on any
    of `ports` (None: any port). `by`: the policy refs this allow came from."""

    cidrs: tuple[str, ...] | None = None
    ports: tuple[PortRange, ...] | None = None
    by: tuple[str, ...] = ()


class DirectionRules(_Api):
    isolated: bool = False  # False: everything passes (no policy selects this direction)
    allows: tuple[Allow, ...] = ()
    selected_by: tuple[str, ...] = ()  # policy refs that select the pod for this direction


class InterfaceRules(_Api):
    ifname: str
    network: str
    primary: bool
    ingress: DirectionRules = Field(default_factory=DirectionRules)
    egress: DirectionRules = Field(default_factory=DirectionRules)
    trusted_sources: tuple[str, ...] = ()  # node addresses let in before any policy (primary)


class PodRules(_Api):
    pod: str  # "namespace/name"
    netns: str
    container_id: str = ""
    interfaces: tuple[InterfaceRules, ...] = ()

    @property
    def enforcing(self) -> bool:
        return any(i.ingress.isolated or i.egress.isolated for i in self.interfaces)
