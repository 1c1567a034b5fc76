"""Where the daemon finds NetworkAttachmentDefinitions: the `NadSource` interface the resolver
reads through, and `LocalNadSource`, which reads YAML manifests from a directory (local mode, the
embedded default for a single machine). Cluster mode's source is `metaplugin.k8s.ApiNadSource`,
a watch-fed cache of every NAD in the cluster. The NAD model itself is `cnispec.nad`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Final, Protocol

import structlog

from cnispec.errors import InvalidConfig
from cnispec.nad import KIND, NetworkAttachmentDefinition, parse_manifests

_MANIFEST_SUFFIXES: Final = (".yaml", ".yml", ".json")

log = structlog.get_logger(__name__)


class NadSource(Protocol):
    def get(self, namespace: str, name: str) -> NetworkAttachmentDefinition | None: ...

    def all(self) -> list[NetworkAttachmentDefinition]: ...

    def synced(self) -> bool: ...


class LocalNadSource:
    """NADs from manifest files in one directory, re-read whenever a file changes."""

    def __init__(self, directory: str) -> None:
        self._dir = Path(directory)
        self._lock = threading.Lock()
        self._signature: tuple[tuple[str, int, int], ...] | None = None
        self._nads: dict[str, NetworkAttachmentDefinition] = {}
        self._errors: list[str] = []

    def _files(self) -> list[Path]:
        try:
            return sorted(
                p for p in self._dir.iterdir() if p.suffix in _MANIFEST_SUFFIXES and p.is_file()
            )
        except FileNotFoundError:
            return []

    def _refresh(self) -> None:
        files = self._files()
        signature = tuple((p.name, *_stat(p)) for p in files)
        with self._lock:
            if signature == self._signature:
                return
            nads, errors = _load_all(files)
            self._nads, self._errors, self._signature = nads, errors, signature
        for error in errors:
            log.warning("nad_manifest_invalid", error=error)
        log.info("nads_loaded", directory=str(self._dir), count=len(nads))

    def get(self, namespace: str, name: str) -> NetworkAttachmentDefinition | None:
        self._refresh()
        return self._nads.get(f"{namespace}/{name}")

    def all(self) -> list[NetworkAttachmentDefinition]:
        self._refresh()
        return list(self._nads.values())

    def errors(self) -> list[str]:
        self._refresh()
        return list(self._errors)

    def synced(self) -> bool:
        return True


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return (0, -1)
    return (st.st_mtime_ns, st.st_size)


def _load_all(files: Iterable[Path]) -> tuple[dict[str, NetworkAttachmentDefinition], list[str]]:
    nads: dict[str, NetworkAttachmentDefinition] = {}
    errors: list[str] = []
    for path in files:
        try:
            found = parse_manifests(path.read_text(), str(path))
        except (InvalidConfig, OSError) as exc:
            errors.append(str(exc))
            continue
        except UnicodeDecodeError as exc:  # one bad file must not fail every lookup
            errors.append(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})")
            continue
        for nad in found:
            if nad.key in nads:
                errors.append(f"{path}: {KIND} {nad.key} is defined twice; the first one is used")
                continue
            nads[nad.key] = nad
    return nads, errors
