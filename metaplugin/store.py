"""Durable attachment records: what ADD ran, so DEL, CHECK and GC can replay it exactly.

Layout: `<stateDir>/attachments/<container id>/<index>-<ifname>.json`, one file per attachment,
each self-contained (container, netns, pod, the exact network config text, CNI_ARGS, capability
arguments, result). Every write is temp file + fsync + rename + directory fsync, so a crash leaves
either the old or the new file. ADD writes every planned attachment *before* running any
delegate, so a crash mid-ADD still leaves enough to undo what ran.

A record that cannot be read is moved to `<stateDir>/quarantine/` and reported; the container's
other records are still usable ("reconstruct what we can", never a crash). Concurrency: the daemon
serialises operations per container; `StateLock` keeps two daemons off one state dir.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from metaplugin import cni
from metaplugin.cni import Result
from metaplugin.errors import IOFailure, TryAgainLater

RECORD_VERSION: Final = 1
log = structlog.get_logger(__name__)


class AttachmentRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    version: int = RECORD_VERSION
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
    config: str  # the network config as resolved (GC and plexusctl read it)
    # What runs, exactly: each plugin's binary, negotiated version and config (PreparedNetwork).
    prepared: dict[str, Any]
    default_route: list[str] | None = None
    state: Literal["planned", "added"] = "planned"
    result: dict[str, Any] | None = None
    created_at: float = Field(default_factory=time.time)

    @property
    def file_name(self) -> str:
        return f"{self.index:02d}-{self.ifname}.json"

    def config_dict(self) -> dict[str, Any]:
        data = json.loads(self.config)
        assert isinstance(data, dict)
        return data

    def parsed_result(self) -> Result | None:
        return Result.from_wire(self.result) if self.result else None


@dataclass(frozen=True, slots=True)
class ContainerRecords:
    container_id: str
    records: tuple[AttachmentRecord, ...]
    quarantined: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.records)

    @property
    def runtime_ifname(self) -> str:
        return self.records[0].runtime_ifname if self.records else ""

    @property
    def netns(self) -> str:
        return self.records[0].netns if self.records else ""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600, sync_dir: bool = True) -> None:
    """Write `data` to `path` so that a crash leaves the old or the new content, never a mix.
    `sync_dir=False` leaves the directory fsync to the caller (one for a batch of files)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync_dir:
        _fsync_dir(path.parent)


class AttachmentStore:
    def __init__(self, state_dir: str | Path) -> None:
        self._root = Path(state_dir) / "attachments"
        self._quarantine = Path(state_dir) / "quarantine"
        self._root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _dir(self, container_id: str) -> Path:
        if not cni.valid_container_id(container_id):
            raise ValueError(f"unsafe container id {container_id!r}")
        return self._root / container_id

    def save(self, record: AttachmentRecord, *, sync_dir: bool = True) -> None:
        directory = self._dir(record.container_id)
        created = not directory.exists()
        directory.mkdir(exist_ok=True, mode=0o700)
        if created:
            _fsync_dir(self._root)
        try:
            atomic_write(
                directory / record.file_name, record.model_dump_json().encode(), sync_dir=sync_dir
            )
        except OSError as exc:
            raise IOFailure(f"cannot write attachment record in {directory}: {exc}") from None

    def plan(self, records: list[AttachmentRecord]) -> None:
        """Durably record every planned attachment (before any delegate runs)."""
        for record in records:
            self.save(record, sync_dir=False)
        if records:
            _fsync_dir(self._dir(records[0].container_id))

    def mark_added(self, record: AttachmentRecord, result: Result) -> AttachmentRecord:
        updated = record.model_copy(
            update={"state": "added", "result": result.to_wire(cni.LATEST_VERSION)}
        )
        # No directory fsync: if a crash loses this rename, the planned record (same name) is
        # still there, and DEL of a planned attachment needs no result.
        self.save(updated, sync_dir=False)
        return updated

    def remove(self, record: AttachmentRecord) -> None:
        path = self._dir(record.container_id) / record.file_name
        path.unlink(missing_ok=True)

    def remove_container(self, container_id: str) -> None:
        directory = self._dir(container_id)
        if not directory.exists():
            return
        for leftover in directory.iterdir():
            if leftover.name.startswith("."):
                leftover.unlink(missing_ok=True)  # temp files of an interrupted write
        try:
            directory.rmdir()
        except OSError:
            return  # records remain (a failed DEL keeps them for the retry)
        _fsync_dir(self._root)

    def load(self, container_id: str, *, quarantine: bool = True) -> ContainerRecords:
        """The container's records. An undecodable record is moved to quarantine (only callers
        holding the container's lock may do that; read-only views pass quarantine=False). An
        I/O error raises IOFailure (code 5): the record may be fine, and DEL must be retried
        rather than succeed without it."""
        directory = self._dir(container_id)
        records: list[AttachmentRecord] = []
        quarantined: list[str] = []
        try:
            paths = sorted(directory.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return ContainerRecords(container_id, ())
        for path in paths:
            if path.name.startswith(".") or path.suffix != ".json":
                continue
            try:
                record = self._read(path)
            except FileNotFoundError:
                continue  # removed by a concurrent DEL: gone, not corrupt
            if record is not None:
                records.append(record)
            elif quarantine:
                quarantined.append(self._move_to_quarantine(path))
        records.sort(key=lambda r: r.index)
        return ContainerRecords(container_id, tuple(records), tuple(quarantined))

    def _read(self, path: Path) -> AttachmentRecord | None:
        """The record, or None when its content cannot be decoded."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise IOFailure(f"cannot read attachment record {path}: {exc.strerror}") from None
        try:
            record = AttachmentRecord.model_validate_json(data)
        except (ValidationError, ValueError) as exc:
            log.error("attachment_record_unreadable", path=str(path), error=str(exc)[:300])
            return None
        if record.version > RECORD_VERSION:
            # Written by a newer plexusd: leave it be, and refuse to guess what it means.
            raise IOFailure(
                f"attachment record {path} has version {record.version}; this plexusd reads "
                f"up to {RECORD_VERSION}: run the newer plexusd (or roll it forward) to DEL it",
            )
        return record

    def _move_to_quarantine(self, path: Path) -> str:
        self._quarantine.mkdir(exist_ok=True, mode=0o700)
        target = self._quarantine / f"{path.parent.name}-{path.name}-{int(time.time())}"
        try:
            shutil.move(str(path), target)
        except FileNotFoundError:
            return ""
        return str(target)

    def container_ids(self) -> list[str]:
        return sorted(p.name for p in self._root.iterdir() if p.is_dir())

    def all(self) -> Iterator[ContainerRecords]:
        """A read-only view of every container (never quarantines; see load)."""
        for container_id in self.container_ids():
            loaded = self.load(container_id, quarantine=False)
            if loaded.records:
                yield loaded

    def quarantined(self) -> list[str]:
        if not self._quarantine.is_dir():
            return []
        return sorted(str(p) for p in self._quarantine.iterdir())


class StateLock:
    """An exclusive flock on `<stateDir>/plexusd.lock`: one daemon per state dir."""

    def __init__(self, state_dir: str | Path) -> None:
        self._path = Path(state_dir) / "plexusd.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TryAgainLater(
                f"another plexusd holds {self._path}; one daemon per stateDir",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
