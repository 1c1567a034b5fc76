"""Does a pod's cost grow with the number of NADs? Local mode with 10 and with 10,000 NADs, one
manifest file each, the same 3-interface pod (plexus-routed primary + 2 plexus-macvlan, each with
host-local), measured through the installed shim exactly as a runtime calls it.

Every size's plexusd runs at once, each in its own node namespace, and the sizes get their pods
in turn (drift hits them alike). Per size: start-up to ready (socket answering and conflist
written: the cluster network is read from the NADs' directory), ADD median/p90/p99 (and
plexusd's own time), the first ADD after one NAD file changed (an unrelated one, and one the pod
uses), a GC of every network Plexus knows (one per NAD, cniVersion 1.1.0 so each one's plugins
do collect), and plexusd's resident memory idle after the pods (and its peak).

Targets (issue 11): ADD median at 10,000 within 1.2x of 10; GC <= 2 s; idle RSS <= 70 MiB; a
change seen by the next ADD without slowing it.

Run as root: `sudo make bench-nads`
(or `.venv/bin/python -m bench.nad_scale [N] [--nads 10,10000]`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from testbed.daemon import DaemonProcess
from testbed.manifests import host_local, nad
from testbed.netns import Netns, namespaces
from testbed.runtime import CniRuntime

NETWORKS = "k8s.v1.cni.cncf.io/networks"
NAMESPACE = "bench"
WARMUP = 5
CHANGES = 10  # first ADDs after a change, per kind of change
LIVE = 5  # pods left attached over the GC (told valid), plus one it must tear down


@dataclass
class Run:
    nads: int
    startup_s: float = 0.0
    add_ms: list[float] = field(default_factory=list)
    add_daemon_ms: list[float] = field(default_factory=list)
    changed_other_ms: list[float] = field(default_factory=list)
    changed_used_ms: list[float] = field(default_factory=list)
    changed_daemon_ms: list[float] = field(default_factory=list)  # plexusd's own, both kinds
    gc_s: float = 0.0
    gc_daemon_s: float = 0.0
    idle_rss_mib: float = 0.0
    after_gc_rss_mib: float = 0.0
    peak_rss_mib: float = 0.0


def macvlan_conf(i: int, data: Path, subnet: str | None = None) -> dict[str, Any]:
    return {
        "cniVersion": "1.1.0",
        "type": "plexus-macvlan",
        "master": "bench0",
        "mode": "bridge",
        "ipam": host_local(subnet or f"10.{64 + i // 256}.{i % 256}.0/24", data),
    }


def nad_name(i: int) -> str:
    return f"net-{i:05d}"


def write_nad(nads: Path, i: int, data: Path, subnet: str | None = None) -> None:
    """Write one NAD's file whole and rename it into place, as tooling does."""
    path = nads / f"{nad_name(i)}.yaml"
    tmp = nads / f".{nad_name(i)}.tmp"
    tmp.write_text(yaml.safe_dump(nad(nad_name(i), macvlan_conf(i, data, subnet), NAMESPACE)))
    tmp.replace(path)


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def daemon_ms(daemon: DaemonProcess, command: str, prefix: str) -> list[float]:
    return [
        float(e["ms"])
        for e in daemon.events("cni_request_done")
        if e.get("command") == command and str(e.get("container_id") or "").startswith(prefix)
    ]


class Bench:
    def __init__(self, root: Path, node: Netns, n_nads: int) -> None:
        self.root = root
        self.node = node
        self.data = root / "ipam"
        self.nads = root / "nads"
        self.nads.mkdir(parents=True)
        for i in range(n_nads):
            write_nad(self.nads, i, self.data)
        (root / "net.d").mkdir()
        routed = {
            "cniVersion": "1.1.0",
            "type": "plexus-routed",
            "ipam": host_local("10.250.0.0/16", self.data),
        }
        (root / "net.d" / "10-routed.conflist").write_text(
            json.dumps({"cniVersion": "1.1.0", "name": "cluster", "plugins": [routed]})
        )
        self.daemon = DaemonProcess(
            root,
            {
                "localDir": str(self.nads),
                "clusterNetwork": "cluster",
                "hostLocalDataDir": str(self.data),
                "logLevel": "info",
            },
            netns=node.name,
        )
        self.annotations = {NETWORKS: f"{NAMESPACE}/{nad_name(0)}, {NAMESPACE}/{nad_name(1)}"}
        self.runtime: CniRuntime | None = None

    def start(self) -> float:
        started = time.perf_counter()
        self.daemon.start(timeout=120)
        elapsed = time.perf_counter() - started
        self.runtime = CniRuntime(self.daemon.conf_file, Path(self.daemon.config["cniBinDir"]))
        return elapsed

    def add(self, cid: str, pod: Netns) -> float:
        assert self.runtime is not None
        started = time.perf_counter()
        self.runtime.add(cid, pod.path, annotations=self.annotations, pod=(NAMESPACE, cid)).ok()
        return (time.perf_counter() - started) * 1000

    def delete(self, cid: str, pod: Netns) -> None:
        assert self.runtime is not None
        self.runtime.delete(cid, pod.path).ok()

    def cycle(self, cid: str) -> float:
        pod = Netns(f"nb-{cid}")
        try:
            ms = self.add(cid, pod)
            self.delete(cid, pod)
        finally:
            pod.delete()
        return ms

    def gc(self, valid: list[str]) -> float:
        assert self.runtime is not None
        started = time.perf_counter()
        self.runtime.invoke(
            "GC",
            version="1.1.0",
            extra={
                "cni.dev/valid-attachments": [{"containerID": c, "ifname": "eth0"} for c in valid]
            },
        ).ok()
        return time.perf_counter() - started


def measure(sizes: list[int], n: int) -> list[Run]:
    """Every size's daemon runs side by side and gets its pods in turn, so the machine's drift
    hits them alike; GC and memory are taken one daemon at a time."""
    runs = [Run(size) for size in sizes]
    with tempfile.TemporaryDirectory(prefix="plexus-bench-nads-") as tmp, namespaces() as made:
        benches = []
        for k, size in enumerate(sizes):
            node = Netns(f"nb{k}-node")
            made.append(node)
            node.run("ip", "link", "add", "bench0", "type", "veth", "peer", "name", "bench1")
            node.run("ip", "link", "set", "bench0", "up")
            node.run("ip", "link", "set", "bench1", "up")
            benches.append(Bench(Path(tmp) / f"n{size}", node, size))
        try:
            for run, bench in zip(runs, benches, strict=True):
                run.startup_s = bench.start()
            _pods(runs, benches, n)
            _changes(runs, benches)
            for run, bench in zip(runs, benches, strict=True):
                _gc(run, bench, made)
        finally:
            for bench in benches:
                bench.daemon.stop()
    return runs


def _pods(runs: list[Run], benches: list[Bench], n: int) -> None:
    for i in range(WARMUP + n):
        for k, (run, bench) in enumerate(zip(runs, benches, strict=True)):
            ms = bench.cycle(f"a{k}-{i}")
            if i >= WARMUP:
                run.add_ms.append(ms)
    for k, (run, bench) in enumerate(zip(runs, benches, strict=True)):
        run.add_daemon_ms = daemon_ms(bench.daemon, "ADD", f"a{k}-")[-n:]
    time.sleep(1.0)
    for run, bench in zip(runs, benches, strict=True):
        assert bench.daemon.proc is not None
        run.idle_rss_mib, _ = rss_mib(bench.daemon.proc.pid)


def _changes(runs: list[Run], benches: list[Bench]) -> None:
    """The first ADD after an unrelated NAD file changed, and after the pod's own one did
    (another subnet, then back)."""
    for i in range(CHANGES):
        for k, (run, bench) in enumerate(zip(runs, benches, strict=True)):
            write_nad(bench.nads, 2 + i % (run.nads - 2), bench.data)
            run.changed_other_ms.append(bench.cycle(f"o{k}-{i}"))
            write_nad(bench.nads, 1, bench.data, "10.63.0.0/24" if i % 2 == 0 else None)
            run.changed_used_ms.append(bench.cycle(f"u{k}-{i}"))
    for k, (run, bench) in enumerate(zip(runs, benches, strict=True)):
        run.changed_daemon_ms = daemon_ms(bench.daemon, "ADD", f"o{k}-") + daemon_ms(
            bench.daemon, "ADD", f"u{k}-"
        )


def _gc(run: Run, bench: Bench, made: list[Netns]) -> None:
    """A GC with a few pods alive (told valid) and one the runtime forgot (torn down)."""
    daemon = bench.daemon
    assert daemon.proc is not None
    live = [(f"l{run.nads}-{i}", Netns(f"nb-l{run.nads}-{i}")) for i in range(LIVE + 1)]
    made.extend(pod for _, pod in live)
    for cid, pod in live:
        bench.add(cid, pod)
    run.gc_s = bench.gc([cid for cid, _ in live[:LIVE]])
    gc_done = [e for e in daemon.events("cni_request_done") if e.get("command") == "GC"]
    run.gc_daemon_s = float(gc_done[-1]["ms"]) / 1000 if gc_done else float("nan")
    for cid, pod in live[:LIVE]:
        bench.delete(cid, pod)
    time.sleep(1.0)
    run.after_gc_rss_mib, run.peak_rss_mib = rss_mib(daemon.proc.pid)


def pct(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def report(runs: list[Run], n: int) -> None:
    base, last = runs[0], runs[-1]
    print(f"3-interface pod (routed + 2 plexus-macvlan, host-local), n={n} pods per size")
    header = f"{'':44}" + "".join(f"{f'{r.nads:,} NADs':>14}" for r in runs) + f"{'ratio':>8}"
    print(header)

    def row(label: str, values: list[float], fmt: str = "{:.1f}", ratio: bool = False) -> None:
        cells = "".join(f"{fmt.format(v):>14}" for v in values)
        tail = f"{values[-1] / values[0]:>7.2f}x" if ratio and values[0] else ""
        print(f"{label:44}{cells}{tail}")

    row("start-up to ready (s)", [r.startup_s for r in runs], "{:.2f}", True)
    row("ADD median (ms)", [statistics.median(r.add_ms) for r in runs], ratio=True)
    row("ADD p90 (ms)", [pct(r.add_ms, 90) for r in runs], ratio=True)
    row("ADD p99 (ms)", [pct(r.add_ms, 99) for r in runs], ratio=True)
    row(
        "ADD median, plexusd's own (ms)",
        [statistics.median(r.add_daemon_ms) for r in runs],
        ratio=True,
    )
    row(
        "first ADD after another NAD file changed",
        [statistics.median(r.changed_other_ms) for r in runs],
        ratio=True,
    )
    row("  (max of them, ms)", [max(r.changed_other_ms) for r in runs])
    row(
        "first ADD after its own NAD file changed",
        [statistics.median(r.changed_used_ms) for r in runs],
        ratio=True,
    )
    row("  (max of them, ms)", [max(r.changed_used_ms) for r in runs])
    row(
        "  both kinds, plexusd's own (median, ms)",
        [statistics.median(r.changed_daemon_ms) for r in runs],
        ratio=True,
    )
    row("GC of every network, through the shim (s)", [r.gc_s for r in runs], "{:.2f}", True)
    row("GC, plexusd's own (s)", [r.gc_daemon_s for r in runs], "{:.2f}", True)
    row("idle RSS after the pods (MiB)", [r.idle_rss_mib for r in runs], ratio=True)
    row("RSS after the GC (MiB)", [r.after_gc_rss_mib for r in runs], ratio=True)
    row("peak RSS (MiB)", [r.peak_rss_mib for r in runs], ratio=True)
    add_ratio = statistics.median(last.add_ms) / statistics.median(base.add_ms)
    print()
    print(
        f"targets at {last.nads:,} NADs: ADD median ratio {add_ratio:.2f}x (<= 1.2x), "
        f"GC {last.gc_s:.2f} s (<= 2 s), idle RSS {last.idle_rss_mib:.1f} MiB (<= 70 MiB)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.nad_scale", description=__doc__.split("\n")[0])
    parser.add_argument("n", nargs="?", type=int, default=60, help="pods per size (>= 20)")
    parser.add_argument("--nads", default="10,10000", help="NAD counts to compare, first = base")
    args = parser.parse_args(argv)
    if args.n < 20:
        print("bench.nad_scale: n must be at least 20", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.nads.split(",")]
    if len(sizes) < 2 or min(sizes) < 3:
        print("bench.nad_scale: --nads needs two or more counts, each >= 3", file=sys.stderr)
        return 2
    runs = measure(sizes, args.n)
    report(runs, args.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
