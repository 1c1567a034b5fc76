"""kubelet device plugin (API v1beta1) for one VF pool: serves the DevicePlugin service on its own
unix socket, registers with kubelet, streams the pool's VFs with their real health, answers
Allocate (environment and vfio device nodes) and GetPreferredAllocation (one PF, one NUMA node;
the choice itself is `sriov.preference`).

The node agent makes one `PoolDevicePlugin` per pool, passing `devices` (the pool's VFs as
`DeviceView`s, read on every call) and calling `notify()` whenever they change. kubelet deletes
every plugin socket in its device-plugins dir when it restarts; a supervisor thread polls for
that and for a new `kubelet.sock`, then serves again and re-registers. Registration failures are
logged and retried with backoff; they never stop the daemon.

This module and `sriov.podresources` are the only ones that import grpc (an import contract).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
import structlog

from cnispec.errors import InvalidConfig, PlexusError
from sriov.kubeletapi import deviceplugin_v1beta1_pb2 as pb
from sriov.kubeletapi import deviceplugin_v1beta1_pb2_grpc as pb_grpc
from sriov.owner import DeviceType
from sriov.preference import preferred_allocation

API_VERSION: Final = "v1beta1"
HEALTHY: Final = "Healthy"
UNHEALTHY: Final = "Unhealthy"
KUBELET_SOCKET: Final = "kubelet.sock"
CONTAINER_VFIO_DIR: Final = "/dev/vfio"

# NOTE: sun_path holds 108 bytes including the terminating NUL.
_SUN_PATH_MAX: Final = 107
# kubelet holds one ListAndWatch stream per plugin (two briefly, across its restarts); a stream
# pins a worker thread for its lifetime, so cap streams and keep threads for the unary calls.
_MAX_STREAMS: Final = 4
_WORKERS: Final = _MAX_STREAMS + 4
_POLL_S: Final = 0.5
_STREAM_WAKE_S: Final = 1.0  # re-check a stream's client even when nothing is notified
_REGISTER_TIMEOUT_S: Final = 5.0
_BACKOFF_MIN_S: Final = 0.5
_BACKOFF_MAX_S: Final = 30.0

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class DeviceView:
    """What the plugin needs to know about one VF of its pool."""

    pci: str
    healthy: bool
    numa_node: int  # -1 when the platform does not say
    pf_pci: str
    iommu_group: str | None = None  # only vfio-pci VFs have (and need) one


def socket_name(resource_name: str) -> str:
    """`plexus.dev/intel_vf` -> `plexus-plexus.dev_intel_vf.sock`: one-to-one, since only the
    one "/" needs replacing and a resource prefix (a DNS subdomain) never holds a "_"."""
    return "plexus-" + resource_name.replace("/", "_", 1) + ".sock"


FileId = tuple[int, int]  # (inode, ctime ns): an inode number alone may be reused at once


def _file_id(path: Path) -> FileId | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_ctime_ns)


class PoolDevicePlugin:
    def __init__(
        self,
        *,
        resource_name: str,
        devices: Callable[[], list[DeviceView]],
        env_name: str,
        device_type: DeviceType,
        plugin_dir: Path = Path("/var/lib/kubelet/device-plugins"),
        vfio_dir: Path = Path("/dev/vfio"),
    ) -> None:
        self.resource_name = resource_name
        self.socket_path = plugin_dir / socket_name(resource_name)
        self.kubelet_socket = plugin_dir / KUBELET_SOCKET
        if len(os.fsencode(self.socket_path)) > _SUN_PATH_MAX:
            raise InvalidConfig(
                f"device-plugin socket path {self.socket_path} is longer than the "
                f"{_SUN_PATH_MAX} bytes a unix socket allows; shorten the kubelet device-plugins "
                f"dir or the pool's resourceName"
            )
        self._devices = devices
        self._env_name = env_name
        self._device_type = device_type
        self._vfio_dir = vfio_dir
        self._log = log.bind(resource=resource_name)
        # Guards the generation/epoch/stream counters below; streams wait on it.
        self._cond = threading.Condition()
        self._generation = 0  # bumped by notify()
        self._epoch = 0  # bumped when a server goes away: its streams end
        self._streams = 0
        self._server: Any = None
        self._executor: ThreadPoolExecutor | None = None
        self._socket_id: FileId | None = None
        self._registered_with: FileId | None = None  # the kubelet.sock we registered with
        self._seen_kubelet: FileId | None = None
        self._backoff = _BACKOFF_MIN_S
        self._next_attempt = 0.0
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Serve, try to register once, then leave retries and restart detection to a thread."""
        self._serve()
        self._maybe_register()
        self._supervisor = threading.Thread(
            target=self._supervise, name=f"deviceplugin-{self.resource_name}", daemon=True
        )
        self._supervisor.start()

    def stop(self) -> None:
        """End every stream, stop serving, remove our socket; joins every thread we started."""
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join()
            self._supervisor = None
        self._shutdown_server()
        if self._socket_id is not None and _file_id(self.socket_path) == self._socket_id:
            self.socket_path.unlink(missing_ok=True)
        self._socket_id = None

    def notify(self) -> None:
        """The pool's devices changed: every open ListAndWatch stream sends the full list."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    @property
    def registered(self) -> bool:
        return self._registered_with is not None

    # --- serving --------------------------------------------------------------------------------

    def _serve(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        # grpc binds a unix socket only where no file is; a leftover of ours (a crash) goes.
        self.socket_path.unlink(missing_ok=True)
        with self._cond:
            epoch = self._epoch
        executor = ThreadPoolExecutor(
            max_workers=_WORKERS, thread_name_prefix=f"dp-{self.resource_name}"
        )
        server = grpc.server(executor)
        try:
            pb_grpc.add_DevicePluginServicer_to_server(_Servicer(self, epoch), server)
            server.add_insecure_port(f"unix:{self.socket_path}")  # RuntimeError when it cannot
            server.start()
        except BaseException:
            executor.shutdown(wait=False)
            raise
        self._server, self._executor = server, executor
        self._socket_id = _file_id(self.socket_path)
        self._log.info("device_plugin_serving", socket=str(self.socket_path))

    def _shutdown_server(self) -> None:
        with self._cond:
            self._epoch += 1  # streams of the old server return at once
            self._cond.notify_all()
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # --- registration and kubelet restarts ------------------------------------------------------

    def _supervise(self) -> None:
        while not self._stop.wait(_POLL_S):
            try:
                self._check()
            except (OSError, RuntimeError) as exc:  # cannot serve right now: try next round
                self._log.warning("device_plugin_serve_failed", error=str(exc))

    def _check(self) -> None:
        if _file_id(self.socket_path) != self._socket_id:
            # kubelet restarted (it removes every plugin socket) or someone else did it.
            self._log.info("device_plugin_socket_gone", socket=str(self.socket_path))
            self._registered_with = None
            self._shutdown_server()
            self._serve()
        self._maybe_register()

    def _maybe_register(self) -> None:
        kubelet = _file_id(self.kubelet_socket)
        if kubelet is None or kubelet == self._registered_with:
            return
        if kubelet != self._seen_kubelet:  # a new kubelet: try now, whatever the backoff said
            self._seen_kubelet = kubelet
            self._backoff, self._next_attempt = _BACKOFF_MIN_S, 0.0
        if time.monotonic() < self._next_attempt:
            return
        try:
            self._register()
        except grpc.RpcError as exc:
            self._log.warning(
                "device_plugin_register_failed",
                code=exc.code().name,
                details=exc.details(),
                retry_in_s=self._backoff,
            )
            self._next_attempt = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX_S)
            return
        self._registered_with = kubelet
        self._log.info("device_plugin_registered", kubelet_socket=str(self.kubelet_socket))

    def _register(self) -> None:
        request = pb.RegisterRequest(
            version=API_VERSION,
            endpoint=self.socket_path.name,
            resource_name=self.resource_name,
            options=_OPTIONS,
        )
        with grpc.insecure_channel(f"unix:{self.kubelet_socket}") as channel:
            pb_grpc.RegistrationStub(channel).Register(request, timeout=_REGISTER_TIMEOUT_S)

    # --- RPC bodies (called by _Servicer) -------------------------------------------------------

    def _list_and_watch(self, context: Any, epoch: int) -> Iterator[pb.ListAndWatchResponse]:
        with self._cond:
            if self._streams >= _MAX_STREAMS:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many ListAndWatch streams")
            self._streams += 1
        context.add_callback(self._wake)  # the client went away: wake the stream to end it
        try:
            yield from self._stream(context, epoch)
        finally:
            with self._cond:
                self._streams -= 1

    def _stream(self, context: Any, epoch: int) -> Iterator[pb.ListAndWatchResponse]:
        sent = -1
        while True:
            with self._cond:
                if not self._wait_change(sent, epoch, context):
                    return
                if self._generation == sent:
                    continue  # woken without news: look at the client again
                sent = self._generation
            # Read the devices outside the lock: the callback takes the agent's own locks.
            try:
                devices = [_to_device(d) for d in self._devices()]
            except (PlexusError, OSError):  # e.g. the pool left the pools file meanwhile
                # kubelet never dials a finished stream again: it waits for a new Register.
                self._log.exception("device_plugin_list_failed")
                with self._cond:
                    self._registered_with = None
                return
            yield pb.ListAndWatchResponse(devices=devices)

    def _wait_change(self, sent: int, epoch: int, context: Any) -> bool:
        """With `_cond` held: wait for a notify; False when the stream must end."""
        self._cond.wait_for(
            lambda: self._generation != sent or self._epoch != epoch or self._stop.is_set(),
            timeout=_STREAM_WAKE_S,
        )
        return self._epoch == epoch and not self._stop.is_set() and bool(context.is_active())

    def _allocate(self, request: pb.AllocateRequest, context: Any) -> pb.AllocateResponse:
        views = {d.pci: d for d in self._devices()}
        responses = []
        for creq in request.container_requests:
            ids = list(creq.devices_ids)
            problem = self._refuse(ids, views)
            if problem is not None:
                self._log.warning("device_plugin_allocate_refused", reason=problem[1])
                context.abort(*problem)
            responses.append(self._container_response(ids, views))
        return pb.AllocateResponse(container_responses=responses)

    def _refuse(
        self, ids: Sequence[str], views: Mapping[str, DeviceView]
    ) -> tuple[Any, str] | None:
        for pci in ids:
            view = views.get(pci)
            if view is None:
                return (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{pci} is not a VF of pool {self.resource_name} on this node "
                    f"(was the pool reconfigured while kubelet still remembered it?)",
                )
            if not view.healthy:
                return (
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"VF {pci} of pool {self.resource_name} is unhealthy; `plexusctl` shows why",
                )
            if self._device_type == "vfio-pci" and view.iommu_group is None:
                return (
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"VF {pci} of vfio-pci pool {self.resource_name} has no IOMMU group: "
                    f"bind it to vfio-pci and boot with the IOMMU on (intel_iommu=on / amd_iommu)",
                )
        return None

    def _container_response(
        self, ids: Sequence[str], views: Mapping[str, DeviceView]
    ) -> pb.ContainerAllocateResponse:
        specs: list[pb.DeviceSpec] = []
        if self._device_type == "vfio-pci":
            groups = dict.fromkeys(str(views[pci].iommu_group) for pci in ids)
            for node in ("vfio", *groups):
                specs.append(
                    pb.DeviceSpec(
                        container_path=f"{CONTAINER_VFIO_DIR}/{node}",
                        host_path=str(self._vfio_dir / node),
                        permissions="rw",
                    )
                )
        return pb.ContainerAllocateResponse(envs={self._env_name: ",".join(ids)}, devices=specs)

    def _preferred(self, request: pb.PreferredAllocationRequest) -> pb.PreferredAllocationResponse:
        views = {d.pci: d for d in self._devices()}
        return pb.PreferredAllocationResponse(
            container_responses=[
                pb.ContainerPreferredAllocationResponse(
                    deviceIDs=preferred_allocation(
                        views,
                        available=list(creq.available_deviceIDs),
                        must_include=list(creq.must_include_deviceIDs),
                        size=creq.allocation_size,
                    )
                )
                for creq in request.container_requests
            ]
        )


_OPTIONS: Final = pb.DevicePluginOptions(
    pre_start_required=False, get_preferred_allocation_available=True
)


def _to_device(view: DeviceView) -> pb.Device:
    topology = (
        pb.TopologyInfo(nodes=[pb.NUMANode(ID=view.numa_node)]) if view.numa_node >= 0 else None
    )
    return pb.Device(ID=view.pci, health=HEALTHY if view.healthy else UNHEALTHY, topology=topology)


class _Servicer:
    """The DevicePlugin service as grpc calls it; the bodies live in PoolDevicePlugin."""

    def __init__(self, plugin: PoolDevicePlugin, epoch: int) -> None:
        self._plugin = plugin
        self._epoch = epoch

    def GetDevicePluginOptions(self, request: pb.Empty, context: Any) -> pb.DevicePluginOptions:
        return _OPTIONS

    def ListAndWatch(self, request: pb.Empty, context: Any) -> Iterator[pb.ListAndWatchResponse]:
        return self._plugin._list_and_watch(context, self._epoch)

    def GetPreferredAllocation(
        self, request: pb.PreferredAllocationRequest, context: Any
    ) -> pb.PreferredAllocationResponse:
        return self._plugin._preferred(request)

    def Allocate(self, request: pb.AllocateRequest, context: Any) -> pb.AllocateResponse:
        return self._plugin._allocate(request, context)

    def PreStartContainer(
        self, request: pb.PreStartContainerRequest, context: Any
    ) -> pb.PreStartContainerResponse:
        return pb.PreStartContainerResponse()
