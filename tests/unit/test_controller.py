"""The controller against the API stand-in through the real `kubernetes` client: Lease-based
leader election between replicas, and VFPool status from node states written the way a node
agent writes them (create with spec.nodeName and an ownerReference to the Node, then the
status subresource). Waits are generous bounds, never the measured quantity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from nad_controller.api import Conflict
from nad_controller.controller import Controller, Settings
from nad_controller.k8s import ClusterApi
from nad_controller.leader import ElectionTiming, LeaseElector
from tests.k8s_standin import ApiStandin

G, V = "plexus.dev", "v1alpha1"
NS = "plexus-system"
FAST = ElectionTiming(lease_duration=2.0, renew_deadline=1.5, retry_period=0.2)
UNHEALTHY = "PF ens1f0 has no link"


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def replica(
    kube: client.ApiClient, identity: str, timing: ElectionTiming = FAST, **kw: Any
) -> Controller:
    settings = Settings(namespace=NS, identity=identity, timing=timing, debounce=0.05,
                        resync=1.0, **kw)  # fmt: skip
    return Controller(ClusterApi(kube), settings)


@pytest.fixture
def controllers(kube: client.ApiClient) -> Iterator[list[Controller]]:
    running: list[Controller] = []
    yield running
    for c in running:
        c.stop()


def holder(standin: ApiStandin) -> str | None:
    lease = standin.get("Lease", NS, "plexus-controller")
    return None if lease is None else lease["spec"].get("holderIdentity")


# --- the node agent's side ---------------------------------------------------------------------


def vfs(n: int, unhealthy: int = 0) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        bad = i < unhealthy
        out.append({"pci": f"0000:3b:02.{i}", "pf": "0000:3b:00.0", "index": i,
                    "netdev": f"ens1f0v{i}", "pool": "plexus.dev/fast",
                    "state": "unhealthy" if bad else ("attached" if i == n - 1 else "free"),
                    "healthy": not bad, "reason": UNHEALTHY if bad else "",
                    "pod": "default/web" if i == n - 1 and not bad else ""})  # fmt: skip
    return out


class NodeAgent:
    """Writes one node's VFPoolNodeState as plexusd does."""

    def __init__(self, standin: ApiStandin, kube: client.ApiClient, node: str) -> None:
        self.node = node
        self.custom = client.CustomObjectsApi(kube)
        made = standin.get("Node", None, node) or standin.create(
            {"apiVersion": "v1", "kind": "Node",
             "metadata": {"name": node, "labels": {"plexus.dev/sriov": "true"}}})  # fmt: skip
        owner = {"apiVersion": "v1", "kind": "Node", "name": node, "uid": made["metadata"]["uid"]}
        body = {"apiVersion": f"{G}/{V}", "kind": "VFPoolNodeState",
                "metadata": {"name": node, "ownerReferences": [owner]},
                "spec": {"nodeName": node}}  # fmt: skip
        self.custom.create_cluster_custom_object(G, V, "vfpoolnodestates", body)

    def report(self, total: int = 4, unhealthy: int = 0) -> None:
        status = {"pfs": [{"pci": "0000:3b:00.0", "name": "ens1f0", "numVfs": total,
                           "totalVfs": 64, "linkUp": unhealthy == 0}],
                  "vfs": vfs(total, unhealthy),
                  "pools": [{"name": "fast", "resourceName": "plexus.dev/fast", "generation": 1}],
                  "problems": [],
                  "updated": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}  # fmt: skip
        self.custom.patch_cluster_custom_object_status(
            G, V, "vfpoolnodestates", self.node, {"status": status},
            _content_type="application/merge-patch+json",
        )  # fmt: skip


def create_pool(kube: client.ApiClient) -> None:
    body = {"apiVersion": f"{G}/{V}", "kind": "VFPool", "metadata": {"name": "fast"},
            "spec": {"resourceName": "plexus.dev/fast", "nicSelector": {"pfNames": ["ens1f0"]},
                     "nodeSelector": {"matchLabels": {"plexus.dev/sriov": "true"}}}}  # fmt: skip
    client.CustomObjectsApi(kube).create_cluster_custom_object(G, V, "vfpools", body)


def pool_status(standin: ApiStandin) -> dict[str, Any]:
    return (standin.get("VFPool", None, "fast") or {}).get("status") or {}


def condition(standin: ApiStandin, kind: str) -> dict[str, Any]:
    found = pool_status(standin).get("conditions") or []
    return next((c for c in found if c["type"] == kind), {})


def three_nodes(standin: ApiStandin, kube: client.ApiClient) -> list[NodeAgent]:
    agents = [NodeAgent(standin, kube, f"node-{i}") for i in (1, 2, 3)]
    for agent in agents:
        agent.report()
    return agents


# --- leader election -------------------------------------------------------------------------


def test_exactly_one_of_two_replicas_leads(
    standin: ApiStandin, kube: client.ApiClient, controllers: list[Controller]
) -> None:
    controllers += [replica(kube, "ctl-a"), replica(kube, "ctl-b")]
    for c in controllers:
        c.start()
    assert wait_until(lambda: any(c.is_leader for c in controllers))
    leaders = [c for c in controllers if c.is_leader]
    assert [c.settings.identity for c in leaders] == [holder(standin)]
    lease = standin.get("Lease", NS, "plexus-controller")
    assert lease and lease["spec"]["leaseDurationSeconds"] == 2
    assert lease["spec"]["leaseTransitions"] == 0


def test_crashed_leader_is_replaced_after_the_lease_expires(
    standin: ApiStandin, kube: client.ApiClient, controllers: list[Controller]
) -> None:
    controllers += [replica(kube, "ctl-a"), replica(kube, "ctl-b")]
    controllers[0].start()
    assert wait_until(lambda: holder(standin) == "ctl-a")
    controllers[1].start()
    first = standin.get("Lease", NS, "plexus-controller")
    controllers[0].stop(release=False)  # as a crash: no release, renewals stop
    assert wait_until(lambda: controllers[1].is_leader)
    lease = standin.get("Lease", NS, "plexus-controller")
    assert lease and first
    assert lease["spec"]["holderIdentity"] == "ctl-b"
    assert lease["spec"]["leaseTransitions"] == first["spec"]["leaseTransitions"] + 1


def test_clean_shutdown_hands_over_without_waiting_for_expiry(
    standin: ApiStandin, kube: client.ApiClient, controllers: list[Controller]
) -> None:
    # A lease of 60 s: without the release the follower could not lead within the wait.
    slow = ElectionTiming(lease_duration=60.0, renew_deadline=30.0, retry_period=0.2)
    controllers += [replica(kube, "ctl-a", slow), replica(kube, "ctl-b", slow)]
    controllers[0].start()
    assert wait_until(lambda: holder(standin) == "ctl-a")
    controllers[1].start()
    controllers[0].stop(release=True)
    assert not controllers[0].is_leader
    assert wait_until(lambda: holder(standin) == "ctl-b", timeout=10.0)


class RacingLeases:
    """A LeaseApi where another replica writes between our read and our write."""

    def __init__(self, api: ClusterApi, standin: ApiStandin) -> None:
        self.api, self.standin = api, standin

    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.api.get_lease(namespace, name)

    def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.api.create_lease(namespace, body)

    def replace_lease(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        current = self.standin.get("Lease", namespace, name)
        assert current is not None
        current["spec"]["holderIdentity"] = "usurper"
        self.standin.update(current)  # the other replica's write lands first
        return self.api.replace_lease(namespace, name, body)


def test_stale_holder_renewal_fails_with_409(standin: ApiStandin, kube: client.ApiClient) -> None:
    api = ClusterApi(kube)
    calls: list[str] = []
    elector = LeaseElector(api, NS, "plexus-controller", "ctl-a", timing=FAST,
                           on_started=lambda: calls.append("start"),
                           on_stopped=lambda: calls.append("stop"))  # fmt: skip
    assert elector._try_acquire_or_renew()  # creates the Lease: ours
    stale = api.get_lease(NS, "plexus-controller")
    assert stale is not None
    assert elector._try_acquire_or_renew()  # a renewal moves resourceVersion on
    with pytest.raises(Conflict):
        api.replace_lease(NS, "plexus-controller", stale)
    racing = LeaseElector(RacingLeases(api, standin), NS, "plexus-controller", "ctl-a",
                          timing=FAST, on_started=lambda: None, on_stopped=lambda: None)  # fmt: skip
    assert not racing._try_acquire_or_renew()  # its renewal hits 409: not leader
    assert holder(standin) == "usurper"


def test_timing_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="retry-period < renew-deadline < lease-duration"):
        ElectionTiming(lease_duration=10, renew_deadline=10, retry_period=2)


# --- VFPool status ---------------------------------------------------------------------------


def test_pool_status_from_three_nodes_then_unhealthy_then_node_state_gone(
    standin: ApiStandin, kube: client.ApiClient, controllers: list[Controller]
) -> None:
    controllers.append(replica(kube, "ctl-a"))
    create_pool(kube)
    agents = three_nodes(standin, kube)
    controllers[0].start()
    assert wait_until(lambda: len(pool_status(standin).get("nodes") or []) == 3)
    status = pool_status(standin)
    assert status["nodes"][0] == {"node": "node-1", "total": 4, "healthy": 4, "free": 3,
                                  "inUse": 1, "unhealthy": 0}  # fmt: skip
    assert status["observedGeneration"] == 1
    assert condition(standin, "Ready")["status"] == "True"
    assert condition(standin, "Degraded")["reason"] == "AllHealthy"

    agents[2].report(unhealthy=2)
    assert wait_until(lambda: condition(standin, "Degraded").get("status") == "True")
    degraded = condition(standin, "Degraded")
    assert degraded["reason"] == "VFsUnhealthy"
    assert degraded["message"] == f"node-3: 2 VFs unhealthy: {UNHEALTHY}"
    warnings = [e for e in standin.events() if e["reason"] == "VFsUnhealthy"]
    assert len(warnings) == 1
    assert warnings[0]["type"] == "Warning"
    assert warnings[0]["involvedObject"]["kind"] == "VFPool"
    assert warnings[0]["message"] == degraded["message"]

    # The node state goes (its Node is deleted: the garbage collector takes the state).
    client.CoreV1Api(kube).delete_node("node-3")
    assert wait_until(
        lambda: [r["node"] for r in pool_status(standin)["nodes"]] == ["node-1", "node-2"]
    )
    assert wait_until(lambda: condition(standin, "Degraded").get("status") == "False")

    # A state object deleted while its Node stays: the row leaves, the node is missing.
    client.CustomObjectsApi(kube).delete_cluster_custom_object(G, V, "vfpoolnodestates", "node-2")
    assert wait_until(lambda: condition(standin, "Degraded").get("reason") == "NodeStateMissing")
    assert [r["node"] for r in pool_status(standin)["nodes"]] == ["node-1"]
    assert condition(standin, "Degraded")["message"].startswith("node-2: selected but has no")


def test_status_is_written_only_when_it_changes(
    standin: ApiStandin, kube: client.ApiClient, controllers: list[Controller]
) -> None:
    controllers.append(replica(kube, "ctl-a"))
    create_pool(kube)
    three_nodes(standin, kube)
    controllers[0].start()
    assert wait_until(lambda: len(pool_status(standin).get("nodes") or []) == 3)
    reconciler = controllers[0].reconciler
    assert wait_until(lambda: reconciler.writes == 1)
    rv = (standin.get("VFPool", None, "fast") or {})["metadata"]["resourceVersion"]
    reconciler.reconcile_all()  # a resync with nothing new
    reconciler.reconcile_all()
    assert reconciler.writes == 1
    assert (standin.get("VFPool", None, "fast") or {})["metadata"]["resourceVersion"] == rv


def test_restart_and_leader_change_lose_nothing(
    standin: ApiStandin, kube: client.ApiClient, controllers: list[Controller]
) -> None:
    controllers.append(replica(kube, "ctl-a"))
    create_pool(kube)
    agents = three_nodes(standin, kube)
    agents[0].report(unhealthy=1)
    controllers[0].start()
    assert wait_until(lambda: condition(standin, "Degraded").get("status") == "True")
    before = pool_status(standin)
    controllers[0].stop()
    # While no controller runs: node-1 recovers.
    agents[0].report(unhealthy=0)
    controllers.append(replica(kube, "ctl-b"))
    controllers[1].start()
    assert wait_until(lambda: condition(standin, "Degraded").get("status") == "False")
    after = pool_status(standin)
    assert after["nodes"][0]["healthy"] == 4
    ready_before = next(c for c in before["conditions"] if c["type"] == "Ready")
    ready_after = next(c for c in after["conditions"] if c["type"] == "Ready")
    assert ready_after["lastTransitionTime"] == ready_before["lastTransitionTime"]
    # A third start with nothing changed writes nothing.
    controllers[1].stop()
    controllers.append(replica(kube, "ctl-c"))
    controllers[2].start()
    assert wait_until(lambda: controllers[2].is_leader)
    assert wait_until(lambda: controllers[2].informers.wait_synced(0))
    controllers[2].reconciler.reconcile_all()
    assert controllers[2].reconciler.writes == 0
    assert pool_status(standin) == after


def test_only_the_leader_writes(
    standin: ApiStandin, kube: client.ApiClient, controllers: list[Controller]
) -> None:
    controllers += [replica(kube, "ctl-a"), replica(kube, "ctl-b")]
    create_pool(kube)
    agents = three_nodes(standin, kube)
    for c in controllers:
        c.start()
    assert wait_until(lambda: condition(standin, "Ready").get("status") == "True")
    agents[1].report(unhealthy=1)
    assert wait_until(lambda: condition(standin, "Degraded").get("status") == "True")
    leader = next(c for c in controllers if c.is_leader)
    follower = next(c for c in controllers if not c.is_leader)
    # The counter moves once the write has returned, after the stand-in already serves it.
    assert wait_until(lambda: leader.reconciler.writes >= 2)
    assert follower.reconciler.writes == 0


def test_watch_expiry_relists(
    standin: ApiStandin, kube: client.ApiClient, controllers: list[Controller]
) -> None:
    controllers.append(replica(kube, "ctl-a"))
    create_pool(kube)
    agents = three_nodes(standin, kube)
    controllers[0].start()
    assert wait_until(lambda: condition(standin, "Ready").get("status") == "True")
    standin.compact()
    standin.close_watches()  # re-watch from a compacted version: 410, list again
    agents[2].report(unhealthy=1)
    assert wait_until(lambda: condition(standin, "Degraded").get("status") == "True")


# --- the console script ------------------------------------------------------------------------


def test_cli_run_leads_writes_and_releases_on_sigterm(standin: ApiStandin, kube: client.ApiClient,
                                                      tmp_path: Path) -> None:  # fmt: skip
    create_pool(kube)
    three_nodes(standin, kube)
    config = standin.kubeconfig(tmp_path / "kubeconfig")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nad_controller.cli", "run", "--kubeconfig", config,
         "--identity", "ctl-cli", "--lease-duration", "4", "--renew-deadline", "3",
         "--retry-period", "0.5", "--metrics-address", ""],  # no port on this host
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert wait_until(lambda: condition(standin, "Ready").get("status") == "True", 30)
        assert holder(standin) == "ctl-cli"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert holder(standin) == ""  # released
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    events = {line["event"] for line in lines}
    assert {"leadership_acquired", "vfpool_status_written", "lease_released"} <= events
    assert all(line["identity"] == "ctl-cli" for line in lines)


def test_an_unreadable_node_state_is_left_out_not_fatal(
    standin: ApiStandin, kube: client.ApiClient, controllers: list[Controller]
) -> None:
    controllers.append(replica(kube, "ctl-a"))
    create_pool(kube)
    three_nodes(standin, kube)
    broken = standin.get("VFPoolNodeState", None, "node-2")
    assert broken is not None
    broken["status"]["vfs"] = [{"index": "not a number"}]  # what no agent of ours writes
    standin.update(broken)
    controllers[0].start()
    assert wait_until(lambda: condition(standin, "Degraded").get("reason") == "NodeProblem")
    assert condition(standin, "Degraded")["message"] == (
        "node-2: VFPoolNodeState unreadable: status.vfs.0.pci: Field required"
    )
    assert [r["node"] for r in pool_status(standin)["nodes"]] == ["node-1", "node-3"]
    assert condition(standin, "Ready")["status"] == "True"
