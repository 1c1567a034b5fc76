"""What one exec of the plexus shim costs, next to a Go reference plugin on the same machine.

Rows (each `subprocess.run` wall time, median, p90 and p99 over N calls after a warm-up, all in
one run; ratio = median / Go host-local VERSION's median):
  /bin/true                          the harness floor
  Go host-local VERSION              a reference plugin's exec cost (every delegate exec's)
  compiled shim VERSION              the static C shim's start-up (answered without the daemon)
  compiled shim STATUS via plexusd   shim + unix socket + daemon round trip (no delegate exec)
  Python shim VERSION / STATUS       the same for the Python shim (the fallback)

Targets (issue 11): compiled VERSION <= 1.5x, compiled STATUS <= 2x.

Run as root: `sudo make bench` (or `.venv/bin/python -m bench.shim_cost [N] [--plot DIR]`
after `make shim`); the latency distributions go to a PNG (bench/plots.py).
Everything lives in a temp dir; the daemon runs in local mode with a cluster network that STATUS
does not exec.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import plots
from metaplugin.config import DaemonConfig
from metaplugin.install import COMPILED_SHIM, place_shim, shim_text
from testbed.daemon import DaemonProcess

GO_PLUGIN = Path("/usr/lib/cni/host-local")


def measure(run: Callable[[], None], n: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        run()
    out = []
    for _ in range(n):
        started = time.perf_counter()
        run()
        out.append((time.perf_counter() - started) * 1000)
    return out


def exec_fn(argv: list[str], env: dict[str, str], stdin: bytes) -> Callable[[], None]:
    def run() -> None:
        proc = subprocess.run(argv, input=stdin, env=env, capture_output=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {proc.stdout!r} {proc.stderr!r}")

    return run


def percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100)[p - 1]


def python_shim(root: Path) -> Path:
    """The Python shim as plexusd installs it when no compiled shim was built."""
    cfg = DaemonConfig.model_validate({"cniBinDir": str(root / "pybin"), "stateDir": str(root)})
    interpreter = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    return place_shim(cfg, shim_text(interpreter).encode())


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.shim_cost", description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=100, help="calls per row (default 100)")
    plots.add_arguments(parser)
    opts = parser.parse_args()
    n = opts.n
    with tempfile.TemporaryDirectory(prefix="plexus-bench-") as tmp:
        root = Path(tmp)
        (root / "net.d").mkdir()
        (root / "nads").mkdir()
        (root / "net.d" / "10-cluster.conflist").write_text(
            json.dumps({"cniVersion": "1.0.0", "name": "cluster", "plugins": [{"type": "bridge"}]})
        )
        daemon = DaemonProcess(root, {"localDir": str(root / "nads"), "logLevel": "warning"})
        daemon.start()
        try:
            installed = Path(daemon.config["cniBinDir"]) / "plexus"
            shims = {"Python": python_shim(root)}
            if COMPILED_SHIM.is_file():
                assert installed.read_bytes() == COMPILED_SHIM.read_bytes()
                shims = {"compiled": installed, **shims}
            else:
                print(f"no compiled shim at {COMPILED_SHIM}: run `make shim` for its rows")
            conf = json.loads(daemon.conf_file.read_text())
            plugin = {**conf["plugins"][0], "name": conf["name"], "cniVersion": "1.1.0"}
            version_in = json.dumps({"cniVersion": "1.0.0"}).encode()
            rows = [
                ("/bin/true", exec_fn(["/bin/true"], {}, b"")),
                (
                    "Go host-local VERSION",
                    exec_fn([str(GO_PLUGIN)], {"CNI_COMMAND": "VERSION"}, version_in),
                ),
            ]
            for kind, shim in shims.items():
                rows.append(
                    (
                        f"{kind} shim VERSION",
                        exec_fn([str(shim)], {"CNI_COMMAND": "VERSION"}, version_in),
                    )
                )
                rows.append(
                    (
                        f"{kind} shim STATUS via plexusd",
                        exec_fn(
                            [str(shim)], {"CNI_COMMAND": "STATUS"}, json.dumps(plugin).encode()
                        ),
                    )
                )
            results = [(name, measure(fn, n)) for name, fn in rows]
        finally:
            daemon.stop()
    base = statistics.median(results[1][1])
    print(f"shim cost per exec, n={n} (ms; ratio = median / Go host-local VERSION median)")
    print(f"{'call':36} {'median':>8} {'p90':>8} {'p99':>8} {'ratio':>7}")
    for name, values in results:
        median = statistics.median(values)
        p90, p99 = percentile(values, 90), percentile(values, 99)
        print(f"{name:36} {median:8.2f} {p90:8.2f} {p99:8.2f} {median / base:7.2f}")
    print("targets: compiled shim VERSION <= 1.50, compiled shim STATUS via plexusd <= 2.00")
    # The harness floor and the Go plugin are the reference rows; every shim row is Plexus.
    series = [
        plots.Series(name, values, reference=i < 2) for i, (name, values) in enumerate(results)
    ]
    plots.emit(
        opts,
        "shim_cost",
        "one exec of the plexus shim vs a Go reference plugin",
        [plots.Panel("per exec (subprocess.run wall time)", series)],
        method="exclusive",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
