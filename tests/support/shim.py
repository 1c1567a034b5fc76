"""The compiled shim (shim/plexus-shim.c) for tests: built by the Makefile's `shim` target,
exactly as `make test` builds it, into the package (metaplugin/bin/plexus)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from metaplugin.install import COMPILED_SHIM
from tests.support.require import missing

REPO = COMPILED_SHIM.parents[2]


def compiled_shim() -> Path:
    """Build the compiled shim if its source changed (make) and return it. Without musl-gcc
    (Debian's musl-tools, which `make deps` installs) the test is `missing`: skipped on a
    developer's machine, failed in CI."""
    if shutil.which("musl-gcc") is None or shutil.which("make") is None:
        missing("the compiled shim needs musl-gcc and make (apt-get install musl-tools make)")
    done = subprocess.run(
        ["make", "-s", "-C", str(REPO), "shim"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"make shim failed:\n{done.stdout}\n{done.stderr}")
    return COMPILED_SHIM
