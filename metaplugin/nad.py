"""NetworkAttachmentDefinitions: the model, where they come from, and the network config each
one stands for.

Two sources implement `NadSource`: `LocalNadSource` reads YAML manifests from a directory (local
mode, the embedded default for a single machine) and `metaplugin.k8s.ApiNadSource` keeps a
watch-fed cache of every NAD in the cluster. `network_config()` turns a NAD into the CNI config
to delegate to (NPWG §3.4: spec.config, else a conf file of that name; `name` injected).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final, Protocol

import structlog
import yaml
from pydantic import BaseModel, ConfigDict, Field

from metaplugin import confdir
from metaplugin.annotations import RESOURCE_NAME_ANNOTATION
from metaplugin.errors import InvalidConfig

GROUP: Final = "k8s.cni.cncf.io"
VERSION: Final = "v1"
PLURAL: Final = "network-attachment-definitions"
KIND: Final = "NetworkAttachmentDefinition"
API_VERSION: Final = f"{GROUP}/{VERSION}"
_MANIFEST_SUFFIXES: Final = (".yaml", ".yml", ".json")

log = structlog.get_logger(__name__)


class NetworkAttachmentDefinition(BaseModel):
    model_config = ConfigDict(frozen=True)

    namespace: str
    name: str
    config: str = ""
    annotations: dict[str, str] = Field(default_factory=dict)
    uid: str = ""
    resource_version: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def resource_name(self) -> str | None:
        return self.annotations.get(RESOURCE_NAME_ANNOTATION)

    @classmethod
    def from_object(
        cls, obj: Mapping[str, Any], *, default_namespace: str = "default"
    ) -> NetworkAttachmentDefinition:
        if obj.get("kind") != KIND:
            raise InvalidConfig(f"kind is {obj.get('kind')!r}, expected {KIND}")
        meta = obj.get("metadata") or {}
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidConfig(f"{KIND} without metadata.name")
        spec = obj.get("spec") or {}
        config = spec.get("config", "")
        if not isinstance(config, str):
            raise InvalidConfig(f"{KIND} {name}: spec.config must be a string holding JSON")
        return cls(
            namespace=meta.get("namespace") or default_namespace,
            name=name,
            config=config,
            annotations={str(k): str(v) for k, v in (meta.get("annotations") or {}).items()},
            uid=str(meta.get("uid") or ""),
            resource_version=str(meta.get("resourceVersion") or ""),
        )


class NadSource(Protocol):
    def get(self, namespace: str, name: str) -> NetworkAttachmentDefinition | None: ...

    def all(self) -> list[NetworkAttachmentDefinition]: ...

    def synced(self) -> bool: ...


def network_config(nad: NetworkAttachmentDefinition, conf_dir: str) -> dict[str, Any]:
    """The CNI config a NAD delegates to: spec.config, else the conf in conf_dir with that name
    (NPWG §3.4.1); a config without `name` gets the NAD's name (§3.4.2)."""
    if nad.config.strip():
        try:
            config = json.loads(nad.config)
        except ValueError as exc:
            raise InvalidConfig(f"{KIND} {nad.key}: spec.config is not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise InvalidConfig(f"{KIND} {nad.key}: spec.config must be a JSON object")
        config.setdefault("name", nad.name)
        return config
    found = confdir.find_by_name(conf_dir, nad.name)
    if found is None:
        raise InvalidConfig(
            f"{KIND} {nad.key} has no spec.config and {conf_dir} holds no CNI config named "
            f"{nad.name!r}",
        )
    return found[1]


def parse_manifests(text: str, source: str) -> list[NetworkAttachmentDefinition]:
    """NADs from a YAML stream (`---`-separated documents; other kinds are skipped)."""
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise InvalidConfig(f"{source}: not valid YAML: {exc}") from None
    out = []
    for i, doc in enumerate(documents):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise InvalidConfig(f"{source}: document {i} is not a mapping")
        if doc.get("kind") != KIND:
            continue
        try:
            out.append(NetworkAttachmentDefinition.from_object(doc))
        except InvalidConfig as exc:
            raise InvalidConfig(f"{source}: document {i}: {exc.msg}") from None
    return out


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
        for nad in found:
            if nad.key in nads:
                errors.append(f"{path}: {KIND} {nad.key} is defined twice; the first one is used")
                continue
            nads[nad.key] = nad
    return nads, errors
