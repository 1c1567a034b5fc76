"""The VFPool objects' shared models: which pools a node serves, in which order, and a node's
row of a pool's status."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cnispec.vfpool_api import NodeStateStatus, VfEntry, VFPool, node_count, pools_for_node

pytestmark = pytest.mark.unit


def _pool(name: str, resource: str, priority: int = 0, **selector: object) -> VFPool:
    return VFPool.model_validate(
        {
            "name": name,
            "spec": {
                "resourceName": resource,
                "nicSelector": {"pfNames": ["ens1f0"]},
                "priority": priority,
                "nodeSelector": selector,
            },
        }
    )


def test_node_selector_picks_pools_and_priority_orders_them() -> None:
    pools = [
        _pool("b-low", "plexus.dev/b"),
        _pool("a-low", "plexus.dev/a"),
        _pool("z-high", "plexus.dev/z", priority=10),
        _pool("gpu-only", "plexus.dev/g", matchLabels={"gpu": "yes"}),
        _pool(
            "not-edge",
            "plexus.dev/e",
            matchExpressions=[{"key": "zone", "operator": "NotIn", "values": ["edge"]}],
        ),
    ]
    chosen = pools_for_node(pools, {"zone": "edge"})
    assert [p.resource_name for p in chosen.pools] == [
        "plexus.dev/z",
        "plexus.dev/a",
        "plexus.dev/b",
    ]
    chosen = pools_for_node(pools, {"gpu": "yes"})
    assert "plexus.dev/g" in [p.resource_name for p in chosen.pools]
    assert "plexus.dev/e" in [p.resource_name for p in chosen.pools]


def test_two_pools_with_one_resource_name_on_a_node_are_refused() -> None:
    with pytest.raises(ValidationError, match="already the resourceName"):
        pools_for_node([_pool("a", "plexus.dev/x"), _pool("b", "plexus.dev/x")], {})


def test_node_count_sums_one_pools_vfs() -> None:
    state = NodeStateStatus(
        vfs=(
            VfEntry(pci="0000:01:00.1", pf="0000:01:00.0", index=0, pool="plexus.dev/a"),
            VfEntry(pci="0000:01:00.2", pf="0000:01:00.0", index=1, pool="plexus.dev/a",
                    state="attached", pod="ns/p"),
            VfEntry(pci="0000:01:00.3", pf="0000:01:00.0", index=2, pool="plexus.dev/a",
                    healthy=False, reason="PF ens1f0 has no link", state="unhealthy"),
            VfEntry(pci="0000:01:00.4", pf="0000:01:00.0", index=3, pool="plexus.dev/b"),
        )
    )  # fmt: skip
    row = node_count("node-3", "plexus.dev/a", state)
    assert row.model_dump(by_alias=True) == {
        "node": "node-3", "total": 3, "healthy": 2, "free": 1, "inUse": 1, "unhealthy": 1,
    }  # fmt: skip
