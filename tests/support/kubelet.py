"""A kubelet stand-in at the gRPC level, for the device-plugin and PodResources tests.

It serves what kubelet serves, with the same generated protos Plexus uses:
Registration on `<plugin_dir>/kubelet.sock` and PodResourcesLister on
`<pod_resources_dir>/kubelet.sock`. Like kubelet, on Register it dials the plugin's endpoint,
asks for its options and consumes its ListAndWatch stream (latest list per resource, with a
condition to wait on); tests can call Allocate / GetPreferredAllocation through it, set the
devices PodResources reports per pod, make `Get` behave like an old kubelet, and `restart()` it
the way kubelet restarts (stop, delete every socket in plugin_dir, start again).
"""

from __future__ import annotations

import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc

from sriov.kubeletapi import deviceplugin_v1beta1_pb2 as dp
from sriov.kubeletapi import deviceplugin_v1beta1_pb2_grpc as dp_grpc
from sriov.kubeletapi import podresources_v1_pb2 as pr
from sriov.kubeletapi import podresources_v1_pb2_grpc as pr_grpc

# "ok": Get answers; "unimplemented": kubelet < 1.27 (no Get at all); "disabled": kubelet
# 1.27-1.33 with the KubeletPodResourcesGet gate off, which answers UNKNOWN.
GetMode = Literal["ok", "unimplemented", "disabled"]


@dataclass(frozen=True)
class SeenDevice:
    health: str
    numa: tuple[int, ...]


@dataclass
class _Endpoint:
    """kubelet's side of one registered plugin: a channel and the ListAndWatch consumer."""

    resource: str
    channel: Any
    stub: Any
    options: dp.DevicePluginOptions
    call: Any = None
    thread: threading.Thread | None = None

    def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.channel.close()


@dataclass
class KubeletStandin:
    plugin_dir: Path
    pod_resources_dir: Path
    get_mode: GetMode = "ok"
    registrations: list[dp.RegisterRequest] = field(default_factory=list)
    # resource -> device id -> what the latest ListAndWatch message said
    devices: dict[str, dict[str, SeenDevice]] = field(default_factory=dict)
    updates: dict[str, int] = field(default_factory=dict)  # ListAndWatch messages per resource
    calls: dict[str, int] = field(default_factory=dict)  # PodResources calls by method
    _pods: dict[tuple[str, str], dict[str, list[str]]] = field(default_factory=dict)
    _endpoints: dict[str, _Endpoint] = field(default_factory=dict)
    _servers: list[tuple[Any, ThreadPoolExecutor]] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def kubelet_socket(self) -> Path:
        return self.plugin_dir / "kubelet.sock"

    @property
    def pod_resources_socket(self) -> Path:
        return self.pod_resources_dir / "kubelet.sock"

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> KubeletStandin:
        self.plugin_dir.mkdir(parents=True, exist_ok=True)
        self.pod_resources_dir.mkdir(parents=True, exist_ok=True)
        registration = self._server()
        dp_grpc.add_RegistrationServicer_to_server(_Registration(self), registration)
        registration.add_insecure_port(f"unix:{self.kubelet_socket}")
        resources = self._server()
        pr_grpc.add_PodResourcesListerServicer_to_server(_PodResources(self), resources)
        resources.add_insecure_port(f"unix:{self.pod_resources_socket}")
        registration.start()
        resources.start()
        return self

    def _server(self) -> Any:
        executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kubelet-standin")
        server = grpc.server(executor)
        self._servers.append((server, executor))
        return server

    def stop(self) -> None:
        for server, executor in self._servers:
            server.stop(grace=None).wait()
            executor.shutdown(wait=True)
        self._servers.clear()
        with self._cond:
            endpoints = list(self._endpoints.values())
            self._endpoints.clear()
        for endpoint in endpoints:
            endpoint.close()
        for sock in (self.kubelet_socket, self.pod_resources_socket):
            sock.unlink(missing_ok=True)

    def restart(self) -> None:
        """What kubelet does when it restarts: forget every plugin and remove their sockets."""
        self.stop()
        for path in self.plugin_dir.iterdir():
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()
        with self._cond:
            self.devices.clear()
        self.start()

    def __enter__(self) -> KubeletStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what tests look at ---------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[KubeletStandin], bool], timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout=timeout)

    def registered(self, resource: str) -> int:
        return sum(1 for r in self.registrations if r.resource_name == resource)

    def set_pod(self, namespace: str, name: str, devices: Mapping[str, Sequence[str]]) -> None:
        with self._cond:
            self._pods[(namespace, name)] = {k: list(v) for k, v in devices.items()}

    def allocate(self, resource: str, *containers: Sequence[str]) -> dp.AllocateResponse:
        request = dp.AllocateRequest(
            container_requests=[dp.ContainerAllocateRequest(devices_ids=ids) for ids in containers]
        )
        response: dp.AllocateResponse = self._endpoint(resource).stub.Allocate(request, timeout=5)
        return response

    def preferred(
        self, resource: str, available: Sequence[str], must_include: Sequence[str], size: int
    ) -> list[str]:
        request = dp.PreferredAllocationRequest(
            container_requests=[
                dp.ContainerPreferredAllocationRequest(
                    available_deviceIDs=available,
                    must_include_deviceIDs=must_include,
                    allocation_size=size,
                )
            ]
        )
        reply = self._endpoint(resource).stub.GetPreferredAllocation(request, timeout=5)
        return list(reply.container_responses[0].deviceIDs)

    def options(self, resource: str) -> dp.DevicePluginOptions:
        return self._endpoint(resource).options

    # --- kubelet's side of a plugin -------------------------------------------------------------

    def _endpoint(self, resource: str) -> _Endpoint:
        with self._cond:
            return self._endpoints[resource]

    def _on_register(self, request: dp.RegisterRequest) -> None:
        channel = grpc.insecure_channel(f"unix:{self.plugin_dir / request.endpoint}")
        stub = dp_grpc.DevicePluginStub(channel)
        try:
            options = stub.GetDevicePluginOptions(dp.Empty(), timeout=5)
        except grpc.RpcError:
            channel.close()
            raise
        endpoint = _Endpoint(request.resource_name, channel, stub, options)
        endpoint.call = stub.ListAndWatch(dp.Empty())
        endpoint.thread = threading.Thread(target=self._consume, args=(endpoint,), daemon=True)
        with self._cond:
            old = self._endpoints.pop(request.resource_name, None)
            self._endpoints[request.resource_name] = endpoint
            self.registrations.append(request)
            self._cond.notify_all()
        if old is not None:
            old.close()
        endpoint.thread.start()

    def _consume(self, endpoint: _Endpoint) -> None:
        try:
            for reply in endpoint.call:
                seen = {
                    d.ID: SeenDevice(d.health, tuple(n.ID for n in d.topology.nodes))
                    for d in reply.devices
                }
                with self._cond:
                    self.devices[endpoint.resource] = seen
                    self.updates[endpoint.resource] = self.updates.get(endpoint.resource, 0) + 1
                    self._cond.notify_all()
        except grpc.RpcError:
            pass  # cancelled by close(), or the plugin went away: kubelet waits for Register

    def _pod(self, namespace: str, name: str) -> pr.PodResources | None:
        with self._cond:
            devices = self._pods.get((namespace, name))
        if devices is None:
            return None
        container = pr.ContainerResources(
            name="main",
            devices=[
                pr.ContainerDevices(resource_name=res, device_ids=ids)
                for res, ids in devices.items()
            ],
        )
        return pr.PodResources(name=name, namespace=namespace, containers=[container])

    def _count(self, method: str) -> None:
        with self._cond:
            self.calls[method] = self.calls.get(method, 0) + 1


class _Registration(dp_grpc.RegistrationServicer):
    def __init__(self, kubelet: KubeletStandin) -> None:
        self._kubelet = kubelet

    def Register(self, request: dp.RegisterRequest, context: Any) -> dp.Empty:
        if request.version != "v1beta1":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unsupported {request.version}")
        # kubelet dials the plugin asynchronously; doing it here keeps the test deterministic
        # and still exercises the plugin serving before it registers.
        self._kubelet._on_register(request)
        return dp.Empty()


class _PodResources(pr_grpc.PodResourcesListerServicer):
    def __init__(self, kubelet: KubeletStandin) -> None:
        self._kubelet = kubelet

    def Get(self, request: pr.GetPodResourcesRequest, context: Any) -> pr.GetPodResourcesResponse:
        self._kubelet._count("Get")
        mode = self._kubelet.get_mode
        if mode == "unimplemented":
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        if mode == "disabled":
            context.abort(grpc.StatusCode.UNKNOWN, "PodResources API Get method disabled")
        pod = self._kubelet._pod(request.pod_namespace, request.pod_name)
        if pod is None:  # kubelet answers an unknown pod with a plain error, i.e. UNKNOWN
            context.abort(
                grpc.StatusCode.UNKNOWN,
                f"pod {request.pod_name} in namespace {request.pod_namespace} not found",
            )
        return pr.GetPodResourcesResponse(pod_resources=pod)

    def List(
        self, request: pr.ListPodResourcesRequest, context: Any
    ) -> pr.ListPodResourcesResponse:
        self._kubelet._count("List")
        with self._kubelet._cond:
            keys = list(self._kubelet._pods)
        pods = [self._kubelet._pod(ns, name) for ns, name in keys]
        return pr.ListPodResourcesResponse(pod_resources=[p for p in pods if p is not None])

    def GetAllocatableResources(
        self, request: pr.AllocatableResourcesRequest, context: Any
    ) -> pr.AllocatableResourcesResponse:
        return pr.AllocatableResourcesResponse()


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()
