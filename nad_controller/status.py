"""A VFPool's status from the cluster's node states: pure functions, no API.

Rows: one per node whose VFPoolNodeState lists the pool (`status.pools[].name`), counted by
`cnispec.vfpool_api.node_count`. Conditions (metav1.Condition):

- `Ready`: True when at least one node serves the pool with a healthy VF. False with reason
  NoNodesSelected (no Node matches spec.nodeSelector), NotServing (nodes are selected but none
  lists the pool) or NoHealthyVFs.
- `Degraded`: True when a person should look: VFsUnhealthy ("node-3: 2 VFs unhealthy: PF ens1f0
  has no link", VFs grouped by reason), NodeStateStale (not updated for `stale_after`),
  NodeStateMissing (a selected node has no state object), NodeProblem (a node reports a problem
  naming this pool, or a selected node does not serve it). The reason is the first of these
  that applies; the message lists every finding, node by node.

`lastTransitionTime` is kept while a condition's status stays the same, so an unchanged pool
gives a byte-identical status and the reconciler writes nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from cnispec.vfpool_api import (
    Condition,
    LabelSelector,
    NodeCount,
    NodeStateStatus,
    VFPoolSpec,
    VFPoolStatus,
    node_count,
)

JSON = dict[str, Any]
MESSAGE_MAX = 2048  # of metav1.Condition's 32768: a message people read, not a dump
DEGRADED_ORDER = ("VFsUnhealthy", "NodeStateMissing", "NodeStateStale", "NodeProblem")


@dataclass(frozen=True)
class NodeState:
    """One VFPoolNodeState as the reconciler needs it."""

    node: str
    status: NodeStateStatus
    updated: datetime | None  # status.updated, None when never written
    error: str = ""  # why the object could not be read (then status is empty)

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> NodeState:
        meta = obj.get("metadata") or {}
        node = str((obj.get("spec") or {}).get("nodeName") or meta.get("name", ""))
        try:
            status = NodeStateStatus.model_validate(obj.get("status") or {})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = "status." + ".".join(str(p) for p in first["loc"])
            why = f"{where}: {first['msg']}"
            return cls(node=node, status=NodeStateStatus(), updated=None, error=why)
        return cls(node=node, status=status, updated=parse_time(status.updated))


def parse_time(text: str) -> datetime | None:
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Finding:
    reason: str
    message: str


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def unhealthy_findings(node: str, resource_name: str, state: NodeStateStatus) -> list[Finding]:
    """ "node-3: 2 VFs unhealthy: PF ens1f0 has no link", one per distinct reason."""
    mine = (v for v in state.vfs if v.pool == resource_name and not v.healthy)
    reasons = Counter(v.reason or "no reason given" for v in mine)
    if not reasons:
        return []
    parts = [f"{_plural(n, 'VF')} unhealthy: {why}" for why, n in sorted(reasons.items())]
    return [Finding("VFsUnhealthy", f"{node}: " + "; ".join(parts))]


def _selects(selector: LabelSelector, node: Mapping[str, Any]) -> bool:
    return selector.matches((node.get("metadata") or {}).get("labels") or {})


def _pool_problems(name: str, spec: VFPoolSpec, state: NodeStateStatus) -> list[str]:
    """Problems a node reports that concern this pool (the agent names the pool in them)."""
    return [p for p in state.problems if name in p or spec.resource_name in p]


def pool_status(
    *,
    name: str,
    generation: int,
    spec: VFPoolSpec,
    states: Iterable[NodeState],
    nodes: Iterable[Mapping[str, Any]],
    previous: VFPoolStatus | None,
    now: datetime,
    stale_after: float,
) -> VFPoolStatus:
    """The status the pool should have now (`previous` keeps transition times)."""
    by_node = {s.node: s for s in states}
    selected = sorted(
        str((n.get("metadata") or {}).get("name", ""))
        for n in nodes
        if _selects(spec.node_selector, n)
    )
    serving = sorted(n for n, s in by_node.items() if any(p.name == name for p in s.status.pools))
    rows = [node_count(n, spec.resource_name, by_node[n].status) for n in serving]
    findings: list[Finding] = []
    for node in sorted(set(selected) | set(serving)):
        findings += _node_findings(
            name,
            spec=spec,
            node=node,
            state=by_node.get(node),
            serving=node in serving,
            now=now,
            stale_after=stale_after,
        )
    conditions = (
        _ready(generation, selected, serving, rows),
        _degraded(generation, findings),
    )
    return VFPoolStatus(
        observed_generation=generation,
        nodes=tuple(rows),
        conditions=_keep_transitions(conditions, previous, now),
    )


def _node_findings(
    name: str,
    *,
    spec: VFPoolSpec,
    node: str,
    state: NodeState | None,
    serving: bool,
    now: datetime,
    stale_after: float,
) -> list[Finding]:
    if state is None:
        why = "selected but has no VFPoolNodeState (is plexusd running there in cluster mode?)"
        return [Finding("NodeStateMissing", f"{node}: {why}")]
    if state.error:
        return [Finding("NodeProblem", f"{node}: VFPoolNodeState unreadable: {state.error}")]
    found = []
    if state.updated is None or (now - state.updated).total_seconds() > stale_after:
        since = f"since {rfc3339(state.updated)}" if state.updated else "ever"
        why = f"node state not updated {since} (plexusd down or cut off from the API?)"
        found.append(Finding("NodeStateStale", f"{node}: {why}"))
    if serving:
        found += unhealthy_findings(node, spec.resource_name, state.status)
    problems = _pool_problems(name, spec, state.status)
    if not serving and not problems:
        problems = ["selected but does not serve this pool yet"]
    found += [Finding("NodeProblem", f"{node}: {p}") for p in problems]
    return found


def _ready(
    generation: int, selected: list[str], serving: list[str], rows: list[NodeCount]
) -> Condition:
    def cond(status: bool, reason: str, message: str) -> Condition:
        return Condition(
            type="Ready",
            status="True" if status else "False",
            reason=reason,
            message=message,
            observed_generation=generation,
        )

    if not selected and not serving:
        return cond(False, "NoNodesSelected", "no Node matches spec.nodeSelector")
    if not serving:
        return cond(False, "NotServing", f"{_plural(len(selected), 'node')} selected, none "
                                         "serves the pool yet")  # fmt: skip
    healthy = sum(r.healthy for r in rows)
    free = sum(r.free for r in rows)
    summary = f"{_plural(len(serving), 'node')}, {healthy}/{sum(r.total for r in rows)} VFs "
    summary += f"healthy, {free} free"
    if healthy == 0:
        return cond(False, "NoHealthyVFs", summary)
    return cond(True, "Serving", summary)


def _degraded(generation: int, findings: list[Finding]) -> Condition:
    if not findings:
        return Condition(
            type="Degraded",
            status="False",
            reason="AllHealthy",
            message="every serving node reports every VF healthy",
            observed_generation=generation,
        )
    reasons = {f.reason for f in findings}
    reason = next(r for r in DEGRADED_ORDER if r in reasons)
    message = "; ".join(f.message for f in findings)
    if len(message) > MESSAGE_MAX:
        message = message[: MESSAGE_MAX - 20].rsplit("; ", 1)[0] + "; ... (truncated)"
    return Condition(
        type="Degraded",
        status="True",
        reason=reason,
        message=message,
        observed_generation=generation,
    )


def invalid_status(
    generation: int, error: ValidationError, previous: VFPoolStatus | None, now: datetime
) -> VFPoolStatus:
    """A spec this controller cannot read (the CRD schema or the webhook should have refused
    it): say so on the object, where the person who wrote it looks."""
    why = "; ".join(
        f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()[:5]
    )
    conditions = (
        Condition(type="Ready", status="False", reason="InvalidSpec", message=why[:MESSAGE_MAX],
                  observed_generation=generation),
        Condition(type="Degraded", status="True", reason="InvalidSpec", message=why[:MESSAGE_MAX],
                  observed_generation=generation),
    )  # fmt: skip
    return VFPoolStatus(
        observed_generation=generation,
        conditions=_keep_transitions(conditions, previous, now),
    )


def _keep_transitions(
    conditions: tuple[Condition, ...], previous: VFPoolStatus | None, now: datetime
) -> tuple[Condition, ...]:
    before = {c.type: c for c in previous.conditions} if previous else {}
    out = []
    for c in conditions:
        old = before.get(c.type)
        kept = old.last_transition_time if old and old.status == c.status else ""
        out.append(c.model_copy(update={"last_transition_time": kept or rfc3339(now)}))
    return tuple(out)


def status_json(status: VFPoolStatus) -> JSON:
    """The wire form (camelCase, every field present)."""
    return status.model_dump(mode="json", by_alias=True)
