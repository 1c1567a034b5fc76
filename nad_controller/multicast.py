"""Multicast membership across nodes (issue 13, cluster mode): level-triggered, leader-only.

Each node's plexusd publishes, in the spec of its `MulticastNodeState`, the groups that have a
member pod on it, per replication domain (`cnispec.mcast_api`). This reconciler sums them into
domain -> group -> nodes and writes into each node's status (`replicateTo`) the OTHER nodes
with members of each group: where that node sends the group's traffic. A status is written
only when it changes for that node, so one node's join costs one write per other node at most
(each of them must learn it) and none for a node whose list stays the same.

Only objects of Nodes that exist count: a node that is gone (its Node deleted; the object goes
with it through its ownerReference and the garbage collector) is no member, even in the moment
before the collector deletes its object, and its object is not written. A node whose plexusd
stopped keeps its last groups until it comes back or its Node goes: the others replicate to it
meanwhile (too much traffic, never too little).

Like the VFPool reconciler: every replica's informers keep the cache warm; only the leader's
worker writes; a burst of changes is gathered for `debounce` seconds (bounded from the first
change, so a steady stream cannot postpone a write); nothing lives only in memory, so a new
leader converges to the same statuses from a list.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

import structlog

from cnispec.mcast_api import aggregate, clean_groups, replicate_to
from nad_controller.api import JSON, ApiFailure, NotFound

log = structlog.get_logger(__name__)


class MembershipCache(Protocol):
    def nodes(self) -> list[JSON]: ...

    def multicast_states(self) -> list[JSON]: ...


class MembershipWriter(Protocol):
    def patch_multicast_status(self, name: str, replicate_to: JSON) -> JSON: ...


def _meta(obj: JSON) -> JSON:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


class MembershipReconciler:
    def __init__(
        self,
        cache: MembershipCache,
        writer: MembershipWriter,
        *,
        debounce: float = 0.05,
        resync: float = 30.0,
    ) -> None:
        self.cache, self.writer = cache, writer
        self.debounce, self.resync = debounce, resync
        self._dirty = threading.Event()
        self._leading = threading.Event()
        self._stop = threading.Event()
        # node -> (replicateTo we wrote, the object's resourceVersion before the write): until
        # the cache moves past it, our write is the truth (no second write of the same list).
        self._written: dict[str, tuple[JSON, str]] = {}
        # name -> (resourceVersion, groups): each spec is read (and validated) once per version
        self._parsed: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {}
        self._backoff = 0.0
        self._thread = threading.Thread(target=self._run, name="mcast-reconciler", daemon=True)
        self.writes = 0  # status writes made (tests, the benchmark, /metrics)
        self.groups = 0  # (domain, group) pairs with a member somewhere, as of the last pass
        self.members = 0  # nodes counted, as of the last pass
        self.observe_pass: Callable[[float], None] | None = None

    # wiring (as `nad_controller.reconciler.Reconciler`)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        self._thread.join(timeout=10)

    def notify(self, kind: str, obj: JSON | None) -> None:
        """A MulticastNodeState or a Node changed (None: an informer listed again)."""
        self._dirty.set()

    def started_leading(self) -> None:
        self._written.clear()
        self._leading.set()
        self._dirty.set()

    def stopped_leading(self) -> None:
        self._leading.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._dirty.wait(self.resync):
                self._dirty.set()  # resync: converge even if an event was lost
                continue
            if self._stop.is_set():
                return
            if not self._leading.is_set():
                self._leading.wait(self.resync)
                continue
            self._stop.wait(max(self.debounce, self._backoff))
            self._dirty.clear()
            started = time.monotonic()
            try:
                self.reconcile_all()
                if self.observe_pass is not None:
                    self.observe_pass(time.monotonic() - started)
            except Exception:  # the loop must survive a bad object or a bug
                log.exception("multicast_reconcile_failed")
                self._dirty.set()
                self._stop.wait(1.0)

    # one pass

    def reconcile_all(self) -> None:
        live = {str(_meta(n).get("name")) for n in self.cache.nodes()}
        states = [s for s in self.cache.multicast_states() if self._counts(s, live)]
        per_node = {str(_meta(s)["name"]): self._groups(s) for s in states}
        membership = aggregate(per_node)
        self.groups = sum(len(g) for g in membership.values())
        self.members = len(per_node)
        for name in set(self._written) - per_node.keys():
            del self._written[name]
        names = {str(_meta(s).get("name")) for s in self.cache.multicast_states()}
        self._parsed = {k: v for k, v in self._parsed.items() if k in names}
        for state in states:
            if not self._leading.is_set():
                return
            self._write(state, replicate_to(membership, str(_meta(state)["name"])))

    @staticmethod
    def _counts(state: JSON, live: set[str]) -> bool:
        """A node's object counts while its Node exists and it names its node as it must."""
        name = _meta(state).get("name")
        spec = state.get("spec")
        if not isinstance(spec, dict) or spec.get("nodeName") != name:
            log.warning("multicast_state_unreadable", state=name, error="spec.nodeName != name")
            return False
        return name in live

    def _groups(self, state: JSON) -> dict[str, tuple[str, ...]]:
        meta = _meta(state)
        name, rv = str(meta.get("name")), str(meta.get("resourceVersion"))
        known = self._parsed.get(name)
        if known is not None and known[0] == rv:
            return known[1]
        groups, problems = clean_groups((state.get("spec") or {}).get("groups") or {})
        if problems:
            log.warning("multicast_state_entries_skipped", state=name, problems=problems[:10])
        self._parsed[name] = (rv, groups)
        return groups

    def _write(self, state: JSON, want: JSON) -> None:
        meta = _meta(state)
        name, rv = str(meta.get("name")), str(meta.get("resourceVersion"))
        written = self._written.get(name)
        if written is not None and written[1] == rv:
            current = written[0]
        else:
            status = state.get("status")
            current = (status.get("replicateTo") if isinstance(status, dict) else None) or {}
        if current == want:
            return
        try:
            self.writer.patch_multicast_status(name, want)
        except NotFound:
            return  # deleted meanwhile (its Node went)
        except ApiFailure as exc:
            self._backoff = min(self._backoff * 2 or 0.5, 30.0)
            log.warning("multicast_status_write_failed", state=name, error=str(exc)[:200],
                        retry_in=self._backoff)  # fmt: skip
            self._dirty.set()
            return
        self._backoff = 0.0
        self.writes += 1
        self._written[name] = (want, rv)
        log.info("multicast_status_written", node=name,
                 groups=sum(len(g) for g in want.values()))  # fmt: skip
