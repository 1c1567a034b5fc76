"""A burst: N pods (default 110, kubelet's default maxPods) ADDed at once through the installed
shim, exactly as a runtime calls it, then all DELed at once. Each pod is the built-in
3-interface pod (plexus-routed primary + 2 plexus-macvlan, host-local). Prints, per phase,
failures (with their CNI codes), p50/p90/p99/max latency and the wall time; and plexusd's RSS
idle before the burst and at its peak (VmHWM from /proc), and its peak thread count.

Targets (issue 11): 0 failures, p99 <= 1.5 s on 2 cores, peak RSS <= 60 MiB.

Run as root: `sudo make bench-burst` (or `.venv/bin/python -m bench.burst [N] [--plot DIR]`); the
ADD and DEL latency distributions go to a PNG (bench/plots.py).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench import plots
from bench.builtins import OVERRIDE, configs, enter
from testbed.daemon import DaemonProcess
from testbed.manifests import nad
from testbed.netns import Netns, namespaces
from testbed.runtime import CniRuntime, Outcome

NETWORKS = "k8s.v1.cni.cncf.io/networks"
KIB = 1024


@dataclass
class Phase:
    name: str
    ms: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    wall: float = 0.0
    cpu: float = 0.0  # plexusd's CPU seconds during the phase


class Direct:
    """`--direct`: each pod's request posted straight to plexusd's socket, as the shim would
    post it, without exec'ing a shim: the daemon's own share of a burst (a Python shim costs
    11-16 ms of CPU per exec, which on 2 cores is most of a 110-pod burst)."""

    def __init__(self, runtime: CniRuntime, sock: str, annotations: dict[str, str]) -> None:
        self._runtime, self._sock, self._annotations = runtime, sock, annotations

    def _post(self, env: dict[str, str], conf: dict[str, object]) -> Outcome:
        body = json.dumps({"env": env, "config": json.dumps(conf)}).encode()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(120)
        try:
            while True:  # as the shim does: a full backlog is waited out, not an error
                try:
                    s.connect(self._sock)
                    break
                except BlockingIOError:
                    time.sleep(0.005)
            s.sendall(f"POST /cni HTTP/1.0\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        finally:
            s.close()
        head, _, reply = data.partition(b"\r\n\r\n")
        return Outcome(0 if head.split(b" ")[1] == b"200" else 1, reply.decode(), "")

    def _env(self, command: str, cid: str, netns: str) -> dict[str, str]:
        args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={cid}"
        return {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": cid,
            "CNI_NETNS": netns,
            "CNI_IFNAME": "eth0",
            "CNI_ARGS": f"{args};K8S_POD_INFRA_CONTAINER_ID={cid};K8S_POD_UID=uid-{cid}",
            "CNI_PATH": self._runtime.cni_path,
        }

    def calls(self) -> tuple[Callable[[str, str], Outcome], Callable[[str, str], Outcome]]:
        return self.add, self.delete

    def add(self, cid: str, netns: str) -> Outcome:
        caps = {"io.kubernetes.cri.pod-annotations": self._annotations}
        conf = self._runtime._stdin(None, caps, None, None)
        return self._post(self._env("ADD", cid, netns), conf)

    def delete(self, cid: str, netns: str) -> Outcome:
        return self._post(self._env("DEL", cid, netns), self._runtime._stdin(None, {}, None, None))


class Sampler:
    """plexusd's RSS and thread count, polled while the burst runs; VmHWM is the exact peak."""

    def __init__(self, pid: int) -> None:
        self._status = Path(f"/proc/{pid}/status")
        self.peak_threads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def cpu(self) -> float:
        """plexusd's CPU seconds so far (user + system)."""
        fields = self._status.with_name("stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def read(self) -> dict[str, int]:
        out = {}
        for line in self._status.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])
        return out

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_threads = max(self.peak_threads, self.read()["Threads"])

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def burst(phase: Phase, pods: list[Netns], call: Callable[[str, str], Outcome]) -> None:
    """Every pod's call on its own thread, released together."""
    gate = threading.Barrier(len(pods) + 1)
    lock = threading.Lock()

    def one(i: int, pod: Netns) -> None:
        gate.wait()
        started = time.perf_counter()
        out = call(f"burst-{i}", pod.path)
        ms = (time.perf_counter() - started) * 1000
        with lock:
            phase.ms.append(ms)
            if out.returncode:
                try:
                    error = json.loads(out.stdout)
                    code = f"code {error.get('code')}"
                except ValueError:
                    error, code = {"msg": out.stderr[-300:]}, f"exit {out.returncode}"
                phase.failures[code] += 1
                phase.examples.setdefault(code, str(error.get("msg", ""))[:300])

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(pods)]
    for t in threads:
        t.start()
    gate.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    phase.wall = time.perf_counter() - started


def node_bed(root: Path, made: list[Netns], extra: dict[str, object]) -> DaemonProcess:
    """The node namespace with a macvlan master, the three networks as NADs, plexusd."""
    node = Netns("burst-node")
    made.append(node)
    node.run("ip", "link", "add", "bench0", "type", "veth", "peer", "name", "bench1")
    node.run("ip", "link", "set", "bench0", "up")
    node.run("ip", "link", "set", "bench1", "up")
    nets = {k: v for k, v in configs(root / "ipam").items() if k in ("routed", "bmv1", "bmv2")}
    (root / "nads").mkdir()
    (root / "nads" / "nads.yaml").write_text(
        yaml.safe_dump_all(
            [
                nad(name, conf, namespace="kube-system" if name == "routed" else "bench")
                for name, conf in nets.items()
            ]
        )
    )
    (root / "net.d").mkdir()
    (root / "net.d" / "10-routed.conflist").write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "cluster", "plugins": [nets["routed"]]})
    )
    config = {
        "localDir": str(root / "nads"),
        "clusterNetwork": "cluster",
        "hostLocalDataDir": str(root / "ipam"),
        "logLevel": "info",
        **extra,
    }
    daemon = DaemonProcess(root, config, netns=node.name)
    daemon.start()
    enter(node.path)
    return daemon


@dataclass
class Run:
    how: str
    phases: list[Phase]
    idle: int = 0  # KiB
    peak: int = 0  # KiB
    threads: int = 0


def main() -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("n", nargs="?", type=int, default=110, help="pods (default 110)")
    args.add_argument(
        "--direct", action="store_true", help="post to the socket, no shim exec (see Direct)"
    )
    args.add_argument("--max-concurrent", type=int, help="plexusd's maxConcurrent (default: its)")
    plots.add_arguments(args)
    opts = args.parse_args()
    extra = {"maxConcurrent": opts.max_concurrent} if opts.max_concurrent else {}
    how = "posted straight to the socket (--direct)" if opts.direct else "through the shim"
    run = Run(how, [Phase("ADD"), Phase("DEL")])
    with tempfile.TemporaryDirectory(prefix="plexus-bench-burst-") as tmp, namespaces() as made:
        pods = [Netns(f"burst{i}") for i in range(opts.n)]
        made.extend(pods)
        daemon = node_bed(Path(tmp), made, extra)
        assert daemon.proc is not None
        try:
            runtime = CniRuntime(daemon.conf_file, Path(daemon.config["cniBinDir"]))
            annotations = {OVERRIDE: "kube-system/routed", NETWORKS: "bmv1, bmv2"}
            # One pod first, so the burst measures serving, not the first request's imports.
            warm = Netns("burst-warm")
            made.append(warm)
            runtime.add("warm", warm.path, annotations=annotations, pod=("bench", "warm")).ok()
            runtime.delete("warm", warm.path).ok()
            calls: tuple[Callable[[str, str], Outcome], Callable[[str, str], Outcome]] = (
                Direct(runtime, daemon.socket, annotations).calls()
                if opts.direct
                else (
                    lambda cid, ns: runtime.add(
                        cid, ns, annotations=annotations, pod=("bench", cid)
                    ),
                    runtime.delete,
                )
            )
            sampler = Sampler(daemon.proc.pid)
            run.idle = sampler.read()["VmRSS"]
            with sampler:
                for phase, call in zip(run.phases, calls, strict=True):
                    cpu = sampler.cpu()
                    burst(phase, pods, call)
                    phase.cpu = sampler.cpu() - cpu
            run.peak, run.threads = sampler.read()["VmHWM"], sampler.peak_threads
        finally:
            daemon.stop()
    report(opts.n, run)
    plots.emit(
        opts,
        "burst",
        f"{opts.n} pods at once {run.how} (routed + 2 macvlan, host-local)",
        [
            plots.Panel(
                "each pod's call, burst released together",
                [plots.Series(p.name, p.ms) for p in run.phases],
            )
        ],
    )
    failed = sum(sum(p.failures.values()) for p in run.phases)
    return 1 if failed else 0


def report(n: int, run: Run) -> None:
    print(f"{n} pods at once {run.how} (routed + 2 macvlan, host-local), ms")
    print(
        f"{'':5} {'fail':>5} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7} {'wall s':>7} "
        f"{'plexusd CPU s':>14}  codes"
    )
    for p in run.phases:
        q = statistics.quantiles(p.ms, n=100, method="inclusive")
        codes = ", ".join(f"{k} x{v}" for k, v in sorted(p.failures.items())) or "-"
        print(
            f"{p.name:5} {sum(p.failures.values()):5d} {q[49]:7.0f} {q[89]:7.0f} {q[98]:7.0f} "
            f"{max(p.ms):7.0f} {p.wall:7.2f} {p.cpu:14.2f}  {codes}"
        )
    for p in run.phases:
        for code, msg in sorted(p.examples.items()):
            print(f"  {p.name} {code}: {msg}")
    print(
        f"plexusd RSS: idle {run.idle / KIB:.1f} MiB, peak (VmHWM) {run.peak / KIB:.1f} MiB; "
        f"peak threads {run.threads}"
    )


if __name__ == "__main__":
    sys.exit(main())
