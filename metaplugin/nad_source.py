"""Where the daemon finds NetworkAttachmentDefinitions: the `NadSource` interface the resolver
reads through, and `LocalNadSource`, which reads YAML manifests from a directory (local mode, the
embedded default for a single machine). Cluster mode's source is `metaplugin.k8s.ApiNadSource`,
a watch-fed cache of every NAD in the cluster. The NAD model itself is `cnispec.nad`.

A lookup is a dict hit, whatever the number of files: the directory is read once, then only the
files inotify names are read again (`metaplugin.dirwatch`), by its thread as soon as they change,
or by the lookup itself when the change came an instant before it.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import structlog

from cnispec.errors import InvalidConfig
from cnispec.nad import KIND, NetworkAttachmentDefinition, parse_manifests
from metaplugin import dirwatch, manifest_dir

log = structlog.get_logger(__name__)


class NadSource(Protocol):
    def get(self, namespace: str, name: str) -> NetworkAttachmentDefinition | None: ...

    def all(self) -> Iterator[NetworkAttachmentDefinition]:
        """Every NAD as of the call; each one is built as the caller reaches it (10,000 NADs
        built at once would hold 16 MB)."""
        ...

    def synced(self) -> bool: ...


class StoredNad(NamedTuple):
    """A NAD as the sources store it between lookups: its strings only (a pydantic model is
    ~1.6 KB; 10,000 NADs would cost 16 MB of the daemon's resident memory)."""

    namespace: str
    name: str
    config: str
    annotations: dict[str, str] | None
    uid: str
    resource_version: str

    @classmethod
    def of(cls, nad: NetworkAttachmentDefinition) -> StoredNad:
        return cls(
            sys.intern(nad.namespace),
            nad.name,
            nad.config,
            nad.annotations or None,
            nad.uid,
            nad.resource_version,
        )

    def model(self) -> NetworkAttachmentDefinition:
        # Validated when the file was read: no second validation per lookup.
        return NetworkAttachmentDefinition.model_construct(
            namespace=self.namespace,
            name=self.name,
            config=self.config,
            annotations=dict(self.annotations or {}),
            uid=self.uid,
            resource_version=self.resource_version,
        )


@dataclass(slots=True)
class _File:
    signature: manifest_dir.Signature
    keys: tuple[str, ...]  # the NADs it defines ("namespace/name")
    errors: tuple[str, ...]


class LocalNadSource:
    """NADs from manifest files in one directory, each file re-read only when it changes."""

    def __init__(self, directory: str, *, watch: bool = True) -> None:
        """`watch=False`, or no inotify to be had: every lookup stat()s the directory's files
        (still re-reading only the changed ones)."""
        # Paths as strings: pathlib interns every name it parses, for the process's lifetime.
        self._dir = directory
        self._watcher = dirwatch.shared() if watch else None
        self._lock = threading.Lock()  # the index
        self._files: dict[str, _File] = {}
        # key -> (file, NAD), from the file read first (by name) of those that define it
        self._index: dict[str, tuple[str, StoredNad]] = {}
        self._shadowed: dict[str, dict[str, StoredNad]] = {}  # key -> the other files defining it
        # What the watcher noticed, not applied yet (its own lock: the watcher never waits for
        # a re-read to finish).
        self._pending_lock = threading.Lock()
        self._dirty: set[str] = set()
        self._rescan = True
        self._watched = False
        self._watched_dir: tuple[int, int] | None = None  # (st_dev, st_ino) of the one watched
        self._watch_error = ""

    # --- the NadSource interface ---------------------------------------------------------------

    def get(self, namespace: str, name: str) -> NetworkAttachmentDefinition | None:
        with self._synced():
            found = self._index.get(f"{namespace}/{name}")
            return found[1].model() if found is not None else None

    def all(self) -> Iterator[NetworkAttachmentDefinition]:
        with self._synced():
            snapshot = [nad for _, nad in self._index.values()]
        return (nad.model() for nad in snapshot)

    def errors(self) -> list[str]:
        """What is wrong with the manifests now (files that do not parse, NADs defined twice)."""
        with self._synced():
            out = [e for f in self._files.values() for e in f.errors]
            out += [
                _twice(self._path(file), key)
                for key, files in self._shadowed.items()
                for file in files
            ]
            return out

    def synced(self) -> bool:
        return True

    # --- dirwatch.Listener ----------------------------------------------------------------------

    def notice(self, names: set[str], *, rescan: bool, lost: bool) -> None:
        with self._pending_lock:
            self._dirty |= {n for n in names if n.endswith(manifest_dir.MANIFEST_SUFFIXES)}
            # kubelet swaps a ConfigMap's files in at once through a `..data` symlink: the
            # manifests' own names never show in the events.
            self._rescan |= rescan or any(n.startswith("..") for n in names)
            if lost:
                self._watched = False

    def settle(self) -> None:
        with self._synced():
            pass

    # --- keeping the index current --------------------------------------------------------------

    @contextmanager
    def _synced(self) -> Iterator[None]:
        """Hold the index lock, with every change noticed so far applied."""
        if self._watcher is not None:
            self._watcher.drain()  # a change made just before this request is in the queue
        with self._lock:
            self._apply_pending()
            yield

    def _apply_pending(self) -> None:
        if self._watched and manifest_dir.identity(self._dir) != self._watched_dir:
            # Another directory is there now (a symlink to it swapped, one renamed in place):
            # no event comes from the one watched. One stat() per lookup tells.
            with self._pending_lock:
                self._watched, self._rescan = False, True
        if not self._watched:
            self._watch()
        with self._pending_lock:
            dirty, rescan = self._dirty, self._rescan
            self._dirty, self._rescan = set(), self._watcher is None  # no watcher: always look
        if rescan:
            self._scan()
            return
        for name in sorted(dirty):
            self._reload(name)

    def _watch(self) -> None:
        if self._watcher is None:
            return
        # before the watch: a swap in between is seen next time
        identity = manifest_dir.identity(self._dir)
        try:
            self._watcher.watch(self._dir, self)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return  # no directory (yet): no NADs, and watched as soon as it is there
            # Out of inotify watches (fs.inotify.max_user_watches): look at every lookup.
            if str(exc) != self._watch_error:
                log.warning("nad_dir_not_watched_polling", directory=self._dir, error=str(exc))
                self._watch_error = str(exc)
            with self._pending_lock:
                self._rescan = True
            return
        with self._pending_lock:
            self._watched, self._watched_dir = True, identity
            self._rescan = True  # what changed while nothing watched is only seen by looking

    def _scan(self) -> None:
        """stat() every manifest; re-read those whose signature moved, forget the ones gone."""
        seen = manifest_dir.listing(self._dir)
        gone = self._files.keys() - seen.keys()
        for name in gone:
            self._drop(name)
        changed = manifest_dir.changed(seen, {n: f.signature for n, f in self._files.items()})
        for name in sorted(changed):
            self._load(name, seen[name])
        if changed or gone:
            log.info("nads_loaded", directory=self._dir, count=len(self._index))

    def audit(self) -> None:
        """The watcher's safety net, for what inotify does not report (a writer that never
        closes, a network filesystem): stat() every manifest without holding the index, so
        lookups meanwhile are not kept waiting, then re-read what moved."""
        with self._lock:
            known = {n: f.signature for n, f in self._files.items()}
        seen = manifest_dir.listing(self._dir)
        suspects = manifest_dir.changed(seen, known) | (known.keys() - seen.keys())
        if suspects:  # each one looked at again, under the lock, as inotify had named it
            log.info("nad_changes_not_notified", files=sorted(suspects)[:10], count=len(suspects))
            with self._pending_lock:
                self._dirty |= suspects
            self.settle()

    def _reload(self, name: str) -> None:
        """A file inotify named: read again whatever its signature says (a rewrite within one
        clock tick keeps its mtime and size)."""
        signature = manifest_dir.signature(self._path(name))
        if signature is None:
            self._drop(name)
        else:
            self._load(name, signature)

    def _load(self, name: str, signature: manifest_dir.Signature) -> None:
        self._drop(name)
        nads, errors = _read(self._path(name))
        keys: dict[str, None] = {}
        for nad in nads:
            key = f"{nad.namespace}/{nad.name}"
            if key in keys:
                errors.append(_twice(self._path(name), key))
                continue
            keys[key] = None
            self._add(key, name, nad)
        for error in errors:
            log.warning("nad_manifest_invalid", error=error)
        self._files[name] = _File(signature, tuple(keys), tuple(errors))

    def _path(self, name: str) -> str:
        return os.path.join(self._dir, name)

    def _add(self, key: str, file: str, nad: StoredNad) -> None:
        owner = self._index.get(key)
        if owner is None:
            self._index[key] = (file, nad)
            return
        # Defined by two files: the one read first (by name) is used, as when all are read.
        first, shadowed = ((file, nad), owner) if file < owner[0] else (owner, (file, nad))
        self._index[key] = first
        self._shadowed.setdefault(key, {})[shadowed[0]] = shadowed[1]
        log.warning("nad_manifest_invalid", error=_twice(self._path(shadowed[0]), key))

    def _drop(self, name: str) -> None:
        old = self._files.pop(name, None)
        if old is None:
            return
        for key in old.keys:
            shadowed = self._shadowed.get(key, {})
            if self._index[key][0] == name:
                if shadowed:
                    first = min(shadowed)
                    self._index[key] = (first, shadowed.pop(first))
                else:
                    del self._index[key]
            else:
                shadowed.pop(name, None)
            if not shadowed:
                self._shadowed.pop(key, None)


def _twice(path: str, key: str) -> str:
    return f"{path}: {KIND} {key} is defined twice; the first one is used"


def _read(path: str) -> tuple[list[StoredNad], list[str]]:
    """The NADs of one manifest file, or why it has none; one bad file never fails a lookup."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode()
        return [StoredNad.of(nad) for nad in parse_manifests(text, path)], []
    except UnicodeDecodeError as exc:
        return [], [f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]
    except InvalidConfig as exc:
        return [], [str(exc)]
    except FileNotFoundError:
        return [], []  # removed since it was listed: its own event follows
    except OSError as exc:
        return [], [str(exc)]
