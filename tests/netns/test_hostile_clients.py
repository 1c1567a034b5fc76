"""Slow and hostile clients on the real daemon's socket never block other requests nor grow its
memory or threads without bound (issue "Trust", campaign 3).

While 200 clients trickle one byte every 2 s, 20 stall after asking for an answer they never
read, 6 send most of a 1 MiB body and stop, and 8 announce 3.9 MB bodies, real pods are added
and deleted through the shim. Printed (run with -s): pod ADD/DEL latency before and during the
attack, and the daemon's RSS and thread count; asserted: every pod works, no request waits
longer than one read deadline beyond its usual time, memory and threads stay bounded."""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import threading
import time
from pathlib import Path

from metaplugin.transport import ConnectionLimits
from tests.netns.conftest import NETWORKS, Bed

TRICKLERS, STALLED_READERS, PARTIAL_BODIES, HUGE_BODIES = 200, 20, 6, 8


def proc_status(pid: int) -> tuple[float, int]:
    """(RSS in MiB, threads) of a process."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


def cycle(bed: Bed, n: int, tag: str) -> tuple[list[float], list[float]]:
    adds, dels = [], []
    for i in range(n):
        pod = bed.pod(f"{tag}{i}")
        started = time.monotonic()
        bed.runtime.add(
            f"{tag}-{i}", pod.path, annotations={NETWORKS: "net-a"}, pod=("default", f"p{i}")
        ).ok()
        adds.append(time.monotonic() - started)
        started = time.monotonic()
        assert bed.runtime.invoke("DEL", f"{tag}-{i}", netns=pod.path).returncode == 0
        dels.append(time.monotonic() - started)
        pod.delete()
    return adds, dels


class Attack:
    def __init__(self, path: str) -> None:
        self.path = path
        self.stop = threading.Event()
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []

    def connect(self) -> socket.socket | None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        try:
            s.connect(self.path)
        except OSError:
            s.close()
            return None
        self.sockets.append(s)
        return s

    def trickle(self) -> None:
        request = b"POST /cni HTTP/1.0\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000
        while not self.stop.is_set():  # reconnect whenever the daemon cuts it off
            s = self.connect()
            if s is None:
                return
            try:
                for byte in request:
                    s.send(bytes([byte]))
                    if self.stop.wait(2.0):
                        return
            except OSError:
                continue

    def stalled_reader(self) -> None:
        s = self.connect()
        if s is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            s.sendall(b"GET /v1/attachments HTTP/1.0\r\n\r\n")  # and never reads the answer

    def partial_body(self) -> None:
        s = self.connect()
        if s is not None:
            head = b"POST /cni HTTP/1.0\r\nContent-Length: 1048576\r\n\r\n"
            with contextlib.suppress(OSError):
                s.sendall(head + b'{"env": {}, "config": "' + b"a" * 900_000)

    def huge_body(self) -> None:
        s = self.connect()
        if s is not None:
            with contextlib.suppress(OSError):
                s.sendall(b"POST /cni HTTP/1.0\r\nContent-Length: 3900000\r\n\r\n" + b"{" * 65536)

    def start(self) -> None:
        plan = (
            [self.trickle] * TRICKLERS
            + [self.stalled_reader] * STALLED_READERS
            + [self.partial_body] * PARTIAL_BODIES
            + [self.huge_body] * HUGE_BODIES
        )
        for fn in plan:
            t = threading.Thread(target=fn, daemon=True)
            t.start()
            self.threads.append(t)

    def end(self) -> None:
        self.stop.set()
        for s in self.sockets:
            s.close()
        for t in self.threads:
            t.join(10)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def test_hostile_clients_never_block_pods_or_grow_the_daemon(bed: Bed) -> None:
    assert bed.daemon.proc is not None
    pid = bed.daemon.proc.pid
    cycle(bed, 2, "warm")
    rss_before, threads_before = proc_status(pid)
    base_add, base_del = cycle(bed, 5, "base")

    attack = Attack(bed.daemon.socket)
    attack.start()
    peak_rss, peak_threads = rss_before, threads_before
    samples: list[tuple[float, int]] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.2):
            samples.append(proc_status(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        time.sleep(3)  # every hostile client connected and stalled
        hostile_add, hostile_del = cycle(bed, 8, "hostile")
    finally:
        sampling.set()
        sampler.join(5)
        attack.end()
    peak_rss = max([peak_rss, *(r for r, _ in samples)])
    peak_threads = max([peak_threads, *(t for _, t in samples)])
    time.sleep(ConnectionLimits().read_deadline + 1)  # whatever is left is cut by the read deadline
    rss_after, threads_after = proc_status(pid)
    after_add, _ = cycle(bed, 2, "after")

    rows = [
        ("pod ADD, quiet (s)", statistics.median(base_add), pct(base_add, 0.9), max(base_add)),
        ("pod DEL, quiet (s)", statistics.median(base_del), pct(base_del, 0.9), max(base_del)),
        (
            "pod ADD, under attack (s)",
            statistics.median(hostile_add),
            pct(hostile_add, 0.9),
            max(hostile_add),
        ),
        (
            "pod DEL, under attack (s)",
            statistics.median(hostile_del),
            pct(hostile_del, 0.9),
            max(hostile_del),
        ),
    ]
    print("\n| measure | median | p90 | max |\n|---|---|---|---|")
    for name, med, p90, worst in rows:
        print(f"| {name} | {med:.3f} | {p90:.3f} | {worst:.3f} |")
    print(
        f"| daemon RSS MiB (before / peak / after) | {rss_before:.0f} | {peak_rss:.0f} | "
        f"{rss_after:.0f} |\n| daemon threads (before / peak / after) | {threads_before} | "
        f"{peak_threads} | {threads_after} |"
    )
    for values, base in ((hostile_add, base_add), (hostile_del, base_del)):
        assert max(values) < max(base) + ConnectionLimits().read_deadline + 2
    assert peak_rss - rss_before < 48, (rss_before, peak_rss)  # 128 Mi is the DaemonSet's limit
    # Hostile connections cost no thread: only the answer pool (32 at most) and real requests.
    assert peak_threads <= threads_before + 32 + 8
    assert threads_after <= threads_before + 32
    assert max(after_add) < max(base_add) + 2
    assert json.loads(json.dumps(bed.daemon.attachments())) == []
