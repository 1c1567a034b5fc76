"""A local pod's labels from the container runtime, over its CRI socket (local mode: no API).

containerd's CRI passes a pod's annotations to CNI (as runtimeConfig / CNI_ARGS) but never its
labels, and network policy selects pods by label: plexusd asks the runtime's
`PodSandboxStatus` (the sandbox id is the CNI_CONTAINERID the runtime gave the ADD). A sandbox's
labels are fixed when it is created (kubelet makes a new sandbox to change them), so an answer is
good for the sandbox's whole life.

The runtime keeps a sandbox out of its store until RunPodSandbox's network setup has returned
(containerd 1.6: `sandboxStore.Add` comes after `setupPodNetwork`): during the ADD itself the
status is NotFound, which `labels()` answers as None ("not known yet"), for the caller to ask
again once the ADD is done.
"""

from __future__ import annotations

import threading
from typing import Final

import grpc
import structlog
from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as rpc

log = structlog.get_logger(__name__)

TIMEOUT: Final = 2.0  # seconds for one PodSandboxStatus; a local socket answers in ms
# kubelet adds these to every sandbox's labels (its pod's identity); the pod in the API has none
# of them, and a selector must see the labels the API shows.
KUBELET_LABELS: Final = frozenset(
    {"io.kubernetes.pod.name", "io.kubernetes.pod.namespace", "io.kubernetes.pod.uid"}
)


class CriUnavailable(Exception):
    """The runtime did not answer (socket missing, refused, too slow)."""


class CriLabels:
    """Sandbox labels from one runtime socket; one channel, opened on first use and kept."""

    def __init__(self, socket: str, *, timeout: float = TIMEOUT) -> None:
        self.socket = socket
        self._timeout = timeout
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub: rpc.RuntimeServiceStub | None = None

    def labels(self, sandbox_id: str) -> dict[str, str] | None:
        """The sandbox's labels (the pod's, as the API shows them); None when the runtime does
        not know the sandbox (yet, or any more). CriUnavailable when it cannot be asked."""
        try:
            reply = self._runtime().PodSandboxStatus(
                pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id), timeout=self._timeout
            )
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code == grpc.StatusCode.NOT_FOUND:
                return None
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            raise CriUnavailable(
                f"container runtime at {self.socket}: PodSandboxStatus {sandbox_id[:12]}: "
                f"{code.name if code else 'failed'}: {details}"
            ) from None
        return {k: v for k, v in reply.status.labels.items() if k not in KUBELET_LABELS}

    def _runtime(self) -> rpc.RuntimeServiceStub:
        with self._lock:
            if self._stub is None:
                self._channel = grpc.insecure_channel(f"unix://{self.socket}")
                self._stub = rpc.RuntimeServiceStub(self._channel)
            return self._stub

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = self._stub = None
