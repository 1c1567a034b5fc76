"""Client of kubelet's PodResources API v1: which device ids kubelet granted a pod, per resource.

Called on ADD, in cluster mode, to learn which VF (PCI address) kubelet allocated to the pod for
a NAD's `k8s.v1.cni.cncf.io/resourceName`. Uses `Get` for the one pod; falls back to `List`
(every pod on the node, filtered here) when `Get` is not there.

Why `List` is also tried when `Get` answers UNKNOWN or NOT_FOUND, not only UNIMPLEMENTED:
kubelet < 1.27 has no `Get` (UNIMPLEMENTED), but kubelet 1.27-1.33 with the `KubeletPodResourcesGet`
gate off answers UNKNOWN ("Get method disabled"), and answers an unknown pod with UNKNOWN too.
Telling those apart would mean matching kubelet's message text; asking `List` tells them apart
by data instead.

A pod kubelet does not know yet is TryAgainLater, not "no devices": a pod that requested no
device is known and simply has none, while an unknown pod (kubelet restarted, a race with pod
admission) would otherwise lose its VF for good; the runtime retries ADD. Every transport
problem (socket missing, kubelet restarting, deadline, rate limit) is TryAgainLater as well.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import grpc
import structlog

from cnispec.errors import DeviceUnavailable, PlexusError, TryAgainLater
from sriov.kubeletapi import podresources_v1_pb2 as pb
from sriov.kubeletapi import podresources_v1_pb2_grpc as pb_grpc

# kubelet answers List with every pod of the node; the 4 MiB grpc default is too small for a
# busy node.
_MAX_MESSAGE: Final = 16 * 1024 * 1024
_FALL_BACK_TO_LIST: Final = frozenset(
    {grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.NOT_FOUND}
)
_TRANSIENT: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # kubelet rate-limits this API
        grpc.StatusCode.CANCELLED,
    }
)

log = structlog.get_logger(__name__)


class PodResourcesClient:
    def __init__(
        self,
        socket: Path = Path("/var/lib/kubelet/pod-resources/kubelet.sock"),
        timeout: float = 5.0,
    ) -> None:
        self._socket = socket
        self._timeout = timeout
        self._lock = threading.Lock()
        self._channel: Any = None

    def devices(self, namespace: str, name: str) -> dict[str, list[str]]:
        """Resource name -> device ids kubelet granted the pod, over all its containers (init
        containers included when kubelet lists them), in kubelet's order, without repeats."""
        if not self._socket.exists():
            raise TryAgainLater(
                f"kubelet's PodResources socket {self._socket} does not exist: is kubelet "
                f"running, and is its pod-resources directory mounted into the Plexus daemon?"
            )
        stub = pb_grpc.PodResourcesListerStub(self._connect())
        request = pb.GetPodResourcesRequest(pod_name=name, pod_namespace=namespace)
        pod: pb.PodResources | None
        try:
            reply = stub.Get(request, timeout=self._timeout, wait_for_ready=True)
            pod = reply.pod_resources
        except grpc.RpcError as exc:
            if exc.code() not in _FALL_BACK_TO_LIST:
                raise self._translate(exc, "Get") from exc
            log.debug("podresources_get_unusable", code=exc.code().name)
            pod = self._from_list(stub, namespace, name)
        if pod is None:
            raise TryAgainLater(
                f"kubelet does not know pod {namespace}/{name} (yet): retrying; if this "
                f"persists, check that the pod is scheduled to this node"
            )
        return _device_map(pod.containers)

    def allocated(self) -> set[str]:
        """Every device id kubelet has granted to any pod on the node (List): what a numVfs
        change must not pull away, whether or not a Plexus NAD uses it."""
        if not self._socket.exists():
            raise TryAgainLater(f"kubelet's PodResources socket {self._socket} does not exist")
        stub = pb_grpc.PodResourcesListerStub(self._connect())
        try:
            reply = stub.List(
                pb.ListPodResourcesRequest(), timeout=self._timeout, wait_for_ready=True
            )
        except grpc.RpcError as exc:
            raise self._translate(exc, "List") from exc
        return {
            device
            for pod in reply.pod_resources
            for ids in _device_map(pod.containers).values()
            for device in ids
        }

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None

    def __enter__(self) -> PodResourcesClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _connect(self) -> Any:
        # One channel, reused: grpc reconnects by path when kubelet recreates its socket.
        with self._lock:
            if self._channel is None:
                self._channel = grpc.insecure_channel(
                    f"unix:{self._socket}",
                    options=[("grpc.max_receive_message_length", _MAX_MESSAGE)],
                )
            return self._channel

    def _from_list(self, stub: Any, namespace: str, name: str) -> pb.PodResources | None:
        try:
            reply = stub.List(
                pb.ListPodResourcesRequest(), timeout=self._timeout, wait_for_ready=True
            )
        except grpc.RpcError as exc:
            raise self._translate(exc, "List") from exc
        for pod in reply.pod_resources:
            if pod.namespace == namespace and pod.name == name:
                found: pb.PodResources = pod
                return found
        return None

    def _translate(self, exc: Any, method: str) -> PlexusError:
        code, details = exc.code(), exc.details()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return TryAgainLater(
                f"kubelet's PodResources API ({self._socket}) did not answer {method} within "
                f"{self._timeout:g}s; kubelet may be restarting or overloaded"
            )
        if code in _TRANSIENT:
            return TryAgainLater(
                f"kubelet's PodResources API ({self._socket}) is unavailable for {method} "
                f"({code.name}: {details}); kubelet may be restarting"
            )
        return DeviceUnavailable(
            f"kubelet's PodResources API ({self._socket}) refused {method} "
            f"({code.name}: {details}); check kubelet's log"
        )


def _device_map(containers: Iterable[pb.ContainerResources]) -> dict[str, list[str]]:
    out: dict[str, dict[str, None]] = {}
    for container in containers:
        for devs in container.devices:
            ids = out.setdefault(devs.resource_name, {})
            ids.update(dict.fromkeys(devs.device_ids))
    return {resource: list(ids) for resource, ids in out.items()}
