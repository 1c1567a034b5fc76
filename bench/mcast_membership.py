"""Multicast membership across nodes, cluster mode: a join or leave on one node -> the other
nodes' replicators called with the new list (issue 13 item 4; requirement: within 2 s).

The path measured is the product's: node-1's `MembershipSync` (metaplugin.mcast_sync) sees its
local membership change, waits its debounce (100 ms), writes its MulticastNodeState's spec;
the controller's watch delivers it, the membership reconciler waits its debounce (100 ms) and
writes the other nodes' `status.replicateTo`; their watches deliver it and their syncs hand the
group to the overlay domain's replicator with node-1's underlay address (or without it, after
a leave). The clock starts when node-1's membership source calls back (as
`LocalMembership.subscribe` does after a change) and stops when a node's replicator is called
with the list that includes (join) or no longer includes (leave) node-1. The replicators here
record the call instead of programming a VXLAN MDB (a netlink call, well under a millisecond).

    python -m bench.mcast_membership [--changes 40] [--nodes 3] [--background 50]
        starts the API stand-in (a subprocess: `python -m tests.k8s_standin`), seeds the Nodes,
        and runs the controller and every node's sync in this process (one API client each),
        each node with `--background` groups of its own that stay joined throughout.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from http.client import HTTPConnection
from pathlib import Path
from urllib.parse import urlsplit

from bench import plots

DOMAIN = "overlay/4097"
GROUP = "239.77.0.1"


class Membership:
    """A node's local membership (`LocalMembership`'s two methods)."""

    def __init__(self, groups: Iterable[str]) -> None:
        self._groups = {DOMAIN: frozenset(groups)}
        self._subscribers: list[Callable[[dict[str, frozenset[str]]], None]] = []

    def snapshot(self) -> dict[str, frozenset[str]]:
        return dict(self._groups)

    def subscribe(self, callback: Callable[[dict[str, frozenset[str]]], None]) -> None:
        self._subscribers.append(callback)

    def change(self, join: bool) -> float:
        """Join or leave GROUP; the monotonic time the change was announced."""
        groups = set(self._groups[DOMAIN])
        (groups.add if join else groups.discard)(GROUP)
        self._groups = {DOMAIN: frozenset(groups)}
        started = time.monotonic()
        for callback in self._subscribers:
            threading.Thread(target=callback, args=(self.snapshot(),), daemon=True).start()
        return started


class Recorder:
    """A domain's replicator that records when GROUP's list changed, and to what."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.lists: dict[str, tuple[str, ...]] = {}
        self.changed_at = 0.0

    def set_group_members(self, group: str, node_addresses: Iterable[str]) -> bool:
        addresses = tuple(node_addresses)
        with self._cond:
            if group == GROUP and self.lists.get(group) != addresses:
                self.changed_at = time.monotonic()
            self.lists[group] = addresses
            self._cond.notify_all()
        return True

    def wait(self, accept: Callable[[tuple[str, ...]], bool], timeout: float = 30.0) -> float:
        with self._cond:
            if not self._cond.wait_for(lambda: accept(self.lists.get(GROUP, ())), timeout):
                raise TimeoutError(f"the replicator never got the expected list for {GROUP}")
            return self.changed_at


def _post_node(api_url: str, name: str) -> None:
    parts = urlsplit(api_url)
    conn = HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=15)
    try:
        body = json.dumps({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
        conn.request("POST", "/api/v1/nodes", body=body,
                     headers={"Content-Type": "application/json"})  # fmt: skip
        resp = conn.getresponse()
        resp.read()
        if resp.status >= 400:
            raise RuntimeError(f"POST node {name}: {resp.status}")
    finally:
        conn.close()


def _kubeconfig(api_url: str, path: Path) -> str:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "bench",
        "clusters": [{"name": "bench", "cluster": {"server": api_url}}],
        "users": [{"name": "bench", "user": {}}],
        "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "bench"}}],
    }))  # fmt: skip
    return str(path)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(api_url: str, tmp: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    from cnispec import logs
    from delegates.fabric import Peer
    from metaplugin.mcast_sync import MembershipSync
    from nad_controller import k8s
    from nad_controller.controller import Controller, Settings
    from nad_controller.leader import ElectionTiming

    logs.configure("warning", "json", cache=False)
    config = _kubeconfig(api_url, tmp / "kubeconfig")
    names = [f"node-{i}" for i in range(1, args.nodes + 1)]
    peers = [Peer(n, (f"10.0.0.{i}",), ()) for i, n in enumerate(names, 1)]
    for name in names:
        _post_node(api_url, name)
    timing = ElectionTiming(lease_duration=15, renew_deadline=10, retry_period=0.5)
    controller = Controller(
        k8s.ClusterApi(k8s.connect(config)),
        Settings(namespace="plexus-system", identity="bench", timing=timing),
    )
    controller.start()
    memberships, recorders, syncs = {}, {}, []
    for i, name in enumerate(names):
        background = [f"239.{i + 1}.{j // 250}.{j % 250 + 1}" for j in range(args.background)]
        memberships[name] = Membership(background)
        recorders[name] = Recorder()
        sync = MembershipSync(
            k8s.connect(config), name, memberships[name],
            peers=lambda: peers, family=lambda: socket.AF_INET,
        )  # fmt: skip
        recorder = recorders[name]
        sync.register("overlay/", lambda _d, r=recorder: r)  # type: ignore[misc]
        sync.start()
        syncs.append(sync)
    sender, others = names[0], names[1:]
    address = "10.0.0.1"
    try:
        # converged: every node knows every other node's background groups
        time.sleep(2.0)
        first: dict[str, list[float]] = {"join": [], "leave": []}
        every: dict[str, list[float]] = {"join": [], "leave": []}
        for n in range(args.changes):
            join = n % 2 == 0
            kind = "join" if join else "leave"
            started = memberships[sender].change(join)
            seen = [
                recorders[o].wait(lambda lst, j=join: (address in lst) == j)  # type: ignore[misc]
                for o in others
            ]
            first[kind].append((min(seen) - started) * 1000)
            every[kind].append((max(seen) - started) * 1000)
            time.sleep(0.3)  # each change starts from quiet (no debounce window open)
    finally:
        for sync in syncs:
            sync.stop()
        controller.stop()
    return {
        "join, first other node": first["join"],
        "join, every other node": every["join"],
        "leave, first other node": first["leave"],
        "leave, every other node": every["leave"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.mcast_membership", description=__doc__)
    ap.add_argument("--changes", type=int, default=40, help="joins and leaves, alternating")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--background", type=int, default=50, help="groups each node keeps joined")
    plots.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.changes < 40 or args.nodes < 2:
        print("--changes must be >= 40 (20 joins, 20 leaves), --nodes >= 2", file=sys.stderr)
        return 2
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
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = run(api_url, Path(tmp), args)
    finally:
        standin.communicate("", timeout=10)
    n = args.changes // 2
    print(f"membership change on node-1 -> replicator called on the other nodes, ms "
          f"({args.nodes} nodes, {args.background} other groups per node, n={n} each)")  # fmt: skip
    print("| change                   | median |    p99 |    max | within 2 s |")
    print("|--------------------------|-------:|-------:|-------:|-----------:|")
    for label, values in results.items():
        ok = sum(v <= 2000 for v in values)
        print(f"| {label:<24} | {statistics.median(values):6.1f} | {_pct(values, 0.99):6.1f} "
              f"| {max(values):6.1f} | {ok:>5}/{len(values):<4} |")  # fmt: skip
    series = [plots.Series(label, values) for label, values in results.items()]
    panel = plots.Panel("node-1 join/leave to the other nodes' replicators", series)
    plots.emit(
        args, "mcast_membership", "multicast membership change -> replicator called", [panel]
    )
    slow = [v for values in results.values() for v in values if v > 2000]
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
