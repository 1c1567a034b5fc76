"""The VF audit: the node agent runs it at start (before any VF is given out) and then every
`vfAuditInterval` seconds, to heal what no DEL will ever come for.

A VF whose pod netns vanished without DEL (node reboot, crash, a runtime that lost the pod) is
found back in the node by its alias (the kernel returns a physical netdev to the initial
namespace, under the pod's name or "devN") and restored; an ADD or DEL cut short by a crash
(RESERVED or RELEASING) is rolled back the same way (`sriov.release`); an attached VF whose
PF-side settings drifted gets them back. What cannot be healed is marked unhealthy with the
reason, so it is out of circulation but never lost track of. IPAM leases of such pods are not
ours to free here: the orchestrator's GC owns them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from cnispec import cni
from cnispec.errors import PlexusError
from cnispec.identity import Holder
from kernel.netlink import Netlink
from sriov import vfconfig
from sriov.netdev import alias_host_name
from sriov.owner import VfOwner
from sriov.records import VfRecord, VfState
from sriov.release import release_vf

log = structlog.get_logger(__name__)


@dataclass
class AuditReport:
    healed: list[str] = field(default_factory=list)  # PCI addresses rolled back and freed
    corrected: list[str] = field(default_factory=list)  # attached, PF-side settings put back
    unhealthy: list[str] = field(default_factory=list)  # marked unhealthy by this audit
    ok: int = 0  # records that matched reality


def audit(owner: VfOwner) -> AuditReport:
    """Compare every VF the ledger remembers with reality and heal what no ADD or DEL is
    working on. Each VF is looked at under the agent's lease, so a DEL or ADD that starts
    meanwhile waits its turn instead of racing the heal (or, for DEL, leaves it to the heal)."""
    report = AuditReport()
    for rec in owner.records():
        if rec.state == VfState.FREE or not owner.lease(rec.pci, rec):
            continue  # free, or busy / changed since listed: the next audit looks again
        try:
            _look_at(owner, rec, report)
        except (PlexusError, OSError) as exc:  # e.g. a pod netns vanishing under our feet
            log.warning("vf_audit_skipped", pci=rec.pci, error=str(exc))
        finally:
            owner.unlease(rec.pci)
    return report


def _look_at(owner: VfOwner, rec: VfRecord, report: AuditReport) -> None:
    if rec.state == VfState.UNHEALTHY:
        _retry(owner, rec, report)
        return
    holder = rec.holder or Holder(container_id="", ifname="")
    if rec.state == VfState.ATTACHED and _still_attached(rec, holder):
        if _correct_drift(owner, rec):
            report.corrected.append(rec.pci)
        else:
            report.ok += 1
        return
    _heal(owner, rec, holder, report)


def _correct_drift(owner: VfOwner, rec: VfRecord) -> bool:
    """An attached VF's PF-side settings as ADD set them: anyone who changed them behind our
    back (`ip link set <pf> vf N ...`) is undone, and it is logged. True when something was."""
    wanted = rec.pf_set
    if wanted is None or not rec.pf_applied:
        return False
    placement = owner.lookup(rec.pci)
    pf, index = placement.pf.netdev, placement.vf.index
    if pf is None:
        return False
    now = vfconfig.read_vf(pf, index)
    # A trusted VF may set its own MAC: that is not drift.
    fields = [f for f in rec.pf_applied if not (f == "mac" and wanted.trust)]
    drifted = vfconfig.differences(wanted, now, fields)
    if not drifted:
        return False
    # Only what drifted: re-sending a VF's MAC or VLAN resets it on some drivers (i40e, ice).
    vfconfig.apply(pf, index, vfconfig.only(wanted, drifted), now)
    holder = rec.holder
    log.warning(
        "vf_pf_settings_corrected",
        pci=rec.pci,
        pod=f"{holder.pod_namespace}/{holder.pod_name}" if holder else "",
        fields={f: (getattr(now, f), getattr(wanted, f)) for f in drifted},
    )
    return True


def _retry(owner: VfOwner, rec: VfRecord, report: AuditReport) -> None:
    """An unhealthy VF gets another chance each audit: its netdev may have come back (a
    driver reload, a slow reboot), or the admin fixed what was wrong."""
    try:
        again = owner.retry_unhealthy(rec.pci)
        if again is None:
            return
        if again.state == VfState.RELEASING and release_vf(owner, again) is not None:
            return  # still nowhere: release_vf marked it unhealthy again
    except PlexusError as exc:
        owner.mark_unhealthy(rec.pci, f"heal failed: {exc.msg}")
        return
    report.healed.append(rec.pci)
    log.info("vf_healed", pci=rec.pci, reason=f"was unhealthy: {rec.reason}")


def _still_attached(rec: VfRecord, holder: Holder) -> bool:
    """The pod netns is there and holds the VF, found by our alias under whatever name the pod
    gave it (an app with NET_ADMIN may rename its interfaces); a vfio-pci VF has no netdev to
    look for, so its pod netns existing is all there is."""
    if not holder.netns or not cni.is_netns(holder.netns):
        return False
    if rec.host is None:
        return True
    with Netlink.open(holder.netns) as pod:
        links = pod.links()
    # By our alias, or by its PCI parent should the pod have changed the alias.
    return any(
        alias_host_name(link.alias, rec.pci) is not None or link.parent_dev == rec.pci
        for link in links
    )


def _heal(owner: VfOwner, rec: VfRecord, holder: Holder, report: AuditReport) -> None:
    pod = holder.pod_ref
    why = {
        VfState.ATTACHED: "pod netns gone or VF missing from it",
        VfState.RESERVED: "ADD cut short",
        VfState.RELEASING: "DEL cut short",
    }.get(rec.state, str(rec.state))
    try:
        releasing = owner.release_begin(rec.pci, holder, healing=True)
        if releasing is None:  # changed hands since we read it: nothing of ours to heal
            return
        missing = release_vf(owner, releasing)
    except PlexusError as exc:
        owner.mark_unhealthy(rec.pci, f"{why}; heal failed: {exc.msg}")
        report.unhealthy.append(rec.pci)
        log.warning("vf_unhealthy", pci=rec.pci, pod=pod, reason=f"{why}; {exc.msg}")
        return
    if missing is not None:
        report.unhealthy.append(rec.pci)
        log.warning("vf_unhealthy", pci=rec.pci, pod=pod, reason=f"{why}; {missing}")
    else:
        report.healed.append(rec.pci)
        log.info("vf_healed", pci=rec.pci, pod=pod, reason=why)
