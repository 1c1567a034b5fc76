"""nad_controller.status (pure): rows, Ready / Degraded with messages a person acts on, and
lastTransitionTime kept while a condition holds; nad_controller.events' dedup and rate limit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from cnispec.vfpool_api import NodeStateStatus, VFPoolSpec, VFPoolStatus
from nad_controller.api import JSON
from nad_controller.events import EventRecorder
from nad_controller.status import NodeState, pool_status

NOW = datetime(2026, 12, 4, 6, 0, 0, tzinfo=UTC)
SPEC = VFPoolSpec.model_validate({
    "resourceName": "plexus.dev/fast", "nicSelector": {"pfNames": ["ens1f0"]},
    "nodeSelector": {"matchLabels": {"sriov": "yes"}},
})  # fmt: skip


def node(name: str, sriov: bool = True) -> JSON:
    return {"metadata": {"name": name, "labels": {"sriov": "yes"} if sriov else {}}}


def vf(i: int, *, healthy: bool = True, reason: str = "", state: str = "free") -> JSON:
    return {"pci": f"0000:3b:02.{i}", "pf": "0000:3b:00.0", "index": i, "pool": "plexus.dev/fast",
            "healthy": healthy, "reason": reason, "state": "unhealthy" if not healthy else state}  # fmt: skip


def state(name: str, vfs: list[JSON], *, updated: datetime = NOW, problems: tuple[str, ...] = (),
          serves: bool = True) -> NodeState:  # fmt: skip
    status = NodeStateStatus.model_validate({
        "vfs": vfs, "problems": list(problems),
        "pools": [{"name": "fast", "resourceName": "plexus.dev/fast", "generation": 1}] if serves else [],
        "updated": updated.strftime("%Y-%m-%dT%H:%M:%SZ"),
    })  # fmt: skip
    return NodeState.from_object({"metadata": {"name": name}, "spec": {"nodeName": name},
                                  "status": status.model_dump(by_alias=True)})  # fmt: skip


def compute(states: list[NodeState], nodes: list[JSON], previous: VFPoolStatus | None = None,
            now: datetime = NOW) -> VFPoolStatus:  # fmt: skip
    return pool_status(name="fast", generation=3, spec=SPEC, states=states, nodes=nodes,
                       previous=previous, now=now, stale_after=120)  # fmt: skip


def cond(status: VFPoolStatus, kind: str) -> Any:
    return next(c for c in status.conditions if c.type == kind)


def test_three_healthy_nodes_are_ready_with_a_row_each() -> None:
    states = [state(n, [vf(0), vf(1, state="attached")]) for n in ("node-1", "node-2", "node-3")]
    status = compute(states, [node("node-1"), node("node-2"), node("node-3")])
    assert [(r.node, r.total, r.healthy, r.free, r.in_use) for r in status.nodes] == [
        ("node-1", 2, 2, 1, 1), ("node-2", 2, 2, 1, 1), ("node-3", 2, 2, 1, 1)]  # fmt: skip
    assert status.observed_generation == 3
    ready, degraded = cond(status, "Ready"), cond(status, "Degraded")
    assert (ready.status, ready.reason) == ("True", "Serving")
    assert ready.message == "3 nodes, 6/6 VFs healthy, 3 free"
    assert (degraded.status, degraded.reason) == ("False", "AllHealthy")
    assert ready.observed_generation == 3


def test_unhealthy_vfs_are_grouped_by_reason_per_node() -> None:
    bad = [vf(0, healthy=False, reason="PF ens1f0 has no link"),
           vf(1, healthy=False, reason="PF ens1f0 has no link"),
           vf(2, healthy=False, reason="driver iavf unbound"), vf(3)]  # fmt: skip
    states = [state("node-1", [vf(0)]), state("node-3", bad)]
    status = compute(states, [node("node-1"), node("node-3")])
    degraded = cond(status, "Degraded")
    assert (degraded.status, degraded.reason) == ("True", "VFsUnhealthy")
    assert degraded.message == (
        "node-3: 2 VFs unhealthy: PF ens1f0 has no link; 1 VF unhealthy: driver iavf unbound"
    )
    assert cond(status, "Ready").status == "True"  # node-1 still serves
    assert status.nodes[1].unhealthy == 3


def test_no_node_selected() -> None:
    status = compute([], [node("node-1", sriov=False)])
    ready = cond(status, "Ready")
    assert (ready.status, ready.reason) == ("False", "NoNodesSelected")
    assert status.nodes == ()


def test_selected_node_without_state_is_missing() -> None:
    status = compute([state("node-1", [vf(0)])], [node("node-1"), node("node-2")])
    degraded = cond(status, "Degraded")
    assert (degraded.status, degraded.reason) == ("True", "NodeStateMissing")
    assert degraded.message.startswith("node-2: selected but has no VFPoolNodeState")
    assert [r.node for r in status.nodes] == ["node-1"]


def test_stale_node_state_names_the_time_it_stopped() -> None:
    old = NOW - timedelta(seconds=600)
    status = compute([state("node-1", [vf(0)], updated=old)], [node("node-1")])
    degraded = cond(status, "Degraded")
    assert (degraded.status, degraded.reason) == ("True", "NodeStateStale")
    assert "node-1: node state not updated since 2026-12-04T05:50:00Z" in degraded.message


def test_node_problem_naming_the_pool_and_a_node_that_does_not_serve_it() -> None:
    states = [
        state("node-1", [vf(0)], problems=("pool fast: resourceName clashes with pool slow",)),
        state("node-2", [], serves=False),
    ]
    status = compute(states, [node("node-1"), node("node-2")])
    degraded = cond(status, "Degraded")
    assert degraded.reason == "NodeProblem"
    assert degraded.message == ("node-1: pool fast: resourceName clashes with pool slow; "
                                "node-2: selected but does not serve this pool yet")  # fmt: skip


def test_no_healthy_vf_is_not_ready() -> None:
    status = compute([state("node-1", [vf(0, healthy=False, reason="x")])], [node("node-1")])
    assert (cond(status, "Ready").status, cond(status, "Ready").reason) == ("False", "NoHealthyVFs")


def test_last_transition_time_kept_while_status_holds() -> None:
    nodes = [node("node-1")]
    first = compute([state("node-1", [vf(0)])], nodes)
    later = NOW + timedelta(seconds=30)
    again = compute([state("node-1", [vf(0), vf(1)], updated=later)], nodes, first, later)
    assert cond(again, "Ready").last_transition_time == "2026-12-04T06:00:00Z"
    assert cond(again, "Ready").message != cond(first, "Ready").message
    broken = [vf(0, healthy=False, reason="x")]
    flipped = compute([state("node-1", broken, updated=later)], nodes, first, later)
    assert cond(flipped, "Degraded").last_transition_time == "2026-12-04T06:00:30Z"
    same = compute([state("node-1", [vf(0)])], nodes, first)
    assert same == first  # nothing changed: byte-identical, so nothing is written


class FakeWriter:
    def __init__(self) -> None:
        self.created: list[JSON] = []
        self.patched: list[tuple[str, JSON]] = []

    def patch_pool_status(self, name: str, status: JSON) -> JSON:
        return {}

    def create_event(self, namespace: str, body: JSON) -> JSON:
        self.created.append(body)
        return body

    def patch_event(self, namespace: str, name: str, patch: JSON) -> JSON:
        self.patched.append((name, patch))
        return patch


def test_events_are_deduplicated_with_a_count_and_rate_limited() -> None:
    writer, now = FakeWriter(), [0.0]
    recorder = EventRecorder(writer, "ctl-0", burst=3, refill=60.0, clock=lambda: now[0])
    pool = {"apiVersion": "plexus.dev/v1alpha1", "kind": "VFPool", "name": "fast", "uid": "u1"}
    recorder.record(pool, "Warning", "VFsUnhealthy", "node-3: 1 VF unhealthy: x")
    recorder.record(pool, "Warning", "VFsUnhealthy", "node-3: 1 VF unhealthy: x")
    assert len(writer.created) == 1
    created = writer.created[0]
    assert created["involvedObject"] == pool and created["count"] == 1
    assert created["metadata"]["namespace"] == "default"
    assert writer.patched == [(created["metadata"]["name"], {"count": 2,
                               "lastTimestamp": writer.patched[0][1]["lastTimestamp"]})]  # fmt: skip
    recorder.record(pool, "Normal", "AllHealthy", "fine")  # third token
    recorder.record(pool, "Warning", "VFsUnhealthy", "again")  # burst spent: dropped
    assert len(writer.created) == 2
    now[0] += 60.0  # one token back
    recorder.record(pool, "Warning", "VFsUnhealthy", "again")
    assert len(writer.created) == 3


def test_unreadable_spec_is_reported_on_the_pool() -> None:
    from pydantic import ValidationError

    from nad_controller.status import invalid_status

    try:
        VFPoolSpec.model_validate({"nicSelector": {"pfNames": ["ens1f0"]}, "mtu": 20})
    except ValidationError as exc:
        status = invalid_status(4, exc, None, NOW)
    ready = cond(status, "Ready")
    assert (ready.status, ready.reason) == ("False", "InvalidSpec")
    assert "spec.resourceName: Field required" in ready.message
    assert "spec.mtu: Input should be greater than or equal to 68" in ready.message
    assert status.observed_generation == 4
