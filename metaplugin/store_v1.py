"""Attachment records as plexusd wrote them before records had a stable identity (version 1:
`<container>/<NN>-<ifname>.json`, the network config and the result kept as JSON text and
dicts), and their migration to the current `metaplugin.store.Attachment`.

A node upgraded while pods run must DEL every pod the previous version attached: when the store
opens, each container's version-1 records are rewritten in the current form (every new file
durably written before any old one goes, so a crash in between only means the migration runs
again at the next start, with the same outcome), then the old files are removed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cnispec import cni
from cnispec.cni import Result
from cnispec.durable import fsync_dir
from cnispec.errors import PlexusError

log = structlog.get_logger(__name__)


class RecordV1(BaseModel):
    """The version-1 record, field for field."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    version: Literal[1]
    container_id: str
    index: int
    network: str
    ifname: str
    is_default: bool
    runtime_ifname: str
    netns: str
    pod_namespace: str = ""
    pod_name: str = ""
    pod_uid: str = ""
    cni_args: str = ""
    cni_path: list[str] = Field(default_factory=list)
    config: str
    prepared: dict[str, Any]
    default_route: list[str] | None = None
    state: Literal["planned", "added"] = "planned"
    result: dict[str, Any] | None = None
    created_at: float


def version_of(data: bytes) -> int | None:
    """The `version` a record file declares, None when it declares none it can be read by."""
    try:
        version = json.loads(data).get("version")
    except (ValueError, AttributeError):
        return None
    return version if isinstance(version, int) else None


def upgrade(old: RecordV1) -> dict[str, Any]:
    """The current record (as data for `Attachment`) for a version-1 record."""
    return {
        "holder": {
            "container_id": old.container_id,
            "ifname": old.ifname,
            "netns": old.netns,
            "pod_namespace": old.pod_namespace,
            "pod_name": old.pod_name,
            "pod_uid": old.pod_uid,
        },
        "network": old.network,
        "seq": old.index,
        "is_default": old.is_default,
        "runtime_ifname": old.runtime_ifname,
        "cni_args": old.cni_args,
        "cni_path": old.cni_path,
        "prepared": {**old.prepared, "disableGC": _disable_gc(old.config)},
        "default_route": old.default_route,
        "state": old.state,
        "result": _result(old),
        "created_at": old.created_at,
    }


def _disable_gc(config: str) -> bool:
    # Version 1 kept the network config beside what it prepared; GC's opt-out lived there only.
    try:
        return bool(json.loads(config).get("disableGC", False))
    except (ValueError, AttributeError):
        return False


def _result(old: RecordV1) -> dict[str, Any] | None:
    """The recorded result in the canonical shape, or None when it no longer decodes (DEL then
    runs without it, as the spec allows, rather than never running)."""
    if old.result is None:
        return None
    try:
        return Result.from_wire(old.result).to_wire(cni.LATEST_VERSION)
    except PlexusError as exc:
        log.error("attachment_result_unreadable", attachment=old.ifname, error=exc.msg)
        return None


def migrate(directory: Path, write: Callable[[dict[str, Any]], str]) -> int:
    """Rewrite the version-1 records of one container through `write` (which returns the name
    of the file it wrote), then remove them; returns how many. A file that is not a readable
    version-1 record is left for the store's loader (which quarantines what it cannot read)."""
    found: list[tuple[Path, RecordV1]] = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or path.suffix != ".json":
            continue
        data = path.read_bytes()
        if version_of(data) != 1:
            continue
        try:
            found.append((path, RecordV1.model_validate_json(data)))
        except ValidationError as exc:
            log.error("attachment_record_unreadable", path=str(path), error=str(exc)[:300])
    if not found:
        return 0
    written = {write(upgrade(old)) for _, old in found}
    fsync_dir(directory)  # every new record is on disk before an old one goes
    for path, _ in found:
        if path.name not in written:
            path.unlink(missing_ok=True)
    fsync_dir(directory)
    return len(found)
