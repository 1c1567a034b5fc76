"""The VFPool reconciler: level-triggered, leader-only.

Informers (every replica runs them, so a new leader starts with a warm cache) call `notify` on
each change; the worker, while this replica leads, waits for the first dirty mark, lets a burst
of node-state writes gather for `debounce` seconds (bounded from the *first* mark, so a steady
stream of updates cannot postpone a health change), then recomputes every dirty pool from the
cache and writes its status only when it differs. A resync every `resync` seconds re-evaluates
staleness (time passes without any event). Nothing lives only in memory: a new leader lists
everything and converges to the same status.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from pydantic import ValidationError

from cnispec.annotations import RESOURCE_NAME_ANNOTATION
from cnispec.nad import GROUP as NAD_GROUP
from cnispec.nad import VERSION as NAD_VERSION
from cnispec.vfpool_api import API_VERSION, POOL_KIND, VFPoolSpec, VFPoolStatus
from nad_controller.api import JSON, ApiFailure, Cache, NotFound, StatusWriter
from nad_controller.events import EventRecorder
from nad_controller.loop import LeaderLoop
from nad_controller.status import NodeState, invalid_status, pool_status, status_json

log = structlog.get_logger(__name__)


class Reconciler(LeaderLoop):
    def __init__(
        self,
        cache: Cache,
        writer: StatusWriter,
        events: EventRecorder,
        *,
        stale_after: float = 120.0,
        debounce: float = 0.1,
        resync: float = 30.0,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        super().__init__(
            name="reconciler", debounce=debounce, resync=resync, failure_event="reconcile_failed"
        )
        self.cache, self.writer, self.events = cache, writer, events
        self.stale_after = stale_after
        self._now = now
        # pool uid -> (status we wrote, the resourceVersion the cache had before): until the
        # cache moves past that version, our own write is the truth (no rewrite loop).
        self._written: dict[str, tuple[JSON, str]] = {}
        self._states: dict[str, tuple[str, NodeState]] = {}  # name -> (rv, parsed)
        self.writes = 0  # status writes made (tests, the benchmark and /metrics read it)
        # resourceNames some VFPool provided while this replica watched, and the NADs (uid)
        # already told that theirs is not provided any more.
        self._provided: set[str] = set()
        self._orphaned: set[str] = set()
        self._nad_lock = threading.Lock()  # a resync may run beside the loop (tests, CLI)

    def reconcile_all(self) -> None:
        states = self._parsed_states()
        nodes = self.cache.nodes()
        pools = self.cache.pools()
        live = {str((p.get("metadata") or {}).get("uid")) for p in pools}
        for uid in set(self._written) - live:  # deleted pools
            del self._written[uid]
        for pool in pools:
            if not self._leading.is_set():
                return
            self.reconcile(pool, states, nodes)
        self.check_nads(pools)

    def check_nads(self, pools: list[JSON]) -> None:
        """A Warning `ResourceNotProvided` on each NAD whose resourceName a VFPool provided and
        none provides any more (its pool was deleted or renamed its resource): the next pod
        asking for that network waits for a device no node will offer. Only resources seen
        provided are judged: others (the SR-IOV device plugin's) are not ours to know. Once per
        NAD until its resource is provided again."""
        with self._nad_lock:
            self._check_nads(pools)

    def _check_nads(self, pools: list[JSON]) -> None:
        now = {str((p.get("spec") or {}).get("resourceName") or "") for p in pools} - {""}
        self._provided |= now
        orphaned = set()
        for obj in self.cache.nads():
            meta = obj.get("metadata") or {}
            resource = (meta.get("annotations") or {}).get(RESOURCE_NAME_ANNOTATION)
            if not resource or resource in now or resource not in self._provided:
                continue
            uid = str(meta.get("uid"))
            orphaned.add(uid)
            if uid in self._orphaned:
                continue
            involved: dict[str, Any] = {
                "apiVersion": f"{NAD_GROUP}/{NAD_VERSION}",
                "kind": "NetworkAttachmentDefinition",
                "namespace": meta.get("namespace"),
                "name": meta.get("name"),
                "uid": meta.get("uid"),
            }
            message = (
                f"resourceName {resource} is provided by no VFPool any more: pods attaching "
                "this network get no VF until a VFPool with that resourceName exists"
            )
            log.warning("nad_resource_not_provided", nad=f"{meta.get('namespace')}/"
                        f"{meta.get('name')}", resource=resource)  # fmt: skip
            self.events.record(involved, "Warning", "ResourceNotProvided", message)
        self._orphaned = orphaned

    def _parsed_states(self) -> list[NodeState]:
        """Every node state, parsed once per resourceVersion (a big cluster's states are most
        of a recompute's work, and only the changed one needs parsing again)."""
        parsed: dict[str, tuple[str, NodeState]] = {}
        for obj in self.cache.states():
            meta = obj.get("metadata") or {}
            name, rv = str(meta.get("name")), str(meta.get("resourceVersion"))
            known = self._states.get(name)
            if known is not None and known[0] == rv:
                parsed[name] = known
                continue
            state = NodeState.from_object(obj)
            if state.error:
                log.warning("node_state_unreadable", state=name, error=state.error)
            parsed[name] = (rv, state)
        self._states = parsed
        return [state for _, state in parsed.values()]

    def reconcile(self, pool: JSON, states: list[NodeState], nodes: list[JSON]) -> None:
        meta = pool.get("metadata") or {}
        name, uid = str(meta.get("name")), str(meta.get("uid"))
        rv = str(meta.get("resourceVersion"))
        current = pool.get("status") or {}
        written = self._written.get(uid)
        before = written[0] if written and written[1] == rv else current
        generation = int(meta.get("generation") or 0)
        try:
            previous = VFPoolStatus.model_validate(before) if before else None
        except ValidationError:
            previous = None  # not ours to keep: recompute from scratch
        try:
            spec = VFPoolSpec.model_validate(pool.get("spec") or {})
        except ValidationError as exc:
            log.warning("vfpool_invalid", pool=name, error=str(exc)[:300])
            status = invalid_status(generation, exc, previous, self._now())
            self._write(pool, status, before=before, previous=previous)
            return
        status = pool_status(
            name=name,
            generation=generation,
            spec=spec,
            states=states,
            nodes=nodes,
            previous=previous,
            now=self._now(),
            stale_after=self.stale_after,
        )
        self._write(pool, status, before=before, previous=previous)

    def _write(
        self, pool: JSON, status: VFPoolStatus, *, before: JSON, previous: VFPoolStatus | None
    ) -> None:
        meta = pool.get("metadata") or {}
        name, uid = str(meta.get("name")), str(meta.get("uid"))
        rv = str(meta.get("resourceVersion"))
        new = status_json(status)
        if new == before:
            return
        try:
            self.writer.patch_pool_status(name, new)
        except NotFound:
            return  # deleted meanwhile
        except ApiFailure as exc:
            self._failed_write()
            log.warning("status_write_failed", pool=name, error=str(exc)[:200],
                        retry_in=self._backoff)  # fmt: skip
            self._dirty.set()
            return
        self._backoff = 0.0
        self.writes += 1
        self._written[uid] = (new, rv)
        conditions = {c.type: c.status for c in status.conditions}
        log.info(
            "vfpool_status_written",
            pool=name,
            generation=status.observed_generation,
            **conditions,
        )
        self._announce(pool, previous, status)

    def _announce(self, pool: JSON, previous: VFPoolStatus | None, status: VFPoolStatus) -> None:
        """An Event for each condition whose status or reason changed."""
        before = {c.type: c for c in previous.conditions} if previous else {}
        meta = pool.get("metadata") or {}
        involved: dict[str, Any] = {
            "apiVersion": API_VERSION,
            "kind": POOL_KIND,
            "name": meta.get("name"),
            "uid": meta.get("uid"),
        }
        for c in status.conditions:
            old = before.get(c.type)
            bad = (c.type == "Degraded") == (c.status == "True")
            # A new finding while degraded is news; Ready's counts changing with every attach
            # are not (they are in the status rows).
            same = old is not None and (old.status, old.reason) == (c.status, c.reason)
            if same and not (bad and c.type == "Degraded" and old and old.message != c.message):
                continue
            self.events.record(involved, "Warning" if bad else "Normal", c.reason, c.message)
