"""VF health change -> VFPool condition latency of the cluster controller.

Each run marks VFs unhealthy on one node (by default by writing that node's VFPoolNodeState
status, as plexusd would) and measures the time until a watch on the VFPool sees
`Degraded=True`; then it heals them and measures the time until `Degraded=False`. The clock
starts just before the write is sent, so the figure includes the API write, the controller's
watch delivery, its debounce (100 ms by default), the status computation, the status write and
the watch delivery back to the benchmark.

    python -m bench.controller_latency [--runs 20]
        starts the API stand-in (a subprocess: `python -m tests.k8s_standin`), seeds three
        Nodes with node states and a VFPool, and runs a controller in this process.
    python -m bench.controller_latency --api http://127.0.0.1:8001 --external-controller \
            --node worker-3 --writer mymodule:make_writer
        against a real cluster (through `kubectl proxy`) whose deployed controller answers,
        with a writer that changes VF health for real (e.g. through plexusd on the node).

A writer is `factory(api_url: str, node: str) -> obj` with `obj.set_unhealthy(count: int)`
(count 0 heals). Stdlib HTTP only (the benchmarks may not import the kubernetes client).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http.client import HTTPConnection
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from bench import plots

G, V = "plexus.dev", "v1alpha1"
POOL = "bench-pool"
RESOURCE = "plexus.dev/bench"
LABEL = "plexus.dev/bench"
VFS = 8


class Writer(Protocol):
    @staticmethod
    def _vf(i: int, bad: bool) -> dict[str, Any]:
        return {"pci": f"0000:5e:02.{i}", "pf": "0000:5e:00.0", "index": i, "pool": RESOURCE,
                "state": "unhealthy" if bad else "free", "healthy": not bad,
                "reason": "PF ens5f0 has no link" if bad else ""}  # fmt: skip

    def set_unhealthy(self, count: int) -> None: ...


class Http:
    """A few JSON requests against an unauthenticated API URL (the stand-in, kubectl proxy)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80

    def request(self, method: str, path: str, body: Any = None, ctype: str = "") -> Any:
        conn = HTTPConnection(self.host, self.port, timeout=15)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": ctype or "application/json"} if data else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = json.loads(resp.read() or b"{}")
            if resp.status >= 400:
                raise RuntimeError(f"{method} {path}: {resp.status} {payload.get('message')}")
            return payload
        finally:
            conn.close()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class DirectStateWriter:
    """Writes the node's VFPoolNodeState as its plexusd would (the default writer)."""

    def __init__(self, api_url: str, node: str) -> None:
        self.http, self.node = Http(api_url), node
        path = f"/apis/{G}/{V}/vfpoolnodestates"
        found = self.http.request("GET", f"/api/v1/nodes/{node}")
        owner = {"apiVersion": "v1", "kind": "Node", "name": node, "uid": found["metadata"]["uid"]}
        body = {"apiVersion": f"{G}/{V}", "kind": "VFPoolNodeState",
                "metadata": {"name": node, "ownerReferences": [owner]},
                "spec": {"nodeName": node}}  # fmt: skip
        try:
            self.http.request("POST", path, body)
        except RuntimeError as exc:
            if "409" not in str(exc):
                raise
        self.status_path = f"{path}/{node}/status"
        self.set_unhealthy(0)

    @staticmethod
    def _vf(i: int, bad: bool) -> dict[str, Any]:
        return {"pci": f"0000:5e:02.{i}", "pf": "0000:5e:00.0", "index": i, "pool": RESOURCE,
                "state": "unhealthy" if bad else "free", "healthy": not bad,
                "reason": "PF ens5f0 has no link" if bad else ""}  # fmt: skip

    def set_unhealthy(self, count: int) -> None:
        vfs = [self._vf(i, i < count) for i in range(VFS)]
        status = {"vfs": vfs, "pools": [{"name": POOL, "resourceName": RESOURCE}],
                  "updated": _now()}  # fmt: skip
        self.http.request("PATCH", self.status_path, {"status": status},
                          "application/merge-patch+json")  # fmt: skip


class PoolWatch:
    """Follows the VFPool's Degraded condition through a watch stream."""

    def __init__(self, api_url: str) -> None:
        self.http = Http(api_url)
        self._cond = threading.Condition()
        self.degraded: str | None = None
        self.seen_at = 0.0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        path = f"/apis/{G}/{V}/vfpools?watch=1&fieldSelector=metadata.name%3D{POOL}"
        while True:
            conn = HTTPConnection(self.http.host, self.http.port, timeout=600)
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                for line in iter(resp.readline, b""):
                    if line.strip():
                        self._seen(json.loads(line))
            except OSError:
                return  # the API went away: the benchmark is over
            finally:
                conn.close()

    def _seen(self, event: dict[str, Any]) -> None:
        conditions = (event.get("object", {}).get("status") or {}).get("conditions") or []
        degraded = next((c["status"] for c in conditions if c["type"] == "Degraded"), None)
        with self._cond:
            if degraded != self.degraded:
                self.degraded, self.seen_at = degraded, time.monotonic()
                self._cond.notify_all()

    def wait(self, want: str, timeout: float = 30.0) -> float:
        """Wait for Degraded == want; the monotonic time it was seen."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.degraded == want, timeout):
                raise TimeoutError(f"VFPool {POOL} never became Degraded={want}")
            return self.seen_at


def _seed(api_url: str, nodes: list[str]) -> None:
    http = Http(api_url)
    for node in nodes:
        http.request("POST", "/api/v1/nodes",
                     {"metadata": {"name": node, "labels": {LABEL: "true"}}})  # fmt: skip
    http.request("POST", f"/apis/{G}/{V}/vfpools", {
        "apiVersion": f"{G}/{V}", "kind": "VFPool", "metadata": {"name": POOL},
        "spec": {"resourceName": RESOURCE, "nicSelector": {"pfNames": ["ens5f0"]},
                 "nodeSelector": {"matchLabels": {LABEL: "true"}}},
    })  # fmt: skip


def _start_controller(api_url: str, tmp: Path) -> Callable[[], None]:
    from cnispec import logs
    from nad_controller import k8s
    from nad_controller.controller import Controller, Settings
    from nad_controller.leader import ElectionTiming

    logs.configure("warning", "json", cache=False)
    config = tmp / "kubeconfig"
    config.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "bench",
        "clusters": [{"name": "bench", "cluster": {"server": api_url}}],
        "users": [{"name": "bench", "user": {}}],
        "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "bench"}}],
    }))  # fmt: skip
    timing = ElectionTiming(lease_duration=15, renew_deadline=10, retry_period=0.5)
    settings = Settings(namespace="plexus-system", identity="bench", timing=timing)
    controller = Controller(k8s.ClusterApi(k8s.connect(str(config))), settings)
    controller.start()
    return controller.stop


def _writer(spec: str | None) -> Callable[[str, str], Writer]:
    if not spec:
        return DirectStateWriter
    module, _, name = spec.partition(":")
    factory: Callable[[str, str], Writer] = getattr(importlib.import_module(module), name)
    return factory


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(api_url: str, node: str, writer: Writer, runs: int) -> tuple[list[float], list[float]]:
    watch = PoolWatch(api_url)
    watch.wait("False", 60)  # the controller has converged on a healthy pool
    degrade, heal = [], []
    for _ in range(runs):
        start = time.monotonic()
        writer.set_unhealthy(2)
        degrade.append((watch.wait("True") - start) * 1000)
        start = time.monotonic()
        writer.set_unhealthy(0)
        heal.append((watch.wait("False") - start) * 1000)
        time.sleep(0.2)  # let the debounce window close: each run starts from quiet
    return degrade, heal


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.controller_latency", description=__doc__)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--api", help="API URL without auth (kubectl proxy); default: a stand-in")
    ap.add_argument("--external-controller", action="store_true",
                    help="measure the controller already running against --api")  # fmt: skip
    ap.add_argument("--node", default="node-3", help="the node whose VFs change health")
    ap.add_argument("--writer", help="module:factory changing VF health (default: write the "
                    "node state directly)")  # fmt: skip
    plots.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.runs < 20:
        print("--runs must be at least 20 for a median and a p90 worth printing", file=sys.stderr)
        return 2
    standin = None
    with tempfile.TemporaryDirectory() as tmp:
        api_url = args.api
        if api_url is None:
            root = Path(__file__).resolve().parents[1]
            standin = subprocess.Popen(
                [sys.executable, "-m", "tests.k8s_standin"],
                cwd=root,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert standin.stdout is not None
            api_url = standin.stdout.readline().strip()
            nodes = ["node-1", "node-2", "node-3"]
            _seed(api_url, nodes)
            for other in nodes:
                if other != args.node:
                    DirectStateWriter(api_url, other)
        stop = None if args.external_controller else _start_controller(api_url, Path(tmp))
        try:
            writer = _writer(args.writer)(api_url, args.node)
            degrade, heal = measure(api_url, args.node, writer, args.runs)
        finally:
            if stop is not None:
                stop()
            if standin is not None:
                standin.communicate("", timeout=10)
    print(f"VF health change -> VFPool Degraded condition, ms (n={args.runs})")
    print("| change                      | median |    p90 |    max |")
    print("|-----------------------------|-------:|-------:|-------:|")
    for label, values in (("2 VFs unhealthy -> True", degrade), ("healed -> False", heal)):
        print(f"| {label:<27} | {statistics.median(values):6.1f} | {_pct(values, 0.9):6.1f} "
              f"| {max(values):6.1f} |")  # fmt: skip
    series = [plots.Series("2 VFs unhealthy -> Degraded=True", degrade),
              plots.Series("healed -> Degraded=False", heal)]  # fmt: skip
    plots.emit(args, "controller_latency", "VF health change -> VFPool Degraded condition",
               [plots.Panel("write to condition seen by a watch", series)])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
