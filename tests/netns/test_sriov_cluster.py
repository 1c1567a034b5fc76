"""SR-IOV in cluster mode with a real plexusd: NADs and pods from the API stand-in, kubelet's side
from the kubelet stand-in (device-plugin registration, ListAndWatch, PodResources), VFs from the
synthetic bed. What kubelet and an app team see: the pool advertised with real health, the pod's
net1 being the VF kubelet granted it, that VF in the pod's network-status, and a clear error for
a pod that requested no device."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from metaplugin.client import get
from tests.netns.conftest import NETWORKS
from tests.netns.test_cluster_mode import STATUS, add, pod_object, wait_for
from tests.support.sriov_world import PF, SriovWorld, sriov_world

POOL = "plexus.dev/intel_vf"


class World(SriovWorld):
    def advertised(self) -> dict[str, str]:
        return {pci: d.health for pci, d in self.kubelet.devices.get(POOL, {}).items()}

    def vf_table(self) -> dict[str, dict[str, Any]]:
        status, body = get(self.bed.daemon.socket, "/v1/vfs")
        assert status == 200, body
        return {v["pci"]: v for v in json.loads(body)}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    pools = tmp_path / "vf-pools.yaml"
    pools.write_text(
        yaml.safe_dump({"pools": [{"resourceName": POOL, "selectors": {"rootDevices": [PF]}}]})
    )
    config = {"vfPools": str(pools)}
    with sriov_world(tmp_path, pool=POOL, subnet="10.56.219.0/24", config=config) as w:
        yield World(w.bed, w.api, w.kubelet, w.hw, w.vfs)


def test_the_pod_gets_the_vf_kubelet_granted(world: World) -> None:
    assert world.kubelet.wait_for(lambda k: k.registered(POOL) == 1, 10.0)
    assert world.kubelet.wait_for(lambda _: len(world.advertised()) == 4, 5.0)
    assert set(world.advertised().values()) == {"Healthy"}

    granted = world.vfs[2]  # not the first free one: the grant, not the pool, decides
    world.kubelet.set_pod("default", "web", {POOL: [granted]})
    created = world.api.create(pod_object("web", {NETWORKS: "sriov-net"}))
    pod = world.bed.pod("web")
    add(world.bed, "c1", pod.path, "web", created["metadata"]["uid"]).ok()

    assert "net1" in pod.links()
    row = world.vf_table()[granted]
    assert (row["state"], row["holder"]) == ("attached", "default/web (net1)")

    def status() -> list[dict[str, Any]] | None:
        obj = world.api.get("Pod", "default", "web") or {}
        raw = (obj.get("metadata", {}).get("annotations") or {}).get(STATUS)
        return json.loads(raw) if raw else None

    entry = next(e for e in wait_for(status) if e["name"] == "default/sriov-net")
    assert entry["device-info"]["pci"] == {"pci-address": granted, "pf-pci-address": PF}

    world.bed.runtime.delete("c1", pod.path).ok()
    assert world.vf_table()[granted]["state"] == "free"
    assert world.advertised()[granted] == "Healthy"


def test_a_pod_without_a_device_request_gets_a_clear_error(world: World) -> None:
    created = world.api.create(pod_object("greedy", {NETWORKS: "sriov-net"}))
    world.kubelet.set_pod("default", "greedy", {})  # kubelet knows it, granted nothing
    pod = world.bed.pod("greedy")
    out = add(world.bed, "c1", pod.path, "greedy", created["metadata"]["uid"])
    assert out.returncode == 1 and out.body["code"] == 111, out.body
    assert f"limits: {{{POOL}: 1}}" in out.body["msg"]
    assert set(pod.links()) == {"lo"}
    assert {v["state"] for v in world.vf_table().values()} == {"free"}
