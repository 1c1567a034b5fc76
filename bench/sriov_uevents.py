"""uevent -> pool-updated latency of the SR-IOV node agent, on the synthetic sysfs bed.

A node namespace holds the bed (a sysfs tree whose VF netdevs are real veth links) and a
NodeAgent following the kernel-format uevents there. Each round:
  add     a new PF with 8 VFs appears (tree + links + uevents) -> its VFs are in the pool
  remove  one of them disappears (uevent remove)               -> the pool reports it unhealthy
measured from the first uevent sent (the tree and links are already in place, as the kernel
has them when it announces) to the agent's pools-changed callback that sees the change, so the
figure includes the kernel netlink delivery, the burst coalescing, the
rescan of the whole tree and the pool assignment (a burst is coalesced for 10 ms first). The
second row's node already has 8 other PFs (64 VFs): the latency grows with the inventory that
each rescan reads.

The reference stack has no row here: sriov-network-device-plugin discovers devices only at
start (sriov-network-device-plugin#276), so a new PF waits for a restart of the plugin.

Run as root: `sudo make bench-sriov` (or `.venv/bin/python -m bench.sriov_uevents [N]`, N >= 20).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from cnispec import logs
from kernel.netns import run_in_netns
from sriov.agent import NodeAgent
from sriov.pools_source import PoolsFileSource
from sriov.sysfs import Sysfs
from sriov.uevents import KernelSource
from testbed.netns import Netns
from testbed.sriov_bed import SriovBed

POOL = "plexus.dev/bench_vf"
VFS_PER_PF = 8


def _pf_address(n: int) -> str:
    return f"0000:{0x10 + n:02x}:00.0"


class Watch:
    """Wakes the benchmark when the agent's pools match a predicate."""

    def __init__(self, agent: NodeAgent) -> None:
        self._agent = agent
        self._cond = threading.Condition()
        agent.membership.on_change(self._changed)

    def _changed(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait(self, predicate: object, timeout: float = 5.0) -> float:
        assert callable(predicate)
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the pool did not change within 5 s")
                self._cond.wait(left)
        return time.monotonic()


def _round(bed: SriovBed, agent: NodeAgent, watch: Watch, n: int) -> tuple[float, float]:
    pci = _pf_address(n)
    vfs = bed.add_pf(
        pci,
        ifname=f"bpf{n}",
        num_vfs=VFS_PER_PF,
        total_vfs=VFS_PER_PF,
        make_links=False,  # tree only: no kernel uevent of a link may start the rescan early
        announce=False,
    )
    started = time.monotonic()
    for address in [pci, *vfs]:
        bed.uevent("add", "pci", bed.devpath(address))

    def members() -> set[str]:
        return {v.pci for v in agent.membership.pool_devices(POOL)}

    added = watch.wait(lambda: set(vfs) <= members()) - started
    gone = vfs[0]
    bed.remove_vf(gone, announce=False)
    started = time.monotonic()
    bed.uevent("remove", "pci", bed.devpath(gone))

    def healthy() -> dict[str, bool]:
        return {v.pci: v.healthy for v in agent.membership.pool_devices(POOL)}

    removed = watch.wait(lambda: healthy().get(gone) is False) - started
    return added * 1000, removed * 1000


def p95(xs: list[float]) -> float:
    return xs[min(len(xs) - 1, int(len(xs) * 0.95))]


def _row(label: str, samples: list[tuple[float, float]]) -> str:
    add = sorted(s[0] for s in samples)
    rem = sorted(s[1] for s in samples)
    return (
        f"| {label:<26} | {statistics.median(add):8.1f} | {p95(add):8.1f} "
        f"| {statistics.median(rem):8.1f} | {p95(rem):8.1f} |"
    )


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    if n < 20:
        print("N must be at least 20 for medians worth printing", file=sys.stderr)
        return 2
    logs.configure("warning", "console")
    node = Netns("bench-sriov-node")
    with tempfile.TemporaryDirectory(prefix="plexus-bench-sriov-") as tmp:
        bed = SriovBed(Path(tmp) / "sys", node)
        pools = Path(tmp) / "pools.yaml"
        pools.write_text(
            f"pools:\n  - resourceName: {POOL}\n    selectors: {{vendors: ['8086']}}\n"
        )
        agent = NodeAgent(
            sysfs=Sysfs(bed.root),
            pools=PoolsFileSource(pools),
            state_dir=Path(tmp) / "state",
            source_factory=lambda: run_in_netns(node.path, KernelSource),
        )
        try:
            agent.start()
            agent.audit_finished()  # nothing to heal on a fresh bed
            watch = Watch(agent)
            rows = []
            made = 0
            for label, background in (("node with 0 other PFs", 0), ("node with 8 other PFs", 8)):
                while made < background:
                    bed.add_pf(
                        _pf_address(100 + made),
                        ifname=f"opf{made}",
                        num_vfs=VFS_PER_PF,
                        make_links=False,
                    )
                    made += 1
                samples = []
                for i in range(n):
                    samples.append(_round(bed, agent, watch, i + (0 if background == 0 else n)))
                    bed.remove_pf(_pf_address(i + (0 if background == 0 else n)))
                rows.append(_row(label, samples))
        finally:
            agent.stop()
            bed.cleanup()
            node.delete()
    print(f"uevent -> pool updated, ms (n={n} per row, medians and p95; {VFS_PER_PF} VFs per PF)")
    print("| node                       | add med  | add p95  | rm med   | rm p95   |")
    print("|----------------------------|----------|----------|----------|----------|")
    for row in rows:
        print(row)
    print("(reference: sriov-network-device-plugin rediscovers only on restart)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
