"""A node without Python (Flatcar, Talos, Bottlerocket): the shim plexusd installed runs in a
mount namespace whose root holds nothing but that shim, the daemon's socket directory and an
empty spool directory (no interpreter, no libc, no dynamic loader, no shell), and a pod's ADD
and DEL go through it to the running daemon. The test is the runtime: it execs the shim
inside that root with the CNI environment and the conflist's plugin config on stdin."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from metaplugin.install import SHIM_NAME
from testbed.runtime import Outcome
from tests.netns.conftest import NETWORKS, Bed
from tests.support.shim import compiled_shim

# In the bare root, the node's usual paths (the conflist names the daemon's own socket path,
# which is rewritten to the default here, as on a real node).
BIN = "/opt/cni/bin"
RUN = "/run/plexus"
SPOOL = "/var/lib/plexus/spool"

# unshare(1) makes a private mount namespace for the one exec; this harness's shell binds the
# daemon's directories into the bare root there, then chroot(1) execs the shim in it. Nothing
# of this is in the shim's root: it finds no shell, no python3, no ld.so.
ENTER = (
    'mount --bind "$2" "$1/opt/cni/bin" && mount --bind "$3" "$1/run/plexus" && '
    'exec chroot "$1" /opt/cni/bin/plexus'
)


@pytest.fixture
def built() -> Path:
    """Built before the bed starts its daemon, so that daemon installs the compiled shim."""
    return compiled_shim()


@pytest.fixture
def bare_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "bare-root"
    for d in (BIN, RUN, SPOOL):
        (root / d.lstrip("/")).mkdir(parents=True)
    yield root


def run_in_bare_root(bed: Bed, root: Path, env: dict[str, str], conf: dict[str, Any]) -> Outcome:
    argv = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        "-c",
        ENTER,
        "enter",
        str(root),
        bed.daemon.config["cniBinDir"],
        str(Path(bed.daemon.socket).parent),
    ]
    done = subprocess.run(
        argv, input=json.dumps(conf).encode(), env=env, capture_output=True, timeout=60, check=False
    )
    return Outcome(done.returncode, done.stdout.decode(), done.stderr.decode())


def plugin_conf(bed: Bed, **extra: Any) -> dict[str, Any]:
    """The conflist's plugin as a runtime hands it to the shim, with the node's paths."""
    (plugin,) = bed.runtime.conflist["plugins"]
    return {
        **plugin,
        "name": bed.runtime.conflist["name"],
        "cniVersion": "1.0.0",
        "socketPath": f"{RUN}/plexus.sock",
        "spoolDir": SPOOL,
        **extra,
    }


def everything_in(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_add_and_del_through_the_compiled_shim_on_a_node_without_python(
    built: Path, bed: Bed, bare_root: Path
) -> None:
    installed = Path(bed.daemon.config["cniBinDir"]) / SHIM_NAME
    assert installed.read_bytes() == built.read_bytes()  # plexusd installed the compiled shim
    assert everything_in(bare_root) == [
        "opt",
        "opt/cni",
        "opt/cni/bin",
        "run",
        "run/plexus",
        "var",
        "var/lib",
        "var/lib/plexus",
        "var/lib/plexus/spool",
    ]
    pod = bed.pod("bare")
    args = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=bare;K8S_POD_INFRA_CONTAINER_ID=cb"
    env = {"CNI_CONTAINERID": "cb", "CNI_NETNS": pod.path, "CNI_IFNAME": "eth0"}
    env |= {"CNI_ARGS": args, "CNI_PATH": BIN, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

    version = run_in_bare_root(bed, bare_root, {**env, "CNI_COMMAND": "VERSION"}, {})
    assert version.ok()["supportedVersions"][-1] == "1.1.0", version.stderr

    annotations = {"io.kubernetes.cri.pod-annotations": {NETWORKS: "net-a"}}
    add = run_in_bare_root(
        bed, bare_root, {**env, "CNI_COMMAND": "ADD"}, plugin_conf(bed, runtimeConfig=annotations)
    )
    result = add.ok()
    assert result["cniVersion"] == "1.0.0"
    # the result is the cluster network's (the secondaries are in the network-status)
    assert [i["name"] for i in result["interfaces"] if i.get("sandbox")] == ["eth0"]
    links = pod.links()
    assert set(links) == {"lo", "eth0", "net1"}
    assert links["net1"]["linkinfo"]["info_kind"] == "macvlan"
    assert pod.addresses("eth0")[0].startswith("10.88.0.")
    assert pod.addresses("net1")[0].startswith("10.89.0.")
    assert [ip["address"] for ip in result["ips"]] == [pod.addresses("eth0")[0]]

    delete = run_in_bare_root(
        bed, bare_root, {**env, "CNI_COMMAND": "DEL"}, plugin_conf(bed, prevResult=result)
    )
    assert delete.returncode == 0 and delete.stdout == "", delete
    bed.assert_nothing_left(pod)
    assert not list((bare_root / SPOOL.lstrip("/")).iterdir())  # done by the daemon, not spooled
    # Outside the private mount namespace the bare root never held anything else.
    assert os.listdir(bare_root / BIN.lstrip("/")) == []


def test_the_bare_root_really_has_no_python(built: Path, bed: Bed, bare_root: Path) -> None:
    """The harness itself: what the shim could not run in that root (so it did not need it)."""
    for missing in ("/usr/bin/python3", "/bin/sh", "/lib64/ld-linux-x86-64.so.2"):
        done = subprocess.run(
            [
                "unshare",
                "--mount",
                "--",
                "/bin/sh",
                "-c",
                ENTER.replace("/opt/cni/bin/plexus", missing),
                "enter",
                str(bare_root),
                bed.daemon.config["cniBinDir"],
                str(Path(bed.daemon.socket).parent),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 127 and "No such file or directory" in done.stderr, done
