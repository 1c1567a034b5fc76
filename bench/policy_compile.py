"""How long does the policy compiler take on a full node? 10, 100 and 1,000 policies against 110
local pods (kubelet's default maxPods) and 2,000 remote peer pods, pure Python, no kernel.

The world is generated from a fixed seed: 20 namespaces with team/env labels; pods with app,
tier and version labels, a primary address pair each, and a third of them on one of three
secondary networks; named container ports. Policies are a mix of what clusters write: allow
from an app (same namespace), from namespaces by label, both together, ipBlock with except,
numeric ports, ranges (endPort) and named ports, egress rules, default-deny (one in ten), and
MultiNetworkPolicies on the secondaries (one in ten).

Per size: `compile_world` (every local pod's rules) and `render` of every local pod's table,
median/p90/p99 over the runs (render per pod over every pod of every run), plus the size of
what comes out (rules, set elements).

Target (issue 14): 1,000 policies x 110 pods compiled and rendered well under a second or two.

Run: `make bench-policy` (or `.venv/bin/python -m bench.policy_compile [--runs 15]`).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from typing import Any

from bench import plots
from netpolicy.compile import compile_world
from netpolicy.model import (
    ContainerPort,
    Namespace,
    Pod,
    PodInterface,
    Policy,
    PolicyWorld,
)
from netpolicy.nft import render

LOCAL_PODS = 110
REMOTE_PODS = 2000
NAMESPACES = 20
APPS = 60
SECONDARY_NETS = ("default/storage", "default/data", "default/mgmt")
NODE = ("192.168.0.10", "fd00:ffff::10")


def make_pods(rng: random.Random) -> tuple[Pod, ...]:
    pods = []
    for i in range(LOCAL_PODS + REMOTE_PODS):
        local = i < LOCAL_PODS
        ifaces = [
            PodInterface(
                ifname="eth0",
                network="cluster",
                primary=True,
                addresses=(f"10.{i // 250}.{i % 250}.{7}", f"fd00:{i // 250:x}::{i % 250 + 7:x}"),
            )
        ]
        if rng.random() < 0.33:
            net = rng.randrange(len(SECONDARY_NETS))
            ifaces.append(
                PodInterface(
                    ifname="net1",
                    network=SECONDARY_NETS[net],
                    primary=False,
                    addresses=(f"172.{16 + net}.{i // 250}.{i % 250 + 1}",),
                )
            )
        app = rng.randrange(APPS)
        pods.append(
            Pod(
                namespace=f"ns{rng.randrange(NAMESPACES)}",
                name=f"pod{i}",
                labels={
                    "app": f"app{app}",
                    "tier": rng.choice(["web", "api", "db"]),
                    "version": f"v{rng.randrange(3)}",
                },
                interfaces=tuple(ifaces),
                named_ports=(
                    ContainerPort(name="http", port=8000 + app % 7),
                    ContainerPort(name="metrics", port=9090),
                    ContainerPort(name="dns", protocol="UDP", port=53),
                ),
                netns=f"/run/netns/pod{i}" if local else "",
            )
        )
    return tuple(pods)


def _peer(rng: random.Random) -> dict[str, Any]:
    roll = rng.random()
    app = {"matchLabels": {"app": f"app{rng.randrange(APPS)}"}}
    if roll < 0.4:
        return {"podSelector": app}
    if roll < 0.6:
        return {"namespaceSelector": {"matchLabels": {"team": f"t{rng.randrange(5)}"}}}
    if roll < 0.8:
        return {
            "namespaceSelector": {
                "matchExpressions": [{"key": "env", "operator": "In", "values": ["prod", "stg"]}]
            },
            "podSelector": {
                "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["db"]}]
            },
        }
    base = rng.randrange(200)
    return {
        "ipBlock": {
            "cidr": f"100.{base}.0.0/16",
            "except": [f"100.{base}.{rng.randrange(256)}.0/24"],
        }
    }


def _ports(rng: random.Random) -> list[dict[str, Any]]:
    choices: list[dict[str, Any]] = [
        {"port": 443},
        {"port": 8000, "endPort": 8100},
        {"port": "http"},
        {"port": "metrics"},
        {"protocol": "UDP", "port": "dns"},
        {"protocol": "UDP", "port": 5353},
        {"protocol": "SCTP", "port": 3868},
    ]
    return rng.sample(choices, rng.randint(0, 3))


def make_policies(rng: random.Random, count: int) -> tuple[Policy, ...]:
    out = []
    for n in range(count):
        namespace = f"ns{rng.randrange(NAMESPACES)}"
        roll = rng.random()
        selector = {"matchLabels": {"app": f"app{rng.randrange(APPS)}"}} if roll > 0.1 else {}
        spec: dict[str, Any] = {"podSelector": selector}
        extra: dict[str, Any] = {"kind": "NetworkPolicy"}
        if roll < 0.1:
            spec["policyTypes"] = ["Ingress", "Egress"]  # default deny
        else:
            spec["ingress"] = [
                {"from": [_peer(rng) for _ in range(rng.randint(1, 3))], "ports": _ports(rng)}
                for _ in range(rng.randint(1, 2))
            ]
            if rng.random() < 0.3:
                spec["egress"] = [{"to": [_peer(rng)], "ports": _ports(rng)}]
        if 0.1 <= roll < 0.2:
            extra = {"kind": "MultiNetworkPolicy", "policy_for": (rng.choice(SECONDARY_NETS),)}
        out.append(
            Policy.model_validate({**extra, "namespace": namespace, "name": f"p{n}", "spec": spec})
        )
    return tuple(out)


def make_world(policies: int, seed: int = 14) -> PolicyWorld:
    rng = random.Random(seed)
    namespaces = {
        f"ns{i}": Namespace(
            name=f"ns{i}",
            labels={"team": f"t{i % 5}", "env": ["prod", "stg", "dev"][i % 3]},
        )
        for i in range(NAMESPACES)
    }
    return PolicyWorld(
        policies=make_policies(rng, policies),
        namespaces=namespaces,
        pods=make_pods(rng),
        node_addresses=NODE,
    )


def _stats(samples: list[float]) -> tuple[float, float, float]:
    p = plots.percentiles(samples)
    return p[50], p[90], p[99]


def measure(policies: int, runs: int) -> dict[str, Any]:
    world = make_world(policies)
    compile_ms: list[float] = []
    render_ms: list[float] = []
    render_all_ms: list[float] = []
    lines = elements = 0
    for _ in range(runs):
        t0 = time.perf_counter()
        rules = compile_world(world)
        compile_ms.append((time.perf_counter() - t0) * 1000)
        total = 0.0
        scripts = []
        for pod_rules in rules.values():
            t = time.perf_counter()
            scripts.append(render(pod_rules))
            dt = (time.perf_counter() - t) * 1000
            render_ms.append(dt)
            total += dt
        render_all_ms.append(total)
        lines = sum(s.count(" accept") + s.count(" drop\n") for s in scripts)
        elements = sum(
            len(a.cidrs or ())
            for r in rules.values()
            for i in r.interfaces
            for d in (i.ingress, i.egress)
            for a in d.allows
        )
    enforcing = sum(1 for r in rules.values() if r.enforcing)
    return {
        "policies": policies,
        "compile": compile_ms,
        "render": render_ms,
        "render_all": render_all_ms,
        "enforcing": enforcing,
        "rules": lines,
        "elements": elements,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.policy_compile", description=__doc__)
    ap.add_argument("--runs", type=int, default=15, help="compile+render runs per size")
    ap.add_argument("--sizes", default="10,100,1000", help="policy counts, comma-separated")
    plots.add_arguments(ap)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    results = [measure(n, args.runs) for n in sizes]
    print(
        f"{LOCAL_PODS} local pods, {REMOTE_PODS} remote peers, {NAMESPACES} namespaces, "
        f"{args.runs} runs per size (ms)"
    )
    head = (
        f"{'policies':>8} | {'compile_world p50/p90/p99':>27} | {'render/pod p50/p90/p99':>24} "
        f"| {'render all p50':>14} | {'both p50':>8} | {'enforcing':>9} | {'rules':>6} "
        f"| {'set elems':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        c, rp, ra = _stats(r["compile"]), _stats(r["render"]), statistics.median(r["render_all"])
        print(
            f"{r['policies']:>8} | {c[0]:>8.1f} {c[1]:>8.1f} {c[2]:>8.1f} | "
            f"{rp[0]:>7.3f} {rp[1]:>7.3f} {rp[2]:>7.3f} | {ra:>14.1f} | {c[0] + ra:>8.1f} | "
            f"{r['enforcing']:>9} | {r['rules']:>6} | {r['elements']:>9}"
        )
    plots.emit(
        args,
        "policy_compile",
        f"policy compile and render: {LOCAL_PODS} local pods, {REMOTE_PODS} remote peers",
        [
            plots.Panel(
                "compile_world (every local pod)",
                [plots.Series(f"{r['policies']} policies", r["compile"]) for r in results],
            ),
            plots.Panel(
                "render (one pod's table)",
                [plots.Series(f"{r['policies']} policies", r["render"]) for r in results],
            ),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
