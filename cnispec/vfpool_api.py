"""The VF pool objects in the Kubernetes API (`plexus.dev/v1alpha1`), shared by the node agent
and the cluster controller, which must agree on them byte for byte:

- `VFPool` (cluster-scoped, written by admins, status by the controller): which nodes
  (`nodeSelector`), which VFs (`nicSelector`, the pools file's `selectors`), what they become.
- `VFPoolNodeState` (cluster-scoped, one per node, named after the Node and owner-referenced to
  it, written only by that node's plexusd): every PF and VF the node has, its pool, state,
  health reason and holder pod. The controller sums these into each VFPool's status.

Pure models and functions: no API calls (those are `metaplugin.k8s` and `nad_controller.k8s`).
Field names are the API's (camelCase); Python attributes are snake_case.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from cnispec.vfpools import MAX_VF_INDEX, DeviceType, PoolsFile, PoolSpec, Selectors

GROUP: Final = "plexus.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
POOL_KIND, POOL_PLURAL = "VFPool", "vfpools"
STATE_KIND, STATE_PLURAL = "VFPoolNodeState", "vfpoolnodestates"

VfPhase = Literal["free", "reserved", "attached", "releasing", "unhealthy"]
SelectorOperator = Literal["In", "NotIn", "Exists", "DoesNotExist"]


class _Model(BaseModel):
    # Unknown fields are ignored, not refused: an older agent must read a newer object (the
    # CRD's schema, not this model, is where the API refuses what it can).
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)


# --- label selectors (metav1.LabelSelector semantics) ------------------------------------------


class SelectorRequirement(_Model):
    key: str
    operator: SelectorOperator
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        return self.key not in labels or labels[self.key] not in self.values  # NotIn


class LabelSelector(_Model):
    """metav1.LabelSelector: every matchLabels pair and every expression must hold; an empty
    selector selects every node (as a Deployment's empty selector does not, but a
    NetworkPolicy's does: for pools "every node" is the useful reading)."""

    match_labels: dict[str, str] = Field(default_factory=dict)
    match_expressions: tuple[SelectorRequirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels.items()) and all(
            e.matches(labels) for e in self.match_expressions
        )


# --- VFPool -------------------------------------------------------------------------------------


class VFPoolSpec(_Model):
    """A pool as the cluster admin writes it. `priority` decides when two pools select the
    same VF on a node: the higher wins, then the name that sorts first."""

    resource_name: str
    nic_selector: Selectors
    node_selector: LabelSelector = Field(default_factory=LabelSelector)
    device_type: DeviceType = "netdevice"
    num_vfs: int | None = Field(default=None, ge=0, le=MAX_VF_INDEX + 1)
    mtu: int | None = Field(default=None, ge=68, le=9702)
    priority: int = Field(default=0, ge=0, le=99)

    def pool_spec(self) -> PoolSpec:
        """The node-side pool (same validators as the pools file: an invalid pool raises)."""
        return PoolSpec(
            resource_name=self.resource_name,
            selectors=self.nic_selector,
            device_type=self.device_type,
            num_vfs=self.num_vfs,
            mtu=self.mtu,
        )


class VFPool(_Model):
    name: str
    generation: int = 0
    spec: VFPoolSpec


def pools_for_node(pools: Iterable[VFPool], labels: Mapping[str, str]) -> PoolsFile:
    """The pools a node with `labels` serves, in the order `sriov.pools.assign` gives VFs
    (first match wins): by priority (highest first), then by name. Raises like the pools file
    (pydantic ValidationError) when two selected pools share a resourceName."""
    mine = sorted(
        (p for p in pools if p.spec.node_selector.matches(labels)),
        key=lambda p: (-p.spec.priority, p.name),
    )
    return PoolsFile(pools=tuple(p.spec.pool_spec() for p in mine))


# --- VFPoolNodeState (written by one node's plexusd) ------------------------------------------


class PfEntry(_Model):
    pci: str
    name: str | None = None  # the PF's netdev
    vendor: str | None = None
    device: str | None = None
    driver: str | None = None
    link_type: str | None = None
    num_vfs: int = 0
    total_vfs: int = 0
    link_up: bool | None = None  # None: no netdev to ask


class VfEntry(_Model):
    pci: str
    pf: str  # the PF's PCI address
    index: int
    netdev: str | None = None
    driver: str | None = None
    pool: str | None = None  # the resourceName of the pool that has it
    state: VfPhase = "free"
    healthy: bool = True
    reason: str = ""  # why unhealthy (or why not serving yet)
    pod: str = ""  # "namespace/name" of the holder, "" when free


class PoolRef(_Model):
    """A VFPool this node serves, and the generation the node acted on."""

    name: str
    resource_name: str
    generation: int = 0


class NodeStateStatus(_Model):
    pfs: tuple[PfEntry, ...] = ()
    vfs: tuple[VfEntry, ...] = ()
    pools: tuple[PoolRef, ...] = ()
    problems: tuple[str, ...] = ()  # node-level: a pool that could not be applied, and why
    updated: str = ""  # RFC 3339, when the node last wrote it


# --- VFPool status (written by the controller) ------------------------------------------------


class NodeCount(_Model):
    node: str
    total: int = 0
    healthy: int = 0
    free: int = 0
    in_use: int = 0
    unhealthy: int = 0


class Condition(_Model):
    """metav1.Condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    observed_generation: int = 0
    last_transition_time: str = ""


class VFPoolStatus(_Model):
    observed_generation: int = 0
    nodes: tuple[NodeCount, ...] = ()
    conditions: tuple[Condition, ...] = ()


def node_count(node: str, resource_name: str, state: NodeStateStatus) -> NodeCount:
    """One node's row of a pool's status, from that node's state object."""
    mine = [v for v in state.vfs if v.pool == resource_name]
    held = ("reserved", "attached", "releasing")
    return NodeCount(
        node=node,
        total=len(mine),
        healthy=sum(v.healthy for v in mine),
        free=sum(v.healthy and v.state == "free" for v in mine),
        in_use=sum(v.state in held for v in mine),
        unhealthy=sum(not v.healthy for v in mine),
    )
