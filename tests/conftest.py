"""Test tiers (see pyproject markers): a test under tests/unit is `unit`, under tests/netns is
`netns`, and so on, unless it says otherwise. Root-only tiers skip, with the reason, when the
suite does not run as root."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.sriov_bed import SriovBed, running_bed
from tests.support.require import required

_TIER_BY_DIR = {"unit": "unit", "netns": "netns", "e2e": "e2e", "kernel": "kernel"}
_ROOT_TIERS = {"netns", "e2e", "kernel"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects: the tier markers must be there by then
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        tier = next((_TIER_BY_DIR[p] for p in parts if p in _TIER_BY_DIR), "unit")
        if not any(item.get_closest_marker(t) for t in _TIER_BY_DIR.values()):
            item.add_marker(getattr(pytest.mark, tier))
        if tier in _ROOT_TIERS and os.geteuid() != 0:
            if os.environ.get("PLEXUS_REQUIRE_ALL_TIERS"):
                raise pytest.UsageError(f"{tier} tests need root, and every tier is required")
            item.add_marker(pytest.mark.skip(reason=f"{tier} tests need root"))


@pytest.fixture
def sriov_bed(tmp_path: Path) -> Iterator[SriovBed]:
    """The synthetic SR-IOV sysfs with its own node namespace (testbed.sriov_bed)."""
    with required(running_bed(tmp_path)) as bed:
        yield bed
