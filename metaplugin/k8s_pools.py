"""The node's half of the VF pool objects (`plexus.dev/v1alpha1`, shapes in
`cnispec.vfpool_api`), in cluster mode:

- `VFPoolSource` reads the VFPools and this node's Node (two watches) and gives the node agent
  the pools whose `spec.nodeSelector` matches the Node's labels (a `sriov.pools_source`
  `PoolsSource`): a VFPool created, edited or deleted, or a label put on the Node, is in force
  within moments, applied like an edited pools file (no drain; a numVfs change waits until no
  pod holds a VF of that PF). A VFPool this node cannot serve (its spec does not parse, or its
  resourceName is another selected pool's) is skipped and named in `problems`; the rest work.
- `NodeStateWriter` keeps this node's `VFPoolNodeState` (named after the Node, owner-referenced
  to it) up to date: its `status` is rebuilt (`sriov.nodestate`) after every change the agent
  reports (uevent, health, reserve/attach/release), a burst coalesced into one write, and at
  least every HEARTBEAT seconds so the controller can tell a dead node. Writes happen on their
  own thread: a CNI request never waits for the API, and an API that is down is retried with
  backoff while the daemon keeps serving.

`NodePools` wires both for the daemon. With `vfPoolSource: file` (or a `vfPools` file and
`auto`) the pools come from the file and only the writer runs.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog
from kubernetes import client as kclient
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError
from urllib3.exceptions import HTTPError

from cnispec.durable import atomic_write
from cnispec.vfpool_api import (
    API_VERSION,
    GROUP,
    POOL_PLURAL,
    STATE_KIND,
    STATE_PLURAL,
    VERSION,
    LabelSelector,
    NodeStateStatus,
    PoolRef,
    VFPool,
)
from cnispec.vfpools import PoolsFile, PoolSpec, env_name
from kubeapi.informer import REQUEST_TIMEOUT, Informer
from sriov.agent import NodeAgent
from sriov.nodestate import node_status
from sriov.pools_source import PoolsSource

log = structlog.get_logger(__name__)

FIRST_SYNC_WAIT: Final = 10.0  # how long start-up waits for the first list of VFPools
DEBOUNCE: Final = 0.15  # a burst of changes (64 VFs appearing) becomes one write
HEARTBEAT: Final = 30.0  # the longest the state goes unwritten: the controller's liveness
BACKOFF: Final = (0.5, 30.0)  # retry delays while the API fails: first, most
_MERGE: Final = "application/merge-patch+json"


# --- what the watches keep ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PoolObject:
    """One VFPool as read: the parsed pool, or why it does not parse."""

    name: str
    generation: int
    pool: VFPool | None
    selector: LabelSelector | None  # None: the nodeSelector itself does not parse
    error: str = ""

    def selects(self, labels: Mapping[str, str]) -> bool:
        # A pool whose nodeSelector cannot be read may be meant for this node: report it.
        return self.selector is None or self.selector.matches(labels)


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    uid: str
    labels: Mapping[str, str] = field(default_factory=dict)


def pool_object(obj: Mapping[str, Any]) -> PoolObject:
    meta = obj.get("metadata") or {}
    name, generation = str(meta.get("name", "")), int(meta.get("generation") or 0)
    spec = obj.get("spec") or {}
    try:
        selector = LabelSelector.model_validate(spec.get("nodeSelector") or {})
    except ValidationError:
        selector = None
    try:
        pool = VFPool.model_validate({"name": name, "generation": generation, "spec": spec})
        pool.spec.pool_spec()  # the node-side validators too (e.g. numVfs needs named PFs)
    except ValidationError as exc:
        return PoolObject(name, generation, None, selector, _errors(exc))
    return PoolObject(name, generation, pool, pool.spec.node_selector)


def node_info(obj: Mapping[str, Any]) -> NodeInfo:
    meta = obj.get("metadata") or {}
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    return NodeInfo(str(meta.get("name", "")), str(meta.get("uid", "")), labels)


def _errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in exc.errors()
    )


# --- which pools this node serves (pure) ------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    pools: PoolsFile
    refs: tuple[PoolRef, ...] = ()
    problems: tuple[str, ...] = ()


def select_pools(
    objects: Iterable[PoolObject], labels: Mapping[str, str], *, in_force: Iterable[str] = ()
) -> Selection:
    """The VFPools a node with `labels` serves, in `pools_for_node`'s order (priority, then
    name: the first that matches a VF gets it). A VFPool that does not parse, or whose
    resourceName (or the environment variable it gives pods) is another selected pool's, is
    skipped with a problem naming it; of two that clash, the one `in_force` (served already)
    keeps serving, so a newcomer never takes a pool away from running pods, else the first in
    that order wins."""
    problems: list[str] = []
    valid: list[tuple[PoolObject, VFPool, PoolSpec]] = []
    for obj in sorted(objects, key=lambda o: o.name):
        if not obj.selects(labels):
            continue
        if obj.pool is None:
            problems.append(f"VFPool {obj.name}: skipped, its spec is invalid: {obj.error}")
            continue
        valid.append((obj, obj.pool, obj.pool.spec.pool_spec()))
    served = set(in_force)
    valid.sort(key=lambda v: (v[0].name not in served, -v[1].spec.priority, v[0].name))
    taken: dict[str, str] = {}  # resourceName and env name -> the VFPool that has it
    kept: list[tuple[PoolObject, VFPool, PoolSpec]] = []
    for obj, pool, spec in valid:
        clash = taken.get(spec.resource_name) or taken.get(env_name(spec.resource_name))
        if clash is not None:
            problems.append(
                f"VFPool {obj.name}: skipped, resourceName {spec.resource_name} clashes with "
                f"VFPool {clash} on this node (same resourceName or environment variable "
                f"{env_name(spec.resource_name)}); give one of them another resourceName"
            )
            continue
        taken[spec.resource_name] = taken[env_name(spec.resource_name)] = obj.name
        kept.append((obj, pool, spec))
    kept.sort(key=lambda v: (-v[1].spec.priority, v[0].name))
    return Selection(
        pools=PoolsFile(pools=tuple(spec for _, _, spec in kept)),
        refs=tuple(
            PoolRef(name=o.name, resource_name=s.resource_name, generation=o.generation)
            for o, _, s in kept
        ),
        problems=tuple(problems),
    )


# --- the watches ------------------------------------------------------------------------------


_Inputs = tuple[Mapping[str, str] | None, tuple[PoolObject, ...]]  # the Node's labels, VFPools


class VFPoolSource:
    """The VFPools selecting this node, as the agent's `PoolsSource`."""

    def __init__(
        self,
        custom: kclient.CustomObjectsApi,
        node: str,
        nodes: NodeWatch,
        *,
        cache: Path | None = None,
    ) -> None:
        self._node = node
        self._nodes = nodes
        self._cache = cache
        self._listeners: list[Callable[[], None]] = []
        self._status_listeners: list[Callable[[], None]] = []
        self._informer: Informer[PoolObject] = Informer(
            "vfpools",
            lambda **kw: custom.list_cluster_custom_object(GROUP, VERSION, POOL_PLURAL, **kw),
            pool_object,
            on_change=lambda _: self._notify(),
        )
        nodes.subscribe(self._notify)
        self._lock = threading.Lock()
        self._seen: _Inputs | None = None
        self._selection = Selection(PoolsFile(pools=()))
        self._waited = False

    def start(self) -> None:
        self._informer.start()

    def stop(self) -> None:
        self._informer.stop()

    def subscribe(self, fn: Callable[[], None]) -> None:
        """`fn()` when the VFPools or the Node changed (the agent's `wake`)."""
        self._listeners.append(fn)

    def on_status(self, fn: Callable[[], None]) -> None:
        """`fn()` when `refs` or `problems` changed without the pools changing (a change of
        the pools reaches the state writer through the agent)."""
        self._status_listeners.append(fn)

    def _notify(self) -> None:
        for fn in self._listeners:
            fn()

    # PoolsSource

    def load(self) -> PoolsFile:
        if not self._waited:  # start-up: give the API a moment, not forever
            self._waited = True
            deadline = time.monotonic() + FIRST_SYNC_WAIT
            self._informer.synced.wait(FIRST_SYNC_WAIT)
            self._nodes.synced.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            inputs = self._inputs()
            selection = self._select(inputs)
            if inputs is None and not self._selection.refs:
                selection = self._cached() or selection
            self._seen, self._selection = inputs, selection
        if inputs is not None:
            self._remember(selection)
        for problem in selection.problems:
            log.warning("vfpool_problem", problem=problem)
        log.info("vfpools_selected", node=self._node, pools=[r.name for r in selection.refs])
        return selection.pools

    def changed(self) -> bool:
        """True when the pools to serve changed. A change that leaves them as they are (a
        VFPool for other nodes edited, a generation bumped, a problem solved) is taken in
        here without a reload: a reload would also forget the VFs that vanished, which stay
        listed as unhealthy until the admin changes this node's pools."""
        with self._lock:
            inputs = self._inputs()
            if inputs == self._seen:
                return False
            selection = self._select(inputs)
            if selection.pools != self._selection.pools:
                return True
            self._seen, self._selection = inputs, selection
        self._remember(selection)
        for fn in self._status_listeners:
            fn()
        return False

    # the last pools read, for a start while the API is down

    def _remember(self, selection: Selection) -> None:
        """Keep the pools served on disk: a daemon restarted while the API is unreachable
        serves them (and keeps its device plugins registered) until the API answers."""
        if self._cache is None:
            return
        data = {
            "pools": selection.pools.model_dump(mode="json", by_alias=True, exclude_none=True),
            "refs": [r.model_dump(mode="json", by_alias=True) for r in selection.refs],
        }
        text = json.dumps(data, sort_keys=True).encode()
        try:
            if self._cache.exists() and self._cache.read_bytes() == text:
                return
            self._cache.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(self._cache, text)
        except OSError as exc:
            log.warning("vfpools_cache_not_written", path=str(self._cache), error=exc.strerror)

    def _cached(self) -> Selection | None:
        if self._cache is None:
            return None
        try:
            data = json.loads(self._cache.read_text(encoding="utf-8"))
            pools = PoolsFile.model_validate(data["pools"])
            refs = tuple(PoolRef.model_validate(r) for r in data["refs"])
        except (OSError, ValueError, KeyError, TypeError):  # ValidationError is a ValueError
            return None
        if not refs:
            return None
        log.warning("vfpools_from_cache", path=str(self._cache), pools=[r.name for r in refs])
        problem = (
            "VFPools not read yet: the Kubernetes API has not answered; serving the pools last "
            f"read ({', '.join(r.name for r in refs)}) until it does"
        )
        return Selection(pools, refs, (problem,))

    def describe(self) -> str:
        return f"VFPools selecting node {self._node}"

    # for the state writer

    @property
    def refs(self) -> tuple[PoolRef, ...]:
        return self._selection.refs

    @property
    def problems(self) -> tuple[str, ...]:
        return self._selection.problems

    def _inputs(self) -> _Inputs | None:
        if not self._informer.synced.is_set() or not self._nodes.synced.is_set():
            return None
        me = self._nodes.get()
        pools = tuple(sorted(self._informer.values(), key=lambda p: p.name))
        return (me.labels if me else None, pools)

    def _select(self, inputs: _Inputs | None) -> Selection:
        if inputs is None:
            return Selection(
                PoolsFile(pools=()),
                problems=(
                    "VFPools not read yet: the Kubernetes API has not answered; no pool "
                    "is served until it does",
                ),
            )
        labels, pools = inputs
        if labels is None:
            return Selection(
                PoolsFile(pools=()),
                problems=(f"Node {self._node} is not in the API: no VFPool can select it",),
            )
        in_force = [r.name for r in self._selection.refs]
        return select_pools(pools, labels, in_force=in_force)


class NodeWatch:
    """This node's Node object (labels, uid), watched by name."""

    def __init__(self, core: kclient.CoreV1Api, node: str) -> None:
        self._node = node
        self._listeners: list[Callable[[], None]] = []
        self._informer: Informer[NodeInfo] = Informer(
            "node",
            lambda **kw: core.list_node(field_selector=f"metadata.name={node}", **kw),
            node_info,
            on_change=lambda _: self._notify(),
        )
        self.synced = self._informer.synced

    def subscribe(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    def _notify(self) -> None:
        for fn in self._listeners:
            fn()

    def get(self) -> NodeInfo | None:
        return self._informer.get(f"/{self._node}")

    def start(self) -> None:
        self._informer.start()

    def stop(self) -> None:
        self._informer.stop()


# --- the node state writer --------------------------------------------------------------------


class _NotYet(Exception):
    """The state cannot be written yet (e.g. the Node is not in the API): retried."""


class NodeStateWriter:
    def __init__(
        self,
        custom: kclient.CustomObjectsApi,
        node: str,
        *,
        agent: NodeAgent,
        nodes: NodeWatch,
        source: VFPoolSource | None,
        debounce: float = DEBOUNCE,
        heartbeat: float = HEARTBEAT,
    ) -> None:
        self._custom = custom
        self._node = node
        self._agent = agent
        self._nodes = nodes
        self._source = source
        self._debounce = debounce
        self._heartbeat = heartbeat
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._retry = threading.Event()  # cuts a backoff short (the Node has arrived)
        self._written: NodeStateStatus | None = None  # what the API has, `updated` aside
        self._exists = False
        self.writes = 0  # successful writes (tests, logs)
        self._thread = threading.Thread(target=self._run, name="vfpool-node-state", daemon=True)

    def start(self) -> None:
        self._agent.on_change(self.poke)
        self._nodes.subscribe(self._retry.set)
        self._dirty.set()  # the first write: at once
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        self._retry.set()
        self._thread.join(timeout=5)

    def poke(self) -> None:
        """Something the state shows may have changed. Never blocks (called under locks)."""
        self._dirty.set()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            if failures:
                self._retry.wait(min(BACKOFF[0] * 2 ** (failures - 1), BACKOFF[1]))
                self._retry.clear()
                force = True
            else:
                woke = self._dirty.wait(self._heartbeat)
                if woke and not self._stop.is_set():
                    self._stop.wait(self._debounce)  # let the burst finish: one write for all
                force = not woke  # the heartbeat: written even when nothing changed
            if self._stop.is_set():
                return
            self._dirty.clear()
            try:
                self._write(force=force)
            except Exception as exc:  # noqa: BLE001 - the writer must outlive any failure
                failures += 1
                self._exists = False  # maybe deleted meanwhile: look again
                level = log.warning if failures in (1, 10) or failures % 100 == 0 else log.debug
                level(
                    "vfpool_node_state_not_written",
                    node=self._node,
                    error=_short(exc),
                    failures=failures,
                )
                continue
            if failures:
                log.info("vfpool_node_state_written_again", node=self._node, after=failures)
            failures = 0

    def _status(self) -> NodeStateStatus:
        source = self._source
        return node_status(
            self._agent,
            pools=source.refs if source else (),
            problems=source.problems if source else (),
        )

    def _write(self, *, force: bool) -> None:
        status = self._status()
        last = self._written
        if not force and self._exists and last == status.model_copy(update={"updated": ""}):
            return  # e.g. a reconcile that changed nothing shown: no API write
        if not self._exists:
            self._ensure_object()
        # Unset fields are left out, not sent as null: the CRD's schema types them as strings
        # and booleans, and a merge patch's null would mean "delete" anyway.
        body = {"status": status.model_dump(mode="json", by_alias=True, exclude_none=True)}
        try:
            self._custom.patch_cluster_custom_object_status(
                GROUP,
                VERSION,
                STATE_PLURAL,
                self._node,
                body,
                _content_type=_MERGE,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status == 404:
                self._exists = False
            raise
        self._written = status.model_copy(update={"updated": ""})
        self.writes += 1
        log.debug("vfpool_node_state_written", node=self._node, vfs=len(status.vfs))

    def _ensure_object(self) -> None:
        try:
            self._custom.get_cluster_custom_object(
                GROUP, VERSION, STATE_PLURAL, self._node, _request_timeout=REQUEST_TIMEOUT
            )
            self._exists = True
            return
        except ApiException as exc:
            if exc.status != 404:
                raise
        me = self._nodes.get()
        if me is None or not me.uid:
            raise _NotYet(f"Node {self._node} is not in the API (yet): no owner for the state")
        body = {
            "apiVersion": API_VERSION,
            "kind": STATE_KIND,
            "metadata": {
                "name": self._node,
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": me.name, "uid": me.uid}
                ],
            },
            "spec": {"nodeName": self._node},
        }
        try:
            self._custom.create_cluster_custom_object(
                GROUP, VERSION, STATE_PLURAL, body, _request_timeout=REQUEST_TIMEOUT
            )
            log.info("vfpool_node_state_created", node=self._node, owner_uid=me.uid)
        except ApiException as exc:
            if exc.status != 409:  # 409: made meanwhile (a previous life of this daemon)
                raise
        self._exists = True


def _short(exc: Exception) -> str:
    if isinstance(exc, ApiException):
        return f"API error {exc.status} {exc.reason}"
    if isinstance(exc, HTTPError | OSError):
        return f"API unreachable: {str(exc)[:160]}"
    return str(exc)[:200]


# --- wiring for the daemon --------------------------------------------------------------------


class NodePools:
    """What plexusd runs in cluster mode with SR-IOV on: the Node watch, the VFPool source
    (unless the pools come from a file) and, once the agent runs, the state writer."""

    def __init__(
        self, api: kclient.ApiClient, node: str, *, from_vfpools: bool, cache: Path | None = None
    ) -> None:
        core, self._custom = kclient.CoreV1Api(api), kclient.CustomObjectsApi(api)
        self._node = node
        self.nodes = NodeWatch(core, node)
        self.source: VFPoolSource | None = (
            VFPoolSource(self._custom, node, self.nodes, cache=cache) if from_vfpools else None
        )
        self.writer: NodeStateWriter | None = None
        self.nodes.start()
        if self.source is not None:
            self.source.start()

    @property
    def pools_source(self) -> PoolsSource | None:
        return self.source

    def attach(self, agent: NodeAgent) -> None:
        """The agent has started: follow VFPool changes promptly and start writing the state."""
        self.writer = NodeStateWriter(
            self._custom, self._node, agent=agent, nodes=self.nodes, source=self.source
        )
        if self.source is not None:
            self.source.subscribe(agent.wake)
            self.source.on_status(self.writer.poke)
        self.writer.start()

    def stop(self) -> None:
        if self.writer is not None:
            self.writer.stop()
        if self.source is not None:
            self.source.stop()
        self.nodes.stop()
