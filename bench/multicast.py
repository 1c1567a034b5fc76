"""Multicast across nodes on the three-node bed (testbed/cluster.py: each node its own plexusd,
local mode), for `plexus-overlay`: one overlay network with `"multicast": true`, a sender pod on
node1, receiver pods on node2 and node3, a bystander pod (never joins) on node2.

1. Join-to-first-packet latency: the sender streams a group every 1 ms (a sequence number); a
   receiver on node2 or node3 (in turn) takes CLOCK_MONOTONIC, joins, and takes it again when
   its first datagram is read (every namespace shares the machine's clock, and one process
   takes both). Each join uses a group nobody ever joined, which is the state a prune leaves
   (no MDB entry, no member port anywhere), without waiting out the leave each time.
   (a) local mode: every node floods the group to every other node, each bridge prunes on
       arrival. (b) cluster mode's data path: the sender node's VXLAN MDB lists the receiver's
       node (`Overlay.set_group_members`, called in node1's namespace as the controller will
       call it) right before the join, so the time is the data path's, not the controller's;
       the MDB call's own time is reported apart. The 1 ms send period adds up to 1 ms.
2. Replication cost per member node: the sender pushes K datagrams back to back to a group
   whose MDB lists 0, 1, 2 member nodes (the real node2, node3, each with a member) and then
   4 and 8 (node2, node3 plus stand-in VTEPs: extra underlay addresses on the bed's external
   namespace, which take VXLAN on a bound, never-read port). The sending process's wall and
   CPU time per 1,000 group datagrams, median of interleaved rounds, and the marginal cost per
   extra member node (least squares over the member counts). On one kernel the softirq work of
   each copy (encapsulation, underlay transmit, and for real nodes their receive path too) runs
   in the sender's syscall: an upper bound on the sender node's own share.
3. Underlay packets per group packet: frames counted on every node's underlay link (node1's
   out, node2's and node3's in) per group datagram, with 0, 1 and 2 member nodes: Plexus
   with the MDB (cluster mode), Plexus flooding (local mode), and the reference, built in the
   same run beside it on the same nodes: a plain Linux bridge with a VXLAN port, head-end
   flood to every other node, no snooping, no MDB (what an L2 secondary network such as
   Multus + bridge or OVN-Kubernetes' layer-2 topology does: broadcast). Also the frames that
   reached the bystander pod, and what each member received.

Then the same three on the routed primary (`fabric.multicast: true`): in local mode on a bed of
its own per fabric mode (native, VXLAN), pods with the primary alone, membership from plexusd
reading a pod's groups when its report arrives, flood to every other node, delivery to members
only; and in cluster mode (listed replication, native fabric) on three node namespaces without
plexusd, each node's replicator fed what plexusd and the controller would feed it (replication
cost and underlay frames; no join latency there, see `run_routed_listed`).

Run as root: `sudo make bench-multicast` (or `.venv/bin/python -m bench.multicast [--joins N]`).
Tables are printed, every sample goes to build/bench/multicast.json, the join latency CDFs to
a PNG (bench/plots.py). About two minutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from bench import plots
from bench.mcast_agents import listed_underlay
from delegates.overlay import QUERY_INTERVAL_S
from delegates.routed import host_veth_name
from testbed.cluster import Cluster, Node, cluster
from testbed.manifests import host_local, nad
from testbed.netns import Netns, namespaces

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "build" / "bench" / "multicast.json"
NETWORK = "mcb"  # the overlay network's name (its config's), as the MDB API takes it
NETWORKS = "k8s.v1.cni.cncf.io/networks"
STREAM_PERIOD_US = 1000
JOIN_TIMEOUT_S = 2.0
WARMUP = 2
# After the segments are made, one querier interval and more: till then the bridges' IPv4
# querier election may leave a node that floods unregistered groups to every pod (seen on the
# last node to make its segment, a few seconds long), which is start-up, not steady state.
SETTLE_S = 2 * QUERY_INTERVAL_S + 1.0
MEMBER_COUNTS = (0, 1, 2, 4, 8)
STAND_INS = [f"192.168.100.{200 + j}" for j in range(1, 7)]  # extra VTEPs on the external ns
BASELINE_VNI, BASELINE_PORT = 9999, 4790
PACED = 100  # group datagrams per underlay count


# --- agents ---------------------------------------------------------------------------------


class Agent:
    """A bench/mcast_agents.py process in a namespace: one command line in, one JSON line out."""

    def __init__(self, ns: Netns, role: str, *args: str) -> None:
        self.name = f"{role}@{ns.name}"
        self.proc = subprocess.Popen(
            [
                *("ip", "netns", "exec", ns.name, "env", f"PYTHONPATH={REPO}", sys.executable),
                *("-m", "bench.mcast_agents", role, *args),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )

    def ready(self) -> None:
        assert self.receive() == "ready"

    def send(self, *words: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(" ".join(words) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"agent {self.name} exited ({self.proc.wait()})")
        return json.loads(line)

    def ask(self, *words: str) -> Any:
        self.send(*words)
        return self.receive()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@contextmanager
def agents() -> Iterator[list[Agent]]:
    """Every agent started is killed at the end (before the bed removes its namespaces)."""
    started: list[Agent] = []
    try:
        yield started
    finally:
        for agent in started:
            agent.close()


def start(started: list[Agent], ns: Netns, role: str, *args: str) -> Agent:
    agent = Agent(ns, role, *args)
    started.append(agent)
    return agent


# --- the bed ----------------------------------------------------------------------------------


def write_nads(bed: Cluster) -> None:
    """The overlay network on every node, each node its own part of the subnet."""
    for node in bed.nodes:
        home, i = bed.root / node.name, node.index
        ipam = host_local(
            "10.90.0.0/24",
            home / "leases",
            ranges=[
                [
                    {
                        "subnet": "10.90.0.0/24",
                        "rangeStart": f"10.90.0.{i}1",
                        "rangeEnd": f"10.90.0.{i}9",
                    }
                ],
                [
                    {
                        "subnet": "fd00:90::/64",
                        "rangeStart": f"fd00:90::{i}:1",
                        "rangeEnd": f"fd00:90::{i}:9",
                    }
                ],
            ],
        )
        conf = {"cniVersion": "1.0.0", "type": "plexus-overlay", "multicast": True, "ipam": ipam}
        (home / "nads" / "multicast-bench.yaml").write_text(
            yaml.safe_dump_all([nad(NETWORK, conf)])
        )


def attach(bed: Cluster, node: Node, role: str) -> Netns:
    """A pod on the overlay; the daemon may not have read the new NAD file yet: retried."""
    deadline = time.monotonic() + 10
    while True:
        pod, out = node.add_pod(bed, role, NETWORK)
        if out.returncode == 0 or time.monotonic() > deadline:
            out.ok()
            return pod
        node.pods.pop()
        node.runtime.delete(pod.name, pod.path).ok()
        time.sleep(0.3)


def baseline(bed: Cluster) -> dict[str, Netns]:
    """The reference L2 secondary network on the same nodes: per node a bridge without
    snooping and a VXLAN port whose all-zeros FDB entries flood to every other node; pods by
    veth (snd on node1, r2 and by2 on node2, r3 and by3 on node3), IPv4 only."""
    pods: dict[str, Netns] = {}
    roles = {1: ["snd"], 2: ["r2", "by2"], 3: ["r3", "by3"]}
    for node in bed.nodes:
        ns = node.ns
        ns.run("ip", "link", "add", "bmc0", "type", "bridge", "mcast_snooping", "0")
        ns.run(
            *("ip", "link", "add", "bmv0", "type", "vxlan", "id", str(BASELINE_VNI)),
            *("dstport", str(BASELINE_PORT), "local", node.address, "dev", "eth0"),
        )
        ns.run("ip", "link", "set", "bmv0", "master", "bmc0", "up")
        ns.run("ip", "link", "set", "bmc0", "up")
        for other in bed.nodes:
            if other is not node:
                ns.run(
                    *("bridge", "fdb", "append", "00:00:00:00:00:00"),
                    *("dev", "bmv0", "dst", other.address),
                )
        for k, role in enumerate(roles[node.index]):
            pod = bed.new_ns(f"bl-{role}")
            host = f"bl{role}"
            ns.run(
                "ip", "link", "add", host, "type", "veth", "peer", "name", "net1", "netns", pod.name
            )
            ns.run("ip", "link", "set", host, "master", "bmc0", "up")
            pod.run("ip", "addr", "add", f"10.91.0.{node.index * 10 + k + 1}/24", "dev", "net1")
            pod.run("ip", "link", "set", "net1", "up")
            pod.run("ip", "route", "add", "224.0.0.0/4", "dev", "net1")
            pods[role] = pod
    return pods


def stand_in_vteps(bed: Cluster) -> None:
    for address in STAND_INS:
        bed.external.run("ip", "addr", "add", f"{address}/24", "dev", "eth0")


# --- statistics -------------------------------------------------------------------------------


def stats(values: Sequence[float]) -> tuple[float, float, float]:
    """Median, p90 and p99 (as bench/plots.py marks them)."""
    p = plots.percentiles(values)
    return p[50], p[90], p[99]


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least squares: the marginal cost per unit of x."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def router_ports(node: Node) -> list[str]:
    """What the node's bridges hold as multicast router ports (unregistered groups go there)."""
    out = node.ns.run("bridge", "-d", "mdb", "show").stdout
    return [line.strip() for line in out.splitlines() if "router" in line]


def group(family: str, block: int, k: int) -> str:
    """A group of its own per (block, k): never joined before it is measured."""
    if family == "4":
        return f"239.{100 + block}.{k // 250}.{k % 250 + 1}"
    return f"ff3e::{100 + block:x}:{k + 1:x}"


# --- 1. join to first packet ------------------------------------------------------------------


def join_latency(
    sender: Agent,
    *,
    receivers: Sequence[tuple[Agent, Node]],
    members: Agent | None,
    family: str,
    block: int,
    n: int,
) -> dict[str, Any]:
    samples: list[float] = []
    where: list[str] = []
    mdb_ms: list[float] = []
    misses = 0
    for k in range(WARMUP + n):
        g = group(family, block, k)
        receiver, node = receivers[k % len(receivers)]
        sender.ask("stream", family, g, str(STREAM_PERIOD_US))
        if members is not None:
            answer = members.ask("set", NETWORK, g, node.address)
            assert answer["ok"], answer
            mdb_ms.append(answer["ms"])
        time.sleep(0.01)  # the stream flows (to nobody) before the join
        out = receiver.ask("first", family, g, str(JOIN_TIMEOUT_S))
        sender.ask("stop")
        if members is not None:
            members.ask("set", NETWORK, g)  # the group leaves the MDB with its member
        if k < WARMUP:
            continue
        if out["first"] is None:
            misses += 1
        else:
            samples.append((out["first"] - out["joined"]) / 1e6)
            where.append(node.name)
        time.sleep(0.02)
    return {
        "samples_ms": samples,
        "receiver_node": where,
        "misses": misses,
        "mdb_call_ms": mdb_ms[WARMUP:],
    }


# --- 2. replication cost ----------------------------------------------------------------------


def replication_cost(
    sender: Agent,
    receivers: Sequence[Agent],
    counts: Sequence[int],
    *,
    program: Callable[[int, str], None] | None,
    burst: int,
    rounds: int,
) -> dict[str, Any]:
    """Bursts to one group per member count: the real receivers (node2's, node3's) hold the
    group for counts 1 and 2 and up; `program` tells the replication where it goes (the
    overlay's MDB, the routed replicator's member nodes), stand-in VTEPs beyond 2."""
    groups = {m: group("4", 10, m) for m in counts}
    for m, g in groups.items():
        for receiver in receivers[: min(m, 2)]:
            assert receiver.ask("hold", "4", g) == "ok"
        if program is not None:
            program(m, g)
    time.sleep(1.0)  # the members' reports have been acted on (bridges, plexusd)
    for g in groups.values():  # ARP for every VTEP; queues warm
        sender.ask("burst", "4", g, "500")
    time.sleep(0.3)
    wall: dict[int, list[float]] = {m: [] for m in counts}
    cpu: dict[int, list[float]] = {m: [] for m in counts}
    errors = dict.fromkeys(counts, 0)
    for r in range(rounds):
        order = counts if r % 2 == 0 else counts[::-1]  # drift hits all alike
        for m in order:
            out = sender.ask("burst", "4", groups[m], str(burst))
            wall[m].append(out["wall_ns"] / burst / 1e3)  # us per datagram = ms per 1,000
            cpu[m].append(out["cpu_ns"] / burst / 1e3)
            errors[m] += out["errors"]
            time.sleep(0.05)
    delivered = {}
    for m, g in groups.items():
        delivered[m] = [receiver.ask("drop", g) for receiver in receivers[: min(m, 2)]]
    sent = burst * rounds + 500
    return {
        "groups": groups,
        "burst": burst,
        "rounds": rounds,
        "wall_ms_per_1000": wall,
        "cpu_ms_per_1000": cpu,
        "send_errors": errors,
        "delivered_to_real_members": {m: [g / sent for g in got] for m, got in delivered.items()},
    }


# --- 3. underlay packets per group packet -----------------------------------------------------


def underlay_counts(
    senders: dict[str, Agent],
    *,
    receivers: dict[str, list[Agent]],
    members: Agent,
    sniffers: dict[str, Agent],
    bystanders: dict[str, list[Agent]],
    nodes: Sequence[Node],
    extra_groups: dict[str, str],
) -> dict[str, Any]:
    """Per (kind, family, member nodes): frames per group datagram on each node's underlay,
    and on each bystander pod's interface. The reference network is IPv4 only."""
    kinds = [("mdb", "4"), ("mdb", "6"), ("flood", "4"), ("flood", "6"), ("baseline", "4")]
    plan = {
        (kind, family, m): group(family, 20 + i, m)
        for i, (kind, family) in enumerate(kinds)
        for m in (0, 1, 2)
    }
    for (kind, family, m), g in plan.items():
        for receiver in receivers[side_of(kind)][:m]:
            assert receiver.ask("hold", family, g) == "ok"
        if kind == "mdb" and m:
            assert members.ask("set", NETWORK, g, *[n.address for n in nodes[1 : 1 + m]])["ok"]
    time.sleep(1.0)  # every report has crossed the segment
    results: dict[str, Any] = {}
    cases = [(f"{kind}/{family}/{m}", kind, family, g) for (kind, family, m), g in plan.items()]
    cases += [(f"replication/{name}", "mdb", "4", g) for name, g in extra_groups.items()]
    # Local mode's rows first; then node1 follows the controller as plexusd does in cluster
    # mode (Overlay.follow_controller: its VXLAN port never a multicast router port) for the
    # MDB rows.
    cases.sort(key=lambda case: case[1] == "mdb")
    following = False
    for i, (key, kind, family, g) in enumerate(cases):
        if kind == "mdb" and not following:
            assert members.ask("follow") == "ok"
            following = True
        side = side_of(kind)
        results[key] = count_frames(
            senders[side],
            family,
            g,
            marker=f"mcbench{i:03d}x",
            sniffers=sniffers,
            bystanders=bystanders[side],
        )
    for (kind, family, m), g in plan.items():
        got = [receiver.ask("drop", g) for receiver in receivers[side_of(kind)][:m]]
        results[f"{kind}/{family}/{m}"]["member_received"] = [x / PACED for x in got]
    return results


def count_frames(
    sender: Agent,
    family: str,
    g: str,
    *,
    marker: str,
    sniffers: dict[str, Agent],
    bystanders: Sequence[Agent],
) -> dict[str, float]:
    """PACED datagrams to `g`: frames per datagram out of node1's underlay, into node2's and
    node3's, and into the bystander pods (node2's, node3's)."""
    watchers = [*sniffers.values(), *bystanders]
    for agent in watchers:
        assert agent.ask("start", marker) == "ok"
    sender.ask("paced", family, g, str(PACED), "1000", marker)
    for agent in watchers:
        agent.send("stop")  # in parallel: each waits out its queue
    names = [*sniffers, "bystander2", "bystander3"]
    counts = dict(zip(names, [a.receive() for a in watchers], strict=True))
    return {
        "node1_out": counts["node1"]["out"] / PACED,
        "node2_in": counts["node2"]["in"] / PACED,
        "node3_in": counts["node3"]["in"] / PACED,
        "bystander2_in": counts["bystander2"]["in"] / PACED,
        "bystander3_in": counts["bystander3"]["in"] / PACED,
    }


def side_of(kind: str) -> str:
    return "baseline" if kind == "baseline" else "overlay"


# --- report -----------------------------------------------------------------------------------

KIND_LABELS = {
    "local": "reference: receiver on the sender's node",
    "mdb": "Plexus overlay, MDB (cluster mode)",
    "flood": "Plexus overlay, flood (local mode)",
    "baseline": "plain bridge+VXLAN flood, no snooping",
}


def report(data: dict[str, Any]) -> None:
    print("\n1. join-to-first-packet across nodes (sender on node1, stream every 1 ms), ms")
    print(
        f"{'':40} {'fam':>4} {'n':>4} {'median':>8} {'p90':>8} {'p99':>8} {'miss':>5} "
        f"{'xflood':>7}  median per receiver node"
    )
    for family, rows in data["join"].items():
        base = stats(rows["flood"]["samples_ms"])[0]
        for kind in ("flood", "mdb", "local"):
            row = rows[kind]
            med, p90, p99 = stats(row["samples_ms"])
            per_node = {
                name: statistics.median(
                    x
                    for x, at in zip(row["samples_ms"], row["receiver_node"], strict=True)
                    if at == name
                )
                for name in sorted(set(row["receiver_node"]))
            }
            print(
                f"{KIND_LABELS[kind]:40} {'v' + family:>4} {len(row['samples_ms']):4d} "
                f"{med:8.2f} {p90:8.2f} {p99:8.2f} {row['misses']:5d} {med / base:7.2f}  "
                + ", ".join(f"{name} {v:.2f}" for name, v in per_node.items())
            )
        mdb_call = statistics.median(rows["mdb"]["mdb_call_ms"])
        print(
            f"{'  the MDB call itself (not in the above)':40} {'v' + family:>4} {'':4} "
            f"{mdb_call:8.2f}"
        )
    rep = data["replication"]
    print(
        f"\n2. replication cost at the sender (IPv4, {rep['burst']} datagrams back to back x "
        f"{rep['rounds']} rounds), ms per 1,000 group datagrams"
    )
    print(
        f"{'member nodes in the MDB':28} {'wall med':>9} {'p90':>7} {'cpu med':>8} {'x0':>6} "
        f"{'copies':>7} {'members got':>11}"
    )
    base = statistics.median(rep["wall_ms_per_1000"][0])
    for m in MEMBER_COUNTS:
        w, c = rep["wall_ms_per_1000"][m], rep["cpu_ms_per_1000"][m]
        med, p90, _ = stats(w)
        copies = data["underlay"][f"replication/{m}"]["node1_out"]
        what = f"{m}" + (" (stand-ins beyond 2)" if m > 2 else "")
        got = ",".join(f"{x:.2f}" for x in rep["delivered_to_real_members"][m]) or "-"
        print(
            f"{what:28} {med:9.2f} {p90:7.2f} {statistics.median(c):8.2f} {med / base:6.2f} "
            f"{copies:7.2f} {got:>11}"
        )
    marginal = rep["marginal_ms_per_1000"]
    print(
        f"marginal cost per extra member node: {marginal['wall']:.2f} ms wall / "
        f"{marginal['cpu']:.2f} ms CPU per 1,000 group datagrams (least squares over 1-8 "
        f"listed nodes); 1->2 real nodes: {marginal['wall_1_2']:.2f} ms wall"
    )
    print(
        "(0 listed: no MDB entry, the group goes to the flood list; the copies column is what "
        "node1's underlay carried per datagram)"
    )
    print("\n3. underlay frames per group datagram (3 nodes, sender on node1; members on node2, 3)")
    underlay_header()
    under = data["underlay"]
    for kind, family in (("mdb", "4"), ("mdb", "6"), ("flood", "4"), ("flood", "6")):
        for m in (0, 1, 2):
            underlay_row(kind, family, m, under[f"{kind}/{family}/{m}"], under[f"baseline/4/{m}"])
    for m in (0, 1, 2):
        underlay_row("baseline", "4", m, under[f"baseline/4/{m}"], under[f"baseline/4/{m}"])
    print("node1's multicast router ports: " + ("; ".join(data["router_ports"]) or "none"))


def underlay_header() -> None:
    print(
        f"{'':38} {'fam':>3} {'members':>7} {'node1 out':>9} {'node2 in':>8} {'node3 in':>8} "
        f"{'x base':>6} {'bystander n2/n3':>15} {'members got':>11}"
    )


def underlay_row(kind: str, family: str, m: int, row: dict[str, Any], ref: dict[str, Any]) -> None:
    ratio = row["node1_out"] / ref["node1_out"] if ref["node1_out"] else float("nan")
    got = ",".join(f"{x:.2f}" for x in row["member_received"]) or "-"
    bystanders = f"{row['bystander2_in']:.2f}/{row['bystander3_in']:.2f}"
    print(
        f"{KIND_LABELS[kind]:38} {'v' + family:>3} {m:7d} {row['node1_out']:9.2f} "
        f"{row['node2_in']:8.2f} {row['node3_in']:8.2f} {ratio:6.2f} {bystanders:>15} {got:>11}"
    )


def plot(opts: argparse.Namespace, data: dict[str, Any]) -> None:
    panels = [
        plots.Panel(
            f"join to first datagram across nodes, IPv{family}",
            [
                plots.Series(KIND_LABELS[kind], rows[kind]["samples_ms"], reference=kind == "local")
                for kind in ("flood", "mdb", "local")
                if rows[kind]["samples_ms"]
            ],
        )
        for family, rows in data["join"].items()
    ]
    plots.emit(opts, "multicast", "plexus-overlay multicast: join to first packet", panels)


# --- the routed primary (fabric.multicast: true) ----------------------------------------------

ROUTED_COUNTS = (0, 1, 2)


def primary_pod(bed: Cluster, node: Node, role: str) -> Netns:
    """A pod with the routed primary only: its sockets join and send on eth0."""
    pod, out = node.add_pod(bed, role)
    out.ok()
    return pod


def run_routed(opts: argparse.Namespace, mode: str) -> dict[str, Any]:
    """The same three measurements for the routed primary in local mode (each node floods its
    pods' groups to every other node, which deliver to their own members only), on a bed of its
    own with `fabric.multicast: true`. Membership is plexusd's: it reads a pod's groups when the
    pod's report arrives, so a join's latency includes that."""
    data: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="plexus-bench-multicast-") as tmp,
        cluster(Path(tmp), mode, fabric_keys={"multicast": True}) as bed,
        agents() as started,
    ):
        n1, n2, n3 = bed.nodes
        where = {"snd": n1, "r1": n1, "r2": n2, "by2": n2, "r3": n3, "by3": n3}
        pods = {role: primary_pod(bed, node, role) for role, node in where.items()}
        sender = start(started, pods["snd"], "sender")
        r1, r2, r3 = (start(started, pods[r], "receiver") for r in ("r1", "r2", "r3"))
        for agent in started:
            agent.ready()
        time.sleep(1.0)  # the pods' first refresh after their ADDs
        receivers = [(r2, n2), (r3, n3)]
        data["join"] = {}
        for fi, family in enumerate(opts.families):
            data["join"][family] = {
                kind: join_latency(
                    sender,
                    receivers=who,
                    members=None,
                    family=family,
                    block=3 * fi + ki,
                    n=opts.joins,
                )
                for ki, (kind, who) in enumerate((("flood", receivers), ("local", [(r1, n1)])))
            }
        data["replication"] = replication_cost(
            sender, [r2, r3], ROUTED_COUNTS, program=None, burst=opts.burst, rounds=opts.rounds
        )
        sniffers = {node.name: start(started, node.ns, "sniffer", "eth0") for node in bed.nodes}
        bystanders = [start(started, pods[r], "sniffer", "eth0") for r in ("by2", "by3")]
        for agent in [*sniffers.values(), *bystanders]:
            agent.ready()
        plan = {
            (family, m): group(family, 30 + fi, m)
            for fi, family in enumerate(opts.families)
            for m in ROUTED_COUNTS
        }
        for (family, m), g in plan.items():
            for receiver, _ in receivers[:m]:
                assert receiver.ask("hold", family, g) == "ok"
        time.sleep(1.0)
        data["underlay"] = {}
        for i, ((family, m), g) in enumerate(plan.items()):
            row = count_frames(
                sender,
                family,
                g,
                marker=f"rtbench{i:03d}x",
                sniffers=sniffers,
                bystanders=bystanders,
            )
            got = [receiver.ask("drop", g) for receiver, _ in receivers[:m]]
            data["underlay"][f"{family}/{m}"] = row | {"member_received": [x / PACED for x in got]}
    return data


def report_routed(mode: str, data: dict[str, Any]) -> None:
    print(f"\n--- routed primary, fabric.multicast: true, {mode} fabric, local mode ---")
    print("1r. join to first packet, ms")
    print(
        f"{'':40} {'fam':>4} {'n':>4} {'median':>8} {'p90':>8} {'p99':>8} {'miss':>5} "
        f"{'x other':>7}"
    )
    for family, rows in data["join"].items():
        base = stats(rows["flood"]["samples_ms"])[0]
        for kind, label in (
            ("flood", "receiver on another node"),
            ("local", "receiver on the sender's node"),
        ):
            row = rows[kind]
            med, p90, p99 = stats(row["samples_ms"])
            print(
                f"{label:40} {'v' + family:>4} {len(row['samples_ms']):4d} {med:8.2f} {p90:8.2f} "
                f"{p99:8.2f} {row['misses']:5d} {med / base:7.2f}"
            )
    rep = data["replication"]
    print("2r. replication cost at the sender (IPv4), ms per 1,000 group datagrams")
    print(
        f"{'member nodes':28} {'wall med':>9} {'p90':>7} {'cpu med':>8} {'x0':>6} "
        f"{'copies':>7} {'members got':>11}"
    )
    base = statistics.median(rep["wall_ms_per_1000"][0])
    for m in ROUTED_COUNTS:
        med, p90, _ = stats(rep["wall_ms_per_1000"][m])
        cpu = statistics.median(rep["cpu_ms_per_1000"][m])
        copies = data["underlay"][f"4/{m}"]["node1_out"]
        got = ",".join(f"{x:.2f}" for x in rep["delivered_to_real_members"][m]) or "-"
        print(f"{m:<28} {med:9.2f} {p90:7.2f} {cpu:8.2f} {med / base:6.2f} {copies:7.2f} {got:>11}")
    print("3r. underlay frames per group datagram")
    underlay_header()
    for key, row in data["underlay"].items():
        family, m = key.split("/")
        got = ",".join(f"{x:.2f}" for x in row["member_received"]) or "-"
        bystanders = f"{row['bystander2_in']:.2f}/{row['bystander3_in']:.2f}"
        print(
            f"{'routed primary, local mode':38} {'v' + family:>3} {int(m):7d} "
            f"{row['node1_out']:9.2f} {row['node2_in']:8.2f} {row['node3_in']:8.2f} {'':6} "
            f"{bystanders:>15} {got:>11}"
        )


LISTED_ROLES = {1: ["snd"], 2: ["r2", "by2"], 3: ["r3", "by3"]}


def listed_bed(
    made: list[Netns], stand_ins: Sequence[str]
) -> tuple[Netns, dict[int, Netns], dict[str, Netns], dict[str, str]]:
    """A LAN bridge, three nodes and a namespace holding the stand-in VTEPs on it; pods by veth
    (the node's end named as plexus-routed names it, a /32 route to the pod). Returns the
    stand-ins' namespace, the nodes, the pods and their node-side veths."""

    def ns(role: str) -> Netns:
        made.append(Netns(role))
        return made[-1]

    lan = ns("mc-lan")
    lan.run("ip", "link", "add", "br0", "type", "bridge")
    lan.run("ip", "link", "set", "br0", "up")

    def wire(node: Netns, i: int, addresses: Sequence[str]) -> None:
        lan.run(
            *("ip", "link", "add", f"l{i}", "type", "veth", "peer", "name", "eth0"),
            *("netns", node.name),
        )
        lan.run("ip", "link", "set", f"l{i}", "master", "br0", "up")
        node.run("ip", "link", "set", "eth0", "up")
        for address in addresses:
            node.run("ip", "addr", "add", f"{address}/24", "dev", "eth0")

    ext = ns("mc-ext")
    wire(ext, 0, stand_ins)
    nodes: dict[int, Netns] = {}
    pods: dict[str, Netns] = {}
    hosts: dict[str, str] = {}
    for i, names in LISTED_ROLES.items():
        nodes[i] = ns(f"mc-node{i}")
        wire(nodes[i], i, [listed_underlay(i)])
        for k, role in enumerate(names):
            pod = ns(f"mc-{role}")
            host = hosts[role] = host_veth_name(pod.name, "eth0")
            address = f"10.160.{i}.{10 + k}"
            nodes[i].run(
                *("ip", "link", "add", host, "type", "veth", "peer", "name", "eth0"),
                *("netns", pod.name),
            )
            nodes[i].run("ip", "link", "set", host, "up")
            nodes[i].run("ip", "route", "add", f"{address}/32", "dev", host)
            pod.run("ip", "link", "set", "eth0", "up")
            pod.run("ip", "addr", "add", f"{address}/32", "dev", "eth0")
            pod.run("ip", "route", "add", "default", "dev", "eth0")
            pods[role] = pod
    return ext, nodes, pods, hosts


def run_routed_listed(opts: argparse.Namespace) -> dict[str, Any]:
    """The routed primary in cluster mode (native fabric, IPv4): no plexusd (the bed's daemons
    have no API, and a second replicator would fight theirs over the same filters), so each
    node's `FabricMulticast(listed=True)` runs in an agent in the node's namespace, fed what
    plexusd and the controller would feed it: the node's member pod veths, the member nodes.
    Pods are veth pairs named as plexus-routed names them. Join latency is not measured here:
    with the filters programmed by hand it is the send period; a real join's is the node's
    membership reaction (local mode's rows) plus the controller's publish."""
    data: dict[str, Any] = {}
    stand_ins = [s.replace("192.168.100.", "192.168.160.") for s in STAND_INS]
    with namespaces() as made, agents() as started:
        ext, nodes, pods, hosts = listed_bed(made, stand_ins)
        replicators = {i: start(started, nodes[i], "replicator", str(i), "3") for i in nodes}
        sender = start(started, pods["snd"], "sender")
        r2, r3 = start(started, pods["r2"], "receiver"), start(started, pods["r3"], "receiver")
        start(started, ext, "sink", "4789")
        for agent in started:
            agent.ready()
        for i, names in LISTED_ROLES.items():
            replicators[i].ask("ports", *(hosts[r] for r in names))
        remotes = [listed_underlay(2), listed_underlay(3), *stand_ins]

        def program(m: int, g: str) -> None:
            """What the node's membership and the controller's aggregate would say."""
            for i, role in ((2, "r2"), (3, "r3"))[: min(m, 2)]:
                replicators[i].ask("local", g, hosts[role])
            replicators[1].ask("remote", g, *remotes[:m])

        data["replication"] = replication_cost(
            sender,
            [r2, r3],
            MEMBER_COUNTS,
            program=program,
            burst=opts.burst,
            rounds=opts.rounds,
        )
        sniffers = {f"node{i}": start(started, nodes[i], "sniffer", "eth0") for i in nodes}
        bystanders = [start(started, pods[r], "sniffer", "eth0") for r in ("by2", "by3")]
        for agent in [*sniffers.values(), *bystanders]:
            agent.ready()
        data["underlay"] = {}
        plan = {m: group("4", 40, m) for m in ROUTED_COUNTS}
        for m, g in plan.items():
            for receiver in (r2, r3)[:m]:
                assert receiver.ask("hold", "4", g) == "ok"
            program(m, g)
        cases = [(str(m), g) for m, g in plan.items()]
        cases += [(f"replication/{m}", g) for m, g in data["replication"]["groups"].items()]
        for i, (key, g) in enumerate(cases):
            data["underlay"][key] = count_frames(
                sender, "4", g, marker=f"clbench{i:03d}x", sniffers=sniffers, bystanders=bystanders
            )
        for m, g in plan.items():
            got = [receiver.ask("drop", g) for receiver in (r2, r3)[:m]]
            data["underlay"][str(m)]["member_received"] = [x / PACED for x in got]
    return data


def report_routed_listed(data: dict[str, Any]) -> None:
    print("\n--- routed primary, fabric.multicast: true, native fabric, cluster mode (listed) ---")
    rep = data["replication"]
    print("2c. replication cost at the sender (IPv4), ms per 1,000 group datagrams")
    print(
        f"{'member nodes listed':28} {'wall med':>9} {'p90':>7} {'cpu med':>8} {'x0':>6} "
        f"{'copies':>7} {'members got':>11}"
    )
    base = statistics.median(rep["wall_ms_per_1000"][0])
    for m in MEMBER_COUNTS:
        med, p90, _ = stats(rep["wall_ms_per_1000"][m])
        cpu = statistics.median(rep["cpu_ms_per_1000"][m])
        copies = data["underlay"][f"replication/{m}"]["node1_out"]
        got = ",".join(f"{x:.2f}" for x in rep["delivered_to_real_members"][m]) or "-"
        what = f"{m}" + (" (stand-ins beyond 2)" if m > 2 else "")
        print(
            f"{what:28} {med:9.2f} {p90:7.2f} {cpu:8.2f} {med / base:6.2f} {copies:7.2f} {got:>11}"
        )
    print(
        f"marginal cost per extra member node: {rep['marginal_ms_per_1000']['wall']:.2f} ms wall "
        "per 1,000 (least squares over 0-8; 0 listed: the group leaves node1 for no one)"
    )
    print("3c. underlay frames per group datagram")
    underlay_header()
    for m in ROUTED_COUNTS:
        row = data["underlay"][str(m)]
        got = ",".join(f"{x:.2f}" for x in row["member_received"]) or "-"
        bystanders = f"{row['bystander2_in']:.2f}/{row['bystander3_in']:.2f}"
        print(
            f"{'routed primary, cluster mode':38} {'v4':>3} {m:7d} {row['node1_out']:9.2f} "
            f"{row['node2_in']:8.2f} {row['node3_in']:8.2f} {'':6} {bystanders:>15} {got:>11}"
        )


# --- main -------------------------------------------------------------------------------------


def run(opts: argparse.Namespace) -> dict[str, Any]:
    data: dict[str, Any] = {"joins": opts.joins, "stream_period_us": STREAM_PERIOD_US}
    with (
        tempfile.TemporaryDirectory(prefix="plexus-bench-multicast-") as tmp,
        cluster(Path(tmp), "native") as bed,
        agents() as started,
    ):
        n1, n2, n3 = bed.nodes
        write_nads(bed)
        pods = {
            "snd": attach(bed, n1, "snd"),
            "r2": attach(bed, n2, "r2"),
            "by2": attach(bed, n2, "by2"),
            "by3": attach(bed, n3, "by3"),
            "r3": attach(bed, n3, "r3"),
            "r1": attach(bed, n1, "r1"),
        }
        settle_until = time.monotonic() + SETTLE_S
        base_pods = baseline(bed)
        stand_in_vteps(bed)
        sender = start(started, pods["snd"], "sender")
        base_sender = start(started, base_pods["snd"], "sender")
        r2, r3 = start(started, pods["r2"], "receiver"), start(started, pods["r3"], "receiver")
        b2, b3 = (
            start(started, base_pods["r2"], "receiver"),
            start(started, base_pods["r3"], "receiver"),
        )
        r1 = start(started, pods["r1"], "receiver")
        members = start(started, n1.ns, "members", n1.name)
        start(started, bed.external, "sink", "4789")
        for agent in started:
            agent.ready()
        time.sleep(max(0.0, settle_until - time.monotonic()))
        receivers = [(r2, n2), (r3, n3)]

        data["join"] = {}
        for fi, family in enumerate(opts.families):
            rows = {
                "flood": (receivers, None),
                "mdb": (receivers, members),
                "local": ([(r1, n1)], None),
            }
            data["join"][family] = {
                kind: join_latency(
                    sender,
                    receivers=who,
                    members=mdb,
                    family=family,
                    block=3 * fi + ki,
                    n=opts.joins,
                )
                for ki, (kind, (who, mdb)) in enumerate(rows.items())
            }
        data["router_ports"] = router_ports(n1)
        remotes = [n2.address, n3.address, *STAND_INS]

        def program(m: int, g: str) -> None:
            if m:
                assert members.ask("set", NETWORK, g, *remotes[:m])["ok"]

        rep = replication_cost(
            sender,
            [r2, r3],
            MEMBER_COUNTS,
            program=program,
            burst=opts.burst,
            rounds=opts.rounds,
        )
        wall = {m: statistics.median(v) for m, v in rep["wall_ms_per_1000"].items()}
        cpu = {m: statistics.median(v) for m, v in rep["cpu_ms_per_1000"].items()}
        listed = [m for m in MEMBER_COUNTS if m]  # 0: no MDB entry, the flood list's
        rep["marginal_ms_per_1000"] = {
            "wall": slope(listed, [wall[m] for m in listed]),
            "cpu": slope(listed, [cpu[m] for m in listed]),
            "wall_1_2": wall[2] - wall[1],
        }
        data["replication"] = rep

        # the sniffers only now: a packet tap on node1's underlay costs every datagram it sees
        sniffers = {node.name: start(started, node.ns, "sniffer", "eth0") for node in bed.nodes}
        bystanders = {
            side: [start(started, p[role], "sniffer", "net1") for role in ("by2", "by3")]
            for side, p in (("overlay", pods), ("baseline", base_pods))
        }
        for agent in [*sniffers.values(), *bystanders["overlay"], *bystanders["baseline"]]:
            agent.ready()
        for m, g in rep["groups"].items():  # the replication groups again, their members back
            for receiver, _ in receivers[: min(m, 2)]:
                receiver.ask("hold", "4", g)
        data["underlay"] = underlay_counts(
            {"overlay": sender, "baseline": base_sender},
            receivers={"overlay": [r2, r3], "baseline": [b2, b3]},
            members=members,
            sniffers=sniffers,
            bystanders=bystanders,
            nodes=bed.nodes,
            extra_groups={str(m): g for m, g in rep["groups"].items()},
        )
    return data


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.multicast", description=__doc__.splitlines()[0])
    parser.add_argument("--joins", type=int, default=30, help="joins per row (default 30)")
    parser.add_argument("--families", default="4,6", help="IP families of the joins (4,6)")
    parser.add_argument("--burst", type=int, default=4000, help="datagrams per burst")
    parser.add_argument("--rounds", type=int, default=7, help="bursts per member count")
    parser.add_argument(
        "--routed",
        default="native,vxlan",
        help="fabric modes of the routed primary's beds (default native,vxlan; '' for none)",
    )
    plots.add_arguments(parser)
    opts = parser.parse_args()
    opts.families = opts.families.split(",")
    opts.routed = [m for m in opts.routed.split(",") if m]
    if opts.joins < 30:
        print("bench.multicast: --joins must be at least 30 for a p99", file=sys.stderr)
        return 2
    started = time.monotonic()
    data = run(opts)
    data["routed"] = {mode: run_routed(opts, mode) for mode in opts.routed}
    if opts.routed:
        listed = run_routed_listed(opts)
        wall = {
            m: statistics.median(v) for m, v in listed["replication"]["wall_ms_per_1000"].items()
        }
        listed["replication"]["marginal_ms_per_1000"] = {
            "wall": slope(list(wall), list(wall.values()))
        }
        data["routed_listed"] = listed
    data["runtime_s"] = time.monotonic() - started
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=1, default=str))
    report(data)
    for mode, routed in data["routed"].items():
        report_routed(mode, routed)
    if "routed_listed" in data:
        report_routed_listed(data["routed_listed"])
    print(f"\nsamples: {OUT} (whole run {data['runtime_s']:.0f} s)")
    plot(opts, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
