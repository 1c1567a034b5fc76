"""Failpoints (cnispec/failpoints.py): `name@N` fires on the N-th hit and not before, a misspelt
name is refused, and the code, the NAMES registry and docs/failpoints.md list the same points."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cnispec import failpoints

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("cnispec", "kernel", "sriov", "delegates", "metaplugin")


def _run(spec: str, hits: int) -> subprocess.CompletedProcess[str]:
    """A process that hits `store_plan_written` `hits` times, printing each hit it survives."""
    code = (
        "from cnispec import failpoints\n"
        f"for i in range({hits}):\n"
        "    failpoints.hit('store_plan_written')\n"
        "    print(i + 1, flush=True)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        env={"PLEXUS_FAILPOINTS": spec, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_an_armed_point_kills_the_process_on_its_first_hit() -> None:
    out = _run("store_plan_written", 3)
    assert out.returncode == -signal.SIGKILL
    assert out.stdout == ""


def test_name_at_n_fires_on_the_nth_hit_only() -> None:
    out = _run("chain_add_before, store_plan_written@3", 5)
    assert out.returncode == -signal.SIGKILL
    assert out.stdout.split() == ["1", "2"]


def test_an_unarmed_point_never_fires() -> None:
    out = _run("chain_add_before", 3)
    assert (out.returncode, out.stdout.split()) == (0, ["1", "2", "3"])


@pytest.mark.parametrize(
    ("spec", "error"),
    [("store_plan_writen", "unknown failpoint"), ("store_plan_written@0", "1 or more")],
)
def test_a_misspelt_spec_is_refused(spec: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        failpoints.parse(spec)


def test_parse() -> None:
    assert failpoints.parse(" iface_up ,,iface_route_added@3") == {
        "iface_up": 1,
        "iface_route_added": 3,
    }
    assert failpoints.parse("") == {}


def test_code_registry_and_docs_list_the_same_points() -> None:
    in_code: list[str] = []
    for package in PRODUCT:
        for source in (ROOT / package).rglob("*.py"):
            in_code += re.findall(r'failpoints\.hit\("([a-z0-9_]+)"\)', source.read_text())
    assert len(in_code) == len(set(in_code)), "a failpoint name is used twice"
    documented = re.findall(
        r"^\| `([a-z0-9_]+)` \|", (ROOT / "docs/failpoints.md").read_text(), re.M
    )
    assert sorted(documented) == sorted(set(documented))
    assert set(in_code) == failpoints.NAMES == set(documented)
