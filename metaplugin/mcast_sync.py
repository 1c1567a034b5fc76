"""Multicast membership across nodes, the node's half (issue 13, cluster mode).

Two loops around this node's `MulticastNodeState` (`cnispec.mcast_api`; named after the Node,
owner-referenced to it):

- publish: after each change of the node's local membership (a `MembershipSource`, i.e.
  `metaplugin.mcast_members.LocalMembership`: replication domain -> groups with a member pod
  here), a burst gathered for `debounce` seconds, the object's `spec.groups` is made to match
  (created when missing). Compared with what the watch shows, so a write that changes nothing
  is never sent, and an object deleted or edited by someone else is put right.
- apply: the object's `status.replicateTo` (written by plexus-controller: per domain and group,
  the other nodes with members) is turned into underlay addresses (each node's address of this
  node's underlay family, from the fabric's peers) and handed to the domain's `Replicator`
  (`set_group_members(group, addresses)`); a group that left the status gets an empty list.
  Replicators are registered per domain prefix (`register("overlay/", overlay_replicators(
  overlay))`) or per domain (`register_domain("fabric", replicator)`).

Neither loop ever blocks plexusd: API calls happen on these threads only, a failure is retried
with backoff (0.5 s doubling to 30 s), the watch relists after a 410 or a restart of the API,
and until the status is known nothing is changed (the replicators keep flooding to every node,
which is correct, just not pruned). A replicator that answers False (an overlay segment not on
this node yet) is asked again every `PENDING_RETRY` seconds, and every group again at each
`resync` and whenever the fabric's peers change (drift: a segment made again has no entries).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import structlog
from kubernetes import client as kclient
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from cnispec.errors import PlexusError
from cnispec.mcast_api import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    clean_groups,
    clean_replicate_to,
    domain_vni,
)
from delegates.fabric import Peer
from kubeapi.informer import REQUEST_TIMEOUT, Informer, name_key

log = structlog.get_logger(__name__)

DEBOUNCE: Final = 0.1  # a burst of joins/leaves becomes one write
RESYNC: Final = 30.0  # every group handed to its replicator again, the spec compared again
PENDING_RETRY: Final = 5.0  # a replicator that could not program a group (no segment yet)
BACKOFF: Final = (0.5, 30.0)  # retry delays while the API fails: first, most
_JSON_PATCH: Final = "application/json-patch+json"

Groups = dict[str, tuple[str, ...]]  # domain -> groups
Targets = dict[str, dict[str, tuple[str, ...]]]  # domain -> group -> node names or addresses


class MembershipSource(Protocol):
    """`metaplugin.mcast_members.LocalMembership`'s two methods."""

    def snapshot(self) -> Mapping[str, frozenset[str]]: ...

    def subscribe(self, callback: Callable[[dict[str, frozenset[str]]], None]) -> None: ...


class Replicator(Protocol):
    def set_group_members(self, group: str, node_addresses: Iterable[str]) -> bool:
        """Send `group` from this node to exactly `node_addresses` (empty: the default again).
        False when there is nothing to program here yet (asked again later)."""
        ...


ReplicatorFor = Callable[[str], Replicator | None]  # domain -> its replicator, None: not served


class _VniGroups(Protocol):
    def set_vni_group_members(
        self, vni: int, group: str, node_addresses: Iterable[str]
    ) -> bool: ...


@dataclass(frozen=True)
class _OverlayVni:
    overlay: _VniGroups
    vni: int

    def set_group_members(self, group: str, node_addresses: Iterable[str]) -> bool:
        return self.overlay.set_vni_group_members(self.vni, group, node_addresses)


def overlay_replicators(overlay: _VniGroups) -> ReplicatorFor:
    """The `overlay/<vni>` domains' replicators: `Overlay.set_vni_group_members` of that VNI."""

    def resolve(domain: str) -> Replicator | None:
        vni = domain_vni(domain)
        return None if vni is None else _OverlayVni(overlay, vni)

    return resolve


@dataclass(frozen=True, slots=True)
class OwnState:
    """This node's object as the watch last saw it."""

    groups: Groups
    replicate_to: Targets
    problems: tuple[str, ...] = ()


def own_state(obj: Mapping[str, Any]) -> OwnState:
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    groups, spec_problems = clean_groups(spec.get("groups") or {} if isinstance(spec, dict) else {})
    raw = status.get("replicateTo") if isinstance(status, dict) else None
    targets, status_problems = clean_replicate_to(raw)
    return OwnState(groups, targets, tuple(spec_problems + status_problems))


def addresses_for(targets: Targets, peers: Iterable[Peer], family: int) -> tuple[Targets, set[str]]:
    """`targets` with node names turned into their underlay addresses of `family`; and the
    nodes that have none (not in the fabric yet, or no address of that family)."""
    address = {p.name: p.address_of(family) for p in peers}
    missing: set[str] = set()
    out: Targets = {}
    for domain, groups in targets.items():
        for group, nodes in groups.items():
            found = []
            for node in nodes:
                a = address.get(node)
                if a is None:
                    missing.add(node)
                else:
                    found.append(a)
            out.setdefault(domain, {})[group] = tuple(sorted(set(found)))
    return out, missing


@dataclass
class _Stats:
    spec_writes: int = 0
    replicator_calls: int = 0
    failures: int = 0
    missing: set[str] = field(default_factory=set)


class MembershipSync:
    def __init__(
        self,
        api: kclient.ApiClient,
        node: str,
        membership: MembershipSource,
        *,
        peers: Callable[[], Iterable[Peer] | None],
        family: Callable[[], int],
        debounce: float = DEBOUNCE,
        resync: float = RESYNC,
        pending_retry: float = PENDING_RETRY,
    ) -> None:
        """`peers()`: every node of the fabric (None while unknown); `family()`: the address
        family of this node's underlay address (the replicas go out from it)."""
        self._custom = kclient.CustomObjectsApi(api)
        self._core = kclient.CoreV1Api(api)
        self._node = node
        self._membership = membership
        self._peers = peers
        self._family = family
        self._debounce, self._resync, self._pending_retry = debounce, resync, pending_retry
        self._informer: Informer[OwnState] = Informer(
            "multicastnodestate",
            lambda **kw: self._custom.list_cluster_custom_object(
                GROUP, VERSION, PLURAL, field_selector=f"metadata.name={node}", **kw
            ),
            own_state,
            key=name_key,
            on_change=self._own_changed,
        )
        self._lock = threading.Lock()
        self._replicators: list[tuple[str, ReplicatorFor]] = []
        self._stop = threading.Event()
        self._publish = threading.Event()
        self._retry = threading.Event()
        self._apply = threading.Event()
        self._force = False  # the next apply pass hands every group over again
        self._missing_object = False  # a write said 404: create it, whatever the cache says
        self._applied: Targets = {}  # domain -> group -> addresses, as the replicators have it
        self.stats = _Stats()
        self._threads = [
            threading.Thread(target=self._publish_loop, name="mcast-publish", daemon=True),
            threading.Thread(target=self._apply_loop, name="mcast-apply", daemon=True),
        ]

    # --- wiring --------------------------------------------------------------------------------

    def register(self, prefix: str, resolve: ReplicatorFor) -> None:
        """Serve the domains starting with `prefix` (`"overlay/"`) through `resolve(domain)`
        (None: that domain is not served here)."""
        with self._lock:
            self._replicators.append((prefix, resolve))
        self.resync_now()

    def register_domain(self, domain: str, replicator: Replicator) -> None:
        """Serve exactly `domain` (`"fabric"`) with `replicator`."""
        self.register(domain, lambda d: replicator if d == domain else None)

    def start(self) -> None:
        self._membership.subscribe(lambda _groups: self._publish.set())
        self._informer.start()
        self._publish.set()  # the first write at once: the controller needs the object
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for event in (self._publish, self._retry, self._apply):
            event.set()
        self._informer.stop()
        for thread in self._threads:
            thread.join(timeout=5)

    def resync_now(self) -> None:
        """Hand every group to its replicator again (the fabric's peers changed, a replicator
        was registered). Never blocks."""
        self._force = True
        self._apply.set()

    def _own_changed(self, _obj: object) -> None:
        self._publish.set()  # compare the spec again (deleted? edited?)
        self._apply.set()

    # --- publish: spec.groups <- local membership ---------------------------------------------

    def desired(self) -> Groups:
        groups, problems = clean_groups(
            {d: sorted(g) for d, g in self._membership.snapshot().items()}
        )
        if problems:
            log.warning("multicast_groups_skipped", node=self._node, problems=problems[:10])
        return groups

    def _publish_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            if failures:
                delay = min(BACKOFF[0] * 2 ** (failures - 1), BACKOFF[1])
                self._retry.wait(delay)
                self._retry.clear()
            elif self._publish.wait(self._resync):
                self._stop.wait(self._debounce)  # let the burst finish: one write for all
            if self._stop.is_set():
                return
            self._publish.clear()
            try:
                self.publish_once()
            except Exception as exc:  # noqa: BLE001 - must outlive any failure
                failures += 1
                self.stats.failures += 1
                level = log.warning if failures in (1, 10) or failures % 100 == 0 else log.debug
                level("multicast_groups_not_written", node=self._node, error=_short(exc),
                      failures=failures)  # fmt: skip
                continue
            if failures:
                log.info("multicast_groups_written_again", node=self._node, after=failures)
            failures = 0

    def publish_once(self) -> bool:
        """Make the object's spec.groups what the local membership says; True if written."""
        want = self.desired()
        own = None if self._missing_object else self._informer.get(self._node)
        if own is not None and own.groups == want:
            return False
        if own is None and self._create(want):
            return True
        ops = [
            {"op": "add", "path": "/spec/groups", "value": {d: list(g) for d, g in want.items()}}
        ]
        try:
            self._custom.patch_cluster_custom_object(
                GROUP, VERSION, PLURAL, self._node, ops,
                _content_type=_JSON_PATCH, _request_timeout=REQUEST_TIMEOUT,
            )  # fmt: skip
        except ApiException as exc:
            self._missing_object = exc.status == 404
            raise
        self.stats.spec_writes += 1
        log.debug("multicast_groups_written", node=self._node, groups=_count(want))
        return True

    def _create(self, want: Groups) -> bool:
        """Create the object with `want`; False when it exists already (patch it instead)."""
        node = self._core.read_node(self._node, _request_timeout=REQUEST_TIMEOUT)
        uid = node.metadata.uid if node.metadata is not None else None
        if not uid:
            raise RuntimeError(f"Node {self._node} has no uid: no owner for its state")
        owner = {"apiVersion": "v1", "kind": "Node", "name": self._node, "uid": uid}
        body = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": self._node, "ownerReferences": [owner]},
            "spec": {"nodeName": self._node, "groups": {d: list(g) for d, g in want.items()}},
        }
        try:
            self._custom.create_cluster_custom_object(
                GROUP, VERSION, PLURAL, body, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status == 409:  # made meanwhile, or by a previous life of this daemon
                self._missing_object = False
                return False
            raise
        self._missing_object = False
        self.stats.spec_writes += 1
        log.info("multicast_node_state_created", node=self._node, owner_uid=owner["uid"])
        return True

    # --- apply: replicators <- status.replicateTo --------------------------------------------

    def _apply_loop(self) -> None:
        pending = False
        while not self._stop.is_set():
            woke = self._apply.wait(self._pending_retry if pending else self._resync)
            if self._stop.is_set():
                return
            self._apply.clear()
            # A resync hands every group over again; a retry only the ones not programmed.
            force, self._force = self._force or not (woke or pending), False
            try:
                pending = self.apply_once(force=force)
            except Exception:  # must outlive any failure (a bug, a bad peer)
                log.exception("multicast_apply_failed", node=self._node)
                self._force = pending = True

    def apply_once(self, *, force: bool = False) -> bool:
        """Hand each group whose replication list changed to its replicator (`force`: every
        group). True while some group could not be programmed (try again soon)."""
        if not self._informer.synced.is_set():
            return False  # the status is unknown: change nothing
        peers = self._peers()
        if peers is None:
            return False  # who is where is unknown: change nothing (peers_changed pokes us)
        own = self._informer.get(self._node)
        targets = own.replicate_to if own is not None else {}
        wanted, missing = addresses_for(targets, peers, self._family())
        if missing - self.stats.missing:
            log.warning("multicast_nodes_without_address", nodes=sorted(missing),
                        why="not in the fabric's peers, or no underlay address of this "
                        "node's family: not replicated to")  # fmt: skip
        self.stats.missing = missing
        pending = False
        for domain in sorted(self._applied.keys() | wanted.keys()):
            pending |= self._apply_domain(domain, wanted.get(domain, {}), force=force)
        return pending

    def _apply_domain(self, domain: str, want: dict[str, tuple[str, ...]], *, force: bool) -> bool:
        """One domain's groups; True if some could not be programmed."""
        have = self._applied.setdefault(domain, {})
        replicator = self._resolve(domain)
        pending = absent = False  # absent: the replicator has nothing to program this pass
        for group in sorted(have.keys() | want.keys()):
            addresses = want.get(group, ())
            if (not force and group in have and have[group] == addresses) or (
                group not in have and not addresses  # never programmed, nothing to program
            ):
                continue
            if replicator is None or (absent and addresses):
                pending = pending or replicator is not None
                continue
            if self._call(replicator, domain, group, addresses):
                if addresses:
                    have[group] = addresses
                else:
                    have.pop(group, None)
            elif addresses:
                absent = pending = True
            else:
                have.pop(group, None)  # nothing there to remove: done
        if not have:
            del self._applied[domain]
        return pending

    def _resolve(self, domain: str) -> Replicator | None:
        with self._lock:
            entries = list(self._replicators)
        for prefix, resolve in entries:
            if domain.startswith(prefix):
                found = resolve(domain)
                if found is not None:
                    return found
        return None

    def _call(self, replicator: Replicator, domain: str, group: str, to: tuple[str, ...]) -> bool:
        self.stats.replicator_calls += 1
        try:
            done = replicator.set_group_members(group, to)
        except PlexusError as exc:
            log.warning("multicast_replication_not_set", domain=domain, group=group,
                        error=exc.msg)  # fmt: skip
            return False
        log.debug("multicast_replication_set", domain=domain, group=group, to=list(to), done=done)
        return done

    @property
    def applied(self) -> Targets:
        """What the replicators have been given (tests, logs)."""
        return {d: dict(g) for d, g in self._applied.items()}


def _count(groups: Groups) -> int:
    return sum(len(g) for g in groups.values())


def _short(exc: Exception) -> str:
    if isinstance(exc, ApiException):
        return f"API error {exc.status} {exc.reason}"
    if isinstance(exc, HTTPError | OSError):
        return f"API unreachable: {str(exc)[:160]}"
    return str(exc)[:200]
