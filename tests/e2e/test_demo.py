"""The README's first command, `sudo make demo`, run as it runs there (the make target is
`python -m demo.local_demo` from the repository's top directory): every CI run proves it still
works on this machine, and that it leaves nothing behind."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from testbed.netns import sh
from tests.support.require import missing

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_runs_pods_pings_and_cleans_up() -> None:
    for tool in ("containerd", "runc", "ctr"):
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed (Debian packages containerd and runc)")
    before = _machine()
    out = subprocess.run(
        [sys.executable, "-m", "demo.local_demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": ""},  # as `make demo` runs it: nothing extra on the path
        check=False,
    )
    report = out.stdout + out.stderr
    assert out.returncode == 0, report
    assert report.rstrip().endswith("demo: OK"), report
    # Three pods, each with the interfaces its annotation asked for, seen inside the pod.
    for pod, interfaces in {
        "frontend": {"eth0", "net1"},
        "backend": {"eth0", "blue0", "net2"},
        "db": {"eth0", "data0"},
    }.items():
        assert {line.split()[1] for line in report.splitlines() if line.split()[:1] == [pod]} >= (
            interfaces
        ), report
    # Their network-status, as plexusctl shows it, names every network.
    assert (
        report.count('"name": "default/blue"') == 2 and report.count('"name": "default/red"') == 2
    )
    pings = re.findall(r"^  \S+ -> \S+ \(\S+\): (OK|FAILED)", report, re.M)
    assert pings == ["OK", "OK"], report
    assert "attachments left on the node: 0" in report
    assert _machine() == before  # no namespace, link or mount of the demo's is left


def _machine() -> tuple[list[str], list[str], list[str]]:
    """What the demo must not leave: named network namespaces, links of the root namespace
    (by name: their state is the machine's business) and mounts of its own."""
    links = [
        line.split(":")[1].strip() for line in sh("ip", "-o", "link", "show").stdout.splitlines()
    ]
    mounts = [
        line for line in Path("/proc/self/mountinfo").read_text().splitlines() if "plexus" in line
    ]
    return sh("ip", "netns", "list").stdout.split(), sorted(links), mounts
