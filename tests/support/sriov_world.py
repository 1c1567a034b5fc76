"""The SR-IOV cluster-mode world two netns test files share: a real plexusd (tests.netns
make_bed) in cluster mode on the API stand-in served from the node's namespace, the kubelet
stand-in (device plugins, PodResources) and the synthetic SR-IOV sysfs with one PF of 4 VFs.
Everything is torn down even when the test or the set-up fails."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernel.netns import run_in_netns
from testbed.manifests import host_local, nad
from testbed.netns import Netns
from testbed.sriov_bed import SriovBed
from tests.k8s_standin import ApiStandin
from tests.netns.conftest import Bed, make_bed
from tests.netns.test_cluster_mode import NODE
from tests.support.kubelet import KubeletStandin

PF = "0000:03:00.0"


@dataclass
class SriovWorld:
    bed: Bed
    api: ApiStandin
    kubelet: KubeletStandin
    hw: SriovBed
    vfs: list[str]


@contextmanager
def sriov_world(
    tmp_path: Path,
    *,
    pool: str,
    subnet: str,
    seed: Callable[[ApiStandin], None] = lambda api: None,
    config: dict[str, Any] | None = None,
) -> Iterator[SriovWorld]:
    """`pool`: the resource the `sriov-net` NAD names; `seed(api)` adds objects of the test's
    own before plexusd starts; `config`: daemon config keys on top of cluster mode's."""
    sockets = Path(tempfile.mkdtemp(prefix="pxs", dir="/tmp"))  # unix paths <= 107 bytes
    kubelet = KubeletStandin(sockets / "dp", sockets / "pr").start()
    made: dict[str, Any] = {}

    def api_mode(node: Netns, nads: list[dict[str, Any]]) -> dict[str, Any]:
        hw = made["hw"] = SriovBed(tmp_path / "sys", node)
        made["vfs"] = hw.add_pf(PF, ifname="pxpf0", num_vfs=4)
        api = made["api"] = run_in_netns(node.path, lambda: ApiStandin().start())
        seed(api)
        sriov = {
            "cniVersion": "1.0.0",
            "name": "sriov-net",
            "type": "plexus-sriov",
            "ipam": host_local(subnet, tmp_path / "ipam"),
        }
        pooled = nad("sriov-net", sriov, annotations={"k8s.v1.cni.cncf.io/resourceName": pool})
        for obj in [*nads, pooled]:
            api.create(obj)
        return {
            "kubeconfig": api.kubeconfig(tmp_path / "kubeconfig"),
            "nodeName": NODE,
            "sysfsRoot": str(hw.root),
            "devicePluginDir": str(kubelet.plugin_dir),
            "podResourcesSocket": str(kubelet.pod_resources_socket),
            **(config or {}),
        }

    try:
        with make_bed(tmp_path, api_mode) as bed:
            yield SriovWorld(bed, made["api"], kubelet, made["hw"], made["vfs"])
    finally:
        if "api" in made:
            made["api"].stop()
        if "hw" in made:
            made["hw"].cleanup()
        kubelet.stop()
        shutil.rmtree(sockets, ignore_errors=True)
