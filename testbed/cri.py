"""A real container runtime as the CNI client: containerd 1.6 + runc, driven through its CRI
exactly as kubelet drives it, with Plexus installed as its CNI.

containerd runs in its own mount and network namespace (`unshare -m -n`): overlays over /etc,
/var/lib and /opt and a private /run keep every path it hard-codes inside this bed's temp dir,
and every link it or a CNI plugin makes lives in its network namespace. plexusd is started in
those same namespaces (nsenter), so it sees the pods' netns files and makes its bridges and
macvlans there. Teardown removes sandboxes, stops both daemons and the cgroups runc made, even
when a test failed. See ../shared/reference/runtime.md for the recipe this follows.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as rpc

from testbed import BedUnavailable
from testbed.daemon import DaemonProcess
from testbed.netns import RUN_PREFIX
from testbed.oci import build_image

REFERENCE_PLUGINS = Path("/usr/lib/cni")
IMAGE = "localhost/plexus/img"
CGROUP_ROOT = Path("/sys/fs/cgroup")

NS_SCRIPT = """#!/bin/sh
# Runs as `unshare -m -n --propagation private`: hide every path containerd hard-codes.
set -e
R={root}
for d in etc varlib opt; do mkdir -p $R/ovl/$d/up $R/ovl/$d/work; done
mount -t overlay pxovl-etc -o lowerdir=/etc,upperdir=$R/ovl/etc/up,workdir=$R/ovl/etc/work /etc
mount -t overlay pxovl-varlib \
  -o lowerdir=/var/lib,upperdir=$R/ovl/varlib/up,workdir=$R/ovl/varlib/work /var/lib
mount -t overlay pxovl-opt -o lowerdir=/opt,upperdir=$R/ovl/opt/up,workdir=$R/ovl/opt/work /opt
mount --bind $R/fs/run /run
ip link set lo up
exec containerd -c $R/containerd/config.toml
"""

CONFIG_TOML = """version = 2
root = "{root}/containerd/root"
state = "{root}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{root}/containerd/containerd.sock"
[ttrpc]
  address = "{root}/containerd/containerd.sock.ttrpc"
[debug]
  level = "debug"
[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{root}/containerd/opt"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{image}:pause"
    restrict_oom_score_adj = true
    enable_selinux = false
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{root}/cni/bin"
      conf_dir = "{root}/cni/net.d"
      max_conf_num = 1
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
"""


@dataclass
class Pod:
    sandbox_id: str
    name: str
    namespace: str
    uid: str
    netns: str
    seconds: float  # RunPodSandbox wall time


class CriError(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class ContainerdBed:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.cgroup_parent = f"/{RUN_PREFIX}-kubepods"
        self.log = root / "containerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None
        self.daemon: DaemonProcess | None = None
        self.pods: dict[str, Pod] = {}

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def socket(self) -> str:
        return str(self.root / "containerd" / "containerd.sock")

    @property
    def cni_bin(self) -> Path:
        return self.root / "cni" / "bin"

    @property
    def cni_conf(self) -> Path:
        return self.root / "cni" / "net.d"

    def start(self) -> ContainerdBed:
        for d in ("containerd/opt", "fs/run", "cni/bin", "cni/net.d", "img"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        # The CRI always runs its built-in loopback network first: it needs `loopback` here.
        for plugin in ("loopback", "bridge", "host-local"):
            (self.cni_bin / plugin).symlink_to(REFERENCE_PLUGINS / plugin)
        script = self.root / "ns-containerd.sh"
        script.write_text(NS_SCRIPT.format(root=self.root))
        script.chmod(0o755)
        (self.root / "containerd" / "config.toml").write_text(
            CONFIG_TOML.format(root=self.root, image=IMAGE)
        )
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                ["unshare", "-m", "-n", "--propagation", "private", str(script)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._wait_for_runtime()
        image = build_image(self.root / "img" / "images.tar")
        subprocess.run(
            [
                "ctr",
                "--address",
                self.socket,
                "-n",
                "k8s.io",
                "image",
                "import",
                "--base-name",
                IMAGE,
                str(image),
            ],
            check=True,
            capture_output=True,
        )
        return self

    def _wait_for_runtime(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited:\n{self.log.read_text()[-3000:]}")
            if Path(self.socket).exists():
                try:
                    self.runtime().Version(pb.VersionRequest(), timeout=2)
                    return
                except grpc.RpcError:
                    pass
            time.sleep(0.05)
        raise RuntimeError("containerd did not come up")

    def nsenter(self) -> list[str]:
        assert self.proc is not None
        pid = self.proc.pid
        return ["nsenter", f"--mount=/proc/{pid}/ns/mnt", f"--net=/proc/{pid}/ns/net"]

    def start_plexusd(self, config: dict[str, Any]) -> DaemonProcess:
        """plexusd in containerd's namespaces, installing itself into containerd's CNI dirs."""
        self.daemon = DaemonProcess(
            self.root / "plexus",
            {
                "cniBinDir": str(self.cni_bin),
                "cniConfDir": str(self.cni_conf),
                "cniPath": [str(REFERENCE_PLUGINS)],
                **config,
            },
            launcher=self.nsenter(),
        )
        self.daemon.start()
        self.wait_network_ready()
        return self.daemon

    def wait_network_ready(self, timeout: float = 20.0) -> None:
        """containerd reloads CNI confs asynchronously: wait for NetworkReady."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.runtime().Status(pb.StatusRequest(verbose=True), timeout=5)
            ready = {c.type: c.status for c in status.status.conditions}
            if ready.get("NetworkReady"):
                return
            time.sleep(0.05)
        raise RuntimeError("containerd never reported NetworkReady")

    def use_conflist(self, name: str, conflist: dict[str, Any]) -> None:
        """Replace the runtime's CNI config (written in place: containerd#11715)."""
        for old in self.cni_conf.iterdir():
            old.unlink()
        (self.cni_conf / name).write_text(json.dumps(conflist))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            info = self.runtime().Status(pb.StatusRequest(verbose=True), timeout=5).info
            if f'"{conflist["name"]}"' in info.get("cniconfig", ""):
                return
            time.sleep(0.05)
        raise RuntimeError(f"containerd did not load {name}")

    def stop(self) -> None:
        with suppress(Exception):
            self.remove_all_pods()
        if self.daemon is not None:
            self.daemon.stop()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._kill_leftover_shims()
        if self.channel is not None:
            self.channel.close()
        _remove_cgroups(self.cgroup_parent)

    def _kill_leftover_shims(self) -> None:
        marker = str(self.root).encode()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with suppress(OSError):
                if marker in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)

    # --- CRI --------------------------------------------------------------------------------------

    def runtime(self) -> rpc.RuntimeServiceStub:
        if self.channel is None:
            self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        return rpc.RuntimeServiceStub(self.channel)

    def run_pod(
        self,
        name: str,
        *,
        namespace: str = "default",
        annotations: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
        port_mappings: list[tuple[int, int]] | None = None,
        timeout: float = 120,
    ) -> Pod:
        uid = str(uuid.uuid4())
        logdir = self.root / "logs" / uid
        logdir.mkdir(parents=True)
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=0),
            hostname=name,
            log_directory=str(logdir),
            labels=labels if labels is not None else {"app": "plexus-e2e"},
            annotations=annotations or {},
            port_mappings=[
                pb.PortMapping(protocol=pb.TCP, container_port=c, host_port=h, host_ip="127.0.0.1")
                for c, h in (port_mappings or [])
            ],
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=f"{self.cgroup_parent}/pod{uid}",
                security_context=pb.LinuxSandboxSecurityContext(
                    namespace_options=pb.NamespaceOption(
                        network=pb.POD, pid=pb.CONTAINER, ipc=pb.POD
                    )
                ),
            ),
        )
        started = time.perf_counter()
        try:
            reply = self.runtime().RunPodSandbox(
                pb.RunPodSandboxRequest(config=config), timeout=timeout
            )
        except grpc.RpcError as exc:
            raise CriError(exc.code(), exc.details()) from None
        seconds = time.perf_counter() - started
        pod = Pod(
            reply.pod_sandbox_id, name, namespace, uid, self.netns_of(reply.pod_sandbox_id), seconds
        )
        self.pods[pod.sandbox_id] = pod
        return pod

    def netns_of(self, sandbox_id: str) -> str:
        status = self.runtime().PodSandboxStatus(
            pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True), timeout=10
        )
        info = json.loads(status.info["info"])
        for ns in info["runtimeSpec"]["linux"]["namespaces"]:
            if ns["type"] == "network":
                return str(ns["path"])
        raise RuntimeError(f"sandbox {sandbox_id} has no network namespace")

    def stop_pod(self, pod: Pod) -> None:
        self.runtime().StopPodSandbox(
            pb.StopPodSandboxRequest(pod_sandbox_id=pod.sandbox_id), timeout=120
        )

    def remove_pod(self, pod: Pod) -> None:
        self.runtime().RemovePodSandbox(
            pb.RemovePodSandboxRequest(pod_sandbox_id=pod.sandbox_id), timeout=120
        )
        self.pods.pop(pod.sandbox_id, None)

    def sandboxes(self) -> list[Any]:
        return list(self.runtime().ListPodSandbox(pb.ListPodSandboxRequest(), timeout=10).items)

    def remove_all_pods(self) -> None:
        for sandbox in self.sandboxes():
            with suppress(grpc.RpcError):
                self.runtime().StopPodSandbox(
                    pb.StopPodSandboxRequest(pod_sandbox_id=sandbox.id), timeout=60
                )
            with suppress(grpc.RpcError):
                self.runtime().RemovePodSandbox(
                    pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox.id), timeout=60
                )
        self.pods.clear()

    # --- looking inside ---------------------------------------------------------------------------

    def in_netns(
        self, netns: str, *argv: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a host command in a pod's (or, with netns="", containerd's) network namespace."""
        return subprocess.run(
            [*self._enter(netns), *argv], capture_output=True, text=True, check=check, timeout=60
        )

    def spawn_in_netns(self, netns: str, *argv: str) -> subprocess.Popen[str]:
        """`in_netns` without waiting: a server the test stops itself."""
        return subprocess.Popen(
            [*self._enter(netns), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def _enter(self, netns: str) -> list[str]:
        assert self.proc is not None
        pid = self.proc.pid
        # nsenter opens every namespace path before it enters any: the pod's netns file exists
        # only in containerd's mount namespace, so enter that first, then the netns.
        return [
            "nsenter",
            f"--mount=/proc/{pid}/ns/mnt",
            "--",
            "nsenter",
            f"--net={netns or f'/proc/{pid}/ns/net'}",
            "--",
        ]

    def links(self, netns: str) -> dict[str, dict[str, Any]]:
        out = self.in_netns(netns, "ip", "-j", "-d", "link", "show").stdout
        return {link["ifname"]: link for link in json.loads(out)}

    def addresses(self, netns: str, ifname: str) -> list[str]:
        out = json.loads(self.in_netns(netns, "ip", "-j", "addr", "show", "dev", ifname).stdout)
        return [
            f"{a['local']}/{a['prefixlen']}"
            for link in out
            for a in link["addr_info"]
            if a.get("scope") == "global"
        ]

    def netns_exists(self, netns: str) -> bool:
        return self.in_netns("", "test", "-e", netns, check=False).returncode == 0

    def cni_phase_ms(self) -> dict[str, float]:
        """containerd's own timing of each sandbox's CNI setup, from its debug log ('begin cni
        setup' to 'cni result': loopback + the CNI plugin + libcni's cache), per sandbox id."""
        return cni_phases(self.log.read_text(errors="replace"))


def _stamp(line: str) -> float:
    # time="2026-11-22T18:17:18.775019403Z": whole seconds and the fraction, separately.
    text = line.split('time="', 1)[1].split('"', 1)[0].rstrip("Z")
    whole, _, fraction = text.partition(".")
    return datetime.fromisoformat(whole).timestamp() + float(f"0.{fraction or 0}")


def cni_phases(log: str) -> dict[str, float]:
    begins: dict[str, float] = {}
    out: dict[str, float] = {}
    for line in log.splitlines():
        begin = 'msg="begin cni setup"' in line
        if not begin and 'msg="cni result' not in line:
            continue
        sandbox = line.rsplit("podsandboxid=", 1)[-1].strip().strip('"')
        if begin:
            begins[sandbox] = _stamp(line)
        elif sandbox in begins:
            out[sandbox] = (_stamp(line) - begins.pop(sandbox)) * 1000
    return out


def _remove_cgroups(parent: str) -> None:
    for controller in CGROUP_ROOT.iterdir():
        top = controller / parent.lstrip("/")
        if not top.is_dir():
            continue
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with suppress(OSError):
                d.rmdir()
        with suppress(OSError):
            top.rmdir()


@contextmanager
def containerd_bed(root: Path) -> Iterator[ContainerdBed]:
    for tool in ("containerd", "runc", "ctr"):
        if shutil.which(tool) is None:
            raise BedUnavailable(f"{tool} is not installed (Debian packages containerd and runc)")
    bed = ContainerdBed(root)
    try:
        yield bed.start()
    finally:
        bed.stop()
