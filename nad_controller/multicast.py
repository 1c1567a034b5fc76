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
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import structlog

from cnispec.mcast_api import aggregate, clean_groups, replicate_to
from nad_controller.api import JSON, ApiFailure, NotFound
from nad_controller.loop import LeaderLoop

log = structlog.get_logger(__name__)

# Status writes in flight at once: one join changes the list of every other node, and on a big
# cluster those writes one after the other would add up past the 2 s budget.
WRITERS = 8


def status_patch(current: JSON, want: JSON) -> JSON:
    """The JSON merge patch (RFC 7386) that turns `replicateTo` from `current` into `want`:
    per domain the groups whose list changed (lists are replaced whole), null for a group or a
    domain that is gone."""
    patch: JSON = {}
    for domain in sorted(current.keys() | want.keys()):
        have, new = current.get(domain), want.get(domain)
        if new is None:
            patch[domain] = None
        elif not isinstance(have, dict):
            patch[domain] = new
        else:
            groups = {g: nodes for g, nodes in new.items() if have.get(g) != nodes}
            groups |= {g: None for g in have if g not in new}
            if groups:
                patch[domain] = groups
    return patch


class MembershipCache(Protocol):
    def nodes(self) -> list[JSON]: ...

    def multicast_states(self) -> list[JSON]: ...


class MembershipWriter(Protocol):
    def patch_multicast_status(self, name: str, changes: JSON) -> JSON: ...


def _meta(obj: JSON) -> JSON:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


class MembershipReconciler(LeaderLoop):
    def __init__(
        self,
        cache: MembershipCache,
        writer: MembershipWriter,
        *,
        debounce: float = 0.05,
        resync: float = 30.0,
    ) -> None:
        super().__init__(
            name="mcast-reconciler",
            debounce=debounce,
            resync=resync,
            failure_event="multicast_reconcile_failed",
        )
        self.cache, self.writer = cache, writer
        # node -> (replicateTo we wrote, the object's resourceVersion before the write): until
        # the cache moves past it, our write is the truth (no second write of the same list).
        self._written: dict[str, tuple[JSON, str]] = {}
        # name -> (resourceVersion, groups): each spec is read (and validated) once per version
        self._parsed: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {}
        self._lock = threading.Lock()  # the writers' shared bookkeeping
        self._pool = ThreadPoolExecutor(WRITERS, thread_name_prefix="mcast-status")
        self.writes = 0  # status writes made (tests, the benchmark, /metrics)
        self.groups = 0  # (domain, group) pairs with a member somewhere, as of the last pass
        self.members = 0  # nodes counted, as of the last pass

    def stop(self) -> None:
        super().stop()
        self._pool.shutdown(wait=True, cancel_futures=True)

    # one pass

    def reconcile_all(self) -> None:
        live = {str(_meta(n).get("name")) for n in self.cache.nodes()}
        states = [s for s in self.cache.multicast_states() if self._counts(s, live)]
        per_node = {str(_meta(s)["name"]): self._groups(s) for s in states}
        membership = aggregate(per_node)
        self.groups = sum(len(g) for g in membership.values())
        self.members = len(per_node)
        with self._lock:
            for name in set(self._written) - per_node.keys():
                del self._written[name]
        names = {str(_meta(s).get("name")) for s in self.cache.multicast_states()}
        self._parsed = {k: v for k, v in self._parsed.items() if k in names}
        writes = [
            (state, want, current)
            for state in states
            if (want := replicate_to(membership, str(_meta(state)["name"])))
            != (current := self._current(state))
        ]
        if len(writes) == 1:
            self._write(*writes[0])
        else:  # concurrently, and the pass ends when all are done
            list(self._pool.map(lambda w: self._write(*w), writes))

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

    def _current(self, state: JSON) -> JSON:
        """The node's list as the API has it: our last write until the cache has caught up."""
        meta = _meta(state)
        name, rv = str(meta.get("name")), str(meta.get("resourceVersion"))
        with self._lock:
            written = self._written.get(name)
        if written is not None and written[1] == rv:
            return written[0]
        status = state.get("status")
        current = status.get("replicateTo") if isinstance(status, dict) else None
        return current if isinstance(current, dict) else {}

    def _write(self, state: JSON, want: JSON, current: JSON) -> None:
        meta = _meta(state)
        name, rv = str(meta.get("name")), str(meta.get("resourceVersion"))
        if not self._leading.is_set():
            return
        try:
            self.writer.patch_multicast_status(name, status_patch(current, want))
        except NotFound:
            return  # deleted meanwhile (its Node went)
        except ApiFailure as exc:
            with self._lock:
                self._failed_write()
            log.warning("multicast_status_write_failed", state=name, error=str(exc)[:200],
                        retry_in=self._backoff)  # fmt: skip
            self._dirty.set()
            return
        with self._lock:
            self._backoff = 0.0
            self.writes += 1
            self._written[name] = (want, rv)
        log.info("multicast_status_written", node=name,
                 groups=sum(len(g) for g in want.values()))  # fmt: skip
