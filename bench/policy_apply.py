"""Network policy at node scale: 1,000 policies x 110 pods on one node, through plexusd's policy
engine (`metaplugin.policy_engine`) and real nftables in real pod namespaces.

The node: a namespace with a bridge; 110 pods, each a namespace with a veth `eth0` on that
bridge (one /16), in 10 namespaces of 11 pods with app/tier labels. The policies: 1,000
NetworkPolicies spread over those namespaces, each selecting pods by label and letting in pods
(by podSelector, namespaceSelector or both) or an ipBlock on a few TCP/UDP ports, a fifth of
them with egress rules too; one of them lets the bench's client reach its server. The engine
runs in this process with an in-bench source (the snapshot never changes behind its back) and
applies through libnftables exactly as in plexusd.

Measured (each a table row, samples in the PNG):
- full: compile the whole world, then apply every pod's table (a fresh engine: a daemon start);
- pod add: a new pod's records appear, `pod_added` (the ADD hook: that pod protected) and then
  the recompute pass that updates every peer whose allows now include it (converged);
- policy change: one policy's port changes; the recompute pass that re-applies the pods whose
  table changed;
- TCP connection setup (connect() until established) from a client pod to a server pod through
  the full rule set, against the same pods with no table (half before the rules go in, half
  after they are all removed), in the same run, and the ratio.

Run as root: `sudo make bench-policy-apply` (or `.venv/bin/python -m bench.policy_apply
[--pods 110] [--policies 1000] [--changes 20] [--connects 500] [--plot DIR]`).
"""

from __future__ import annotations

import argparse
import functools
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from bench import plots
from cnispec import logs
from cnispec.cni import Result
from cnispec.identity import Holder
from cnispec.netconf import PreparedNetwork, PreparedPlugin
from kernel.netns import run_in_netns
from metaplugin.policy_engine import PolicyEngine
from metaplugin.store import Attachment, ContainerRecords
from netpolicy.model import Namespace, Pod, Policy, PolicySpec
from testbed.netns import Netns, namespaces

NAMESPACES = 10
APPS = 20
SERVER_PORT = 5201
SUBNET = "10.201"


@dataclass
class BenchPod:
    namespace: str
    name: str
    netns: Netns
    address: str
    labels: dict[str, str]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class Source:
    """The engine's PolicySource, held still by the bench."""

    def __init__(self, policies: list[Policy], labels: dict[str, dict[str, str]]) -> None:
        self.policies = tuple(policies)
        self.namespaces = {
            f"ns{i}": Namespace(name=f"ns{i}", labels={"team": f"t{i % 3}"})
            for i in range(NAMESPACES)
        }
        self.pods: tuple[Pod, ...] = ()
        self.labels = labels

    def snapshot(self) -> Source:
        return self

    def on_change(self, callback: Callable[[], None]) -> None:
        return None

    def pod_labels(self, namespace: str, name: str, container_id: str) -> dict[str, str] | None:
        return self.labels.get(f"{namespace}/{name}")

    def synced(self) -> bool:
        return True

    def close(self) -> None:
        return None


@dataclass
class Store:
    containers: dict[str, ContainerRecords] = field(default_factory=dict)

    def put(self, pod: BenchPod) -> None:
        plugin = PreparedPlugin(
            type="bridge", path="/usr/lib/cni/bridge", version="1.0.0", config={}
        )
        result = {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": pod.netns.path}],
            "ips": [{"address": f"{pod.address}/16", "interface": 0}],
        }
        record = Attachment(
            holder=Holder(
                container_id=pod.name,
                ifname="eth0",
                netns=pod.netns.path,
                pod_namespace=pod.namespace,
                pod_name=pod.name,
            ),
            network="cluster",
            seq=0,
            is_default=True,
            runtime_ifname="eth0",
            prepared=PreparedNetwork(name="cluster", plugins=(plugin,)),
            state="added",
            result=Result.from_wire(result),
        )
        self.containers[pod.name] = ContainerRecords(pod.name, (record,))

    def drop(self, pod: BenchPod) -> None:
        self.containers.pop(pod.name, None)

    def all(self) -> Iterable[ContainerRecords]:
        return list(self.containers.values())


# --- the node -------------------------------------------------------------------------------------


def build_node(made: list[Netns], count: int) -> tuple[Netns, list[BenchPod]]:
    node = Netns("pnode")
    made.append(node)
    node.run("ip", "link", "add", "pbr0", "type", "bridge")
    node.run("ip", "addr", "add", f"{SUBNET}.255.254/16", "dev", "pbr0")
    node.run("ip", "link", "set", "pbr0", "up")
    pods = []
    for i in range(count):
        pods.append(make_pod(made, node, i))
    return node, pods


def make_pod(made: list[Netns], node: Netns, i: int, *, name: str | None = None) -> BenchPod:
    ns = Netns(f"pp{i}")
    made.append(ns)
    host = f"pv{i}"
    subprocess.run(
        ["ip", "link", "add", host, "netns", node.name, "type", "veth", "peer", "name", "eth0",
         "netns", ns.name],
        check=True,
    )  # fmt: skip
    node.run("ip", "link", "set", host, "master", "pbr0", "up")
    address = f"{SUBNET}.{i // 250}.{i % 250 + 1}"
    ns.run("ip", "addr", "add", f"{address}/16", "dev", "eth0")
    ns.run("ip", "link", "set", "eth0", "up")
    # app by position within the namespace: each namespace holds pods of many apps
    labels = {"app": f"app{(i // NAMESPACES) % APPS}", "tier": f"t{i % 3}"}
    return BenchPod(f"ns{i % NAMESPACES}", name or f"pod{i}", ns, address, labels)


# --- the policies -------------------------------------------------------------------------------


def generate_policies(count: int, rng: random.Random) -> list[Policy]:
    """`count` policies; the first two let every ns0 pod reach ns0's app0 pods (the server)
    on SERVER_PORT."""
    out = [
        policy(
            "ns0",
            "bench-server",
            {
                "podSelector": {"matchLabels": {"app": "app0"}},
                "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": SERVER_PORT}]}],
            },
        ),
        # ... and lets every ns0 pod out to it (a random policy may isolate the client's egress)
        policy(
            "ns0",
            "bench-client",
            {
                "podSelector": {},
                "policyTypes": ["Egress"],
                "egress": [
                    {
                        "to": [{"podSelector": {"matchLabels": {"app": "app0"}}}],
                        "ports": [{"port": SERVER_PORT}],
                    }
                ],
            },
        ),
    ]
    for n in range(2, count):
        namespace = f"ns{rng.randrange(NAMESPACES)}"
        peer: dict[str, Any]
        shape = rng.randrange(4)
        if shape == 0:
            peer = {"podSelector": {"matchLabels": {"app": f"app{rng.randrange(APPS)}"}}}
        elif shape == 1:
            peer = {"namespaceSelector": {"matchLabels": {"team": f"t{rng.randrange(3)}"}}}
        elif shape == 2:
            peer = {
                "namespaceSelector": {"matchLabels": {"team": f"t{rng.randrange(3)}"}},
                "podSelector": {"matchLabels": {"tier": f"t{rng.randrange(3)}"}},
            }
        else:
            octet = rng.randrange(256)
            net = f"172.{16 + octet % 16}"
            peer = {"ipBlock": {"cidr": f"{net}.0.0/16", "except": [f"{net}.{octet}.0/24"]}}
        port = 1000 + rng.randrange(2000)
        ports = [{"protocol": rng.choice(("TCP", "UDP")), "port": port}]
        if rng.random() < 0.2:
            ports.append({"protocol": "TCP", "port": port, "endPort": port + 10})
        spec: dict[str, Any] = {
            "podSelector": {"matchLabels": {"app": f"app{rng.randrange(APPS)}"}},
            "ingress": [{"from": [peer], "ports": ports}],
        }
        if rng.random() < 0.2:
            spec["egress"] = [{"to": [peer], "ports": ports}]
            spec["policyTypes"] = ["Ingress", "Egress"]
        out.append(policy(namespace, f"p{n}", spec))
    return out


def policy(namespace: str, name: str, spec: dict[str, Any]) -> Policy:
    return Policy(
        kind="NetworkPolicy",
        namespace=namespace,
        name=name,
        spec=PolicySpec.model_validate(spec),
    )


# --- measurements -------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def connect_ms(client: Netns, server: BenchPod, count: int) -> list[float]:
    """connect() to established from inside the client pod, `count` times (each a new flow)."""

    def work() -> list[float]:
        out = []
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(2.0)
            started = time.perf_counter()
            sock.connect((server.address, SERVER_PORT))
            out.append((time.perf_counter() - started) * 1000)
            sock.close()
        return out

    return run_in_netns(client.path, work)


def serve(server: BenchPod) -> socket.socket:
    """A listening socket made inside the server pod, accepted and closed by a thread."""

    def bind() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", SERVER_PORT))
        sock.listen(1024)
        return sock

    listener = run_in_netns(server.netns.path, bind)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    return listener


def row(label: str, samples: list[float], digits: int = 1) -> tuple[str, ...]:
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return (
        label,
        str(len(samples)),
        *(f"{v:.{digits}f}" for v in (statistics.median(samples), q[98], max(samples))),
    )


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@dataclass
class Results:
    compile_ms: float = 0.0
    full_ms: float = 0.0
    enforced: int = 0
    allows: int = 0
    baseline: list[float] = field(default_factory=list)
    through: list[float] = field(default_factory=list)
    hook_ms: list[float] = field(default_factory=list)
    converge_ms: list[float] = field(default_factory=list)
    change_ms: list[float] = field(default_factory=list)
    changed_pods: list[int] = field(default_factory=list)
    add_reapplied: list[int] = field(default_factory=list)  # peers re-applied per pod add


@dataclass
class Node:
    made: list[Netns]
    node: Netns
    pods: list[BenchPod]
    store: Store
    source: Source
    engine: PolicyEngine


def measure(opts: argparse.Namespace) -> Results:
    rng = random.Random(opts.seed)
    out = Results()
    with namespaces() as made:
        print(f"building the node: {opts.pods} pods ...", file=sys.stderr)
        node, pods = build_node(made, opts.pods)
        store = Store()
        for p in pods:
            store.put(p)
        source = Source(generate_policies(opts.policies, rng), {p.key: p.labels for p in pods})
        engine = PolicyEngine(
            source=source,
            store=store,
            node_addresses=lambda: (f"{SUBNET}.255.254",),
            debounce=0.0,
        )
        bed = Node(made, node, pods, store, source, engine)
        server = next(p for p in pods if p.namespace == "ns0" and p.labels["app"] == "app0")
        client = next(p for p in pods if p.namespace == "ns0" and p is not server)
        listener = serve(server)
        try:
            run_in_netns(client.netns.path, lambda: None)  # a warm worker
            out.baseline = connect_ms(client.netns, server, opts.connects // 2)  # no table yet
            out.compile_ms = timed(engine.compile)
            out.full_ms = timed(engine.recompute)
            wanted = engine.compile().values()
            out.enforced = sum(1 for r in wanted if r.enforcing)
            out.allows = sum(
                len(i.ingress.allows) + len(i.egress.allows) for r in wanted for i in r.interfaces
            )
            out.through = connect_ms(client.netns, server, opts.connects)
            pod_adds(bed, opts, out)
            policy_changes(bed, opts, rng, out)
            # no policy again (every table removed): the other half of the baseline, so both
            # rows see the same warm caches and the same noise of a shared machine
            source.policies = ()
            engine.recompute()
            out.baseline += connect_ms(client.netns, server, opts.connects - opts.connects // 2)
        finally:
            listener.close()
            engine.stop()
    return out


def pod_adds(bed: Node, opts: argparse.Namespace, out: Results) -> None:
    """A new pod: its ADD hook, then the pass that updates its peers; then it goes again."""
    for n in range(opts.changes):
        extra = make_pod(bed.made, bed.node, opts.pods + n, name=f"extra{n}")
        bed.source.labels[extra.key] = extra.labels
        bed.store.put(extra)
        records = list(bed.store.containers[extra.name].records)
        hook = functools.partial(bed.engine.pod_added, extra.netns.path, records)
        out.hook_ms.append(timed(hook))
        before = bed.engine.stats.applies
        out.converge_ms.append(out.hook_ms[-1] + timed(bed.engine.recompute))
        out.add_reapplied.append(bed.engine.stats.applies - before)
        bed.store.drop(extra)
        bed.engine.pod_removed(extra.netns.path)
        bed.engine.recompute()
        extra.netns.delete()


def policy_changes(bed: Node, opts: argparse.Namespace, rng: random.Random, out: Results) -> None:
    """One policy's port changes: the pass that re-applies the pods whose table changed."""
    policies = list(bed.source.policies)
    present = {(p.namespace, p.labels["app"]) for p in bed.pods}
    selecting = [  # a change to a policy that selects no pod here would cost nothing
        i
        for i, pol in enumerate(policies)
        if i > 1 and (pol.namespace, pol.spec.pod_selector.match_labels["app"]) in present
    ]
    for n in range(opts.changes):
        i = rng.choice(selecting)
        old = policies[i]
        spec = old.spec.model_dump(by_alias=True, exclude_none=True)
        spec["ingress"][0]["ports"][0]["port"] = 3000 + n
        policies[i] = policy(old.namespace, old.name, spec)
        bed.source.policies = tuple(policies)
        before = bed.engine.stats.applies
        out.change_ms.append(timed(bed.engine.recompute))
        out.changed_pods.append(bed.engine.stats.applies - before)


def report(opts: argparse.Namespace, r: Results) -> None:
    print(
        f"\n{opts.policies} policies x {opts.pods} pods on one node: {r.enforced} pods "
        f"enforcing, {r.allows} allows in all their tables"
    )
    print_table(
        [
            ("what", "n", "median ms", "p99 ms", "max ms"),
            ("compile the whole world", "1", f"{r.compile_ms:.1f}", "-", "-"),
            ("compile + apply every pod (start)", "1", f"{r.full_ms:.1f}", "-", "-"),
            row("pod add: ADD hook (new pod protected)", r.hook_ms),
            row("pod add: converged (peers updated)", r.converge_ms),
            row("policy change: converged", r.change_ms),
        ]
    )
    for what, counts in (
        ("pod add's pass (peers; the new pod is the hook's)", r.add_reapplied),
        ("policy change", r.changed_pods),
    ):
        print(
            f"pods re-applied by a {what}: median {statistics.median(counts):.0f}, "
            f"max {max(counts)}"
        )
    print()
    print_table(
        [
            ("TCP connection setup", "n", "median ms", "p99 ms", "max ms"),
            row("no policy", r.baseline, 3),
            row(f"through the rule set ({opts.policies} policies)", r.through, 3),
        ]
    )
    ratio = statistics.median(r.through) / statistics.median(r.baseline)
    print(f"ratio (median, rule set / none): {ratio:.2f}")
    plots.emit(
        opts,
        "policy-apply",
        f"network policy: {opts.policies} policies x {opts.pods} pods",
        [
            plots.Panel(
                "updates",
                [
                    plots.Series("pod add: ADD hook", r.hook_ms),
                    plots.Series("pod add: converged", r.converge_ms),
                    plots.Series("policy change: converged", r.change_ms),
                ],
            ),
            plots.Panel(
                "TCP connection setup",
                [
                    plots.Series("through the rule set", r.through),
                    plots.Series("no policy", r.baseline, reference=True),
                ],
            ),
        ],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench.policy_apply", description="1,000 policies x 110 pods"
    )
    parser.add_argument("--pods", type=int, default=110)
    parser.add_argument("--policies", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=20, help="pod adds and policy changes")
    parser.add_argument("--connects", type=int, default=500, help="TCP connections per row")
    parser.add_argument("--seed", type=int, default=14)
    plots.add_arguments(parser)
    opts = parser.parse_args(argv)
    logs.configure("warning", "console")  # the engine logs every apply at info
    report(opts, measure(opts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
