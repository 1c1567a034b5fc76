"""The crash campaign, bounded for CI (`testbed.chaos`; `make chaos` runs a long one): one cycle
per failpoint, each shaped to reach its point, then cycles drawn from a fixed seed with
failpoints, random SIGKILLs and spooled DELs. After each cycle's two DELs (the second without a
netns, as containerd sends it) and a GC with the runtime's valid list, nothing of the pod may be
left: no link on the node or in the pod, no lease, no record, no spool entry; every DEL answers
success."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.chaos import (
    CAMPAIGN_POINTS,
    Campaign,
    CycleRecord,
    Plan,
    World,
    chaos_world,
    each_failpoint_plans,
)
from tests.support.require import required

SEED = 20251
RANDOM_CYCLES = 20
PLANS = each_failpoint_plans(0, CAMPAIGN_POINTS)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with required(chaos_world(tmp_path_factory.mktemp("chaos"))) as bed:
        yield bed


@pytest.fixture(scope="module")
def campaign(world: World) -> Campaign:
    return Campaign(world, seed=SEED, log=lambda _: None)


def _verdict(campaign: Campaign, record: CycleRecord) -> str:
    plan = record.plan
    lines = [f"cycle {plan.cycle}: {plan.describe()}"]
    lines += record.del_failures + record.crashed + record.gc_failures
    lines += [f"left ({kind}): {', '.join(items)}" for kind, items in record.leftovers.items()]
    if plan.point and not record.fired:
        lines.append(f"{plan.point} was never reached")
    if len(lines) == 1:
        return ""
    add = "succeeded" if record.add_code is None else f"failed with code {record.add_code}"
    lines.append(f"the ADD {add}; plexusd's log ends:")
    return "\n".join(lines + campaign.world.daemon.logs().splitlines()[-15:])


def _run(campaign: Campaign, plan: Plan) -> str:
    return _verdict(campaign, campaign.run_cycle(plan))


@pytest.fixture(scope="module")
def each_point(campaign: Campaign) -> dict[str, str]:
    """One cycle per failpoint, in one pass (each start-up after a crash arms the next point
    when only an ADD can reach it): the verdict of each, by point."""
    verdicts = {}
    for plan, upcoming in zip(PLANS, [*PLANS[1:], None], strict=True):
        record = campaign.run_cycle(plan, upcoming)
        verdicts[plan.point.split("@")[0]] = _verdict(campaign, record)
    return verdicts


def test_the_campaign_sees_what_a_pod_holds(campaign: Campaign) -> None:
    """The leak count is not blind: a pod that was never DEL'd shows its node-side veth, its
    leases (host-local's, in-process and exec'd) and its records; after its DELs, nothing."""
    campaign.ensure_up()
    pod = campaign.world.pod("seen")
    cid = "chaos99999"
    out = campaign.runtime.add(cid, pod.path, annotations={"k8s.v1.cni.cncf.io/networks": "ref"})
    out.ok()
    held = campaign.leftovers({cid})
    assert len(held["links"]) == 1 and cid in held["links"][0]
    assert sorted(lease.split("/")[0] for lease in held["leases"]) == ["pods", "pods", "ref"]
    assert len(held["records"]) == 1 and "eth0@" in held["records"][0]
    campaign.runtime.delete(cid, pod.path).ok()
    pod.delete()
    campaign.runtime.delete(cid, "", with_prev=False).ok()
    assert {k: v for k, v in campaign.leftovers({cid}).items() if v} == {}


@pytest.mark.parametrize("point", [plan.point.split("@")[0] for plan in PLANS])
def test_a_crash_at_each_failpoint_leaves_nothing(each_point: dict[str, str], point: str) -> None:
    assert each_point[point] == ""


@pytest.mark.parametrize(
    "plan",
    [
        pytest.param(Plan(900, ("ref",), master_gone=True, gc=True), id="master-gone"),
        pytest.param(
            # The third delegate to run is ref's: its record is planned, its ADD never ran.
            Plan(901, ("mv", "ref"), "failpoint", "chain_add_before@3", master_gone=True, gc=True),
            id="crash-mid-add-then-master-gone",
        ),
    ],
)
def test_a_del_that_cannot_succeed_still_leaves_nothing(campaign: Campaign, plan: Plan) -> None:
    """DEL #1 (netns there) may answer 105 so the runtime retries; DEL #2 (netns gone) must
    succeed, release the lease and set the record aside; the GC must succeed."""
    assert _run(campaign, plan) == ""


def test_gc_removes_the_empty_record_dir_a_crash_left(campaign: Campaign) -> None:
    plan = Plan(902, ("mv",), "failpoint", "store_record_write_before@1", lost=True, gc=True)
    assert _run(campaign, plan) == ""


def test_random_cycles_leave_nothing(tmp_path: Path) -> None:
    """Failpoints armed at random hits, SIGKILLs at random moments, spooled DELs, pods that live
    a few cycles and pods the runtime loses (only GC collects them); then every pod is torn
    down, a last GC runs with nothing valid, and the node is as it was."""
    with required(chaos_world(tmp_path)) as bed:
        campaign = Campaign(bed, seed=SEED, log=lambda _: None)
        plans = [
            Plan.draw(SEED, cycle, points=CAMPAIGN_POINTS, gc_every=3, faulty=0.9)
            for cycle in range(RANDOM_CYCLES)
        ]
        for plan, upcoming in zip(plans, [*plans[1:], None], strict=True):
            campaign.run_cycle(plan, upcoming)
        tally = campaign.finish()
    found = [f"cycle {f.cycle} ({f.plan}): {f.what}: {f.detail}" for f in tally.findings]
    assert tally.kills > RANDOM_CYCLES // 2  # the campaign did crash plexusd
    assert (tally.del_failures, tally.crashes, tally.unexpected_add_failures) == (0, 0, 0), found
    assert {k: v for k, v in tally.leaks.items() if v} == {}, found
