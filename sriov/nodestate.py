"""This node's SR-IOV as the cluster sees it: the `status` of its `VFPoolNodeState`
(`cnispec.vfpool_api.NodeStateStatus`), built from what the node agent already keeps — the
inventory snapshot (PFs), the membership views with their health (`sriov.health.VfView`, what
`plexusctl vfs` shows) and the ledger's holders. Pure reads under the agent's own locks; the API
side (`metaplugin.k8s_pools`) decides when to build and write it.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import get_args

from cnispec.identity import Holder
from cnispec.vfpool_api import NodeStateStatus, PfEntry, PoolRef, VfEntry, VfPhase
from sriov.agent import NodeAgent
from sriov.health import VfView
from sriov.model import Pf

_PHASES = frozenset(get_args(VfPhase))


def node_status(
    agent: NodeAgent,
    *,
    pools: Iterable[PoolRef] = (),
    problems: Iterable[str] = (),
    now: datetime | None = None,
) -> NodeStateStatus:
    """Every PF and VF of the node now, with the pools served (and the generation acted on)
    and the node-level problems: the caller's (pools it could not apply) and the agent's own
    (a numVfs change waiting for pods, or refused by the PF)."""
    snapshot = agent.snapshot
    holders = {r.pci: r.holder for r in agent.ledger.records()}
    return NodeStateStatus(
        pfs=tuple(_pf(snapshot.pfs[pci]) for pci in sorted(snapshot.pfs)),
        vfs=tuple(_vf(view, holders.get(view.pci)) for view in agent.membership.vfs_view()),
        pools=tuple(pools),
        problems=(*problems, *agent.num_vfs.problems()),
        updated=(now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


def _pf(pf: Pf) -> PfEntry:
    return PfEntry(
        pci=pf.pci,
        name=pf.netdev,
        vendor=pf.vendor,
        device=pf.device,
        driver=pf.driver,
        link_type=pf.link_type,
        num_vfs=pf.num_vfs,
        total_vfs=pf.total_vfs,
        link_up=pf.link_up,
    )


def _vf(view: VfView, holder: Holder | None) -> VfEntry:
    return VfEntry(
        pci=view.pci,
        pf=view.pf_pci,
        index=view.index,
        netdev=view.netdev,
        driver=view.driver,
        pool=view.pool,
        state=view.state if view.state in _PHASES else "unhealthy",
        healthy=view.healthy,
        reason=view.reason,
        pod=pod_of(holder),
    )


def pod_of(holder: Holder | None) -> str:
    """ "namespace/name" of the pod holding a VF; its container ID when the pod is not known
    (a local-mode runtime that sent no pod name); "" when free."""
    if holder is None:
        return ""
    if holder.pod_name:
        return f"{holder.pod_namespace}/{holder.pod_name}"
    return holder.container_id
