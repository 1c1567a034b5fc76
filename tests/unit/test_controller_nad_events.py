"""The controller's Events on NADs, against the API stand-in through the real `kubernetes`
client: a NAD whose resourceName a VFPool provided gets a Warning `ResourceNotProvided` in its
own namespace once that VFPool is gone, once, and not for resources no VFPool ever provided."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from nad_controller.controller import Controller
from testbed.manifests import nad
from tests.k8s_standin import ApiStandin
from tests.unit.test_controller import (
    G,
    V,
    create_pool,
    pool_status,
    replica,
    three_nodes,
    wait_until,
)

RESOURCE = "k8s.v1.cni.cncf.io/resourceName"


@pytest.fixture
def controllers() -> Iterator[list[Controller]]:
    running: list[Controller] = []
    yield running
    for c in running:
        c.stop()


def sriov_nad(name: str, namespace: str, resource: str) -> dict[str, Any]:
    config = {"cniVersion": "1.0.0", "type": "sriov", "ipam": {"type": "static"}}
    return nad(name, config, namespace=namespace, annotations={RESOURCE: resource})


def not_provided(standin: ApiStandin) -> list[dict[str, Any]]:
    return [e for e in standin.events() if e["reason"] == "ResourceNotProvided"]


def test_a_nad_whose_vfpool_is_deleted_is_told_once(
    standin: ApiStandin, kube: client.ApiClient, controllers: list[Controller]
) -> None:
    made = standin.create(sriov_nad("fast-net", "team", "plexus.dev/fast"))
    standin.create(sriov_nad("other-net", "team", "intel.com/sriov_netdevice"))
    controllers.append(replica(kube, "ctl-a"))
    create_pool(kube)
    three_nodes(standin, kube)
    controllers[0].start()
    assert wait_until(lambda: len(pool_status(standin).get("nodes") or []) == 3)
    controllers[0].reconciler.reconcile_all()
    assert not_provided(standin) == []  # provided: nothing to say

    client.CustomObjectsApi(kube).delete_cluster_custom_object(G, V, "vfpools", "fast")
    events = wait_until(lambda: not_provided(standin))
    assert len(events) == 1
    event = events[0]
    assert event["type"] == "Warning" and event["metadata"]["namespace"] == "team"
    assert event["involvedObject"]["kind"] == "NetworkAttachmentDefinition"
    assert event["involvedObject"]["name"] == "fast-net"
    assert event["involvedObject"]["uid"] == made["metadata"]["uid"]
    assert "plexus.dev/fast is provided by no VFPool" in event["message"]

    # Resyncs do not repeat it; the device plugin's resource is never judged.
    controllers[0].reconciler.reconcile_all()
    controllers[0].reconciler.reconcile_all()
    assert [e["involvedObject"]["name"] for e in not_provided(standin)] == ["fast-net"]
    assert not_provided(standin)[0]["count"] == 1

    # Provided again, then gone again: news again (the same Event, counted).
    create_pool(kube)
    assert wait_until(lambda: pool_status(standin).get("nodes"))
    controllers[0].reconciler.reconcile_all()
    client.CustomObjectsApi(kube).delete_cluster_custom_object(G, V, "vfpools", "fast")
    assert wait_until(lambda: [e["count"] for e in not_provided(standin)] == [2])
