"""The processes bench/multicast.py runs inside the bed's namespaces, one per role, each driven by
one command per line on stdin and answering one line (JSON) on stdout. Long-lived, so a
measurement never includes a Python start-up or an `ip netns exec`.

  sender    (in a pod)   stream to a group every period; bursts as fast as it can; paced sends
  receiver  (in a pod)   join-to-first-datagram; hold a membership and count what arrives
  sniffer   (anywhere)   count frames carrying a marker on one interface, in and out
  members   (in a node)  `Overlay.set_group_members`, as cluster mode's controller calls it
  sink      (anywhere)   a bound, never-read UDP port: stand-in VTEPs that take VXLAN quietly
  replicator (in a node) the routed primary's cluster-mode replicator, fed as plexusd would

Times are CLOCK_MONOTONIC: every namespace shares the machine's clock.

`python -m bench.mcast_agents ROLE [ARGS]` (bench/multicast.py starts them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, cast

PORT = 17788


def _family(family: str) -> int:
    return socket.AF_INET if family == "4" else socket.AF_INET6


def _reply(value: Any) -> None:
    print(json.dumps(value), flush=True)


def _serve(handle: Callable[[list[str]], Any]) -> None:
    _reply("ready")
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            break
        _reply(handle(words))


# --- sender -------------------------------------------------------------------------------


class Sender:
    """One UDP socket per family; no loopback of its own datagrams (no member in its pod)."""

    def __init__(self) -> None:
        self.socks: dict[str, socket.socket] = {}
        for family in ("4", "6"):
            s = socket.socket(_family(family), socket.SOCK_DGRAM)
            # TTL 4: what leaves a pod on the routed primary (an L2 overlay ignores it)
            if family == "4":
                s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
                s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 4)
            else:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 4)
            self.socks[family] = s
        self.target: tuple[str, str] | None = None  # (family, group) of the stream
        self.period = 0.001
        self.lock = threading.Lock()
        threading.Thread(target=self._stream, daemon=True).start()

    def _stream(self) -> None:
        """Every `period`, one datagram (a sequence number) to the current target, if any."""
        seq = 0
        while True:
            with self.lock:
                target = self.target
            if target is not None:
                family, group = target
                seq += 1
                with contextlib.suppress(OSError):  # ENOBUFS and the like: the stream goes on
                    self.socks[family].sendto(b"s%d" % seq, (group, PORT))
            time.sleep(self.period)

    def handle(self, words: list[str]) -> Any:
        match words:
            case ["stream", family, group, period_us]:
                with self.lock:
                    self.target, self.period = (family, group), int(period_us) / 1e6
                return "ok"
            case ["stop"]:
                with self.lock:
                    self.target = None
                return "ok"
            case ["burst", family, group, count]:
                return self.burst(family, group, int(count))
            case ["paced", family, group, count, period_us, marker]:
                self.paced(family, group, int(count), int(period_us) / 1e6, marker.encode())
                return "ok"
        raise ValueError(f"sender: unknown command {words}")

    def burst(self, family: str, group: str, count: int) -> dict[str, int]:
        """`count` datagrams back to back: the wall and CPU time the sending process spent
        (on one kernel the stack runs each datagram's replication in the sender's syscall)."""
        s, payload, errors = self.socks[family], b"b" * 64, 0
        cpu0, wall0 = time.process_time_ns(), time.perf_counter_ns()
        for _ in range(count):
            try:
                s.sendto(payload, (group, PORT))
            except OSError:
                errors += 1
        wall, cpu = time.perf_counter_ns() - wall0, time.process_time_ns() - cpu0
        return {"wall_ns": wall, "cpu_ns": cpu, "errors": errors}

    def paced(self, family: str, group: str, count: int, period: float, marker: bytes) -> None:
        s = self.socks[family]
        for i in range(count):
            s.sendto(marker + b"-%d" % i, (group, PORT))
            time.sleep(period)


# --- receiver -----------------------------------------------------------------------------


def _member_socket(family: str, group: str) -> socket.socket:
    """A UDP socket bound to the group's address (so it sees only that group's datagrams),
    not yet a member."""
    s = socket.socket(_family(family), socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((group, PORT))
    return s


def _join(s: socket.socket, family: str, group: str) -> None:
    """The kernel picks the interface from the route to the group (the multicast network's)."""
    if family == "4":
        mreq = socket.inet_aton(group) + socket.inet_aton("0.0.0.0")
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    else:
        mreq = socket.inet_pton(socket.AF_INET6, group) + struct.pack("@I", 0)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)


class Receiver:
    def __init__(self) -> None:
        self.held: dict[str, tuple[socket.socket, list[int]]] = {}

    def handle(self, words: list[str]) -> Any:
        match words:
            case ["first", family, group, timeout]:
                return self.first(family, group, float(timeout))
            case ["hold", family, group]:
                self.hold(family, group)
                return "ok"
            case ["drop", group]:
                s, count = self.held.pop(group)
                s.close()  # the leave
                return count[0]
        raise ValueError(f"receiver: unknown command {words}")

    @staticmethod
    def first(family: str, group: str, timeout: float) -> dict[str, Any]:
        """Join, wait for the first datagram, leave: CLOCK_MONOTONIC just before the join's
        setsockopt and just after the datagram is read."""
        s = _member_socket(family, group)
        s.settimeout(timeout)
        try:
            joined = time.monotonic_ns()
            _join(s, family, group)
            try:
                s.recv(2048)
            except TimeoutError:
                return {"joined": joined, "first": None}
            return {"joined": joined, "first": time.monotonic_ns()}
        finally:
            s.close()

    def hold(self, family: str, group: str) -> None:
        s = _member_socket(family, group)
        _join(s, family, group)
        count = [0]
        self.held[group] = (s, count)

        def drain() -> None:
            while True:
                try:
                    s.recv(2048)
                except OSError:
                    return  # closed by `drop`
                count[0] += 1

        threading.Thread(target=drain, daemon=True).start()


# --- sniffer ------------------------------------------------------------------------------


class Sniffer:
    """AF_PACKET on one interface: frames carrying the current marker anywhere (VXLAN keeps the
    inner payload in the clear), counted by direction."""

    def __init__(self, ifname: str) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.1)
        self.marker: bytes | None = None
        self.counts = {"in": 0, "out": 0}
        self.lock = threading.Lock()
        threading.Thread(target=self._count, daemon=True).start()

    def _count(self) -> None:
        while True:
            try:
                data, where = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            with self.lock:
                if self.marker is not None and self.marker in data:
                    direction = "out" if where[2] == socket.PACKET_OUTGOING else "in"
                    self.counts[direction] += 1

    def handle(self, words: list[str]) -> Any:
        match words:
            case ["start", marker]:
                with self.lock:
                    self.marker, self.counts = marker.encode(), {"in": 0, "out": 0}
                return "ok"
            case ["stop"]:
                time.sleep(0.3)  # what is still in the socket's queue
                with self.lock:
                    self.marker = None
                    return dict(self.counts)
        raise ValueError(f"sniffer: unknown command {words}")


# --- members ------------------------------------------------------------------------------


class Members:
    """The overlay's MDB API in a node's namespace, called as the controller will call it."""

    def __init__(self, node: str) -> None:
        import structlog

        from delegates.fabric import Fabric, FabricConfig
        from delegates.overlay import Overlay

        # stdout carries the answers: the product's log lines go to stderr, warnings only
        structlog.configure(
            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
            wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        )
        fabric = Fabric(FabricConfig(mode="native", node_name=node, pod_cidrs=(), interface="eth0"))
        fabric.setup()
        self.overlay = Overlay(ipam=cast(Any, None), fabric=fabric)  # the MDB API needs no IPAM

    def handle(self, words: list[str]) -> Any:
        match words:
            case ["set", network, group, *addresses]:
                started = time.perf_counter_ns()
                done = self.overlay.set_group_members(network, group, addresses)
                return {"ok": done, "ms": (time.perf_counter_ns() - started) / 1e6}
            case ["follow"]:  # cluster mode: the VXLAN port is no router port from now on
                self.overlay.follow_controller()
                return "ok"
        raise ValueError(f"members: unknown command {words}")


class Replicator:
    """The routed primary's replicator of one node in cluster mode (`FabricMulticast`, listed),
    driven as plexusd and the controller drive it: this node's members, the member nodes. For a
    bed without plexusd (its daemons have no API, so no cluster mode): node i of `count` at
    192.168.160.(10+i), pods in 10.160.i.0/24, native fabric with multicast."""

    def __init__(self, index: str, count: str) -> None:
        import structlog

        from delegates.fabric import Fabric, FabricConfig, Peer
        from delegates.fabric_mcast import FabricMulticast

        structlog.configure(
            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
            wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        )
        nodes = range(1, int(count) + 1)
        peers = [Peer(f"n{j}", (listed_underlay(j),), (listed_cidr(j),)) for j in nodes]
        config = FabricConfig(
            mode="native",
            node_name=f"n{index}",
            pod_cidrs=(listed_cidr(int(index)),),
            interface="eth0",
            multicast=True,
        )
        fabric = Fabric(config)
        fabric.setup()
        fabric.reconcile(peers)
        self.mcast = FabricMulticast(fabric, listed=True)
        self.ports: list[str] = []
        self.members: dict[str, frozenset[str]] = {}

    def handle(self, words: list[str]) -> Any:
        started = time.perf_counter_ns()
        match words:
            case ["ports", *hosts]:
                self.ports = hosts
                self.mcast.set_local(self.members, self.ports)
            case ["local", group, *hosts]:
                self.members[group] = frozenset(hosts)
                self.mcast.set_local(self.members, self.ports)
            case ["remote", group, *addresses]:
                self.mcast.set_group_members(group, addresses)
            case _:
                raise ValueError(f"replicator: unknown command {words}")
        return {"ms": (time.perf_counter_ns() - started) / 1e6}


def listed_underlay(i: int) -> str:
    return f"192.168.160.{10 + i}"


def listed_cidr(i: int) -> str:
    return f"10.160.{i}.0/24"


class Sink:
    """Binds the VXLAN port on the stand-in VTEPs' namespace and never reads: what arrives is
    dropped when the buffer is full, and no ICMP port-unreachable goes back."""

    def __init__(self, port: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("", int(port)))

    def handle(self, words: list[str]) -> Any:
        raise ValueError(f"sink: unknown command {words}")


def main(argv: list[str]) -> None:
    role, args = argv[0], argv[1:]
    handlers: dict[str, Callable[[], Callable[[list[str]], Any]]] = {
        "sender": lambda: Sender().handle,
        "receiver": lambda: Receiver().handle,
        "sniffer": lambda: Sniffer(args[0]).handle,
        "members": lambda: Members(args[0]).handle,
        "sink": lambda: Sink(args[0]).handle,
        "replicator": lambda: Replicator(args[0], args[1]).handle,
    }
    _serve(handlers[role]())


if __name__ == "__main__":
    main(sys.argv[1:])
