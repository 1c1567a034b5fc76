"""Which device (VF PCI address) each attachment of a NAD with the
`k8s.v1.cni.cncf.io/resourceName` annotation gets, decided before anything is recorded or run.

Cluster mode asks kubelet's PodResources API which devices it granted the pod (kubelet picked
them through our device plugin); local mode, with no kubelet, reserves a VF from the pool
itself. The orchestrator asks with one `DeviceRequest` per attachment that needs a device, puts
each answer into the attachment's config as `deviceID` (as Multus does, so sriov-cni and
`plexus-sriov` both find it), and calls `release_unattached` when the ADD fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol

from cnispec.errors import DeviceNotFound, DeviceUnavailable, InvalidConfig
from cnispec.identity import Holder, PodInfo
from sriov.agent import NodeAgent

SRIOV_TYPE: Final = "plexus-sriov"


@dataclass(frozen=True, slots=True)
class DeviceRequest:
    """One attachment that needs a device of `resource` (its NAD's resourceName)."""

    holder: Holder
    network: str
    resource: str
    plugin_types: tuple[str, ...]  # the types of the network's plugins


class DeviceSource(Protocol):
    def assign(self, pod: PodInfo | None, requests: list[DeviceRequest]) -> list[str]:
        """One device (PCI address) per request, in order."""
        ...

    def release_unattached(self, container_id: str) -> None:
        """Give back what `assign` reserved for an ADD that failed before using it."""
        ...

    def device_info(self, pci: str) -> dict[str, str]:
        """network-status `device-info.pci` for a device (at least its PCI address)."""
        ...


class _Base:
    def __init__(self, agent: NodeAgent | None) -> None:
        self._agent = agent

    def device_info(self, pci: str) -> dict[str, str]:
        info = {"pci-address": pci}
        vf = self._agent.snapshot.vf(pci) if self._agent is not None else None
        if vf is not None:
            info["pf-pci-address"] = vf.pf_pci
        return info


class LocalPools(_Base):
    """Local mode: the node agent reserves a VF of the pool for each attachment."""

    def __init__(self, agent: NodeAgent) -> None:
        super().__init__(agent)
        self._pools = agent

    def assign(self, pod: PodInfo | None, requests: list[DeviceRequest]) -> list[str]:
        out = []
        try:
            for request in requests:
                _only_plexus_sriov(request)
                out.append(self._pools.vfs.allocate(request.resource, request.holder))
        except Exception:
            if requests:
                self.release_unattached(requests[0].holder.container_id)
            raise
        return out

    def release_unattached(self, container_id: str) -> None:
        self._pools.vfs.release_unattached(container_id)


def _only_plexus_sriov(request: DeviceRequest) -> None:
    # Only plexus-sriov tells the node agent when its VF is attached and released; another
    # plugin given a VF from the pool would leave it reserved forever.
    if SRIOV_TYPE not in request.plugin_types:
        raise InvalidConfig(
            f"network {request.network}: in local mode a VF pool ({request.resource}) serves "
            f"only {SRIOV_TYPE}, which gives the VF back on DEL; this network's plugins are "
            f"{', '.join(request.plugin_types)}. Change its type to {SRIOV_TYPE} (it takes "
            "sriov-cni's keys)"
        )


class Devices(Protocol):
    def devices(self, namespace: str, name: str) -> dict[str, list[str]]: ...


class KubeletGrants(_Base):
    """Cluster mode: the devices kubelet granted the pod, one per attachment of the resource,
    in the order PodResources lists them (two attachments of one SR-IOV NAD get two different
    VFs; which gets which is not promised, as in Multus)."""

    def __init__(self, client: Devices, agent: NodeAgent | None) -> None:
        super().__init__(agent)
        self._client = client

    def assign(self, pod: PodInfo | None, requests: list[DeviceRequest]) -> list[str]:
        if not requests:
            return []
        if pod is None:
            raise DeviceNotFound(
                "a network with k8s.v1.cni.cncf.io/resourceName needs a Kubernetes pod "
                "(K8S_POD_NAMESPACE/K8S_POD_NAME in CNI_ARGS) to look up its devices"
            )
        granted = self._client.devices(pod.namespace, pod.name)
        used: dict[str, int] = {}
        out = []
        for request in requests:
            ids = granted.get(request.resource, [])
            index = used.get(request.resource, 0)
            if index >= len(ids):
                raise DeviceUnavailable(
                    f"network {request.network} ({request.holder.ifname}) needs a "
                    f"{request.resource} device but kubelet granted pod {pod.ref} {len(ids)}; "
                    "request one per attachment in the pod's resources (limits: "
                    f"{{{request.resource}: {index + 1}}})"
                )
            used[request.resource] = index + 1
            out.append(ids[index])
        return out

    def release_unattached(self, container_id: str) -> None:
        return None  # kubelet owns the grant; nothing was reserved here
