"""Which of a pool's VFs kubelet should give one pod (GetPreferredAllocation): VFs of as few PFs
as possible, on one NUMA node, deterministically.

Called by `sriov.deviceplugin` for each container request. Pure functions over the plugin's
device views; no grpc, so the rule is testable on its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol


class Candidate(Protocol):
    """What the choice needs of a VF (`sriov.deviceplugin.DeviceView` has it)."""

    @property
    def healthy(self) -> bool: ...

    @property
    def numa_node(self) -> int: ...  # -1 when the platform does not say

    @property
    def pf_pci(self) -> str: ...


def preferred_allocation(
    views: Mapping[str, Candidate],
    *,
    available: Sequence[str],
    must_include: Sequence[str],
    size: int,
) -> list[str]:
    """Pick `size` ids: `must_include` first, then whole PFs, so one pod's VFs share a PF.

    The next PF is one already used, then (once a NUMA node is known from the first pick) one on
    the same NUMA node, then the one with the most available VFs, then the lowest PCI address;
    within a PF, lowest PCI address first. Ids this pool does not know, or knows unhealthy, come
    last in kubelet's order. Deterministic for a given input.
    """
    picks = list(dict.fromkeys(must_include))
    chosen = set(picks)
    by_pf: dict[str, list[str]] = {}
    unknown: list[str] = []
    for pci in dict.fromkeys(available):
        view = views.get(pci)
        if pci in chosen:
            continue
        if view is None or not view.healthy:
            unknown.append(pci)
        else:
            by_pf.setdefault(view.pf_pci, []).append(pci)
    used_pfs = {views[p].pf_pci for p in picks if p in views}
    anchor = _numa_of(views, picks)
    while len(picks) < size and by_pf:
        pf = min(by_pf, key=lambda pf: _pf_rank(pf, by_pf[pf], views, used_pfs, anchor))
        take = sorted(by_pf.pop(pf))[: size - len(picks)]
        picks.extend(take)
        used_pfs.add(pf)
        anchor = _numa_of(views, picks)
    picks.extend(unknown[: max(size - len(picks), 0)])
    return picks


def _numa_of(views: Mapping[str, Candidate], picks: Sequence[str]) -> int | None:
    first = views.get(picks[0]) if picks else None
    return first.numa_node if first is not None and first.numa_node >= 0 else None


def _pf_rank(
    pf: str,
    ids: Sequence[str],
    views: Mapping[str, Candidate],
    used_pfs: set[str],
    anchor: int | None,
) -> tuple[bool, bool, int, str]:
    # Sorts ascending: a PF already used, then one on the anchor's NUMA node, then the fullest.
    other_numa = anchor is not None and views[ids[0]].numa_node != anchor
    return (pf not in used_pfs, other_numa, -len(ids), pf)
