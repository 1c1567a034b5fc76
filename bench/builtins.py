"""Built-in delegates against exec'd reference plugins, for the same three attachments: a routed
primary (veth + host routes) and two macvlan secondaries, each with host-local IPAM.

Rows, measured in the same run, pod by pod in turn so drift hits them alike:
  (a) Plexus built-ins: plexus-routed + 2x plexus-macvlan, host-local in-process
  (b) Plexus driving Debian's reference plugins: ptp + 2x macvlan, host-local exec'd
  (c) Debian's reference plugins exec'd one after another, no meta-plugin at all: the lower
      bound of any exec-based meta-plugin such as Multus
(a) and (b) go through the installed shim exactly as a runtime calls it; their "daemon" columns
are plexusd's own time per request (from its log), i.e. without the shim's exec.

Run as root: `sudo make bench-builtins` (or `.venv/bin/python -m bench.builtins [N] [--plot DIR]`,
N >= 50); the ADD and DEL distributions go to a PNG (bench/plots.py).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench import plots
from testbed.daemon import DaemonProcess
from testbed.manifests import host_local, nad
from testbed.netns import Netns, namespaces
from testbed.runtime import CniRuntime

PLUGINS = Path("/usr/lib/cni")
WARMUP = 3
OVERRIDE = "v1.multus-cni.io/default-network"
NETWORKS = "k8s.v1.cni.cncf.io/networks"


def enter(netns: str) -> None:
    """Move this benchmark process into the node's namespace, so the reference plugins it
    execs for (c) work there exactly as the daemon's do (no `ip netns exec` in the timing)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = os.open(netns, os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)


def configs(data: Path) -> dict[str, dict[str, Any]]:
    mv = {"cniVersion": "1.0.0", "master": "bench0", "mode": "bridge"}
    return {
        "routed": {
            "cniVersion": "1.0.0",
            "type": "plexus-routed",
            "ipam": host_local("10.230.0.0/16", data),
        },
        "ptp": {
            "cniVersion": "1.0.0",
            "type": "ptp",
            "ipMasq": False,
            "ipam": host_local("10.231.0.0/16", data, routes=[{"dst": "0.0.0.0/0"}]),
        },
        "bmv1": {**mv, "type": "plexus-macvlan", "ipam": host_local("10.232.0.0/16", data)},
        "bmv2": {**mv, "type": "plexus-macvlan", "ipam": host_local("10.233.0.0/16", data)},
        "rmv1": {**mv, "type": "macvlan", "ipam": host_local("10.234.0.0/16", data)},
        "rmv2": {**mv, "type": "macvlan", "ipam": host_local("10.235.0.0/16", data)},
    }


class Direct:
    """(c): the reference plugins exec'd in order, as a runtime without Plexus would."""

    def __init__(self, nets: dict[str, dict[str, Any]]) -> None:
        self.plan = [
            ("ptp", "eth0", nets["ptp"]),
            ("macvlan", "net1", nets["rmv1"]),
            ("macvlan", "net2", nets["rmv2"]),
        ]

    def _run(
        self,
        command: str,
        plugin: str,
        *,
        cid: str,
        netns: str,
        ifname: str,
        conf: dict[str, Any],
        name: str,
    ) -> None:
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": cid,
            "CNI_NETNS": netns,
            "CNI_IFNAME": ifname,
            "CNI_PATH": str(PLUGINS),
            "PATH": os.environ["PATH"],
        }
        stdin = json.dumps({**conf, "name": name}).encode()
        out = subprocess.run(
            [str(PLUGINS / plugin)], input=stdin, env=env, capture_output=True, check=False
        )
        if out.returncode:
            raise RuntimeError(f"{plugin} {command}: {out.stdout!r} {out.stderr!r}")

    def add(self, cid: str, netns: str) -> None:
        for i, (plugin, ifname, conf) in enumerate(self.plan):
            self._run(
                "ADD", plugin, cid=cid, netns=netns, ifname=ifname, conf=conf, name=f"direct{i}"
            )

    def delete(self, cid: str, netns: str) -> None:
        for i, (plugin, ifname, conf) in reversed(list(enumerate(self.plan))):
            self._run(
                "DEL", plugin, cid=cid, netns=netns, ifname=ifname, conf=conf, name=f"direct{i}"
            )


def via_plexus(
    runtime: CniRuntime, primary: str, secondaries: str
) -> tuple[Callable[[str, str], None], Callable[[str, str], None]]:
    annotations = {OVERRIDE: f"kube-system/{primary}", NETWORKS: secondaries}

    def add(cid: str, netns: str) -> None:
        runtime.add(cid, netns, annotations=annotations, pod=("bench", cid)).ok()

    def delete(cid: str, netns: str) -> None:
        runtime.delete(cid, netns).ok()

    return add, delete


def stats(values: list[float]) -> tuple[float, float, float]:
    """Median, p90 and p99."""
    q = statistics.quantiles(values, n=100, method="inclusive")
    return statistics.median(values), q[89], q[98]


def daemon_times(daemon: DaemonProcess, prefix: str, command: str) -> list[float]:
    return [
        float(e["ms"])
        for e in daemon.events("cni_request_done")
        if e.get("command") == command and str(e.get("container_id", "")).startswith(prefix)
    ]


MIN_RUNS = 50
TARGET = 0.5  # issue 11: built-in ADD and DEL medians at most half the reference plugins'


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.builtins", description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=60, help="pods per row (default 60)")
    plots.add_arguments(parser)
    opts = parser.parse_args()
    n = opts.n
    if n < MIN_RUNS:
        print(f"bench.builtins: N must be at least {MIN_RUNS} for stable medians", file=sys.stderr)
        return 2
    timings: dict[str, dict[str, list[float]]] = {k: {"ADD": [], "DEL": []} for k in "abc"}
    with tempfile.TemporaryDirectory(prefix="plexus-bench-builtins-") as tmp, namespaces() as made:
        root = Path(tmp)
        node = Netns("bench-node")
        made.append(node)
        node.run("ip", "link", "add", "bench0", "type", "veth", "peer", "name", "bench1")
        node.run("ip", "link", "set", "bench0", "up")
        node.run("ip", "link", "set", "bench1", "up")
        nets = configs(root / "ipam")
        (root / "nads").mkdir()
        (root / "nads" / "nads.yaml").write_text(
            yaml.safe_dump_all(
                [
                    nad(
                        name,
                        conf,
                        namespace="kube-system" if name in ("routed", "ptp") else "bench",
                    )
                    for name, conf in nets.items()
                ]
            )
        )
        (root / "net.d").mkdir()
        (root / "net.d" / "10-routed.conflist").write_text(
            json.dumps({"cniVersion": "1.0.0", "name": "cluster", "plugins": [nets["routed"]]})
        )
        daemon = DaemonProcess(
            root,
            {
                "localDir": str(root / "nads"),
                "clusterNetwork": "cluster",
                "hostLocalDataDir": str(root / "ipam"),
                "logLevel": "info",
            },
            netns=node.name,
        )
        daemon.start()
        try:
            enter(node.path)
            runtime = CniRuntime(daemon.conf_file, Path(daemon.config["cniBinDir"]))
            direct = Direct(nets)
            cases = {
                "a": via_plexus(runtime, "routed", "bmv1, bmv2"),
                "b": via_plexus(runtime, "ptp", "rmv1, rmv2"),
                "c": (direct.add, direct.delete),
            }
            for i in range(WARMUP + n):
                for key, (add, delete) in cases.items():
                    pod = Netns(f"bench-{key}{i}")
                    try:
                        started = time.perf_counter()
                        add(f"{key}-{i}", pod.path)
                        added = time.perf_counter()
                        delete(f"{key}-{i}", pod.path)
                        done = time.perf_counter()
                    finally:
                        pod.delete()
                    if i >= WARMUP:
                        timings[key]["ADD"].append((added - started) * 1000)
                        timings[key]["DEL"].append((done - added) * 1000)
        finally:
            daemon.stop()
        inside = {
            key: {cmd: daemon_times(daemon, f"{key}-", cmd)[-n:] for cmd in ("ADD", "DEL")}
            for key in "ab"
        }
    report(n, timings, inside)
    plot(opts, timings)
    return 0


LABELS = {
    "a": "(a) Plexus built-ins",
    "b": "(b) Plexus + reference plugins",
    "c": "(c) reference plugins, no meta-plugin",
}


def plot(opts: argparse.Namespace, timings: dict[str, dict[str, list[float]]]) -> None:
    """The ADD and DEL distributions of the three rows, (c) drawn as the reference."""
    panels = [
        plots.Panel(
            f"{cmd} of a 3-attachment pod (through the shim)",
            [plots.Series(LABELS[key], timings[key][cmd], reference=key == "c") for key in "abc"],
        )
        for cmd in ("ADD", "DEL")
    ]
    plots.emit(opts, "builtins", "built-in delegates vs exec'd reference plugins", panels)


def report(
    n: int, timings: dict[str, dict[str, list[float]]], inside: dict[str, dict[str, list[float]]]
) -> None:
    labels = LABELS
    base = {cmd: stats(timings["c"][cmd])[0] for cmd in ("ADD", "DEL")}
    print(f"3 attachments per pod (routed primary + 2 macvlan, host-local), n={n} pods per row, ms")
    print(
        f"{'':40} {'ADD med':>8} {'p90':>7} {'p99':>7} {'x(c)':>6} {'DEL med':>8} {'p90':>7} "
        f"{'p99':>7} {'x(c)':>6} {'daemon ADD':>11} {'daemon DEL':>11}"
    )
    for key in "abc":
        add_m, add_p90, add_p99 = stats(timings[key]["ADD"])
        del_m, del_p90, del_p99 = stats(timings[key]["DEL"])
        d_add = f"{statistics.median(inside[key]['ADD']):.1f}" if key in inside else "-"
        d_del = f"{statistics.median(inside[key]['DEL']):.1f}" if key in inside else "-"
        print(
            f"{labels[key]:40} {add_m:8.1f} {add_p90:7.1f} {add_p99:7.1f} "
            f"{add_m / base['ADD']:6.2f} {del_m:8.1f} {del_p90:7.1f} {del_p99:7.1f} "
            f"{del_m / base['DEL']:6.2f} {d_add:>11} {d_del:>11}"
        )
    for cmd in ("ADD", "DEL"):
        ratio = stats(timings["a"][cmd])[0] / base[cmd]
        verdict = "met" if ratio <= TARGET else "missed"
        print(f"target: built-in {cmd} median <= {TARGET}x (c): {ratio:.2f}x, {verdict}")


if __name__ == "__main__":
    sys.exit(main())
