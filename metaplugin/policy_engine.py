"""The policy engine in plexusd: NetworkPolicy, MultiNetworkPolicy and the isolation modes,
enforced with one nftables table (`inet plexus_policy`) in each local pod's network namespace.

What it does, and when:
- It assembles a `PolicyWorld`: policies, namespaces and the cluster's pods from the policy
  source's snapshot; the local pods from the attachment store (netns, interfaces, addresses per
  network, as network-status says them), with labels from `source.pod_labels` (the API's pod
  cache, or the CRI in local mode) and named ports from the API's pod when it has one; and the
  node's own addresses (kubelet's health checks to its pods always pass).
- `netpolicy.compile_world` says what each local pod's table must be; `netpolicy.nft.render`
  writes it as one nft transaction that replaces the table, applied in the pod's netns
  (`kernel.nftables.apply`). Only pods whose script changed are applied; the last applied text
  is remembered per netns.
- After a successful ADD (`pod_added`, called by the orchestrator before the ADD answers) the
  new pod's table is applied at once: a pod a policy selects never runs unprotected. A failure
  fails the ADD (its CNI error names the pod and nft's message) and the ADD rolls back like any
  other, so the runtime retries it. Everything else (policy, namespace, label changes, peers'
  addresses, DELs) is recomputed on one worker thread, debounced (`DEBOUNCE`), never on a CNI
  request; its failures are logged and retried on the next pass (`RETRY`).
- At start every local pod's table is applied once, whatever the last daemon left in it, once
  the source has synced (an unsynced source would open pods a policy not yet seen protects).

Drops: each isolated (interface, direction) ends in a named counter + drop. A drop is counted
against the kinds of the policies that select that direction ("NetworkPolicy",
"MultiNetworkPolicy", "Isolation", or several joined by "+" when several kinds select it): a
packet is dropped because no policy among them allowed it, so no single policy is to blame.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple, Protocol

import structlog

from cnispec.errors import PlexusError
from cnispec.identity import Holder
from kernel import nftables
from kernel.netlink import Netlink
from metaplugin.metrics import PolicyReadout
from metaplugin.status import entry
from metaplugin.store import Attachment, ContainerRecords
from netpolicy.compile import compile_world
from netpolicy.model import (
    APP_LABEL,
    ISOLATION_ANNOTATION,
    InterfaceRules,
    Namespace,
    Pod,
    PodInterface,
    PodRules,
    Policy,
    PolicyWorld,
)
from netpolicy.nft import TABLE, parse_drop_counters, render

log = structlog.get_logger(__name__)

DEBOUNCE: Final = 0.1  # seconds a change waits for the ones right behind it
APPLY_THREADS: Final = 16  # pods whose tables are applied at once in a pass
NODE_ADDRESS_TTL: Final = 1.0  # seconds the node's addresses are reused
RETRY: Final = 5.0  # seconds before a pass that failed for some pod runs again
Direction = Literal["ingress", "egress"]
DIRECTIONS: Final[tuple[Direction, Direction]] = ("ingress", "egress")


class Inputs(Protocol):
    """`metaplugin.policy_source.PolicyInputs`: what the policy source knows right now."""

    @property
    def policies(self) -> tuple[Policy, ...]: ...

    @property
    def namespaces(self) -> dict[str, Namespace]: ...

    @property
    def pods(self) -> tuple[Pod, ...]: ...


class Source(Protocol):
    """`metaplugin.policy_source.PolicySource`, as far as the engine uses it."""

    def snapshot(self) -> Inputs: ...

    def on_change(self, callback: Callable[[], None]) -> None: ...

    def pod_labels(self, namespace: str, name: str, container_id: str) -> dict[str, str] | None: ...

    def synced(self) -> bool: ...

    def close(self) -> None: ...


class _Nothing:
    """The source before `start` gives the real one: knows nothing, not synced."""

    policies: tuple[Policy, ...] = ()
    namespaces: dict[str, Namespace] = {}  # never written
    pods: tuple[Pod, ...] = ()

    def snapshot(self) -> _Nothing:
        return self

    def on_change(self, callback: Callable[[], None]) -> None:
        return None

    def pod_labels(self, namespace: str, name: str, container_id: str) -> dict[str, str] | None:
        return None

    def synced(self) -> bool:
        return False

    def close(self) -> None:
        return None


class Records(Protocol):
    """The attachment store (metaplugin.store.AttachmentStore), read only."""

    def all(self) -> Iterable[ContainerRecords]: ...


class Kernel(Protocol):
    """Where the tables go (kernel.nftables; a test may record instead)."""

    def apply(self, netns: str, script: str) -> None: ...

    def list_counters_json(self, netns: str, family: str, table: str) -> dict[str, Any] | None: ...


class _Nft:
    apply = staticmethod(nftables.apply)
    list_counters_json = staticmethod(nftables.list_counters_json)


class DropLabel(NamedTuple):
    namespace: str
    policy_kind: str
    direction: str


@dataclass
class PolicyStats:
    """What the metrics read (metaplugin.metrics)."""

    applies: int = 0
    apply_failures: int = 0
    enforced: int = 0


def node_addresses() -> tuple[str, ...]:
    """The node netns's own addresses that a health check can come from (not loopback, not
    link-local: a pod's peers on a segment share those)."""
    import ipaddress

    with Netlink.open() as nl:
        found = nl.all_addresses()
    keep = []
    for text in found:
        ip = ipaddress.ip_address(text)
        if not (ip.is_loopback or ip.is_link_local):
            keep.append(text)
    return tuple(sorted(set(keep)))


def _open_rules(netns: str, container_id: str, records: list[Attachment]) -> PodRules:
    """A local pod's rules when nothing can select it: every interface open (no table)."""
    holder = records[0].holder
    return PodRules(
        pod=f"{holder.pod_namespace}/{holder.pod_name}",
        netns=netns,
        container_id=container_id,
        interfaces=tuple(
            InterfaceRules(ifname=r.ifname, network=r.network, primary=r.is_default)
            for r in records
        ),
    )


def _kinds(selected_by: Iterable[str]) -> str:
    kinds = sorted({ref.split(":", 1)[0] for ref in selected_by})
    return "+".join(kinds) or "none"


class PolicyEngine:
    def __init__(
        self,
        *,
        source: Source | None = None,
        store: Records,
        kernel: Kernel | None = None,
        node_addresses: Callable[[], tuple[str, ...]] = node_addresses,
        debounce: float = DEBOUNCE,
        observe_apply: Callable[[float], None] | None = None,
    ) -> None:
        self._source: Source = source or _Nothing()
        self._store = store
        self._kernel: Kernel = kernel or _Nft()
        self._node_addresses = node_addresses
        self._node_cache: tuple[float, tuple[str, ...]] | None = None
        self._debounce = debounce
        self._observe_apply = observe_apply
        self.stats = PolicyStats()
        self._lock = threading.Lock()  # _applied, _rules, counters: the worker vs ADD hooks
        self._applied: dict[str, str] = {}  # netns -> the script last applied there
        # netns -> (container, records) of each local pod; None until read from the store
        self._local: dict[str, tuple[str, list[Attachment]]] | None = None
        self._rules: dict[str, PodRules] = {}  # netns -> what its table says now
        self._drop_last: dict[str, dict[tuple[str, str], int]] = {}  # netns -> last read
        self._drop_retired: Counter[DropLabel] = Counter()  # from tables replaced or gone
        self._netns_locks = [threading.Lock() for _ in range(64)]  # striped by netns
        self._pool = ThreadPoolExecutor(APPLY_THREADS, thread_name_prefix="policy-apply")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- life ---------------------------------------------------------------------------------

    def start(self, source: Source | None = None) -> None:
        """Run: the worker thread, and a first pass over every local pod. `source`: the policy
        source, when it was not given at construction (plexusd opens it only here, after the
        start-up steps that must not wait for its imports and watches)."""
        if source is not None:
            self._source = source
        self._source.on_change(self.changed)
        self._thread = threading.Thread(target=self._loop, name="policy-engine", daemon=True)
        self._thread.start()
        self.changed()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5.0)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._source.close()

    def changed(self) -> None:
        """Something the rules depend on changed: recompute soon (any thread, never blocks)."""
        self._wake.set()

    def _loop(self) -> None:
        failed = False
        while not self._stop.is_set():
            # A pass that failed for some pod runs again after RETRY, change or not.
            self._wake.wait(RETRY if failed else None)
            if self._stop.is_set():
                return
            self._stop.wait(self._debounce)  # let the changes right behind this one join it
            self._wake.clear()
            try:
                failed = self.recompute()
            except Exception:
                log.exception("policy_recompute_failed")
                failed = True

    # --- the world ------------------------------------------------------------------------------

    def world(self, inputs: Inputs | None = None) -> PolicyWorld:
        inputs = inputs if inputs is not None else self._source.snapshot()
        api_pods = {p.key: p for p in inputs.pods}
        local = self._local_pods(api_pods)
        peers = tuple(p for key, p in api_pods.items() if key not in local)
        return PolicyWorld(
            policies=inputs.policies,
            namespaces=inputs.namespaces,
            pods=(*local.values(), *peers),
            node_addresses=self._node_addresses_now(),
        )

    def _node_addresses_now(self) -> tuple[str, ...]:
        """The node's addresses, read at most once a NODE_ADDRESS_TTL (every ADD asks)."""
        now = time.monotonic()
        if self._node_cache is None or now - self._node_cache[0] > NODE_ADDRESS_TTL:
            self._node_cache = (now, self._node_addresses())
        return self._node_cache[1]

    def _local_pods(self, api_pods: Mapping[str, Pod]) -> dict[str, Pod]:
        """Each local pod from its newest sandbox's records (as network-status says it)."""
        newest: dict[str, tuple[float, str, list[Attachment]]] = {}
        for container_id, added in self._local_records():
            holder = added[0].holder
            key = f"{holder.pod_namespace}/{holder.pod_name}"
            if key not in newest or added[0].created_at >= newest[key][0]:
                newest[key] = (added[0].created_at, container_id, added)
        pods = {}
        for key, (_, container_id, records) in newest.items():
            pods[key] = self._local_pod(records, container_id, api_pods.get(key))
        return pods

    def _local_records(self) -> list[tuple[str, list[Attachment]]]:
        """The local pods' records: read from the store once, then kept by the orchestrator's
        hooks (NOTE: reading every record file on every ADD made a 110-pod burst quadratic)."""
        with self._lock:
            if self._local is None:
                self._local = {}
                for loaded in self._store.all():
                    self._remember_locked(loaded.netns, list(loaded.records))
            return list(self._local.values())

    def _remember_locked(self, netns: str, records: list[Attachment]) -> None:
        added = [r for r in records if r.state == "added"]
        if netns and added and added[0].holder.pod_name:  # a Kubernetes pod, ADD finished
            assert self._local is not None
            self._local[netns] = (added[0].container_id, added)

    def _local_pod(self, records: list[Attachment], container_id: str, api: Pod | None) -> Pod:
        holder = records[0].holder
        labels = api.labels if api is not None else self._labels(holder, container_id)
        interfaces = tuple(
            PodInterface(
                ifname=r.ifname,
                network=r.network,
                primary=r.is_default,
                addresses=tuple(entry(r).get("ips", ())),
            )
            for r in records
        )
        return Pod(
            namespace=holder.pod_namespace,
            name=holder.pod_name,
            uid=holder.pod_uid or (api.uid if api else ""),
            labels=labels or {},
            interfaces=interfaces,
            named_ports=api.named_ports if api is not None else (),
            netns=records[0].netns,
            container_id=container_id,
        )

    def _labels(self, holder: Holder, container_id: str) -> dict[str, str] | None:
        try:
            return self._source.pod_labels(holder.pod_namespace, holder.pod_name, container_id)
        except Exception as exc:  # noqa: BLE001 - a pod without labels, said in the log
            log.warning("pod_labels_failed", pod=holder.pod_name, error=str(exc))
            return None

    def compile(self, only: str | None = None) -> dict[str, PodRules]:
        """netns -> the rules its table must hold, for every local pod (or for the one in the
        netns `only`: the others are then peers only, which the compiler does not compile)."""
        inputs = self._source.snapshot()
        if self._quiet(inputs):
            return {
                netns: _open_rules(netns, cid, records)
                for netns, (cid, records) in self._local_items()
                if only is None or netns == only
            }
        world = self.world(inputs)
        if only is not None:
            pods = tuple(
                p if p.netns == only else p.model_copy(update={"netns": ""}) for p in world.pods
            )
            world = world.model_copy(update={"pods": pods})
        return {r.netns: r for r in compile_world(world).values() if r.netns}

    def _quiet(self, inputs: Inputs) -> bool:
        """Nothing anywhere can isolate a local pod: no policy, no isolated namespace, no local
        pod with the app-isolation label. Then no compile: a node without policies pays
        nothing per ADD (NOTE: compiling the world on every ADD doubled a 110-pod burst's CPU)."""
        if inputs.policies or any(
            ns.annotations.get(ISOLATION_ANNOTATION) == "namespace"
            for ns in inputs.namespaces.values()
        ):
            return False
        api_pods = {p.key: p for p in inputs.pods}
        for _, (cid, records) in self._local_items():
            holder = records[0].holder
            api = api_pods.get(f"{holder.pod_namespace}/{holder.pod_name}")
            labels = api.labels if api is not None else self._labels(holder, cid)
            if labels and APP_LABEL in labels:
                return False
        return True

    def _local_items(self) -> list[tuple[str, tuple[str, list[Attachment]]]]:
        self._local_records()
        with self._lock:
            assert self._local is not None
            return list(self._local.items())

    # --- applying -------------------------------------------------------------------------------

    def recompute(self) -> bool:
        """One full pass: apply every local pod whose script changed. True when some failed."""
        if not self._source.synced():
            log.info("policy_waiting_for_source")
            return True
        wanted = self.compile()
        # NOTE: in parallel: an nft commit mostly waits for the kernel (an RCU grace period,
        # ~12 ms), not the CPU; 8 pods at once applied ~7x faster than one after the other,
        # and 16 took a 110-pod start from ~310 to ~220 ms.
        ok = list(self._pool.map(self._apply_logged, wanted.values()))
        with self._lock:
            for gone in set(self._applied) - set(wanted):
                self._forget_locked(gone)  # a pod deleted: its netns, and table, go with it
            self.stats.enforced = sum(1 for r in self._rules.values() if r.enforcing)
        return not all(ok)

    def _apply_logged(self, rules: PodRules) -> bool:
        """`_apply` for the worker's pass: False (logged) when it failed."""
        if self._stop.is_set():
            return True
        try:
            self._apply(rules)
        except Exception as exc:  # noqa: BLE001 - one pod's failure never stops the rest
            log.warning(
                "policy_apply_failed",
                pod=rules.pod,
                netns=rules.netns,
                error=exc.msg if isinstance(exc, PlexusError) else repr(exc),
            )
            return False
        return True

    def _netns_lock(self, netns: str) -> threading.Lock:
        return self._netns_locks[hash(netns) % len(self._netns_locks)]

    def _apply(self, rules: PodRules) -> bool:
        """Apply one pod's table if its script changed; True when it was applied. One pod's
        applies never overlap (its netns lock); different pods' run in parallel."""
        script = render(rules)  # only the removal when nothing is isolated
        netns = rules.netns
        with self._netns_lock(netns):
            with self._lock:
                if self._applied.get(netns) == script:
                    self._rules[netns] = rules
                    return False
                old = self._rules.get(netns)
                known = netns in self._applied
            if not rules.enforcing and not known and self._no_table(netns):
                # NOTE: a pod no policy selects, seen for the first time (a daemon start): a
                # look (~0.4 ms) instead of a removal commit (~12 ms of kernel wait) each.
                with self._lock:
                    self._applied[netns] = script
                    self._rules[netns] = rules
                return False
            counts = self._counts_before_replacing(netns, old)
            started = time.monotonic()
            try:
                self._kernel.apply(netns, script)
            except Exception:
                with self._lock:
                    self.stats.apply_failures += 1
                    self._applied.pop(netns, None)  # unknown now: apply again next time
                raise
            elapsed = time.monotonic() - started
            with self._lock:
                self._retire_locked(old, counts)
                self.stats.applies += 1
                self._applied[netns] = script
                self._rules[netns] = rules
                self._drop_last.pop(netns, None)
        if self._observe_apply is not None:
            self._observe_apply(elapsed)
        log.info(
            "policy_applied",
            pod=rules.pod,
            netns=netns,
            enforcing=rules.enforcing,
            interfaces=[i.ifname for i in rules.interfaces],
            ms=round(elapsed * 1000, 2),
        )
        return True

    # --- hooks from the orchestrator ------------------------------------------------------------

    def pod_added(self, netns: str, added: list[Attachment]) -> None:
        """After a successful ADD, before it answers: this pod's table, now. Raises a
        PlexusError when it cannot be applied (the ADD then fails and rolls back)."""
        self._local_records()  # read from the store first, if it never was
        with self._lock:
            self._remember_locked(netns, added)
        try:
            quiet = self._quiet(self._source.snapshot())
            wanted = self.compile(only=netns)  # the ADD waits for one pod's rules, not all
        except Exception as exc:
            log.exception("policy_compile_failed", netns=netns)
            raise PlexusError(f"network policy: cannot compute the pod's rules: {exc!r}") from None
        rules = wanted.get(netns)
        if rules is not None:
            with self._lock:
                known = netns in self._applied
            if rules.enforcing or known:
                try:
                    self._apply(rules)
                except PlexusError as exc:
                    raise exc.with_msg(
                        f"network policy: cannot protect pod {rules.pod}: {exc.msg}"
                    ) from None
            else:
                with self._lock:  # a new netns holds no table: nothing to remove
                    self._applied[netns] = render(rules)
                    self._rules[netns] = rules
        if not quiet:
            self.changed()  # peers now see this pod's addresses

    def pod_removed(self, netns: str) -> None:
        """After DEL (or a rolled-back ADD): forget the pod; peers are recomputed."""
        if netns:
            with self._lock:
                self._forget_locked(netns)
                if self._local is not None:
                    self._local.pop(netns, None)
        self.changed()

    def _forget_locked(self, netns: str) -> None:
        self._retire_locked(self._rules.get(netns), self._drop_last.get(netns, {}))
        self._applied.pop(netns, None)
        self._rules.pop(netns, None)
        self._drop_last.pop(netns, None)

    # --- what is in force (plexusctl, metrics) --------------------------------------------------

    def _read_drops(self, netns: str) -> dict[tuple[str, str], int]:
        listed = self._kernel.list_counters_json(netns, "inet", TABLE)
        return parse_drop_counters(listed) if listed is not None else {}

    def _no_table(self, netns: str) -> bool:
        try:
            return self._kernel.list_counters_json(netns, "inet", TABLE) is None
        except Exception:  # noqa: BLE001 - cannot tell: the removal is applied, to be sure
            return False

    def _counts_before_replacing(
        self, netns: str, rules: PodRules | None
    ) -> dict[tuple[str, str], int]:
        """What a table about to be replaced counted: its counters start again at 0."""
        if rules is None or not rules.enforcing:
            return {}
        try:
            return self._read_drops(netns)
        except Exception as exc:  # noqa: BLE001 - the last read is then what is kept
            log.debug("policy_counters_unread", netns=netns, error=str(exc))
            with self._lock:
                return dict(self._drop_last.get(netns, {}))

    def _retire_locked(self, rules: PodRules | None, counts: dict[tuple[str, str], int]) -> None:
        """Keep what a replaced or vanished table counted, so the drop metric never goes back."""
        if rules is None:
            return
        for (ifname, direction), packets in counts.items():
            self._drop_retired[self._label(rules, ifname, direction)] += packets

    @staticmethod
    def _label(rules: PodRules, ifname: str, direction: str) -> DropLabel:
        namespace = rules.pod.split("/", 1)[0]
        for itf in rules.interfaces:
            if itf.ifname == ifname:
                side = itf.ingress if direction == "ingress" else itf.egress
                return DropLabel(namespace, _kinds(side.selected_by), direction)
        return DropLabel(namespace, "none", direction)

    def dropped(self) -> dict[DropLabel, int]:
        """Packets dropped so far, by (pod namespace, policy kinds, direction): the tables'
        counters read now, plus what replaced and deleted tables had counted."""
        with self._lock:
            enforced = [(n, r) for n, r in self._rules.items() if r.enforcing]
        totals: Counter[DropLabel] = Counter()
        for netns, rules in enforced:
            try:
                counts = self._read_drops(netns)
            except Exception as exc:  # noqa: BLE001 - a pod going away as we read
                log.debug("policy_counters_unread", netns=netns, error=str(exc))
                continue
            with self._lock:
                if self._rules.get(netns) is not rules:
                    continue  # replaced meanwhile: its counts were retired
                self._drop_last[netns] = counts
            for (ifname, direction), packets in counts.items():
                totals[self._label(rules, ifname, direction)] += packets
        with self._lock:
            totals.update(self._drop_retired)
        return dict(totals)

    def readout(self) -> PolicyReadout:
        """What a metrics scrape reads (the drop counters are read from the tables now)."""
        dropped = {(k.namespace, k.policy_kind, k.direction): v for k, v in self.dropped().items()}
        return PolicyReadout(
            enforced=self.stats.enforced,
            apply_failures=self.stats.apply_failures,
            dropped=dropped,
        )

    def pod_view(self, namespace: str, name: str) -> dict[str, Any] | None:
        """What `plexusctl policy POD` shows: per interface and direction, the policies that
        select it, the allows (peers, ports, by which policy) and the drop counter."""
        key = f"{namespace}/{name}"
        with self._lock:
            found = [(n, r) for n, r in self._rules.items() if r.pod == key]
        if not found:
            return None
        netns, rules = found[-1]
        try:
            drops = self._read_drops(netns) if rules.enforcing else {}
        except PlexusError as exc:
            drops = {}
            log.warning("policy_counters_unread", netns=netns, error=exc.msg)
        interfaces = []
        for itf in rules.interfaces:
            view: dict[str, Any] = {
                "ifname": itf.ifname,
                "network": itf.network,
                "primary": itf.primary,
                "trustedSources": list(itf.trusted_sources),
            }
            for direction in DIRECTIONS:
                side = itf.ingress if direction == "ingress" else itf.egress
                view[direction] = {
                    "isolated": side.isolated,
                    "selectedBy": list(side.selected_by),
                    "allows": [a.model_dump(mode="json") for a in side.allows],
                    "droppedPackets": drops.get((itf.ifname, direction), 0),
                }
            interfaces.append(view)
        return {
            "pod": rules.pod,
            "netns": netns,
            "enforcing": rules.enforcing,
            "table": f"inet {TABLE}",
            "interfaces": interfaces,
        }
