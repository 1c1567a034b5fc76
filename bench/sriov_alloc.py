"""VF allocation cost against pool size: `Ledger.reserve` plus the transition back to FREE, each
durable (record written, fsynced, renamed, directory fsynced; freeing unlinks and fsyncs the
directory), for pools of 64, 256, 1,024 and 4,096 VFs. The cost must not grow with the pool: the
last column is each size's median over the 64-VF pool's (~1.0x).

Each pool is half taken before timing (the free index then has holes, as in a busy node); one op
reserves the lowest free VF and frees a random held one. Sizes take turns op by op, so drift in
disk latency hits them alike. Also prints the memory (tracemalloc) of 1,024 VF records.

Run: `.venv/bin/python -m bench.sriov_alloc [--n 300] [--dir /var/tmp]` (no root needed;
`--dir /dev/shm` shows the cost without the disk).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

from cnispec.identity import Holder
from sriov.ledger import Ledger
from sriov.records import HostState, VfRecord, VfSettings, VfState

POOL = "plexus.dev/bench_vf"
SIZES = (64, 256, 1024, 4096)
MIN_OPS = 200
WARMUP = 10


def pci(i: int) -> str:
    # 8 functions per device, 32 devices per bus: as many VFs as we like, all distinct
    return f"0000:{0x10 + i // 256:02x}:{(i // 8) % 32:02x}.{i % 8}"


def holder(n: int) -> Holder:
    return Holder(
        container_id=f"{n:064x}", ifname="net1", netns=f"/var/run/netns/cni-{n}", pod_name=f"p{n}"
    )


@dataclass
class Run:
    """One pool under test, half taken."""

    ledger: Ledger
    size: int
    held: list[str] = field(default_factory=list)
    next_holder: int = 0
    reserve_ms: list[float] = field(default_factory=list)
    free_ms: list[float] = field(default_factory=list)

    def op(self, rng: random.Random, *, record: bool) -> None:
        self.next_holder += 1
        started = time.perf_counter()
        got = self.ledger.reserve(POOL, holder(self.next_holder))
        reserved = time.perf_counter()
        self.held.append(got.pci)
        victim = self.held.pop(rng.randrange(len(self.held)))
        before = time.perf_counter()
        self.ledger.transition(victim, expect={VfState.RESERVED, VfState.ATTACHED}, to=VfState.FREE)
        done = time.perf_counter()
        if record:
            self.reserve_ms.append((reserved - started) * 1000)
            self.free_ms.append((done - before) * 1000)


def prepare(base: Path, size: int) -> Run:
    ledger = Ledger(base / f"pool-{size}")
    ledger.set_pool(POOL, [pci(i) for i in range(size)])
    run = Run(ledger, size)
    for _ in range(size // 2):
        run.next_holder += 1
        run.held.append(ledger.reserve(POOL, holder(run.next_holder)).pci)
    return run


def stats(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), statistics.quantiles(values, n=20)[-1]


def report(runs: list[Run], n: int, where: Path) -> None:
    base = statistics.median(
        [a + b for a, b in zip(runs[0].reserve_ms, runs[0].free_ms, strict=True)]
    )
    print(f"reserve + free of one VF, durable, state dir on {where}; n={n} ops per size, ms")
    print(
        f"{'pool VFs':>8} {'reserve med':>12} {'p95':>7} {'free med':>9} {'p95':>7}"
        f" {'total med':>10} {'p95':>7} {'x(64)':>6}"
    )
    for run in runs:
        r_med, r_p95 = stats(run.reserve_ms)
        f_med, f_p95 = stats(run.free_ms)
        t_med, t_p95 = stats([a + b for a, b in zip(run.reserve_ms, run.free_ms, strict=True)])
        print(
            f"{run.size:8d} {r_med:12.3f} {r_p95:7.3f} {f_med:9.3f} {f_p95:7.3f}"
            f" {t_med:10.3f} {t_p95:7.3f} {t_med / base:6.2f}"
        )


def held_record(i: int) -> VfRecord:
    return VfRecord(
        pci=pci(i),
        state=VfState.ATTACHED,
        pool=POOL,
        holder=holder(i),
        host=HostState(name=f"ens1f0v{i}", mac="02:00:00:00:00:01", mtu=1500),
        pf_before=VfSettings(mac="00:00:00:00:00:00", vlan=0, spoofchk=True, trust=False),
        pf_applied=("vlan", "spoofchk"),
    )


def memory(where: Path) -> None:
    """Bytes the ledger keeps for 1,024 VFs: all free (pool index only), then all attached."""
    with tempfile.TemporaryDirectory(dir=where, prefix="plexus-bench-mem-") as tmp:
        tracemalloc.start()
        ledger = Ledger(Path(tmp))
        ledger.set_pool(POOL, [pci(i) for i in range(1024)])
        free_bytes = tracemalloc.get_traced_memory()[0]
        for i in range(1024):
            ledger.put(held_record(i))
        held_bytes = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
    print(
        f"memory per 1,024 VFs: {free_bytes / 1024:.0f} KiB all free (pool index, no records, "
        f"no files); {held_bytes / 1024:.0f} KiB all attached (1,024 records + indexes)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=300, help=f"timed ops per size (>= {MIN_OPS})")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where the state goes")
    parser.add_argument("--max", type=int, default=4096, choices=SIZES, help="largest pool")
    args = parser.parse_args()
    if args.n < MIN_OPS:
        parser.error(f"--n must be at least {MIN_OPS} for a stable p95")
    rng = random.Random(5)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="plexus-bench-vf-") as tmp:
        runs = [prepare(Path(tmp), size) for size in SIZES if size <= args.max]
        for i in range(WARMUP + args.n):
            for run in runs:
                run.op(rng, record=i >= WARMUP)
    report(runs, args.n, args.dir)
    memory(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
