"""Pod setup through containerd's CRI, as kubelet drives it, with and without Plexus.

Rows, all measured in the same run on the same containerd:
  (c) containerd + a plain conflist of Debian's bridge + host-local (no meta-plugin)
  (b) Plexus, eth0 only (the same bridge + host-local as its cluster network)
  (a) Plexus, eth0 + 2 macvlan secondaries (host-local each)
Columns: RunPodSandbox wall time and the CNI phase containerd itself logs ('begin cni setup' ->
'cni result': loopback, the plugin, libcni's cache write), medians and p90 over N pods each, and
the ratio of medians to (c). (b) and (a) alternate pod by pod so drift hits both alike.

Run as root: `sudo make bench-cri` (or `.venv/bin/python -m bench.cri_pods [N] [--plot DIR]`,
N >= 20); both columns' distributions go to a PNG (bench/plots.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

from bench import plots
from testbed.cri import ContainerdBed, containerd_bed
from testbed.manifests import bridge_conflist, host_local, macvlan, nad

NETWORKS = "k8s.v1.cni.cncf.io/networks"
OVERRIDE = "v1.multus-cni.io/default-network"
WARMUP = 3


def cycle(rt: ContainerdBed, name: str, annotations: dict[str, str]) -> tuple[str, float]:
    pod = rt.run_pod(name, annotations=annotations)
    rt.stop_pod(pod)
    rt.remove_pod(pod)
    return pod.sandbox_id, pod.seconds * 1000


def stats(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), statistics.quantiles(values, n=10)[-1]


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.cri_pods", description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=25, help="pods per row (default 25)")
    plots.add_arguments(parser)
    opts = parser.parse_args()
    n = opts.n
    runs: dict[str, list[tuple[str, float]]] = {"a": [], "b": [], "c": [], "d": []}
    with tempfile.TemporaryDirectory(prefix="plexus-bench-cri-") as tmp:
        root = Path(tmp)
        ipam = root / "ipam"
        (root / "nads").mkdir()
        (root / "nads" / "nads.yaml").write_text(
            yaml.safe_dump_all(
                [
                    nad("net-a", macvlan("bench0", "10.89.0.0/16", ipam)),
                    nad("net-b", macvlan("bench0", "10.90.0.0/16", ipam)),
                    nad("fast-a", macvlan("bench0", "10.91.0.0/16", ipam, type="plexus-macvlan")),
                    nad("fast-b", macvlan("bench0", "10.92.0.0/16", ipam, type="plexus-macvlan")),
                    nad(
                        "routed",
                        {
                            "cniVersion": "1.0.0",
                            "type": "plexus-routed",
                            "ipam": host_local("10.93.0.0/16", ipam),
                        },
                        namespace="kube-system",
                    ),
                ]
            )
        )
        cluster = root / "cluster.conflist"
        cluster.write_text(json.dumps(bridge_conflist("cluster", "benchbr0", "10.88.0.0/16", ipam)))
        with containerd_bed(root / "rt") as rt:
            for argv in (
                ("ip", "link", "add", "bench0", "type", "veth", "peer", "name", "bench1"),
                ("ip", "link", "set", "bench0", "up"),
                ("ip", "link", "set", "bench1", "up"),
            ):
                rt.in_netns("", *argv)
            rt.use_conflist(
                "10-plain.conflist", bridge_conflist("plain", "benchbr0", "10.88.0.0/16", ipam)
            )
            for i in range(WARMUP + n):
                sample = cycle(rt, f"plain-{i}", {})
                if i >= WARMUP:
                    runs["c"].append(sample)
            for old in rt.cni_conf.iterdir():
                old.unlink()
            rt.start_plexusd(
                {
                    "localDir": str(root / "nads"),
                    "clusterNetwork": str(cluster),
                    "stateDir": str(root / "state"),
                    "runDir": str(root / "run"),
                    "logLevel": "warning",
                    "hostLocalDataDir": str(ipam),
                }
            )
            builtins = {OVERRIDE: "kube-system/routed", NETWORKS: "fast-a, fast-b"}
            for i in range(WARMUP + n):
                a = cycle(rt, f"three-{i}", {NETWORKS: "net-a, net-b"})
                b = cycle(rt, f"one-{i}", {})
                d = cycle(rt, f"builtin-{i}", builtins)
                if i >= WARMUP:
                    runs["a"].append(a)
                    runs["b"].append(b)
                    runs["d"].append(d)
            phases = rt.cni_phase_ms()
    labels = {
        "c": "(c) containerd + bridge/host-local, no Plexus",
        "b": "(b) Plexus, eth0 only",
        "a": "(a) Plexus, eth0 + 2 macvlan secondaries",
        "d": "(d) Plexus built-ins: routed + 2 plexus-macvlan",
    }
    base_run = stats([ms for _, ms in runs["c"]])[0]
    base_cni = stats([phases[s] for s, _ in runs["c"]])[0]
    print(f"pod setup through containerd 1.6 CRI, n={n} pods per row, medians and p90 in ms")
    print(f"{'':48} {'RunPodSandbox':>22} {'CNI phase':>22}")
    print(f"{'':48} {'median':>7} {'p90':>7} {'ratio':>6} {'median':>7} {'p90':>7} {'ratio':>6}")
    for key in ("c", "b", "a", "d"):
        run_med, run_p90 = stats([ms for _, ms in runs[key]])
        cni_med, cni_p90 = stats([phases[s] for s, _ in runs[key]])
        print(
            f"{labels[key]:48} {run_med:7.1f} {run_p90:7.1f} {run_med / base_run:6.2f} "
            f"{cni_med:7.1f} {cni_p90:7.1f} {cni_med / base_cni:6.2f}"
        )
    order = ("c", "b", "a", "d")
    panels = [
        plots.Panel(
            "RunPodSandbox (CRI call wall time)",
            [plots.Series(labels[k], [ms for _, ms in runs[k]], reference=k == "c") for k in order],
        ),
        plots.Panel(
            "CNI phase (containerd's own log)",
            [
                plots.Series(labels[k], [phases[s] for s, _ in runs[k]], reference=k == "c")
                for k in order
            ],
        ),
    ]
    # The table's p90 is statistics.quantiles' default (exclusive) method: the legend's too.
    plots.emit(opts, "cri_pods", "pod setup through containerd's CRI", panels, method="exclusive")
    return 0


if __name__ == "__main__":
    sys.exit(main())
