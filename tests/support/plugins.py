"""Test-only CNI plugins: `failer` (ADD always fails with a CNI error JSON) and `gate` (ADD waits
until the test releases it, then runs Debian's macvlan, whether or not the daemon that exec'd
it is still alive). Written into a temp dir that goes on the daemon's cniPath."""

from __future__ import annotations

import stat
from pathlib import Path

FAILER = """#!/bin/sh
cat >/dev/null
case "$CNI_COMMAND" in
VERSION) echo '{"cniVersion":"1.0.0","supportedVersions":["0.3.1","0.4.0","1.0.0"]}';;
ADD) echo '{"cniVersion":"1.0.0","code":110,"msg":"deliberate failure","details":"failer refuses ADD"}'
     exit 1;;
*) exit 0;;
esac
"""

GATE = """#!/usr/bin/python3 -IS
import json, os, subprocess, sys, time
data = sys.stdin.buffer.read()
if os.environ.get("CNI_COMMAND") == "ADD":
    gate = json.loads(data)["gateDir"]
    open(os.path.join(gate, "reached"), "w").close()
    deadline = time.monotonic() + 60  # never outlive a broken test by much
    while not os.path.exists(os.path.join(gate, "release")) and time.monotonic() < deadline:
        time.sleep(0.02)  # keeps going if the daemon dies: an orphan, as a real plugin would be
sys.exit(subprocess.run(["/usr/lib/cni/macvlan"], input=data).returncode)
"""


def write_test_plugins(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in (("failer", FAILER), ("gate", GATE)):
        path = directory / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return directory
