"""Where the policy engine's inputs come from: policies, namespaces, the API's pods, and a local
pod's labels, behind one `PolicySource` interface.

- Local mode (`localDir`): NetworkPolicy, MultiNetworkPolicy and Namespace manifests from the
  same directory as the NADs ('---'-separated YAML; other kinds are the NAD source's), each file
  re-read only when inotify names it (`metaplugin.dirwatch`, the watcher the NAD source uses),
  and a pod's labels from the container runtime over its CRI socket (`criSocket`,
  `metaplugin.cri_labels`). No pods in the snapshot: without an API there are no peers to know.
- Cluster mode: watch-fed caches of the four kinds (`metaplugin.k8s_policy`).

Either way a bad object is logged and listed by `errors()` and never hides the good ones, and
`on_change` callbacks run (on the source's thread) after anything the snapshot shows moved.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol

import structlog

from cnispec.errors import InvalidConfig
from cnispec.nad import load_yaml_documents
from metaplugin import dirwatch, manifest_dir
from metaplugin.config import DaemonConfig
from netpolicy.manifests import POLICY_KINDS, namespace_from_object, policy_from_object
from netpolicy.model import Namespace, Pod, Policy

if TYPE_CHECKING:  # the CRI client (gRPC, ~12 MiB) loads only when criSocket is set
    from metaplugin.cri_labels import CriLabels

log = structlog.get_logger(__name__)

POLL_INTERVAL: Final = 2.0  # seconds between looks when inotify does not watch the directory
LABEL_RETRY_FOR: Final = 120.0  # how long a sandbox the runtime does not know yet is asked for
LABEL_RETRY_FIRST: Final = 0.05  # the runtime stores the sandbox right after the ADD returns
LABEL_RETRY_MAX: Final = 2.0
LABEL_CACHE: Final = 4096  # sandboxes whose labels are kept (a node runs at most ~250 pods)


class PolicyInputs(NamedTuple):
    policies: tuple[Policy, ...]  # NetworkPolicies + MultiNetworkPolicies (policy_for resolved)
    namespaces: dict[str, Namespace]
    pods: tuple[Pod, ...]  # pods the API knows (every node; peers), netns ""; () in local mode


class PolicySource(Protocol):
    def snapshot(self) -> PolicyInputs: ...

    def on_change(self, callback: Callable[[], None]) -> None:
        """`callback` runs (from any thread) after a change the snapshot shows."""
        ...

    def pod_labels(self, namespace: str, name: str, container_id: str) -> dict[str, str] | None:
        """A local pod's labels: the API's pod cache (cluster), or the runtime's
        PodSandboxStatus (local mode, sandbox id = CNI_CONTAINERID); None: not known (yet)."""
        ...

    def synced(self) -> bool: ...

    def close(self) -> None: ...


def open_policy_source(config: DaemonConfig, api: Any | None) -> PolicySource:
    """The source for the daemon's mode: `api` is cluster mode's kubernetes ApiClient (the
    daemon's `Sources.api`), None in local mode."""
    if config.local_dir is not None:
        labels = None
        if config.cri_socket:
            from metaplugin.cri_labels import CriLabels  # gRPC loads only when used

            labels = CriLabels(config.cri_socket)
        if labels is None:
            log.warning(
                "policy_no_pod_labels",
                reason="local mode without criSocket: local pods have no labels, so only "
                "policies that select every pod (an empty podSelector) select them",
            )
        return LocalPolicySource(config.local_dir, labels=labels)
    if api is None:
        raise InvalidConfig("cluster mode needs the Kubernetes API for network policies")
    # The kubernetes client costs ~250 ms to import: only cluster mode pays for it.
    from metaplugin.k8s_policy import ClusterPolicySource

    return ClusterPolicySource.start(api)


class Callbacks:
    """The on_change callbacks of one source; a failing callback is logged, never raised into
    the thread that noticed the change."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def add(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)

    def fire(self) -> None:
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("policy_change_callback_failed")


# ---- local mode: the manifest directory ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _File:
    signature: manifest_dir.Signature
    policies: tuple[Policy, ...]
    namespaces: tuple[Namespace, ...]
    errors: tuple[str, ...]


class LocalPolicySource:
    """Policies and Namespaces from the manifests in one directory, and local pods' labels
    from the runtime. Files are read at start, then again as inotify names them (each alone),
    and looked at every `POLL_INTERVAL` while the directory cannot be watched (not there yet,
    out of inotify watches)."""

    def __init__(
        self,
        directory: str,
        *,
        labels: CriLabels | None = None,
        watch: bool = True,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self._dir = directory
        self._watcher = dirwatch.shared() if watch else None
        self._callbacks = Callbacks()
        self._lock = threading.Lock()  # the files and the snapshot
        self._files: dict[str, _File] = {}
        self._snapshot: PolicyInputs | None = None
        self._duplicates: tuple[str, ...] = ()
        self._pending_lock = threading.Lock()  # what the watcher noticed, not applied yet
        self._dirty: set[str] = set()
        self._rescan = True
        self._watched = False
        self._watched_dir: tuple[int, int] | None = None
        self._watch_error = ""
        self._labels = SandboxLabels(labels, self._callbacks.fire) if labels else None
        self._stop = threading.Event()
        self.settle()
        self._poller = threading.Thread(
            target=self._poll, args=(poll_interval,), name="policy-dir-poll", daemon=True
        )
        self._poller.start()

    # --- PolicySource ---------------------------------------------------------------------------

    def snapshot(self) -> PolicyInputs:
        if self._watcher is not None:
            self._watcher.drain()  # a change made just before this call is in the queue
        changed = self._apply()
        if changed:
            self._callbacks.fire()
        with self._lock:
            if self._snapshot is None:
                self._snapshot = self._build()
            return self._snapshot

    def on_change(self, callback: Callable[[], None]) -> None:
        self._callbacks.add(callback)

    def pod_labels(self, namespace: str, name: str, container_id: str) -> dict[str, str] | None:
        if self._labels is None or not container_id:
            return None
        return self._labels.get(container_id, f"{namespace}/{name}")

    def synced(self) -> bool:
        return True

    def errors(self) -> list[str]:
        """What is wrong with the policy and namespace manifests now."""
        self.snapshot()
        with self._lock:
            return [e for f in self._files.values() for e in f.errors] + list(self._duplicates)

    def close(self) -> None:
        self._stop.set()
        if self._labels is not None:
            self._labels.close()

    # --- dirwatch.Listener ----------------------------------------------------------------------

    def notice(self, names: set[str], *, rescan: bool, lost: bool) -> None:
        with self._pending_lock:
            self._dirty |= {n for n in names if n.endswith(manifest_dir.MANIFEST_SUFFIXES)}
            self._rescan |= rescan or any(n.startswith("..") for n in names)  # ConfigMap swap
            if lost:
                self._watched = False

    def settle(self) -> None:
        if self._apply():
            self._callbacks.fire()

    def audit(self) -> None:
        with self._lock:
            known = {n: f.signature for n, f in self._files.items()}
        seen = manifest_dir.listing(self._dir)
        suspects = manifest_dir.changed(seen, known) | (known.keys() - seen.keys())
        if suspects:
            with self._pending_lock:
                self._dirty |= suspects
            self.settle()

    # --- keeping the files current ----------------------------------------------------------------

    def _poll(self, interval: float) -> None:
        while not self._stop.wait(interval):
            if self._watcher is None or not self._watched:
                with self._pending_lock:
                    self._rescan = True
                self.settle()
            elif self._dirty:
                # Noticed by another reader's drain() (the NAD source's lookups read the same
                # inotify queue), which settles only its own listener: nobody else settles this.
                self.settle()

    def _apply(self) -> bool:
        """Apply what was noticed; True when a file's content may have changed."""
        with self._lock:
            if self._watched and manifest_dir.identity(self._dir) != self._watched_dir:
                with self._pending_lock:  # another directory swapped in: nothing watches it
                    self._watched, self._rescan = False, True
            if not self._watched:
                self._watch()
            with self._pending_lock:
                dirty, rescan = self._dirty, self._rescan
                self._dirty, self._rescan = set(), self._watcher is None
            if rescan:
                seen = manifest_dir.listing(self._dir)
                dirty = manifest_dir.changed(seen, {n: f.signature for n, f in self._files.items()})
                dirty |= self._files.keys() - seen.keys()
            changed = False
            for name in sorted(dirty):
                changed |= self._reload(name)
            if changed:
                self._snapshot = None
                log.info(
                    "policy_manifests_loaded",
                    directory=self._dir,
                    policies=sum(len(f.policies) for f in self._files.values()),
                    namespaces=sum(len(f.namespaces) for f in self._files.values()),
                )
            return changed

    def _watch(self) -> None:
        if self._watcher is None:
            return
        identity = manifest_dir.identity(self._dir)
        try:
            self._watcher.watch(self._dir, self)
        except OSError as exc:
            # No directory (yet): no policies, and the poller watches it once it is there.
            # Out of inotify watches: the poller looks every POLL_INTERVAL instead.
            missing = exc.errno in (errno.ENOENT, errno.ENOTDIR)
            if not missing and str(exc) != self._watch_error:
                log.warning("policy_dir_not_watched_polling", directory=self._dir, error=str(exc))
                self._watch_error = str(exc)
            with self._pending_lock:
                self._rescan = True
            return
        with self._pending_lock:
            self._watched, self._watched_dir, self._rescan = True, identity, True

    def _reload(self, name: str) -> bool:
        path = os.path.join(self._dir, name)
        signature = manifest_dir.signature(path)
        old = self._files.pop(name, None)
        if signature is None:
            return old is not None and bool(old.policies or old.namespaces or old.errors)
        new = _read(path, signature)
        self._files[name] = new
        for error in new.errors:
            log.warning("policy_manifest_invalid", error=error)
        return old is None or (old.policies, old.namespaces, old.errors) != (
            new.policies,
            new.namespaces,
            new.errors,
        )

    def _build(self) -> PolicyInputs:
        """Every file's objects, the first file (by name) winning a policy or namespace defined
        twice, as the NAD source does."""
        policies: dict[str, tuple[str, Policy]] = {}
        namespaces: dict[str, tuple[str, Namespace]] = {}
        duplicates: list[str] = []
        for name in sorted(self._files):
            file = self._files[name]
            for policy in file.policies:
                if policy.ref in policies:
                    duplicates.append(_twice(self._dir, name, policies[policy.ref][0], policy.ref))
                    continue
                policies[policy.ref] = (name, policy)
            for ns in file.namespaces:
                if ns.name in namespaces:
                    ref = f"Namespace {ns.name}"
                    duplicates.append(_twice(self._dir, name, namespaces[ns.name][0], ref))
                    continue
                namespaces[ns.name] = (name, ns)
        for duplicate in duplicates:
            log.warning("policy_manifest_invalid", error=duplicate)
        self._duplicates = tuple(duplicates)
        return PolicyInputs(
            policies=tuple(p for _, p in policies.values()),
            namespaces={k: ns for k, (_, ns) in namespaces.items()},
            pods=(),
        )


def _twice(directory: str, file: str, first: str, ref: str) -> str:
    return (
        f"{os.path.join(directory, file)}: {ref} is defined twice (first in {first}); "
        "the first one is used"
    )


def _read(path: str, signature: manifest_dir.Signature) -> _File:
    """The policies and namespaces of one manifest file; each bad document is an error of its
    own and the file's other documents still count."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode()
        documents = load_yaml_documents(text, path)
    except UnicodeDecodeError as exc:
        return _File(signature, (), (), (f"{path}: not UTF-8 text ({exc.reason})",))
    except InvalidConfig as exc:
        return _File(signature, (), (), (exc.msg,))
    except OSError as exc:  # removed since it was listed: its own event follows
        return _File(signature, (), (), () if isinstance(exc, FileNotFoundError) else (str(exc),))
    policies: list[Policy] = []
    namespaces: list[Namespace] = []
    errors: list[str] = []
    for i, doc in enumerate(documents):
        if not isinstance(doc, dict):
            continue  # the NAD source reports documents that are no object
        kind = doc.get("kind")
        try:
            if kind in POLICY_KINDS:
                policies.append(policy_from_object(doc))
            elif kind == "Namespace":
                namespaces.append(namespace_from_object(doc))
        except InvalidConfig as exc:
            errors.append(f"{path}: document {i}: {exc.msg}")
    return _File(signature, tuple(policies), tuple(namespaces), tuple(errors))


# ---- local mode: pods' labels from the runtime --------------------------------------------------


class SandboxLabels:
    """Sandbox labels from the runtime, cached (they never change for a sandbox); a sandbox the
    runtime does not know yet (the ADD runs inside RunPodSandbox, before the runtime stores the
    sandbox) is asked for again in the background, and `notify` runs once its labels are
    known, so the engine recomputes that pod."""

    def __init__(
        self,
        cri: CriLabels,
        notify: Callable[[], None],
        *,
        retry_for: float = LABEL_RETRY_FOR,
        first_retry: float = LABEL_RETRY_FIRST,
        max_retry: float = LABEL_RETRY_MAX,
    ) -> None:
        self._cri = cri
        self._notify = notify
        self._retry_for = retry_for
        self._first_retry = first_retry
        self._max_retry = max_retry
        self._lock = threading.Lock()
        self._known: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._pending: dict[str, tuple[str, float]] = {}  # sandbox -> (pod, give up at)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._last_error = ""
        self._thread: threading.Thread | None = None

    def get(self, sandbox_id: str, pod: str) -> dict[str, str] | None:
        with self._lock:
            found = self._known.get(sandbox_id)
            if found is not None:
                self._known.move_to_end(sandbox_id)
                return dict(found)
        labels = self._ask(sandbox_id, pod)
        if labels is not None:
            return dict(labels)
        with self._lock:
            self._pending.setdefault(sandbox_id, (pod, time.monotonic() + self._retry_for))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._retry, name="cri-labels-retry", daemon=True
                )
                self._thread.start()
        self._wake.set()
        return None

    def waiting(self) -> list[str]:
        """The sandboxes still asked for (the engine's status, tests)."""
        with self._lock:
            return sorted(self._pending)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        with suppress(Exception):
            self._cri.close()

    def _ask(self, sandbox_id: str, pod: str) -> dict[str, str] | None:
        from metaplugin.cri_labels import CriUnavailable  # loaded with the client

        try:
            labels = self._cri.labels(sandbox_id)
        except CriUnavailable as exc:
            if str(exc) != self._last_error:  # once per distinct failure, not per pod
                log.warning("pod_labels_unavailable", pod=pod, error=str(exc))
                self._last_error = str(exc)
            return None
        if labels is not None:
            with self._lock:
                self._known[sandbox_id] = labels
                self._known.move_to_end(sandbox_id)
                while len(self._known) > LABEL_CACHE:
                    self._known.popitem(last=False)
                self._pending.pop(sandbox_id, None)
        return labels

    def _retry(self) -> None:
        delay = self._first_retry
        while not self._stop.is_set():
            with self._lock:
                pending = dict(self._pending)
            if not pending:
                self._wake.wait()
                self._wake.clear()
                delay = self._first_retry
                continue
            if self._wake.wait(delay):  # a new sandbox: ask soon again
                self._wake.clear()
                delay = self._first_retry
            learned = False
            now = time.monotonic()
            for sandbox_id, (pod, give_up) in pending.items():
                if self._ask(sandbox_id, pod) is not None:
                    log.info("pod_labels_known", pod=pod, sandbox=sandbox_id[:12])
                    learned = True
                elif now >= give_up:
                    log.warning("pod_labels_never_known", pod=pod, sandbox=sandbox_id[:12])
                    with self._lock:
                        self._pending.pop(sandbox_id, None)
            if learned:
                self._notify()
            delay = min(delay * 2, self._max_retry)
