"""The node admin's VF pools file (`vfPools`): its parser (errors name the file and line), which
VFs each pool gets, and how many VFs each PF should have. The models are `cnispec.vfpools` (the
controller reads them too).

The node agent (`sriov.agent`) calls `load_pools` at start and on reload, `assign` on every
inventory change, and `desired_num_vfs` before writing `sriov_numvfs`; the device plugin names
its environment variable with `env_name`. Everything here is pure: no sysfs, no kernel. Reading
the YAML so that errors carry line numbers is `cnispec.yamllines`'s job.

    pools:
      - resourceName: plexus.dev/intel_vf
        selectors: {vendors: ["8086"], pfNames: ["ens1f0#0-3,6"]}
        deviceType: netdevice      # or vfio-pci
        numVfs: 8                  # per PF the PF-level selectors pick
        mtu: 9000
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from cnispec.errors import InvalidConfig
from cnispec.vfpools import PfRef, PoolsFile, PoolSpec
from cnispec.yamllines import load_validated
from sriov.model import Pf, Snapshot, Vf

# --- loading ------------------------------------------------------------------------------------


def load_pools(path: Path) -> PoolsFile:
    """Read and validate the pools file; every problem raises InvalidConfig naming file:line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise InvalidConfig(f"cannot read VF pools file {path}: {reason}") from None
    return parse_pools(text, str(path))


def parse_pools(text: str, source: str) -> PoolsFile:
    """The pools file's `text`, read from `source` (named in every message)."""
    return load_validated(
        text,
        source,
        PoolsFile,
        expect="expected a top-level 'pools:' list",
        fields="fields are camelCase: resourceName, pfNames, numVfs, ...",
    )


# --- matching -----------------------------------------------------------------------------------


def matches(spec: PoolSpec, vf: Vf, pf: Pf) -> bool:
    """Whether `vf` (of `pf`) fits every selector `spec` gives. deviceType does not select: a
    VF of the pool with the wrong driver stays in it, unhealthy until configured."""
    sel = spec.selectors
    return (
        (sel.vendors is None or vf.vendor in sel.vendors)
        and (sel.devices is None or vf.device in sel.devices)
        and (sel.drivers is None or vf.driver in sel.drivers)
        and (sel.link_types is None or vf.link_type in sel.link_types)
        and (sel.pf_names is None or _refers(sel.pf_names, pf.netdev, vf.index))
        and (sel.root_devices is None or _refers(sel.root_devices, pf.pci, vf.index))
    )


def _refers(refs: Iterable[PfRef], key: str | None, index: int) -> bool:
    return key is not None and any(ref.key == key and ref.covers(index) for ref in refs)


def assign(snapshot: Snapshot, pools: PoolsFile) -> dict[str, list[Vf]]:
    """Every pool's VFs (every pool present, maybe empty), in (PF PCI, VF index) order; a VF
    belongs to the first pool, in file order, that matches it."""
    out: dict[str, list[Vf]] = {pool.resource_name: [] for pool in pools.pools}
    for pf_pci in sorted(snapshot.pfs):
        pf = snapshot.pfs[pf_pci]
        for vf in sorted(pf.vfs, key=lambda v: v.index):
            pool = next((p for p in pools.pools if matches(p, vf, pf)), None)
            if pool is not None:
                out[pool.resource_name].append(vf)
    return out


def picks_pf(spec: PoolSpec, pf: Pf) -> bool:
    """Whether the PF-level selectors of `spec` (pfNames, rootDevices, vendors, linkTypes; VF
    ranges ignored) pick `pf`. A pool with neither pfNames nor rootDevices picks no PF."""
    sel = spec.selectors
    return (
        sel.picks_pfs
        and (sel.vendors is None or pf.vendor in sel.vendors)
        and (sel.link_types is None or pf.link_type in sel.link_types)
        and (sel.pf_names is None or any(r.key == pf.netdev for r in sel.pf_names))
        and (sel.root_devices is None or any(r.key == pf.pci for r in sel.root_devices))
    )


def desired_num_vfs(snapshot: Snapshot, pools: PoolsFile) -> dict[str, int]:
    """PF PCI -> the numVfs the pools want for it (the largest when several pools pick it).
    PFs no pool with numVfs picks are absent: their sriov_numvfs is left alone. Not clamped to
    sriov_totalvfs: the caller reports a PF that cannot have that many."""
    wanted: dict[str, int] = {}
    for pool in pools.pools:
        if pool.num_vfs is None:
            continue
        for pf in snapshot.pfs.values():
            if picks_pf(pool, pf):
                wanted[pf.pci] = max(wanted.get(pf.pci, 0), pool.num_vfs)
    return wanted
