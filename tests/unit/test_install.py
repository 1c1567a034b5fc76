"""The node install step, with a real plexusd process (local mode, temp dirs, no kernel work):
the shim is replaced atomically, the conflist appears only once the cluster network is ready, is
written in place, and goes away on --uninstall."""

from __future__ import annotations

import ctypes
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from metaplugin import install
from metaplugin.config import DaemonConfig
from metaplugin.install import ShimMissing, install_shim, write_conf
from testbed.daemon import PLEXUSD, DaemonProcess
from testbed.runtime import CniRuntime
from tests.support.shim import compiled_shim

CLUSTER = {"cniVersion": "1.0.0", "name": "cluster", "plugins": [{"type": "bridge"}]}


def wait_for(check: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_conf_waits_for_the_cluster_network_and_the_readiness_file(tmp_path: Path) -> None:
    (tmp_path / "nads").mkdir()
    cluster = tmp_path / "later" / "cluster.conflist"
    ready = tmp_path / "primary-ready"
    daemon = DaemonProcess(
        tmp_path,
        {
            "localDir": str(tmp_path / "nads"),
            "clusterNetwork": str(cluster),
            "readinessIndicatorFile": str(ready),
        },
    )
    daemon.start(wait_conf=False)
    try:
        shim = Path(daemon.config["cniBinDir"]) / "plexus"
        assert shim.exists()  # the shim is installed at once...
        time.sleep(1.5)
        assert not daemon.conf_file.exists()  # ...the conf only when the primary is ready
        cluster.parent.mkdir()
        cluster.write_text(json.dumps(CLUSTER))
        time.sleep(1.5)
        assert not daemon.conf_file.exists()  # the readiness indicator is still missing
        status = {"CNI_COMMAND": "STATUS"}
        conf = {
            "cniVersion": "1.1.0",
            "name": "plexus",
            "type": "plexus",
            "socketPath": daemon.socket,
        }
        out = subprocess.run(
            [str(shim)],
            input=json.dumps(conf),
            env=status,
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 1 and json.loads(out.stdout)["code"] == 50
        ready.touch()
        wait_for(daemon.conf_file.exists)
        runtime = CniRuntime(daemon.conf_file, shim.parent)
        assert runtime.invoke("STATUS", version="1.1.0").returncode == 0
        daemon.conf_file.unlink()  # an admin's mistake: the daemon puts it back
        wait_for(daemon.conf_file.exists)
        subprocess.run([PLEXUSD, "--config", str(daemon.config_file), "--uninstall"], check=True)
        assert not daemon.conf_file.exists()
        time.sleep(3)  # longer than the daemon's check interval
        assert not daemon.conf_file.exists()  # the running daemon honours the uninstall
        assert shim.exists()  # pods that still run must be able to DEL
    finally:
        daemon.stop()


IN_MODIFY, IN_MOVED_TO = 0x002, 0x080


def watched_events(directory: Path, action: Callable[[], object]) -> set[int]:
    """The inotify event kinds `action` raises in `directory` (what containerd listens to)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK)
    assert fd >= 0
    try:
        assert libc.inotify_add_watch(fd, str(directory).encode(), IN_MODIFY | IN_MOVED_TO) >= 0
        action()
        data = os.read(fd, 65536)
    finally:
        os.close(fd)
    kinds, offset = set(), 0
    while offset < len(data):
        _, mask, _, name_len = struct.unpack_from("iIII", data, offset)
        kinds.add(mask)
        offset += 16 + name_len
    return kinds


def install_config(tmp_path: Path) -> DaemonConfig:
    return DaemonConfig.model_validate(
        {
            "cniConfDir": str(tmp_path / "net.d"),
            "cniBinDir": str(tmp_path / "bin"),
            "shimInterpreter": sys.executable,
            "stateDir": str(tmp_path / "s"),
        }
    )


def test_conf_is_never_seen_half_written_yet_raises_a_write(tmp_path: Path) -> None:
    cfg = install_config(tmp_path)
    assert write_conf(cfg)
    conf = Path(cfg.conf_file)
    conf.write_text("{}")  # someone edited it
    inode = conf.stat().st_ino
    kinds = watched_events(conf.parent, lambda: write_conf(cfg))
    assert conf.stat().st_ino != inode  # renamed into place: never empty for a reader ...
    assert IN_MODIFY in kinds  # ... and a WRITE event, which containerd 1.6 reloads on
    assert json.loads(conf.read_text())["name"]
    assert not [p for p in conf.parent.iterdir() if p.name.startswith(".")]
    assert not write_conf(cfg)  # unchanged: no write at all


def test_the_shim_is_replaced_by_rename(tmp_path: Path) -> None:
    cfg = install_config(tmp_path)
    shim = install_shim(cfg)
    old = shim.stat().st_ino
    with shim.open("rb"):  # a runtime exec'ing the old shim keeps its inode
        shim.write_bytes(shim.read_bytes() + b"\n# stale\n")
        install_shim(cfg)
    assert shim.stat().st_ino != old
    assert os.access(shim, os.X_OK)
    assert not [p for p in shim.parent.iterdir() if p.name.startswith(".plexus")]


def test_the_compiled_shim_is_what_gets_installed(tmp_path: Path) -> None:
    built = compiled_shim()
    shim = install_shim(install_config(tmp_path))
    assert shim.read_bytes() == built.read_bytes()
    assert shim.read_bytes()[:4] == b"\x7fELF"  # not a script: no interpreter on the node
    assert os.stat(shim).st_mode & 0o777 == 0o755
    ldd = subprocess.run(["ldd", str(shim)], capture_output=True, text=True, check=False)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr
    out = subprocess.run(
        [str(shim)], input=b"{}", env={"CNI_COMMAND": "VERSION"}, capture_output=True, check=False
    )
    assert out.returncode == 0 and json.loads(out.stdout)["cniVersion"] == "1.0.0"


def test_shim_binary_names_the_shim_to_install(tmp_path: Path) -> None:
    mine = tmp_path / "my-plexus"
    mine.write_bytes(compiled_shim().read_bytes() + b"\0mine")
    mine.chmod(0o755)
    cfg = DaemonConfig.model_validate(
        {**install_config(tmp_path).model_dump(by_alias=True), "shimBinary": str(mine)}
    )
    assert install_shim(cfg).read_bytes() == mine.read_bytes()
    mine.unlink()
    with pytest.raises(ShimMissing, match="my-plexus is not an executable file"):
        install_shim(cfg)


def test_without_a_compiled_shim_the_python_shim_is_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A development checkout that never ran `make shim` still gets a working shim."""
    monkeypatch.setattr(install, "COMPILED_SHIM", tmp_path / "never-built")
    shim = install_shim(install_config(tmp_path))
    assert shim.read_text().splitlines()[0] == f"#!{sys.executable} -IS"
