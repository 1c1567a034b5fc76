"""The DaemonSet's image, tested rather than described: the OCI archive `make image` wrote is
imported into the bed's containerd, plexusd runs from it the way the DaemonSet runs it (host
network, privileged, the image's own entrypoint with the config mounted at /etc/plexus, the
reference plugins at /host/opt/cni/bin, the netns dir mounted HostToContainer), and a pod sandbox
created through the CRI gets its networks from that daemon. `make test` builds the archive first;
without it the test skips, and fails in CI (PLEXUS_REQUIRE_ALL_TIERS)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.cri import REFERENCE_PLUGINS, ContainerdBed
from testbed.daemon import DaemonProcess
from tests.e2e.conftest import NETWORKS, CriBed
from tests.support.require import missing

REPO = Path(__file__).resolve().parents[2]
VENV = Path("/opt/plexus")
HOST_CNI_BIN = "/host/opt/cni/bin"  # where the DaemonSet mounts the node's CNI plugins
CONFIG_DIR = "/etc/plexus"  # where the DaemonSet mounts its ConfigMap
PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
# The ELF64 program headers' segment types of the file argv[1], run by the image's python3.
ELF_SEGMENTS = """
import struct, sys
data = open(sys.argv[1], "rb").read()
assert data[:5] == b"\\x7fELF\\x02", "not a 64-bit ELF file"
(phoff,) = struct.unpack_from("<Q", data, 0x20)
size, count = struct.unpack_from("<HH", data, 0x36)
print(*(struct.unpack_from("<I", data, phoff + i * size)[0] for i in range(count)))
"""


def _make(target: str) -> str:
    if shutil.which("make") is None:
        missing("make is not installed: cannot ask the Makefile for the image")
    done = subprocess.run(
        ["make", "-s", "--no-print-directory", target],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.strip()


@pytest.fixture(scope="module")
def archive() -> tuple[Path, str]:
    """The archive and the ref `make image` gave it (the Makefile's IMAGE:IMAGE_TAG)."""
    path = REPO / _make("print-image-archive")
    if not path.is_file():
        missing(f"no image archive at {path}: run `make image` (`make test` builds it first)")
    return path, _make("print-image")


class Ctr:
    """containerd's own client on the bed's socket, in the containerd namespace the CRI uses."""

    def __init__(self, bed: ContainerdBed) -> None:
        self.bed = bed
        # in the bed's mount namespace: ctr makes the task's stdio fifos under /run/containerd,
        # which must be the /run the shim sees
        self.base = [*bed.nsenter(), "ctr", "--address", bed.socket, "--namespace", "k8s.io"]

    def __call__(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self.base, *argv], capture_output=True, text=True, timeout=timeout, check=False
        )
        assert done.returncode == 0, f"ctr {' '.join(argv)}: {done.stdout}{done.stderr}"
        return done

    def run_argv(
        self,
        image: str,
        cid: str,
        mounts: list[tuple[str, str, str]],
        flags: tuple[str, ...] = ("--net-host", "--privileged"),
    ) -> list[str]:
        """`ctr run` as the DaemonSet runs plexusd: the host's (the bed's) network, privileged,
        in a cgroup under the bed's (which the bed removes), foreground with signals forwarded."""
        argv = [*self.base, "run", "--rm", *flags]
        argv += ["--cgroup", f"{self.bed.cgroup_parent}/{cid}"]
        for src, dst, options in mounts:
            argv += ["--mount", f"type=bind,src={src},dst={dst},options={options}"]
        return [*argv, image, cid]

    def image_run(
        self, image: str, *command: str, flags: tuple[str, ...] = ("--net-host", "--privileged")
    ) -> subprocess.CompletedProcess[str]:
        """A one-off container from the image running `command` (as a pod's `command:` does:
        it replaces the entrypoint), with nothing mounted."""
        cid = f"pximg-{uuid.uuid4().hex[:8]}"
        try:
            return subprocess.run(
                [*self.run_argv(image, cid, [], flags), *command],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        finally:
            self.remove(cid)

    def remove(self, cid: str) -> None:
        for argv in (("task", "kill", "-s", "SIGKILL", cid), ("task", "rm", "-f", cid)):
            subprocess.run([*self.base, *argv], capture_output=True, check=False, timeout=30)
        subprocess.run(
            [*self.base, "containers", "rm", cid], capture_output=True, check=False, timeout=30
        )


class ImageDaemon(DaemonProcess):
    """plexusd from the image: `ctr run` in the foreground is the process the bed signals (ctr
    forwards SIGTERM to the task). Its config file is the one `DaemonProcess` writes, mounted at
    /etc/plexus: the image's entrypoint and default arguments start it, nothing else."""

    def __init__(self, ctr: Ctr, image: str, root: Path, config: dict[str, Any]) -> None:
        super().__init__(root, config)
        self.ctr = ctr
        self.image = image
        self.cid = f"plexusd-{uuid.uuid4().hex[:8]}"

    def mounts(self, test_root: Path) -> list[tuple[str, str, str]]:
        return [
            # every path the config names (CNI dirs, NADs, state, run dir) lives under here
            (str(test_root), str(test_root), "rbind:rw"),
            (str(self.root), CONFIG_DIR, "rbind:ro"),
            (str(REFERENCE_PLUGINS), HOST_CNI_BIN, "rbind:ro"),
            # pods' netns files appear after the daemon started: HostToContainer (rslave)
            ("/run/netns", "/run/netns", "rbind:rslave"),
        ]

    def start(  # type: ignore[override]
        self, *, test_root: Path, timeout: float = 60.0
    ) -> ImageDaemon:
        argv = self.ctr.run_argv(self.image, self.cid, self.mounts(test_root))
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ctr run exited with {self.proc.returncode}:\n{self.logs()}")
            if self.ready() and self.conf_file.exists():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"plexusd from the image not ready after {timeout}s:\n{self.logs()}")

    def exec(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """`kubectl exec` into the running daemon's container."""
        return subprocess.run(
            [*self.ctr.base, "task", "exec", "--exec-id", uuid.uuid4().hex[:8], self.cid, *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.ctr.remove(self.cid)


@pytest.fixture
def imaged(cri: CriBed, archive: tuple[Path, str]) -> Iterator[tuple[CriBed, Ctr, str]]:
    """The cri bed with the image imported into its containerd."""
    path, ref = archive
    ctr = Ctr(cri.containerd)
    ctr("images", "import", str(path), timeout=300)
    assert ref in ctr("images", "ls", "--quiet").stdout.split()
    yield cri, ctr, ref


def _shared_netns_dir(bed: ContainerdBed) -> None:
    """The bed's /run/netns as kubelet's node has it: a shared mount point (containerd makes
    it one at its first sandbox, too late for a container started before), so the netns
    files containerd mounts there later reach the daemon's container."""
    # (rbind: a netns file already there stays visible; `mountpoint` would be fooled by the
    # host's /run/netns that the bed's /run covers)
    script = (
        "mkdir -p /run/netns && mount --rbind /run/netns /run/netns"
        " && mount --make-rshared /run/netns"
    )
    assert bed.proc is not None
    done = subprocess.run(
        ["nsenter", f"--mount=/proc/{bed.proc.pid}/ns/mnt", "sh", "-c", script],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr


def _start_daemon(cri: CriBed, ctr: Ctr, ref: str) -> ImageDaemon:
    bed = cri.containerd
    _shared_netns_dir(bed)
    daemon = ImageDaemon(
        ctr,
        ref,
        cri.root / "image-config",
        {
            "cniBinDir": str(bed.cni_bin),
            "cniConfDir": str(bed.cni_conf),
            "cniPath": [HOST_CNI_BIN],
            "localDir": str(cri.nad_dir),
            "clusterNetwork": str(cri.cluster_conf),
            "stateDir": str(cri.root / "plexus-state"),
            "runDir": str(cri.root / "plexus-run"),
        },
    )
    # the bed stops it (after removing every pod, so their DELs reach it) even when a test fails
    bed.daemon = cri.daemon = daemon
    daemon.start(test_root=cri.root)
    bed.wait_network_ready()
    return daemon


def test_plexusd_from_the_image_gives_a_cri_pod_its_networks(
    imaged: tuple[CriBed, Ctr, str],
) -> None:
    cri, ctr, ref = imaged
    daemon = _start_daemon(cri, ctr, ref)
    # the process serving the socket is the image's own plexusd, not this machine's
    top = ctr("task", "ps", daemon.cid).stdout
    pids = [line.split()[0] for line in top.splitlines()[1:] if line.strip()]
    cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in pids]
    assert [b"/opt/plexus/bin/python", b"/opt/plexus/bin/plexusd"] in [c[:2] for c in cmdlines]
    # and the shim it installed into the runtime's CNI bin dir is the image's compiled one
    shim = cri.containerd.cni_bin / "plexus"
    in_image = daemon.exec(
        "sha256sum", f"{VENV}/lib/python3.11/site-packages/metaplugin/bin/plexus"
    ).stdout.split()[0]
    installed = subprocess.run(
        ["sha256sum", str(shim)], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    assert installed == in_image

    pod = cri.containerd.run_pod(
        "web", annotations={NETWORKS: "net-a"}, port_mappings=[(80, 18080)]
    )
    ifaces = cri.interfaces(pod)
    assert set(ifaces) == {"eth0", "net1"}
    assert ifaces["eth0"][0].startswith("10.88.") and ifaces["net1"][0].startswith("10.89.")
    kinds = {
        n: link["linkinfo"]["info_kind"]
        for n, link in cri.containerd.links(pod.netns).items()
        if n != "lo"
    }
    assert kinds == {"eth0": "veth", "net1": "macvlan"}
    # portmap, exec'd by the daemon in its container, ran the image's iptables
    assert len(cri.portmap_chains()) == 1

    # what an admin sees with `kubectl exec` into the DaemonSet's pod
    shown = daemon.exec("plexusctl", "--socket", daemon.socket, "network-status", "default/web")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert [(s["name"], s["interface"]) for s in status] == [
        ("cluster", "eth0"),
        ("default/net-a", "net1"),
    ]
    assert status[1]["ips"] == [ifaces["net1"][0].split("/")[0]]
    assert daemon.exec("plexusctl", "--socket", daemon.socket, "health").returncode == 0

    # the records it keeps are on the state dir the DaemonSet mounts from the node
    records = [r for r in cri.records() if r.endswith(".record")]
    assert sorted(r.partition("@")[0] for r in records) == [
        f"{pod.sandbox_id}/eth0",
        f"{pod.sandbox_id}/net1",
    ]

    cri.containerd.stop_pod(pod)
    cri.containerd.remove_pod(pod)
    cri.assert_nothing_left()
    dels = [e for e in daemon.events("cni_request_done") if e.get("command") == "DEL"]
    assert dels and {e["outcome"] for e in dels} == {"ok"}


def test_image_carries_the_tools_and_a_static_shim(imaged: tuple[CriBed, Ctr, str]) -> None:
    _, ctr, ref = imaged
    version = ctr.image_run(ref, "plexusctl", "version")
    assert version.returncode == 0, version.stderr
    assert "1.0.0" in json.loads(version.stdout)["supportedVersions"]
    # as the controller's Deployment runs it: uid 65532, read-only root, unprivileged
    # (ctr 1.6 has no --user: util-linux's setpriv in the image drops to it)
    controller = ctr.image_run(
        ref,
        *("setpriv", "--reuid=65532", "--regid=65532", "--clear-groups"),
        *("plexus-controller", "--help"),
        flags=("--read-only",),
    )
    assert controller.returncode == 0, controller.stderr
    assert "run" in controller.stdout
    # cluster mode's adaptors import from the image (the local-mode daemon above does not need
    # them; the build drops the kubernetes client's asyncio half)
    imports = ctr.image_run(
        ref,
        "python3",
        "-c",
        "import metaplugin.k8s, metaplugin.k8s_pools, nad_controller.k8s, kubeapi.informer, "
        "sriov.deviceplugin, sriov.uevents, pyudev; pyudev.Context()",
    )
    assert imports.returncode == 0, imports.stderr
    # the shim is static: no program interpreter (PT_INTERP), so it needs nothing on the node
    shim = f"{VENV}/lib/python3.11/site-packages/metaplugin/bin/plexus"
    headers = ctr.image_run(ref, "python3", "-c", ELF_SEGMENTS, shim)
    assert headers.returncode == 0, headers.stderr
    segments = {int(t) for t in headers.stdout.split()}
    assert PT_LOAD in segments and PT_INTERP not in segments and PT_DYNAMIC not in segments


def test_manifests_run_what_the_image_holds(
    imaged: tuple[CriBed, Ctr, str], archive: tuple[Path, str]
) -> None:
    """The DaemonSet's and the controller's commands and probes name programs on the image's
    PATH, and the DaemonSet's command is the image's own entrypoint with its default arguments."""
    _, ctr, ref = imaged
    pod = yaml.safe_load((REPO / "deploy" / "daemonset.yaml").read_text())["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    config = _image_config(archive[0])
    assert container["image"] == ref
    assert container["command"] == config["Entrypoint"] + config["Cmd"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert CONFIG_DIR in mounts and HOST_CNI_BIN in mounts
    controller = next(
        d
        for d in yaml.safe_load_all((REPO / "deploy" / "controller.yaml").read_text())
        if d["kind"] == "Deployment"
    )
    (ccontainer,) = controller["spec"]["template"]["spec"]["containers"]
    assert ccontainer["image"] == ref
    programs = {
        container["command"][0],
        container["readinessProbe"]["exec"]["command"][0],
        container["livenessProbe"]["exec"]["command"][0],
        ccontainer["command"][0],
    }
    for program in sorted(programs):
        found = ctr.image_run(ref, "sh", "-c", f"command -v {program}")
        assert found.stdout.strip() == f"{VENV}/bin/{program}", found.stderr


def _image_config(path: Path) -> dict[str, Any]:
    """The archive's image config, process part (Entrypoint, Cmd, Env): index -> manifest ->
    config, as the OCI image layout has them."""
    with tarfile.open(path) as tar:

        def blob(digest: str) -> Any:
            member = tar.extractfile(f"blobs/sha256/{digest.removeprefix('sha256:')}")
            assert member is not None
            return json.load(member)

        index_file = tar.extractfile("index.json")
        assert index_file is not None
        (manifest,) = json.load(index_file)["manifests"]
        config: dict[str, Any] = blob(blob(manifest["digest"])["config"]["digest"])["config"]
        return config
