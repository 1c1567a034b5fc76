"""The fuzz tier: hypothesis profiles, the `fuzz` marker, and the score card at the end.

Profiles (PLEXUS_FUZZ_PROFILE): `ci`, the default, bounded so the whole tier stays well under a
minute on two cores and derandomized so CI is repeatable; `long` (`make fuzz`), at least
100,000 inputs across the targets, random each run. Hypothesis's example database is off: a run
writes nothing into the repository.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
import structlog
from hypothesis import HealthCheck, settings

from tests.fuzz.tally import render_table

PROFILE = os.environ.get("PLEXUS_FUZZ_PROFILE", "ci")
_COMMON = {
    "database": None,
    "deadline": None,  # hangs are caught by tally.bounded, never timed per example
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,
}
settings.register_profile("ci", max_examples=100, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=10_000, **_COMMON)
settings.load_profile(PROFILE)


def budget(ci: int, long: int) -> settings:
    """Per-target example counts: the long profile's add up to >= 100,000."""
    return settings(max_examples=long if PROFILE == "long" else ci)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.fuzz)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = render_table()
    if lines:
        terminalreporter.section(f"fuzz: hypothesis profile {PROFILE!r}")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def quiet_logs() -> Iterator[None]:
    """Thousands of requests would log thousands of lines into pytest's capture: keep errors
    out too (a crash shows as a 999 answer, which the property catches)."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    yield
    structlog.configure(**saved)
