"""Whether a VF may serve its pool, and the read-only views built on that answer.

`sriov.agent.NodeAgent` owns the state (inventory snapshot, ledger records, pool membership) and
calls in here: `givable` when it recomputes each pool's free list, `misfit` before it returns an
unhealthy VF to service, `vf_view` for `pool_devices()` / `vfs_view()` (the device plugins and
`plexusctl vfs`), and `pool_summary` for `pools_view()` (`plexusctl pools`). A free VF whose PF
has no link (`no_link`) is neither givable nor healthy. Everything here is pure: the agent reads
what is needed under its own lock and passes it in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cnispec.identity import Holder
from cnispec.vfpools import PoolSpec, env_name
from sriov.ledger import HELD
from sriov.model import USERSPACE_DRIVERS, VFIO_DRIVER, Pf, Snapshot, Vf
from sriov.owner import DeviceType
from sriov.records import VfRecord, VfState


@dataclass(frozen=True, slots=True)
class VfView:
    """One VF as `plexusctl vfs` and the device plugins see it."""

    pci: str
    pf_pci: str
    pf: str | None
    index: int
    pool: str | None
    driver: str | None
    netdev: str | None
    numa_node: int
    present: bool
    healthy: bool
    state: str
    holder: str  # "namespace/pod (ifname)" or ""
    reason: str


def misfit(vf: Vf, device_type: DeviceType) -> str | None:
    """Why a free VF cannot serve its pool yet, or None."""
    if vf.driver is None:
        return "no driver bound"
    if device_type == "vfio-pci":
        return None if vf.driver == VFIO_DRIVER else f"bound to {vf.driver}, pool wants vfio-pci"
    if vf.driver in USERSPACE_DRIVERS:
        return f"bound to {vf.driver}, pool wants a netdevice"
    if vf.netdev is None:
        return "no netdev in the node's namespace"
    return None


def no_link(pf: Pf | None) -> str | None:
    """Why the PF's VFs cannot carry traffic now (cable pulled, switch port down), or None. An
    operstate that says nothing (`Pf.link_up` None) is never held against the VFs."""
    if pf is None or pf.link_up is not False:
        return None
    return f"PF {pf.name} has no link (operstate {pf.operstate})"


def givable(
    vf: Vf, pf: Pf | None, state: VfState, device_type: DeviceType, *, verified: bool
) -> bool:
    """May be given out once free: verified, not unhealthy, and (unless a pod holds it,
    when its netdev is in the pod) bound to a driver that fits the pool, on a PF with link."""
    if not verified:
        return False
    if state == VfState.UNHEALTHY:
        return False
    return state in HELD or (misfit(vf, device_type) is None and no_link(pf) is None)


def vf_health(
    vf: Vf | None, pf: Pf | None, record: VfRecord, device_type: DeviceType, *, verified: bool
) -> tuple[bool, str]:
    """(healthy, why not) as kubelet and `plexusctl vfs` are told. A VF a pod holds stays
    healthy when its PF loses link: kubelet would evict nothing for it, and the link returns."""
    if vf is None:
        return False, "gone from sysfs"
    if record.state == VfState.UNHEALTHY:
        return False, record.reason
    if not verified:
        return False, "not yet verified by the audit"
    if record.state in HELD:
        return True, ""
    problem = misfit(vf, device_type) or no_link(pf)
    return (problem is None), problem or ""


def vf_view(
    snapshot: Snapshot,
    pci: str,
    record: VfRecord,
    pool: str | None,
    device_type: DeviceType,
    *,
    verified: bool,
) -> VfView:
    """VF `pci` (present in `snapshot` or not) with its ledger `record`, as a `VfView`."""
    vf = snapshot.vf(pci)
    pf = snapshot.pfs.get(vf.pf_pci) if vf else None
    healthy, reason = vf_health(vf, pf, record, device_type, verified=verified)
    return VfView(
        pci=pci,
        pf_pci=vf.pf_pci if vf else "",
        pf=pf.netdev if pf else None,
        index=vf.index if vf else -1,
        pool=pool,
        driver=vf.driver if vf else None,
        netdev=vf.netdev if vf else None,
        numa_node=vf.numa_node if vf else -1,
        present=vf is not None,
        healthy=healthy,
        state=record.state.value,
        holder=holder_text(record.holder),
        reason=reason,
    )


def pool_summary(spec: PoolSpec, views: list[VfView]) -> dict[str, Any]:
    """One row of `plexusctl pools`: the pool's counts over the views of its VFs."""
    mine = [v for v in views if v.pool == spec.resource_name]
    return {
        "resourceName": spec.resource_name,
        "deviceType": spec.device_type,
        "env": env_name(spec.resource_name),
        "total": len(mine),
        "healthy": sum(v.healthy for v in mine),
        "free": sum(v.healthy and v.state == VfState.FREE for v in mine),
        "inUse": sum(v.state in HELD for v in mine),
    }


def holder_text(holder: Holder | None) -> str:
    """ "namespace/pod (ifname)" (the container ID when the pod is not known), or ""."""
    if holder is None:
        return ""
    pod = f"{holder.pod_namespace}/{holder.pod_name}" if holder.pod_name else holder.container_id
    return f"{pod} ({holder.ifname})"
