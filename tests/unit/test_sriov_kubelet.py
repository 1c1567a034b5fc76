"""The kubelet integration of SR-IOV pools, against the kubelet stand-in over real unix sockets:
device-plugin registration, ListAndWatch health, Allocate, GetPreferredAllocation, kubelet
restarts, and the PodResources client with its List fallback and errors."""

from __future__ import annotations

import random
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from cnispec.errors import DeviceNotFound, InvalidConfig, TryAgainLater
from sriov.deviceplugin import DeviceView, PoolDevicePlugin, socket_name
from sriov.podresources import PodResourcesClient
from sriov.preference import preferred_allocation
from tests.support.kubelet import KubeletStandin, wait_until

RESOURCE = "plexus.dev/intel_vf"
ENV = "PCIDEVICE_PLEXUS_DEV_INTEL_VF"
VF1, VF2 = "0000:03:02.0", "0000:03:02.1"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer than that.
    path = Path(tempfile.mkdtemp(prefix="pxk", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def kubelet(short_dir: Path) -> Iterator[KubeletStandin]:
    with KubeletStandin(short_dir / "dp", short_dir / "pr") as standin:
        yield standin


class Pool:
    """The agent's side: a mutable list of VFs the plugin reads on every call."""

    def __init__(self, *views: DeviceView) -> None:
        self.views = list(views)

    def __call__(self) -> list[DeviceView]:
        return list(self.views)


PluginFactory = Callable[..., PoolDevicePlugin]


@pytest.fixture
def make_plugin(short_dir: Path) -> Iterator[PluginFactory]:
    plugins: list[PoolDevicePlugin] = []

    def make(pool: Pool, *, device_type: str = "netdevice", start: bool = True) -> PoolDevicePlugin:
        plugin = PoolDevicePlugin(
            resource_name=RESOURCE,
            plugin_dir=short_dir / "dp",
            devices=pool,
            env_name=ENV,
            device_type=device_type,  # type: ignore[arg-type]
            vfio_dir=short_dir / "vfio",
        )
        plugins.append(plugin)
        if start:
            plugin.start()
        return plugin

    yield make
    for plugin in plugins:
        plugin.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith(("dp-", "deviceplugin-"))]


def vf(pci: str, *, pf: str = "0000:03:00.0", numa: int = 0, healthy: bool = True) -> DeviceView:
    return DeviceView(pci=pci, healthy=healthy, numa_node=numa, pf_pci=pf)


def health(kubelet: KubeletStandin) -> dict[str, str]:
    return {pci: d.health for pci, d in kubelet.devices.get(RESOURCE, {}).items()}


# --- registration and ListAndWatch -------------------------------------------------------------


def test_registers_with_kubelet_and_streams_devices(kubelet, make_plugin):
    plugin = make_plugin(Pool(vf(VF1, numa=1), vf(VF2, numa=-1)))

    assert kubelet.wait_for(lambda k: len(k.devices.get(RESOURCE, {})) == 2)
    [reg] = kubelet.registrations
    assert (reg.version, reg.resource_name) == ("v1beta1", RESOURCE)
    assert reg.endpoint == "plexus-plexus.dev_intel_vf.sock" == socket_name(RESOURCE)
    assert reg.options.get_preferred_allocation_available
    assert (kubelet.plugin_dir / reg.endpoint).is_socket()
    assert plugin.registered
    seen = kubelet.devices[RESOURCE]
    assert seen[VF1].health == "Healthy" and seen[VF1].numa == (1,)
    assert seen[VF2].numa == ()  # NUMA unknown: no topology, so no NUMA preference in kubelet
    options = kubelet.options(RESOURCE)
    assert options.get_preferred_allocation_available and not options.pre_start_required


def test_unhealthy_vf_reaches_kubelet_within_a_second(kubelet, make_plugin):
    pool = Pool(vf(VF1), vf(VF2))
    plugin = make_plugin(pool)
    assert kubelet.wait_for(lambda k: health(k) == {VF1: "Healthy", VF2: "Healthy"})

    pool.views[1] = vf(VF2, healthy=False)
    started = time.monotonic()
    plugin.notify()
    assert kubelet.wait_for(lambda k: health(k).get(VF2) == "Unhealthy", timeout=1.0)
    assert time.monotonic() - started < 1.0

    del pool.views[1]  # the VF left sysfs altogether
    plugin.notify()
    assert kubelet.wait_for(lambda k: health(k) == {VF1: "Healthy"}, timeout=1.0)


class FailingOnce(Pool):
    """A device list that cannot be read once (the pool left the pools file meanwhile)."""

    failed = False

    def __call__(self) -> list[DeviceView]:
        if not self.failed and len(self.views) > 1:
            self.failed = True
            raise DeviceNotFound("no VF pool named plexus.dev/intel_vf on this node")
        return super().__call__()


def test_a_stream_that_fails_registers_again(kubelet, make_plugin):
    # kubelet never dials a finished ListAndWatch again; it waits for a new Register.
    pool = FailingOnce(vf(VF1))
    plugin = make_plugin(pool)
    assert kubelet.wait_for(lambda k: health(k) == {VF1: "Healthy"})
    pool.views.append(vf(VF2))
    plugin.notify()  # this list fails: the stream ends
    assert kubelet.wait_for(lambda k: k.registered(RESOURCE) == 2, timeout=5.0)
    assert kubelet.wait_for(lambda k: health(k) == {VF1: "Healthy", VF2: "Healthy"})


def test_registration_is_retried_until_kubelet_appears(short_dir, make_plugin):
    (short_dir / "dp").mkdir()
    plugin = make_plugin(Pool(vf(VF1)))  # no kubelet: must neither raise nor register
    assert not plugin.registered
    assert (short_dir / "dp" / socket_name(RESOURCE)).is_socket()

    with KubeletStandin(short_dir / "dp", short_dir / "pr") as kubelet:
        assert kubelet.wait_for(lambda k: health(k) == {VF1: "Healthy"}, timeout=3.0)
        # kubelet dials back while Register is still in flight: the plugin learns a moment later
        assert wait_until(lambda: plugin.registered, timeout=1.0)


def test_kubelet_restart_reregisters_and_stream_resumes(kubelet, make_plugin):
    pool = Pool(vf(VF1), vf(VF2))
    plugin = make_plugin(pool)
    assert kubelet.wait_for(lambda k: len(health(k)) == 2)
    sock = kubelet.plugin_dir / socket_name(RESOURCE)

    kubelet.restart()  # removes our socket and forgets our devices
    assert kubelet.wait_for(lambda k: k.registered(RESOURCE) == 2 and len(health(k)) == 2, 5.0)
    assert sock.is_socket()

    pool.views[0] = vf(VF1, healthy=False)
    plugin.notify()
    assert kubelet.wait_for(lambda k: health(k).get(VF1) == "Unhealthy", timeout=1.0)
    assert kubelet.allocate(RESOURCE, [VF2]).container_responses[0].envs[ENV] == VF2


def test_stop_removes_socket_and_ends_kubelet_stream(kubelet, make_plugin):
    plugin = make_plugin(Pool(vf(VF1)))
    assert kubelet.wait_for(lambda k: len(health(k)) == 1)
    consumer = kubelet._endpoint(RESOURCE).thread
    plugin.stop()
    assert not (kubelet.plugin_dir / socket_name(RESOURCE)).exists()
    assert consumer is not None
    consumer.join(timeout=5)
    assert not consumer.is_alive()


def test_socket_path_too_long_is_invalid_config(short_dir):
    with pytest.raises(InvalidConfig, match="107 bytes"):
        PoolDevicePlugin(
            resource_name="plexus.dev/" + "x" * 120,
            plugin_dir=short_dir,
            devices=Pool(),
            env_name=ENV,
            device_type="netdevice",
        )


# --- Allocate ------------------------------------------------------------------------------------


def test_allocate_sets_pci_env_per_container(kubelet, make_plugin):
    make_plugin(Pool(vf(VF1), vf(VF2)))
    assert kubelet.wait_for(lambda k: len(health(k)) == 2)

    reply = kubelet.allocate(RESOURCE, [VF2, VF1], [VF1])

    first, second = reply.container_responses
    assert dict(first.envs) == {ENV: f"{VF2},{VF1}"}
    assert dict(second.envs) == {ENV: VF1}
    assert not first.devices and not first.mounts


def test_allocate_vfio_gives_vfio_device_nodes(kubelet, make_plugin, short_dir):
    views = [
        DeviceView(VF1, True, 0, "0000:03:00.0", iommu_group="41"),
        DeviceView(VF2, True, 0, "0000:03:00.0", iommu_group="42"),
    ]
    make_plugin(Pool(*views), device_type="vfio-pci")
    assert kubelet.wait_for(lambda k: len(health(k)) == 2)

    [resp] = kubelet.allocate(RESOURCE, [VF1, VF2]).container_responses

    specs = [(d.container_path, d.host_path, d.permissions) for d in resp.devices]
    vfio = short_dir / "vfio"
    assert specs == [
        ("/dev/vfio/vfio", str(vfio / "vfio"), "rw"),
        ("/dev/vfio/41", str(vfio / "41"), "rw"),
        ("/dev/vfio/42", str(vfio / "42"), "rw"),
    ]
    assert resp.envs[ENV] == f"{VF1},{VF2}"


REFUSALS = {
    "unknown": (Pool(vf(VF1)), "netdevice", grpc.StatusCode.INVALID_ARGUMENT, "is not a VF of"),
    "unhealthy": (
        Pool(vf(VF1), vf(VF2, healthy=False)),
        "netdevice",
        grpc.StatusCode.FAILED_PRECONDITION,
        "unhealthy",
    ),
    "vfio-no-group": (
        Pool(vf(VF1), vf(VF2)),
        "vfio-pci",
        grpc.StatusCode.FAILED_PRECONDITION,
        "no IOMMU group",
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_allocate_refuses_with_a_clear_status(kubelet, make_plugin, case):
    pool, device_type, code, text = REFUSALS[case]
    make_plugin(pool, device_type=device_type)
    assert kubelet.wait_for(lambda k: len(health(k)) == len(pool.views))

    with pytest.raises(grpc.RpcError) as err:
        kubelet.allocate(RESOURCE, [VF2])

    assert err.value.code() == code
    assert VF2 in err.value.details() and text in err.value.details()


# --- GetPreferredAllocation ----------------------------------------------------------------------

PF_A, PF_B, PF_C = "0000:03:00.0", "0000:04:00.0", "0000:81:00.0"
TOPOLOGY = [
    vf("0000:03:02.0", pf=PF_A, numa=0),
    vf("0000:03:02.1", pf=PF_A, numa=0),
    vf("0000:04:02.0", pf=PF_B, numa=1),
    vf("0000:04:02.1", pf=PF_B, numa=1),
    vf("0000:04:02.2", pf=PF_B, numa=1),
    vf("0000:81:02.0", pf=PF_C, numa=0),
    vf("0000:81:02.1", pf=PF_C, numa=0),
]
ALL = [v.pci for v in TOPOLOGY]


def test_preferred_allocation_through_kubelet_keeps_one_pf(kubelet, make_plugin):
    make_plugin(Pool(*TOPOLOGY))
    assert kubelet.wait_for(lambda k: len(health(k)) == len(TOPOLOGY))

    # Nothing imposed: the PF with the most free VFs, so both VFs share it.
    assert kubelet.preferred(RESOURCE, ALL, [], 2) == ["0000:04:02.0", "0000:04:02.1"]


@pytest.mark.parametrize(
    ("must", "size", "expected"),
    [
        # must_include first, then the rest of its PF, then a PF on the same NUMA node (C, not
        # the bigger B on NUMA 1).
        (["0000:03:02.1"], 4, ["0000:03:02.1", "0000:03:02.0", "0000:81:02.0", "0000:81:02.1"]),
        # more than one PF: the biggest first, then the lowest PCI address among equals
        ([], 4, ["0000:04:02.0", "0000:04:02.1", "0000:04:02.2", "0000:03:02.0"]),
        ([], 1, ["0000:04:02.0"]),
    ],
)
def test_preferred_allocation_pf_then_numa(must, size, expected):
    views = {v.pci: v for v in TOPOLOGY}
    shuffled = ALL[:]
    random.Random(7).shuffle(shuffled)
    assert preferred_allocation(views, available=ALL, must_include=must, size=size) == expected
    # deterministic: kubelet's order of the available ids does not change the answer
    assert preferred_allocation(views, available=shuffled, must_include=must, size=size) == expected


def test_preferred_allocation_puts_unknown_ids_last():
    views = {v.pci: v for v in TOPOLOGY[:2]}
    got = preferred_allocation(views, available=["0000:99:00.1", *ALL[:2]], must_include=[], size=3)
    assert got == [*ALL[:2], "0000:99:00.1"]


# --- PodResources --------------------------------------------------------------------------------


@pytest.fixture
def client(kubelet) -> Iterator[PodResourcesClient]:
    with PodResourcesClient(kubelet.pod_resources_socket, timeout=2.0) as c:
        yield c


def test_podresources_get_returns_pod_devices(kubelet, client):
    kubelet.set_pod("ns1", "pod-a", {RESOURCE: [VF2, VF1, VF2], "other.io/x": ["x0"]})
    kubelet.set_pod("ns1", "pod-b", {RESOURCE: ["0000:09:00.1"]})

    assert client.devices("ns1", "pod-a") == {RESOURCE: [VF2, VF1], "other.io/x": ["x0"]}
    assert kubelet.calls == {"Get": 1}


def test_podresources_allocated_is_every_pods_devices(kubelet, client):
    kubelet.set_pod("default", "dpdk", {"plexus.dev/intel_dpdk": [VF1]})
    kubelet.set_pod("web", "frontend", {RESOURCE: [VF2]})
    kubelet.set_pod("web", "idle", {})
    assert client.allocated() == {VF1, VF2}


def test_podresources_pod_without_devices_is_empty(kubelet, client):
    kubelet.set_pod("ns1", "plain", {})
    assert client.devices("ns1", "plain") == {}


@pytest.mark.parametrize("mode", ["unimplemented", "disabled"])
def test_podresources_falls_back_to_list_when_get_is_unusable(kubelet, client, mode):
    kubelet.get_mode = mode
    kubelet.set_pod("ns1", "pod-a", {RESOURCE: [VF1]})
    kubelet.set_pod("ns2", "pod-a", {RESOURCE: [VF2]})

    assert client.devices("ns2", "pod-a") == {RESOURCE: [VF2]}
    assert kubelet.calls == {"Get": 1, "List": 1}


@pytest.mark.parametrize("mode", ["ok", "unimplemented"])
def test_podresources_unknown_pod_is_try_again_later(kubelet, client, mode):
    kubelet.get_mode = mode
    with pytest.raises(TryAgainLater, match="does not know pod ns1/ghost"):
        client.devices("ns1", "ghost")


def test_podresources_missing_socket_is_try_again_later(short_dir):
    sock = short_dir / "pr" / "kubelet.sock"
    with (
        PodResourcesClient(sock) as client,
        pytest.raises(TryAgainLater, match=f"{sock} does not exist"),
    ):
        client.devices("ns1", "pod-a")


def test_podresources_dead_kubelet_is_try_again_later(short_dir):
    sock = short_dir / "kubelet.sock"
    with socket.socket(socket.AF_UNIX) as s:  # a socket file nobody listens on
        s.bind(str(sock))
    started = time.monotonic()
    with (
        PodResourcesClient(sock, timeout=0.3) as client,
        pytest.raises(TryAgainLater, match=r"did not answer Get within 0\.3s"),
    ):
        client.devices("ns1", "pod-a")
    assert time.monotonic() - started < 3


def test_podresources_survives_kubelet_restart(kubelet, client):
    kubelet.set_pod("ns1", "pod-a", {RESOURCE: [VF1]})
    assert client.devices("ns1", "pod-a") == {RESOURCE: [VF1]}
    kubelet.restart()
    assert wait_until(kubelet.pod_resources_socket.is_socket)
    assert client.devices("ns1", "pod-a") == {RESOURCE: [VF1]}


def test_leftover_socket_of_a_crashed_plugin_is_replaced(kubelet, make_plugin):
    stale = kubelet.plugin_dir / socket_name(RESOURCE)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # what a SIGKILLed daemon leaves behind
    make_plugin(Pool(vf(VF1)))
    assert kubelet.wait_for(lambda k: health(k) == {VF1: "Healthy"})
