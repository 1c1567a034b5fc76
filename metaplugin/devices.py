"""Which device (VF PCI address) each attachment of a NAD with the
`k8s.v1.cni.cncf.io/resourceName` annotation gets, decided before anything is recorded or run.

Cluster mode asks kubelet's PodResources API which devices it granted the pod (kubelet picked
them through our device plugin); local mode, with no kubelet, reserves a VF from the pool
itself. Either way the PCI address goes into every plugin of the attachment's config as
`deviceID` and as the `deviceID` capability argument, as Multus does, so sriov-cni and
`plexus-sriov` both find it. The orchestrator (`metaplugin.orchestrator`) calls `assign` and,
when an ADD fails, `release_unattached`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, Protocol

from metaplugin.cni import CniRequest
from metaplugin.errors import DeviceNotFound, DeviceUnavailable, InvalidConfig
from metaplugin.resolve import PlannedAttachment, PodInfo
from sriov.agent import NodeAgent
from sriov.records import Holder

SRIOV_TYPE = "plexus-sriov"


class DeviceSource(Protocol):
    def assign(
        self, req: CniRequest, pod: PodInfo | None, plan: list[PlannedAttachment]
    ) -> list[PlannedAttachment]:
        """The plan with a `deviceID` in every attachment whose network names a resource."""
        ...

    def release_unattached(self, container_id: str) -> None:
        """Give back what `assign` reserved for an ADD that failed before using it."""
        ...

    def device_info(self, pci: str) -> dict[str, str]:
        """network-status `device-info.pci` for a device (at least its PCI address)."""
        ...


def _wanting(plan: list[PlannedAttachment]) -> Iterator[tuple[int, PlannedAttachment]]:
    for position, att in enumerate(plan):
        if att.resource_name and not _has_device(att.config):
            yield position, att


def _plugins(config: dict[str, Any]) -> list[dict[str, Any]]:
    plugins = config.get("plugins")
    return plugins if isinstance(plugins, list) else [config]


def _has_device(config: dict[str, Any]) -> bool:
    return any(isinstance(p, dict) and p.get("deviceID") for p in _plugins(config))


def _with_device(att: PlannedAttachment, device: str) -> PlannedAttachment:
    config = copy.deepcopy(att.config)
    for plugin in _plugins(config):
        plugin["deviceID"] = device
    return replace(att, config=config, capability_args={**att.capability_args, "deviceID": device})


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

    def assign(
        self, req: CniRequest, pod: PodInfo | None, plan: list[PlannedAttachment]
    ) -> list[PlannedAttachment]:
        out = list(plan)
        try:
            for position, att in _wanting(plan):
                assert att.resource_name is not None
                _only_plexus_sriov(att)
                holder = Holder(
                    container_id=req.container_id,
                    ifname=att.ifname,
                    netns=req.netns,
                    pod_namespace=pod.namespace if pod else "",
                    pod_name=pod.name if pod else "",
                    pod_uid=pod.uid if pod else req.pod_uid,
                )
                out[position] = _with_device(att, self._pools.allocate(att.resource_name, holder))
        except Exception:
            self.release_unattached(req.container_id)
            raise
        return out

    def release_unattached(self, container_id: str) -> None:
        self._pools.release_unattached(container_id)


def _only_plexus_sriov(att: PlannedAttachment) -> None:
    # Only plexus-sriov tells the node agent when its VF is attached and released; another
    # plugin given a VF from the pool would leave it reserved forever.
    types = [str(p.get("type")) for p in _plugins(att.config) if isinstance(p, dict)]
    if SRIOV_TYPE not in types:
        raise InvalidConfig(
            f"network {att.network}: in local mode a VF pool ({att.resource_name}) serves only "
            f"{SRIOV_TYPE}, which gives the VF back on DEL; this network's plugins are "
            f"{', '.join(types)}. Change its type to {SRIOV_TYPE} (it takes sriov-cni's keys)"
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

    def assign(
        self, req: CniRequest, pod: PodInfo | None, plan: list[PlannedAttachment]
    ) -> list[PlannedAttachment]:
        wanting = list(_wanting(plan))
        if not wanting:
            return plan
        if pod is None:
            raise DeviceNotFound(
                "a network with k8s.v1.cni.cncf.io/resourceName needs a Kubernetes pod "
                "(K8S_POD_NAMESPACE/K8S_POD_NAME in CNI_ARGS) to look up its devices"
            )
        granted = self._client.devices(pod.namespace, pod.name)
        used: dict[str, int] = {}
        out = list(plan)
        for position, att in wanting:
            resource = att.resource_name or ""
            ids = granted.get(resource, [])
            index = used.get(resource, 0)
            if index >= len(ids):
                raise DeviceUnavailable(
                    f"network {att.network} ({att.ifname}) needs a {resource} device but kubelet "
                    f"granted pod {pod.ref} {len(ids)}; request one per attachment in the pod's "
                    f"resources (limits: {{{resource}: {index + 1}}})"
                )
            used[resource] = index + 1
            out[position] = _with_device(att, ids[index])
        return out

    def release_unattached(self, container_id: str) -> None:
        return None  # kubelet owns the grant; nothing was reserved here
