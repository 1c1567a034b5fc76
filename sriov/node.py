"""SR-IOV on this node, assembled for plexusd: the node agent (inventory, pools, ledger, one
kubelet device plugin per pool in cluster mode), where attachments get their VFs (kubelet's
grants, or the pool itself in local mode), and the audit that heals VFs at start and then
every `audit_interval` seconds. plexusd builds it when its config names a `vfPools` file, or in
cluster mode from the VFPool objects (`metaplugin.k8s_pools` hands in that `PoolsSource`), from
the `SriovSettings` it takes out of that config.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from cnispec.vfpools import PoolSpec, env_name
from sriov.agent import NodeAgent
from sriov.audit import audit
from sriov.devices import DeviceSource, KubeletGrants, LocalPools
from sriov.health import VfView
from sriov.membership import DevicePlugin
from sriov.pools_source import PoolsFileSource, PoolsSource
from sriov.sysfs import Sysfs
from sriov.uevents import UeventSource, open_source

if TYPE_CHECKING:
    from sriov.podresources import PodResourcesClient

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class SriovSettings:
    """The daemon config's SR-IOV keys (vfPools, sysfsRoot, vfAuditInterval, devicePluginDir,
    podResourcesSocket), and whether a kubelet picks the devices (cluster mode)."""

    vf_pools: Path | None  # None: the caller hands SriovNode its own PoolsSource
    sysfs_root: Path
    state_dir: Path  # the agent's own: the daemon's stateDir/sriov
    audit_interval: float
    kubelet: bool
    device_plugin_dir: Path
    pod_resources_socket: Path


class SriovNode:
    def __init__(
        self,
        cfg: SriovSettings,
        *,
        source_factory: Callable[[], UeventSource] | None = None,
        pools: PoolsSource | None = None,
    ) -> None:
        root = cfg.sysfs_root
        self._root = root
        self._cfg = cfg
        kubelet = self._kubelet = self._pod_resources() if cfg.kubelet else None
        self.agent = NodeAgent(
            sysfs=Sysfs(root),
            pools=pools or _file_source(cfg),
            state_dir=cfg.state_dir,
            source_factory=source_factory or (lambda: open_source(root)),
            plugin_factory=self._device_plugin if cfg.kubelet else None,
            granted=kubelet.allocated if kubelet is not None else None,
        )
        self.devices: DeviceSource = (
            LocalPools(self.agent) if kubelet is None else KubeletGrants(kubelet, self.agent)
        )
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None
        # What the audits did since start, by kind (plexusd's /metrics reads it when scraped).
        self.healed = {"healed": 0, "corrected": 0, "unhealthy": 0}
        self._healed_lock = threading.Lock()

    def _pod_resources(self) -> PodResourcesClient:
        from sriov.podresources import PodResourcesClient  # grpc: cluster mode only

        return PodResourcesClient(self._cfg.pod_resources_socket)

    def _device_plugin(self, spec: PoolSpec, views: Callable[[], list[VfView]]) -> DevicePlugin:
        from sriov.deviceplugin import DeviceView, PoolDevicePlugin

        def devices() -> list[DeviceView]:
            return [
                DeviceView(
                    pci=v.pci,
                    healthy=v.healthy,
                    numa_node=v.numa_node,
                    pf_pci=v.pf_pci,
                    iommu_group=self._iommu_group(v.pci),
                )
                for v in views()
            ]

        return PoolDevicePlugin(
            resource_name=spec.resource_name,
            plugin_dir=self._cfg.device_plugin_dir,
            devices=devices,
            env_name=env_name(spec.resource_name),
            device_type=spec.device_type,
        )

    def _iommu_group(self, pci: str) -> str | None:
        link = self._root / "bus/pci/devices" / pci / "iommu_group"
        try:
            return Path(link.readlink()).name
        except OSError:
            return None

    def start_agent(self) -> None:
        """Read the hardware, the pools and the ledger: enough for DELs (the spool replay)."""
        self.agent.start()

    def heal_and_open(self) -> None:
        """Heal what a crash or reboot left behind, then give VFs out (and advertise them)."""
        self.audit_once()
        self.agent.audit_finished()
        self._loop = threading.Thread(target=self._audit_loop, name="vf-audit", daemon=True)
        self._loop.start()

    def audit_once(self) -> dict[str, Any]:
        report = audit(self.agent.vfs)
        summary = asdict(report)
        counts = {k: v if isinstance(v, int) else len(v) for k, v in summary.items()}
        log.info("vf_audit_done", **counts)
        with self._healed_lock:  # the audit loop and a start-up audit may both count
            for kind in ("healed", "corrected", "unhealthy"):
                self.healed[kind] += counts.get(kind, 0)
        return summary

    def _audit_loop(self) -> None:
        while not self._stop.wait(self._cfg.audit_interval):
            try:
                self.audit_once()
            except Exception:
                log.exception("vf_audit_failed")

    def stop(self) -> None:
        self._stop.set()
        if self._loop is not None:
            self._loop.join(timeout=5)
        if self._kubelet is not None:
            self._kubelet.close()
        self.agent.stop()

    def pools(self) -> list[dict[str, Any]]:
        return self.agent.membership.pools_view()

    def vfs(self) -> list[dict[str, Any]]:
        return [asdict(v) for v in self.agent.membership.vfs_view()]


def _file_source(cfg: SriovSettings) -> PoolsFileSource:
    if cfg.vf_pools is None:
        raise ValueError("SriovNode needs a vfPools file or a PoolsSource")
    return PoolsFileSource(cfg.vf_pools)
