"""Putting VFs back: `release_attachment` (the `plexus-sriov` DEL) and `release_vf`, which DEL
and the audit (`sriov.audit`) share: PF-side settings as before, the netdev back in the node
under its host name with its MAC and MTU (`sriov.netdev`), then free; a VF found nowhere is
marked unhealthy with the reason, never lost track of.
"""

from __future__ import annotations

from collections.abc import Callable

from cnispec.errors import PlexusError
from cnispec.identity import Holder
from sriov import vfconfig
from sriov.netdev import put_back
from sriov.owner import Placement, VfOwner
from sriov.records import VfRecord


def release_attachment(owner: VfOwner, pci: str, holder: Holder) -> None:
    """DEL's part: release what `holder` holds; nothing when it no longer holds `pci` (a stale
    or repeated DEL must touch nothing)."""
    rec = owner.release_begin(pci, holder)
    if rec is None:
        return
    try:
        release_vf(owner, rec, patient=True)
    except BaseException:
        owner.let_go(pci)  # stays RELEASING: the runtime's retry or the audit finishes it
        raise


def release_vf(owner: VfOwner, rec: VfRecord, *, patient: bool = False) -> str | None:
    """A RELEASING VF back to its pool: PF-side settings as before, its netdev back in the node
    under its host name with its MAC and MTU, then free. A VF or netdev found nowhere is marked
    unhealthy and the reason returned. Other failures raise, leaving the record RELEASING for
    DEL's retry or the next audit. `patient` (DEL): give the kernel a moment to hand back the
    netdev of a pod netns that has just died."""
    try:
        placement: Placement | None = owner.lookup(rec.pci)
    except PlexusError:
        placement = None
    failures: list[PlexusError] = []
    before = rec.pf_before
    if placement is not None and placement.pf.netdev and rec.pf_applied and before is not None:
        pf, index = placement.pf.netdev, placement.vf.index
        _collect(failures, lambda: vfconfig.restore(pf, index, before, rec.pf_applied))
    missing = "the VF is gone from sysfs" if placement is None else None
    host = rec.host  # None: vfio-pci, or a crash before ADD recorded it (nothing moved yet)
    if placement is not None and host is not None:
        netns = rec.holder.netns if rec.holder else ""
        try:
            missing = put_back(rec.pci, netns, host, patient=patient)
        except PlexusError as exc:
            failures.append(exc)
    if failures:
        raise failures[0].with_msg(
            f"VF {rec.pci}: restore incomplete: " + "; ".join(f.msg for f in failures)
        )
    if missing is not None:
        owner.mark_unhealthy(rec.pci, missing)
        return missing
    owner.release_done(rec.pci)
    return None


def _collect(failures: list[PlexusError], step: Callable[[], None]) -> None:
    try:
        step()
    except PlexusError as exc:
        failures.append(exc)
