"""The crash campaign (issue 10): many pod ADD/DEL cycles against a real plexusd while it is
SIGKILLed at its failpoints (docs/failpoints.md) and at random moments, then a count of what is
left behind.

The world: a "node" namespace running plexusd in local mode, its cluster network the built-in
`plexus-routed` (dual-stack, host-local leases in-process) and secondary networks as NADs in a
local directory: `mv` (built-in `plexus-macvlan`), `b2` (built-in `plexus-ipvlan`, or
`plexus-macvlan` on a kernel without ipvlan), `ref` (Debian's reference `macvlan` + `host-local`,
exec'd) and `bad` (a built-in whose ADD always fails once its link, lease and address exist, so
the pod's ADD is rolled back). Every request goes through the real shim executable with the
CNI_* environment and the conflist on stdin, as libcni sends them (`testbed.runtime`).

One cycle: a pod namespace, an ADD with 2-3 networks (eth0 + one or two secondaries); then, as
containerd tears a sandbox down, DEL #1 with the netns (a failed one is retried, as the kubelet
retries StopPodSandbox), the netns deleted, DEL #2 with `CNI_NETNS` empty; every few cycles a
GC with the runtime's valid list (the pods still alive: some pods live a few cycles; a few are
"lost" by the runtime and only GC can collect them). Each cycle's choices come from its own seed
(`seed:cycle`), so `--first-cycle K --cycles 1` replays cycle K's plan alone. The faults: a
failpoint armed (`name@N`, plexusd restarted with PLEXUS_FAILPOINTS), a SIGKILL after a random
fraction of the phase's usual duration (ADD, DEL #1, DEL #2, GC), or plexusd killed before
DEL #1 (and sometimes DEL #2) so the shim spools them and the next start replays them. After any
death plexusd is started again, unarmed. Opt-in (`--master-gone`): the macvlan master is deleted
after ADD and put back after the cycle (issue 10 item 3: a DEL that cannot succeed).

What counts as a leak, once every pod is gone and a last GC ran (and, per cycle, after that
cycle's DELs and GC): a link in the node namespace that is not the bed's own, a lease file in
any IPAM dataDir, an attachment record directory, a spool entry (pending or set aside as
unreadable); and the interfaces a DEL that answered success left in a pod that was still there
("pod links after DEL"). Quarantined records are reported on their own. VFs are n/a: this bed
has no SR-IOV.

Run it as root from the repository's top directory: `python -m testbed.chaos --cycles 1000`
(`make chaos`); `tests/netns/test_chaos.py` runs a bounded campaign in CI.
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from cnispec import failpoints
from delegates.routed import host_veth_name
from testbed import BedUnavailable
from testbed.daemon import DaemonProcess
from testbed.manifests import host_local, nad
from testbed.netns import Netns, is_root, namespaces
from testbed.runtime import CniRuntime, Outcome

NETWORKS_KEY: Final = "k8s.v1.cni.cncf.io/networks"
REFERENCE_PLUGINS: Final = Path("/usr/lib/cni")
POD_CIDRS: Final = ["10.244.0.0/20", "fd00:244::/64"]
SECONDARIES: Final = ("mv", "b2", "ref")
# Every failpoint but the SR-IOV one: this bed has no VFs.
CAMPAIGN_POINTS: Final = tuple(sorted(failpoints.NAMES - {"sriov_vf_moved"}))
BED_LINKS: Final = frozenset({"lo", "pxm0", "pxm1", "pxi0", "pxi1", "eth0", "wire"})
LEAK_KINDS: Final = ("links", "pod links after DEL", "leases", "records", "spool")
PHASES: Final = ("add", "del1", "del2", "gc")
DEL_ATTEMPTS: Final = 3  # the kubelet retries a failed teardown; each failure counts
_CID = re.compile(r"chaos\d{5}")
_WORLDS = itertools.count()


# --- the world ------------------------------------------------------------------------------


def _nads(root: Path, *, ipvlan: bool) -> list[dict[str, Any]]:
    """`mv` and `b2` are built-ins (b2 is plexus-ipvlan, or plexus-macvlan on a kernel without
    ipvlan, on its own master), `ref` is Debian's macvlan + host-local, exec'd; `bad` always
    fails its ADD (for rollbacks)."""
    ipam = root / "ipam"
    return [
        nad(
            "mv",
            {
                "cniVersion": "1.1.0",
                "type": "plexus-macvlan",
                "master": "pxm0",
                "ipam": host_local("10.70.0.0/20", ipam),
            },
        ),
        nad(
            "b2",
            {
                "cniVersion": "1.1.0",
                "type": "plexus-ipvlan" if ipvlan else "plexus-macvlan",
                "master": "pxi0",
                "ipam": host_local("10.72.0.0/20", ipam, routes=[{"dst": "10.99.0.0/16"}]),
            },
        ),
        # Its ADD always fails, after its link, lease and address exist (the kernel refuses a
        # gateway that is not on the link): the whole pod's ADD is rolled back.
        nad(
            "bad",
            {
                "cniVersion": "1.1.0",
                "type": "plexus-macvlan",
                "master": "pxi0",
                "ipam": host_local(
                    "10.73.0.0/20", ipam, routes=[{"dst": "10.98.0.0/16", "gw": "192.0.2.1"}]
                ),
            },
        ),
        nad(
            "ref",
            {
                "cniVersion": "1.0.0",
                "type": "macvlan",
                "master": "pxm0",
                "mode": "bridge",
                "ipam": host_local("10.71.0.0/20", ipam),
            },
        ),
    ]


@dataclass
class World:
    """The node namespace and its plexusd (restarted with or without failpoints)."""

    root: Path
    node: Netns
    daemon: DaemonProcess
    made: list[Netns]
    tag: str = "chaos"  # prefixes its namespaces' names
    ipvlan: bool = True  # b2 is plexus-ipvlan (else plexus-macvlan: no ipvlan in this kernel)
    spec: str = ""  # PLEXUS_FAILPOINTS of the running plexusd
    starts: int = 0

    @property
    def state(self) -> Path:
        return Path(self.daemon.config["stateDir"])

    @property
    def spool(self) -> Path:
        return self.state / "spool"

    @property
    def ipam_dirs(self) -> list[Path]:
        return [self.root / "leases", self.root / "ipam"]

    def alive(self) -> bool:
        """Whether plexusd runs. A SIGKILLed plexusd closes its sockets (the shim sees it gone
        and answers at once) a moment before it can be reaped: one that no longer accepts is
        waited for, so that moment is not taken for a live daemon."""
        proc = self.daemon.proc
        if proc is None or proc.poll() is not None:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(self.daemon.socket)
                return True
            except OSError:
                pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return True  # alive, only not serving
        return False

    def start(self, spec: str) -> int | None:
        """Start plexusd armed with `spec`; the signal number when it died while starting (a
        failpoint reached by the spool replay), else None."""
        self.starts += 1
        self.daemon.log = self.root / "logs" / f"plexusd-{self.starts:05d}.log"
        self.spec = spec
        try:
            self.daemon.start(env={failpoints.ENV: spec} if spec else None, timeout=60)
        except RuntimeError:
            proc = self.daemon.proc
            if proc is not None and proc.poll() is not None and proc.returncode < 0:
                return -proc.returncode
            raise
        return None

    def stop(self) -> None:
        self.daemon.stop()

    def kill(self) -> None:
        if self.alive():
            self.daemon.kill()

    def add_master(self) -> None:
        """(Re)create pxm0, the master of mv and ref, and its peer."""
        self.node.run("ip", "link", "add", "pxm0", "type", "veth", "peer", "name", "pxm1")
        self.node.run("ip", "link", "set", "pxm0", "up")
        self.node.run("ip", "link", "set", "pxm1", "up")

    def pod(self, role: str) -> Netns:
        ns = Netns(role)
        self.made.append(ns)
        return ns


@contextmanager
def chaos_world(root: Path) -> Iterator[World]:
    """Build the bed under `root` (plexusd not started); everything goes afterwards."""
    if not is_root():
        raise BedUnavailable("the crash campaign makes network namespaces: run it as root")
    if not (REFERENCE_PLUGINS / "macvlan").exists():
        raise BedUnavailable(
            "Debian's containernetworking-plugins are not installed (/usr/lib/cni/macvlan)"
        )
    (root / "net.d").mkdir(parents=True)
    (root / "net.d" / "10-pods.conflist").write_text(
        json.dumps({"cniVersion": "1.1.0", "name": "pods", "plugins": [{"type": "plexus-routed"}]})
    )
    (root / "logs").mkdir()
    with namespaces() as made:
        tag = f"chaos{next(_WORLDS)}"  # two worlds may be up at once (the tests)
        node = Netns(f"{tag}-node")
        made.append(node)
        node.run("ip", "link", "add", "pxi0", "type", "veth", "peer", "name", "pxi1")
        probe = node.run(
            "ip", "link", "add", "link", "pxi0", "pxprobe", "type", "ipvlan", check=False
        )
        ipvlan = probe.returncode == 0
        node.run("ip", "link", "del", "pxprobe", check=False)
        (root / "nads").mkdir()
        (root / "nads" / "nads.yaml").write_text(yaml.safe_dump_all(_nads(root, ipvlan=ipvlan)))
        node.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "wire")
        node.run("ip", "addr", "add", "192.168.100.11/24", "dev", "eth0")
        for link in ("pxi0", "pxi1", "eth0", "wire"):
            node.run("ip", "link", "set", link, "up")
        daemon = DaemonProcess(
            root,
            {
                "clusterNetwork": "pods",
                "localDir": str(root / "nads"),
                "hostLocalDataDir": str(root / "leases"),
                "cniPath": [str(REFERENCE_PLUGINS)],
                "fabric": {"mode": "native", "interface": "eth0", "podCIDRs": POD_CIDRS},
                "logLevel": "info",
            },
            netns=node.name,
        )
        world = World(root, node, daemon, made, tag=tag, ipvlan=ipvlan)
        world.add_master()
        try:
            yield world
        finally:
            world.stop()


# --- what a cycle does ----------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """One cycle's choices, all drawn from `seed:cycle`."""

    cycle: int
    secondaries: tuple[str, ...]
    fault: str = "none"  # none | failpoint | kill | spool
    point: str = ""  # failpoint: `name@N`
    kill_phase: str = ""  # kill: add | del1 | del2 | gc
    kill_at: float = 0.0  # kill: fraction of the phase's usual duration
    lifetime: int = 0  # cycles the pod stays alive after this one
    lost: bool = False  # the runtime forgets the pod: no DEL, only a GC collects it
    gc: bool = False  # a GC ends the cycle
    spool_both: bool = False  # spool: DEL #2 is spooled too (plexusd still down)
    master_gone: bool = False  # pxm0 (mv's and ref's master) is deleted after ADD, back at the end

    @property
    def cid(self) -> str:
        return f"chaos{self.cycle:05d}"

    @classmethod
    def draw(
        cls,
        seed: int,
        cycle: int,
        *,
        points: tuple[str, ...],
        gc_every: int,
        faulty: float,
        master_gone: float = 0.0,
    ) -> Plan:
        rng = random.Random(f"{seed}:{cycle}")
        secondaries = tuple(rng.sample(SECONDARIES, rng.choice((1, 2))))
        if rng.random() < 0.1:  # a rollback: one good secondary, then one that fails
            secondaries = (secondaries[0], "bad")
        roll = rng.random()
        fault, point, phase, at = "none", "", "", 0.0
        if roll < faulty * 0.55 and points:
            fault, point = (
                "failpoint",
                f"{rng.choice(points)}@{rng.choice((1,) * 12 + (2,) * 5 + (3, 3, 4))}",
            )
        elif roll < faulty * 0.9:
            fault, at = "kill", rng.random()
            phase = rng.choice(("add",) * 5 + ("del1",) * 3 + ("del2", "gc"))
        elif roll < faulty:
            fault = "spool"
        spool_both = rng.random() < 0.5
        lifetime = rng.choice((1, 2, 3)) if rng.random() < 0.15 else 0
        lost = rng.random() < 0.03
        gone = rng.random() < master_gone
        gc = gc_every > 0 and cycle % gc_every == gc_every - 1
        # Shaped so the point can be reached: a spool point fires only on a replay, a GC
        # point only in a GC.
        if point.startswith("spool_"):
            fault, lifetime, lost = "spool", 0, False
        gc = gc or point.startswith("chain_gc_")
        if phase == "gc" and not gc:
            phase = "del1"
        return cls(
            cycle,
            secondaries,
            fault,
            point,
            phase,
            round(at, 3),
            lifetime,
            lost,
            gc,
            spool_both and fault == "spool",
            gone,
        )

    def describe(self) -> str:
        if self.cycle < 0:
            return "the end of the campaign (pods still alive torn down, a last GC)"
        what = {
            "none": "no fault",
            "failpoint": "",
            "kill": f"SIGKILL in {self.kill_phase} at {self.kill_at:.0%} of its usual time",
            "spool": f"plexusd down for DEL #1{' and #2' if self.spool_both else ''} (spooled)",
        }[self.fault]
        if self.point:
            what = f"{what}, failpoint {self.point}" if what else f"failpoint {self.point}"
        if self.master_gone:
            what += ", the macvlan master pxm0 deleted after ADD (back after the cycle)"
        pod = "lost by the runtime" if self.lost else f"lives {self.lifetime} more cycle(s)"
        gc = ", GC" if self.gc else ""
        return f"{what}; eth0 + {'+'.join(self.secondaries)}; {pod}{gc}"


@dataclass
class Pod:
    plan: Plan
    ns: Netns
    added: bool = False
    expires: int = 0

    @property
    def cid(self) -> str:
        return self.plan.cid


@dataclass
class Finding:
    cycle: int
    plan: str
    what: str
    detail: str
    reproducer: str

    @property
    def key(self) -> str:
        """The finding with its container ids, addresses and numbers blotted out, to group."""
        text = _CID.sub("<cid>", f"{self.what}: {self.detail}")
        text = re.sub(r"\b[0-9a-f]{11,}\b", "<hex>", text)
        return re.sub(r"\d+", "N", text)[:300]


@dataclass
class CycleRecord:
    plan: Plan
    fired: str = ""  # the phase a failpoint fired in ("start": the spool replay at start-up)
    killed: str = ""  # the phase a random SIGKILL hit
    in_flight: bool = False  # that phase was still running when the SIGKILL came
    add_code: int | None = None  # the ADD's CNI error code (None: it succeeded)
    dels: int = 0
    del_failures: list[str] = field(default_factory=list)
    gc_failures: list[str] = field(default_factory=list)
    leftovers: dict[str, list[str]] = field(default_factory=dict)
    crashed: list[str] = field(default_factory=list)  # plexusd died with nothing armed

    @property
    def clean(self) -> bool:
        return not (self.del_failures or self.crashed or any(self.leftovers.values()))


@dataclass
class Tally:
    seed: int
    cycles: int = 0
    kills_failpoint: Counter[str] = field(default_factory=Counter)
    kills_random: Counter[str] = field(default_factory=Counter)
    kills_spool: int = 0
    rearms: int = 0  # SIGKILLs between requests to start plexusd with other failpoints armed
    armed_not_reached: Counter[str] = field(default_factory=Counter)
    crashes: int = 0
    adds: int = 0
    unexpected_add_failures: int = 0  # with no fault in the cycle
    add_errors: Counter[int] = field(default_factory=Counter)
    dels: int = 0
    del_failures: int = 0
    del_refused_master_gone: int = 0  # DEL #1 with the netns there and the master gone
    gcs: int = 0
    gc_failures: int = 0
    cycles_with_leftovers: int = 0
    pod_links: list[str] = field(default_factory=list)
    leaks: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in LEAK_KINDS})
    quarantined: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    bed: str = ""

    @property
    def kills(self) -> int:
        return (
            sum(self.kills_failpoint.values()) + sum(self.kills_random.values()) + self.kills_spool
        )

    @property
    def leak_count(self) -> int:
        return sum(len(v) for v in self.leaks.values())

    @property
    def ok(self) -> bool:
        return not (
            self.leak_count or self.del_failures or self.crashes or self.unexpected_add_failures
        )

    def summary(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "cycles": self.cycles,
            "kills": self.kills,
            "kills_failpoint": dict(self.kills_failpoint),
            "kills_random": dict(self.kills_random),
            "kills_spool": self.kills_spool,
            "rearms": self.rearms,
            "armed_not_reached": dict(self.armed_not_reached),
            "crashes": self.crashes,
            "adds": self.adds,
            "unexpected_add_failures": self.unexpected_add_failures,
            "add_errors": {str(k): v for k, v in self.add_errors.items()},
            "dels": self.dels,
            "del_failures": self.del_failures,
            "del_refused_master_gone": self.del_refused_master_gone,
            "gcs": self.gcs,
            "gc_failures": self.gc_failures,
            "cycles_with_leftovers": self.cycles_with_leftovers,
            "leaks": self.leaks,
            "vfs": "n/a (no SR-IOV bed)",
            "quarantined": self.quarantined,
            "findings": [{**f.__dict__, "key": f.key} for f in self.findings],
            "seconds": round(self.seconds, 1),
        }


class Campaign:
    def __init__(
        self,
        world: World,
        *,
        seed: int,
        log: Callable[[str], None] = print,
        replay: Callable[[Plan], str] | None = None,
    ) -> None:
        self.world = world
        self.seed = seed
        self.log = log
        # How to run one cycle's plan again, for the findings.
        self.replay = replay or (
            lambda plan: (
                f"python -m testbed.chaos --seed {seed} --first-cycle {plan.cycle} --cycles 1"
            )
        )
        self.tally = Tally(seed)
        self.live: dict[str, Pod] = {}
        self.dead: dict[str, Pod] = {}
        self.armed = ""  # what the campaign wants armed until it fires
        self._runtime: CniRuntime | None = None
        self._usual = {"add": 0.4, "del1": 0.2, "del2": 0.05, "gc": 0.2}
        self._record: CycleRecord | None = None
        self._upcoming: Plan | None = None

    @property
    def runtime(self) -> CniRuntime:
        if self._runtime is None:
            self._runtime = CniRuntime(
                self.world.daemon.conf_file, Path(self.world.daemon.config["cniBinDir"])
            )
        return self._runtime

    # --- plexusd ------------------------------------------------------------------------------

    def ensure_up(self) -> None:
        """plexusd running with what is armed; a failpoint that fires while it starts (the
        spool replay) counts, and it starts again unarmed."""
        world = self.world
        if world.alive() and world.spec == self.armed:
            return
        if world.alive():
            # Between requests: SIGKILL is as good as SIGTERM here and half a second faster.
            world.kill()
            self.tally.rearms += 1
        for _ in range(3):
            if world.start(self.armed) is None:
                return
            self._died("start", by_us=False)  # disarms (or arms an ADD-only next point)
        raise RuntimeError(f"plexusd keeps dying while it starts: {world.daemon.log}")

    def _died(self, phase: str, *, by_us: bool) -> None:
        record = self._record
        if by_us:
            return
        proc = self.world.daemon.proc
        killed = proc is not None and proc.returncode == -signal.SIGKILL
        if self.world.spec and killed:
            name = self.world.spec.split("@")[0]
            self.tally.kills_failpoint[name] += 1
            if record is not None:
                record.fired = phase
            upcoming = self._upcoming
            self.armed = upcoming.point if upcoming and add_only(upcoming.point) else ""
            return
        self.tally.crashes += 1
        tail = self.world.daemon.logs().splitlines()[-5:]
        code = proc.returncode if proc is not None else None
        if record is not None:
            record.crashed.append(
                f"plexusd died in {phase} (exit {code}), not at a failpoint: {tail}"
            )

    def _op(self, phase: str, fn: Callable[[], Outcome], *, down: bool = False) -> Outcome:
        """Run one runtime request, SIGKILLing plexusd during it when the cycle's plan says so;
        then account for any death and start plexusd again. `down`: plexusd was stopped on
        purpose (the shim is to spool a DEL), leave it so."""
        if down:
            return fn()
        record = self._record
        plan = record.plan if record is not None else None
        kill = (
            plan is not None
            and record is not None
            and plan.fault == "kill"
            and plan.kill_phase == phase
            and not record.killed
        )
        started = time.monotonic()
        if kill and plan is not None and record is not None:
            outcome, record.in_flight = self._killing(fn, plan.kill_at * self._usual[phase] * 1.2)
            record.killed = phase
            when = "in flight" if record.in_flight else "after it returned"
            self.tally.kills_random[f"{phase} ({when})"] += 1
        else:
            outcome = fn()
        if not self.world.alive():
            self._died(phase, by_us=kill)
        elif not kill and not self.world.spec:
            took = time.monotonic() - started
            self._usual[phase] = 0.8 * self._usual[phase] + 0.2 * took
        self.ensure_up()
        return outcome

    def _killing(self, fn: Callable[[], Outcome], delay: float) -> tuple[Outcome, bool]:
        box: list[Outcome] = []
        errors: list[BaseException] = []

        def run() -> None:
            try:
                box.append(fn())
            except BaseException as exc:  # noqa: BLE001 - re-raised in the campaign's thread
                errors.append(exc)

        thread = threading.Thread(target=run, name="chaos-request", daemon=True)
        thread.start()
        thread.join(delay)
        in_flight = thread.is_alive()
        self.world.kill()
        thread.join(180)
        if errors:
            raise errors[0]
        if not box:
            raise RuntimeError("a runtime request did not return within 180 s of a SIGKILL")
        return box[0], in_flight

    # --- a cycle ------------------------------------------------------------------------------

    def run_cycle(self, plan: Plan, upcoming: Plan | None = None) -> CycleRecord:
        """One cycle. `upcoming`: the next cycle's plan, if known; when its failpoint can only
        be reached by an ADD, the start-up after this cycle's failpoint fired arms it already
        (nothing of this cycle can reach it any more), one start-up fewer."""
        record = self._record = CycleRecord(plan)
        self._upcoming = upcoming
        self.armed = plan.point
        self.ensure_up()
        pod = Pod(plan, self.world.pod(f"{self.world.tag}-{plan.cycle}"))
        self._add(pod)
        if plan.master_gone:
            self.world.node.run("ip", "link", "del", "pxm0")
        dying: list[Pod] = []
        if plan.lost:
            pod.ns.delete()
            self.dead[pod.cid] = pod
        elif pod.added and plan.lifetime:
            pod.expires = plan.cycle + plan.lifetime
            self.live[pod.cid] = pod
        else:
            dying.append(pod)
        dying += [p for p in self.live.values() if p.expires <= plan.cycle]
        for victim in dying:
            self.live.pop(victim.cid, None)
            spooled = plan.fault == "spool" and victim is pod
            self._teardown(victim, spooled=spooled, both=spooled and plan.spool_both)
        if plan.gc:
            self.gc()
        if plan.fault == "kill" and not record.killed:  # its phase did not run: kill now
            self.world.kill()
            record.killed = "between requests"
            self.tally.kills_random["between requests"] += 1
            self.ensure_up()
        if self.armed == plan.point and plan.point and not record.fired:
            self.tally.armed_not_reached[self.armed.split("@")[0]] += 1
            self.armed = ""
        cids = {p.cid for p in dying} | ({pod.cid} if plan.lost and plan.gc else set())
        for kind, items in self.leftovers(cids).items():
            if items:
                record.leftovers.setdefault(kind, []).extend(items)
        if plan.master_gone:
            self.world.add_master()
        self._account(record)
        self._record = None
        return record

    def _add(self, pod: Pod) -> None:
        plan = pod.plan
        self.tally.adds += 1
        out = self._op(
            "add",
            lambda: self.runtime.add(
                pod.cid,
                pod.ns.path,
                annotations={NETWORKS_KEY: ", ".join(plan.secondaries)},
                pod=("default", f"pod{plan.cycle}"),
            ),
        )
        pod.added = out.returncode == 0
        if not pod.added:
            body = _body(out)
            code = body.get("code", -1) if isinstance(body, dict) else -1
            assert self._record is not None
            self._record.add_code = int(code)
            self.tally.add_errors[int(code)] += 1
            if plan.fault == "none" and "bad" not in plan.secondaries:
                self.tally.unexpected_add_failures += 1
                self._finding(plan, "ADD failed with no fault injected", out.stdout or out.stderr)

    def _teardown(self, pod: Pod, *, spooled: bool, both: bool = False) -> None:
        """As containerd tears a sandbox down: DEL with the netns (retried while it fails),
        the netns deleted, DEL again without it."""
        record = self._record
        assert record is not None
        if spooled:
            self.world.kill()
            self.tally.kills_spool += 1
            self._del(pod, "del1", pod.ns.path, down=True)  # the shim spools it: success
            pod.ns.delete()
            if both:
                self._del(pod, "del2", "", down=True)
            self.ensure_up()  # replays the spool before it serves (may reach a spool_* point)
            if both:
                self.dead[pod.cid] = pod
                return
        else:
            fired = record.fired
            ok = self._del(pod, "del1", pod.ns.path)
            if ok and record.fired == fired and record.killed != "del1" and pod.ns.exists():
                left = sorted(set(pod.ns.links()) - {"lo"})
                if left:
                    record.leftovers.setdefault("pod links after DEL", []).extend(
                        f"{name} ({pod.cid})" for name in left
                    )
            pod.ns.delete()
        self._del(pod, "del2", "")
        self.dead[pod.cid] = pod

    def _del(self, pod: Pod, phase: str, netns: str, *, down: bool = False) -> bool:
        record = self._record
        assert record is not None
        for attempt in range(1, DEL_ATTEMPTS + 1):
            self.tally.dels += 1
            record.dels += 1
            if phase == "del1":
                out = self._op(phase, lambda: self.runtime.delete(pod.cid, netns), down=down)
            else:
                out = self._op(
                    phase, lambda: self.runtime.delete(pod.cid, "", with_prev=False), down=down
                )
            if out.returncode == 0 and not _is_error(out):
                return True
            if phase == "del1" and record.plan.master_gone:
                # The netns is there and a delegate cannot DEL without its master: 105, so the
                # runtime retries (by design, also once "DEL that can never succeed" is fixed).
                self.tally.del_refused_master_gone += 1
                continue
            self.tally.del_failures += 1
            mine = (
                "" if pod.plan is record.plan else f" of {pod.cid} (made in cycle {pod.plan.cycle})"
            )
            what = f"DEL #{phase[-1]}{mine} failed (attempt {attempt} of {DEL_ATTEMPTS})"
            detail = (out.stdout or out.stderr).strip()
            record.del_failures.append(f"{what}: {detail}")
            self._finding(record.plan, what, detail)
        return False

    def gc(self) -> bool:
        valid = [{"containerID": cid, "ifname": "eth0"} for cid in sorted(self.live)]
        extra = {"cni.dev/valid-attachments": valid}
        plan = self._record.plan if self._record else Plan(-1, ())
        for _ in range(2):  # once more when plexusd died during it
            self.tally.gcs += 1
            before = self.world.starts
            out = self._op("gc", lambda: self.runtime.invoke("GC", version="1.1.0", extra=extra))
            if self.world.starts != before and out.returncode != 0:
                continue
            if out.returncode == 0:
                return True
            self.tally.gc_failures += 1
            detail = (out.stdout or out.stderr).strip()
            if self._record is not None:
                self._record.gc_failures.append(detail)
            self._finding(plan, "GC failed", detail)
            return False
        return False

    def _finding(self, plan: Plan, what: str, detail: str) -> None:
        replay = self.replay(plan) if plan.cycle >= 0 else "(the whole campaign again)"
        finding = Finding(plan.cycle, plan.describe(), what, detail, replay)
        self.tally.findings.append(finding)

    def _account(self, record: CycleRecord) -> None:
        self.tally.cycles += 1
        # Seen only now (the pod's namespace goes right after): they count as leaks.
        self.tally.pod_links += record.leftovers.get("pod links after DEL", [])
        if any(record.leftovers.values()):
            self.tally.cycles_with_leftovers += 1
            for kind, items in record.leftovers.items():
                self._finding(record.plan, f"left after the DELs ({kind})", ", ".join(items))
        self.log(_cycle_line(record))

    # --- the end ------------------------------------------------------------------------------

    def finish(self) -> Tally:
        """Tear down the pods still alive, start plexusd unarmed (it replays the spool), GC
        with nothing valid, and count every leak left on the node."""
        self._record = CycleRecord(Plan(-1, ()))
        self.armed = ""
        self.ensure_up()
        for pod in list(self.live.values()):
            self.live.pop(pod.cid)
            self._teardown(pod, spooled=False)
        self.world.stop()
        self.ensure_up()
        self.gc()
        self.tally.leaks = self.leftovers(None)
        for kind, items in self.tally.leaks.items():
            for item in items:  # each leak is a finding of the cycle that made the pod
                match = _CID.search(item)
                maker = self.dead.get(match.group(0)) if match else None
                plan = maker.plan if maker else Plan(-1, ())
                self._finding(plan, f"leaked at the end ({kind})", item)
        self.tally.leaks["pod links after DEL"] = list(self.tally.pod_links)
        self.tally.quarantined = sorted(
            str(p.name) for p in (self.world.state / "quarantine").glob("*")
        )
        self._record = None
        return self.tally

    def leftovers(self, cids: set[str] | None) -> dict[str, list[str]]:
        """What is left on the node of the containers `cids` (None: of anything)."""

        def ours(cid: str) -> bool:
            return cids is None or cid in cids

        out: dict[str, list[str]] = {kind: [] for kind in LEAK_KINDS}
        hosts = {host_veth_name(cid, "eth0"): cid for cid in (self.dead if cids is None else cids)}
        for name in self.world.node.links():
            if name in BED_LINKS:
                continue
            if cids is None or name in hosts:
                out["links"].append(f"{name} ({hosts.get(name, '?')})")
        for lease, cid in self._leases():
            if ours(cid):
                out["leases"].append(f"{lease} ({cid})")
        attachments = self.world.state / "attachments"
        if attachments.is_dir():
            for directory in sorted(attachments.iterdir()):
                if ours(directory.name):
                    files = (
                        sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
                    )
                    out["records"].append(f"{directory.name}: {', '.join(files) or '(empty)'}")
        spool = self.world.spool
        if spool.is_dir():
            for entry in sorted(spool.rglob("*.json")):
                match = _CID.search(entry.name)
                if ours(match.group(0) if match else "?"):
                    out["spool"].append(str(entry.relative_to(spool)))
        return out

    def _leases(self) -> Iterator[tuple[str, str]]:
        for data_dir in self.world.ipam_dirs:
            if not data_dir.is_dir():
                continue
            for network in sorted(p for p in data_dir.iterdir() if p.is_dir()):
                for lease in sorted(network.iterdir()):
                    if lease.name == "lock" or lease.name.startswith("last_reserved_ip."):
                        continue
                    try:
                        ipaddress.ip_address(lease.name)
                    except ValueError:
                        # a temp file a crash left: the next allocation removes it, so it
                        # counts only when nothing came after (the end of the campaign)
                        yield f"{network.name}/{lease.name} (a temp file)", "?"
                        continue
                    # `<container id>\r\n<ifname>` (or the id alone, the older format)
                    text = lease.read_bytes().decode(errors="replace").strip()
                    owner = text.splitlines()[0].strip() if text else "?"
                    yield f"{network.name}/{lease.name}", owner


# Points only an ADD reaches (the rest are reached by DEL, GC or the spool replay too).
_ADD_ONLY = re.compile(
    r"(store_plan|store_record|store_mark_added|chain_add|iface|hostlocal_lease|routed_ipam"
    r"|routed_veth|routed_node|routed_pod|sublink_create|sublink_ipam|sublink_configured)"
)


def add_only(spec: str) -> bool:
    return bool(spec) and _ADD_ONLY.match(spec) is not None


def _body(out: Outcome) -> Any:
    try:
        return out.body
    except ValueError:
        return None


def _is_error(out: Outcome) -> bool:
    body = _body(out)
    return isinstance(body, dict) and "code" in body


def _cycle_line(record: CycleRecord) -> str:
    plan = record.plan
    what = {
        "none": "clean",
        "failpoint": "",
        "kill": f"kill {record.killed}{'' if record.in_flight else ' (after it returned)'}",
        "spool": "spooled DEL",
    }[plan.fault]
    if plan.point:
        what += f" {plan.point} " + (f"fired in {record.fired}" if record.fired else "not reached")
    add = "ok" if record.add_code is None else f"code {record.add_code}"
    status = "ok" if record.clean else "FINDING"
    extra = ""
    if record.del_failures:
        extra += f" del-failures={len(record.del_failures)}"
    if record.leftovers:
        extra += " left=" + ",".join(f"{k}:{len(v)}" for k, v in record.leftovers.items())
    if record.gc_failures:
        extra += f" gc-failures={len(record.gc_failures)}"
    return f"cycle {plan.cycle:5d} {status:7} ADD {add:8} {what}{extra}"


# --- the report -----------------------------------------------------------------------------


def report(tally: Tally) -> str:
    t = tally
    by_point = ", ".join(f"{k} {v}" for k, v in sorted(t.kills_failpoint.items()))
    by_phase = ", ".join(f"{k} {v}" for k, v in sorted(t.kills_random.items()))
    add_errors = ", ".join(f"code {k}: {v}" for k, v in sorted(t.add_errors.items()))
    sent = t.dels - t.del_refused_master_gone
    pct = 100.0 * (sent - t.del_failures) / sent if sent else 100.0
    rows = [
        ("cycles", str(t.cycles), f"seed {t.seed}, {t.seconds:.0f} s"),
        ("SIGKILLs", str(t.kills), ""),
        (
            "  at a failpoint",
            str(sum(t.kills_failpoint.values())),
            f"{len(t.kills_failpoint)} points",
        ),
        ("  at a random moment", str(sum(t.kills_random.values())), by_phase),
        ("  to spool a DEL", str(t.kills_spool), "DEL #1 sent while plexusd was down"),
        ("armed, never reached", str(sum(t.armed_not_reached.values())), ""),
        ("idle restarts to (dis)arm", str(t.rearms), "SIGKILL between requests, not a fault"),
        ("plexusd crashes (unarmed)", str(t.crashes), ""),
        ("ADDs", str(t.adds), f"failed: {add_errors or 'none'}"),
        ("  failed with no fault", str(t.unexpected_add_failures), ""),
        ("DELs sent", str(t.dels), f"{pct:.2f} % succeeded"),
        ("DEL failures", str(t.del_failures), ""),
        *(
            [
                (
                    "DEL #1 refused, master gone",
                    str(t.del_refused_master_gone),
                    "netns there: retried",
                )
            ]
            if t.del_refused_master_gone
            else []
        ),
        ("GCs", str(t.gcs), f"{t.gc_failures} failed"),
        ("cycles with leftovers after DELs", str(t.cycles_with_leftovers), "before the final GC"),
        *[(f"leaks: {kind}", str(len(t.leaks[kind])), "") for kind in LEAK_KINDS],
        ("leaks: VFs", "n/a", "no SR-IOV bed in this campaign"),
        ("quarantined records", str(len(t.quarantined)), ""),
    ]
    width = max(len(r[0]) for r in rows)
    lines = ["", f"Crash campaign ({tally.bed})", "-" * (width + 12)]
    lines += [f"{a.ljust(width)}  {b:>7}  {c}".rstrip() for a, b, c in rows]
    if by_point:
        lines += ["", f"failpoints fired: {by_point}"]
    if t.armed_not_reached:
        lines += [
            "armed but not reached: "
            + ", ".join(f"{k} {v}" for k, v in sorted(t.armed_not_reached.items()))
        ]
    for kind in LEAK_KINDS:
        if t.leaks[kind]:
            lines += ["", f"leaked {kind}:"] + [f"  {item}" for item in t.leaks[kind][:20]]
    if t.quarantined:
        lines += ["", "quarantined:"] + [f"  {q}" for q in t.quarantined[:20]]
    groups: dict[str, list[Finding]] = {}
    for finding in t.findings:
        groups.setdefault(finding.key, []).append(finding)
    if groups:
        lines += ["", f"findings ({len(t.findings)}, {len(groups)} kinds):"]
    for found in sorted(groups.values(), key=len, reverse=True):
        first = found[0]
        lines += [
            f"- {len(found)}x {first.what}",
            f"    first in cycle {first.cycle}: {first.plan}",
            f"    {first.detail[:1500]}",
            f"    reproduce: {first.reproducer}",
            f"    cycles: {', '.join(str(f.cycle) for f in found[:15])}"
            + (" ..." if len(found) > 15 else ""),
        ]
    return "\n".join(lines)


def plans(args: argparse.Namespace) -> list[Plan]:
    points = tuple(args.failpoints.split(",")) if args.failpoints else CAMPAIGN_POINTS
    if args.each_failpoint:
        return each_failpoint_plans(args.first_cycle, points)
    return [
        Plan.draw(
            args.seed,
            c,
            points=points,
            gc_every=args.gc_every,
            faulty=args.faulty,
            master_gone=args.master_gone,
        )
        for c in range(args.first_cycle, args.first_cycle + args.cycles)
    ]


def each_failpoint_plans(first: int, points: tuple[str, ...] = CAMPAIGN_POINTS) -> list[Plan]:
    """One cycle per failpoint, shaped so that it is reached: a spool point needs a spooled
    DEL; every cycle has both a built-in and the reference secondary, and ends with a GC."""
    out = []
    for i, name in enumerate(points):
        spec = name if "@" in name else f"{name}@1"
        secondaries = ("mv", "ref") if i % 2 == 0 else ("b2", "ref")
        # A spool point is armed for the start-up that replays the spooled DEL.
        shape = "spool" if name.startswith("spool_") else "failpoint"
        out.append(Plan(first + i, secondaries, shape, spec, gc=True))
    return out


def run(
    plans_: list[Plan],
    *,
    seed: int,
    root: Path,
    log: Callable[[str], None],
    replay: Callable[[Plan], str] | None = None,
) -> Tally:
    started = time.monotonic()
    with chaos_world(root) as world:
        campaign = Campaign(world, seed=seed, log=log, replay=replay)
        b2 = "plexus-ipvlan" if world.ipvlan else "plexus-macvlan (no ipvlan in this kernel)"
        campaign.tally.bed = (
            f"eth0 plexus-routed + 1-2 of mv plexus-macvlan, b2 {b2}, ref reference macvlan"
        )
        for plan, upcoming in itertools.zip_longest(plans_, plans_[1:]):
            campaign.run_cycle(plan, upcoming)
        tally = campaign.finish()
    tally.seconds = time.monotonic() - started
    return tally


def replay_command(args: argparse.Namespace, plan: Plan) -> str:
    """The command that runs `plan` alone again (the cycle's random choices come from its own
    seed; a SIGKILL's timing can differ)."""
    cmd = "sudo .venv/bin/python -m testbed.chaos"
    if args.each_failpoint:
        return f"{cmd} --each-failpoint --failpoints {plan.point}"
    cmd += f" --seed {args.seed} --first-cycle {plan.cycle} --cycles 1 --gc-every {args.gc_every}"
    cmd += f" --faulty {args.faulty}"
    if args.failpoints:
        cmd += f" --failpoints {args.failpoints}"
    if plan.master_gone:
        cmd += " --master-gone 1"
    return cmd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.chaos",
        description="The crash campaign: ADD/DEL cycles while plexusd is SIGKILLed, then leaks.",
    )
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--first-cycle", type=int, default=0, help="replay from this cycle's plan")
    parser.add_argument(
        "--gc-every", type=int, default=4, help="a GC every N cycles (0: only at the end)"
    )
    parser.add_argument("--faulty", type=float, default=0.85, help="share of cycles with a fault")
    parser.add_argument("--failpoints", default="", help="comma-separated names (default: all)")
    parser.add_argument(
        "--master-gone",
        type=float,
        default=0.0,
        help="share of cycles whose macvlan master is deleted after ADD (default 0: crashes only)",
    )
    parser.add_argument("--each-failpoint", action="store_true", help="one cycle per failpoint")
    parser.add_argument("--keep", type=Path, help="keep the state, leases and logs here")
    parser.add_argument("--json", type=Path, help="write the tally as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no line per cycle")
    args = parser.parse_args(argv)
    bad = [p for p in args.failpoints.split(",") if p and p.split("@")[0] not in failpoints.NAMES]
    if bad:
        parser.error(f"unknown failpoints: {', '.join(bad)} (see docs/failpoints.md)")
    chosen = plans(args)
    tmp = tempfile.mkdtemp(prefix="plexus-chaos-")
    try:
        tally = run(
            chosen,
            seed=args.seed,
            root=Path(tmp),
            log=(lambda _: None) if args.quiet else print,
            replay=lambda plan: replay_command(args, plan),
        )
    except BedUnavailable as exc:
        print(f"chaos: this machine cannot run it: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            shutil.copytree(tmp, args.keep, dirs_exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    print(report(tally))
    if args.json:
        args.json.write_text(json.dumps(tally.summary(), indent=2) + "\n")
    print(
        "\nchaos: OK (0 leaks, every DEL succeeded)" if tally.ok else "\nchaos: FAILED (see above)"
    )
    return 0 if tally.ok else 1


if __name__ == "__main__":
    sys.exit(main())
