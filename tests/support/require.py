"""Skipping a tier is fine on a developer's machine and wrong in CI: `.ci/run` sets
PLEXUS_REQUIRE_ALL_TIERS=1, and then a missing prerequisite fails the test instead of hiding it.
(Kernel features this machine lacks are a different matter: those tests skip everywhere and
run in the VM tier.)"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import NoReturn, TypeVar

import pytest

from testbed import BedUnavailable

T = TypeVar("T")


def missing(reason: str) -> NoReturn:
    if os.environ.get("PLEXUS_REQUIRE_ALL_TIERS"):
        pytest.fail(f"a required test tier cannot run here: {reason}")
    pytest.skip(reason)


@contextmanager
def required(bed: AbstractContextManager[T]) -> Iterator[T]:
    """Enter a test bed; one this machine cannot run is `missing`, with the bed's reason."""
    with ExitStack() as stack:
        try:
            entered = stack.enter_context(bed)
        except BedUnavailable as exc:
            missing(str(exc))
        yield entered
