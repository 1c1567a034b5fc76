"""Durable attachment records: what ADD ran, so DEL, CHECK and GC replay it exactly.

An attachment is one network on one interface of one container, and that is its identity:
(container, network, interface name). Its record (`Attachment`) holds who it is for, the network
as prepared to run (each plugin's binary, negotiated version and exact config, including any
IPAM a built-in derived), and the parsed result; DEL and CHECK read nothing else, so they
consult no live state (no API, no fabric, no netns needed). `seq` orders a container's
attachments (ADD ascending, DEL descending); it is not part of the identity.

Layout: `<stateDir>/attachments/<container id>/<ifname>@<network digest>.record`, one
self-contained file per attachment (not `.json`, the suffix of version-1 records: a plexusd of
that version, brought back by a rollback, passes these by instead of quarantining them, so they
are still there for the next upgrade to DEL). Every write is temp file + fsync + rename +
directory fsync (`cnispec.durable`), so a crash leaves either the old or the new file. ADD
writes every planned attachment *before* running any delegate, so a crash mid-ADD still leaves
enough to undo what ran.

One durable write per pod ADD: the plan goes first into the container's journal
(`<container id>/.journal`, every planned record in one file, fsync'd), then each record file
is renamed into place without an fsync of its data, then one directory fsync makes the journal
and every record's name durable at once. Later updates (`mark_added`) are renamed into place
without any fsync. A record file that a power cut left torn or empty is read from the journal
instead (its planned state: DEL then runs without prevResult, as the spec allows); a record
that is gone was removed by a DEL, and the journal never brings it back. A SIGKILL loses
nothing either way (the page cache survives it). The journal's name starts with '.', so a
plexusd of an earlier version (a rollback) removes it with the container like a temp file.
(Before: 2 fsyncs per attachment and 2 directory fsyncs per pod ADD.)

Records written by an older plexusd are migrated when the store opens (`metaplugin.store_v1`);
one written by a newer plexusd is refused, never guessed at.

A record that cannot be read is moved to `<stateDir>/quarantine/` and reported; the container's
other records are still usable ("reconstruct what we can", never a crash). An index kept in
memory answers "what does this pod have" without reading every record. Concurrency: the daemon
serialises operations per container; `StateLock` keeps two daemons off one state dir.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple

import structlog
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from cnispec import cni, failpoints
from cnispec.cni import Result
from cnispec.durable import atomic_write, durable_unlink, fsync_dir
from cnispec.errors import IOFailure, PlexusError, TryAgainLater
from cnispec.identity import Holder
from cnispec.netconf import PreparedNetwork
from metaplugin import store_v1

RECORD_VERSION: Final = 2
SUFFIX: Final = ".record"
JOURNAL: Final = ".journal"
log = structlog.get_logger(__name__)


class AttachmentKey(NamedTuple):
    container_id: str
    network: str
    ifname: str


class Attachment(BaseModel):
    """One attachment as ADD planned and ran it."""

    model_config = ConfigDict(frozen=True)

    version: int = RECORD_VERSION
    holder: Holder  # the container, this attachment's interface, the netns and the pod
    network: str  # "namespace/name" of a NAD, or a conf's own name
    seq: int  # position among the container's attachments
    is_default: bool
    runtime_ifname: str  # CNI_IFNAME of the ADD (DEL comes for it)
    cni_args: str = ""
    cni_path: tuple[str, ...] = ()
    prepared: PreparedNetwork  # what runs, exactly
    default_route: tuple[str, ...] | None = None  # NPWG default-route gateways asked for
    state: Literal["planned", "added"] = "planned"
    result: Result | None = None
    created_at: float = Field(default_factory=time.time)

    @field_validator("result", mode="wrap")
    @classmethod
    def _readable_result(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Result | None:
        """A recorded result that no longer decodes is dropped, not the whole record: DEL then
        runs without prevResult, as the spec allows, rather than never running."""
        try:
            result: Result | None = handler(value)
        except ValidationError as exc:
            log.error("attachment_result_unreadable", error=str(exc)[:300])
            return None
        return result

    @property
    def key(self) -> AttachmentKey:
        return AttachmentKey(self.holder.container_id, self.network, self.holder.ifname)

    @property
    def container_id(self) -> str:
        return self.holder.container_id

    @property
    def ifname(self) -> str:
        return self.holder.ifname

    @property
    def netns(self) -> str:
        return self.holder.netns

    @property
    def label(self) -> str:
        """How errors and logs name it: `network (ifname)`."""
        return f"{self.network} ({self.ifname})"

    @property
    def file_name(self) -> str:
        return file_name(self.network, self.ifname)

    def view(self) -> dict[str, Any]:
        """The record as plexusctl and the daemon's API show it (flat, result on the wire)."""
        return {
            "version": self.version,
            "container_id": self.container_id,
            "network": self.network,
            "ifname": self.ifname,
            "netns": self.netns,
            "pod_namespace": self.holder.pod_namespace,
            "pod_name": self.holder.pod_name,
            "pod_uid": self.holder.pod_uid,
            "index": self.seq,
            "is_default": self.is_default,
            "runtime_ifname": self.runtime_ifname,
            "cni_args": self.cni_args,
            "cni_path": list(self.cni_path),
            "default_route": list(self.default_route) if self.default_route else None,
            "state": self.state,
            "result": self.result.to_wire(cni.LATEST_VERSION) if self.result else None,
            "prepared": self.prepared.model_dump(mode="json", by_alias=True),
            "created_at": self.created_at,
        }


def file_name(network: str, ifname: str) -> str:
    # The interface name makes it readable; the network's digest makes (network, ifname) the
    # key (a network name holds '/' and may be long).
    digest = hashlib.sha256(network.encode()).hexdigest()[:12]
    return f"{ifname}@{digest}{SUFFIX}"


def _quarantine_name(container_id: str, name: str, suffix: str = "") -> str:
    """`<container>-<record file>-<ns timestamp><suffix>`, within NAME_MAX: a long container ID
    is cut and a digest of it keeps it apart (the file's content names it in full)."""
    if len(container_id) > 64:
        digest = hashlib.sha256(container_id.encode()).hexdigest()[:12]
        container_id = f"{container_id[:48]}~{digest}"
    return f"{container_id}-{name}-{time.time_ns()}{suffix}"


@dataclass(frozen=True, slots=True)
class ContainerRecords:
    container_id: str
    records: tuple[Attachment, ...]
    quarantined: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.records)

    @property
    def runtime_ifname(self) -> str:
        return self.records[0].runtime_ifname if self.records else ""

    @property
    def netns(self) -> str:
        return self.records[0].netns if self.records else ""

    @property
    def created_at(self) -> float:
        return self.records[0].created_at if self.records else 0.0


class AttachmentStore:
    def __init__(self, state_dir: str | Path) -> None:
        self._root = Path(state_dir) / "attachments"
        self._quarantine = Path(state_dir) / "quarantine"
        self._root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._pods: dict[tuple[str, str], set[str]] = {}  # (namespace, name) -> container ids
        self._open()

    def _open(self) -> None:
        """Migrate what an older plexusd wrote, then index every container by its pod. A
        container whose records cannot be read now (an I/O error, a record of a newer plexusd)
        is left as it is and logged: its own DEL reports it (code 5), and the rest of the node
        is served."""
        for container_id in self.container_ids():
            try:
                migrated = store_v1.migrate(self._root / container_id, self._write_migrated)
                loaded = self.load(container_id, quarantine=False)
            except (PlexusError, OSError, ValidationError) as exc:
                log.error("attachment_records_not_opened", container=container_id, error=str(exc))
                continue
            if migrated:
                log.info("attachment_records_migrated", container=container_id, count=migrated)
            if loaded:
                self._index(loaded.records[0])

    def _write_migrated(self, record: dict[str, Any]) -> str:
        attachment = Attachment.model_validate(record)
        self.save(attachment, sync_dir=False)
        return attachment.file_name

    def _dir(self, container_id: str) -> Path:
        if not cni.valid_container_id(container_id):
            raise ValueError(f"unsafe container id {container_id!r}")
        if len(container_id) > cni.MAX_CONTAINER_ID:
            # ADD refuses such an ID, so nothing was recorded under it, but its DEL must find
            # "nothing" rather than fail on a file name too long. A digest (a valid ID itself,
            # and not 64 hex digits as a runtime's would be) keeps the store total.
            digest = hashlib.sha256(container_id.encode()).hexdigest()
            return self._root / f"long-{digest}"
        return self._root / container_id

    # --- writing ------------------------------------------------------------------------------

    def save(self, record: Attachment, *, sync_dir: bool = True, durable: bool = True) -> None:
        """Write one record file. `durable=False`: renamed into place without fsync (the
        caller made it recoverable otherwise: the journal, or a planned record beneath it)."""
        directory = self._container_dir(record.container_id)
        data = record.model_dump_json(by_alias=True, exclude_none=True).encode()
        failpoints.hit("store_record_write_before")
        try:
            if durable:
                atomic_write(directory / record.file_name, data, sync_dir=sync_dir)
            else:
                _replace_file(directory / record.file_name, data)
        except OSError as exc:
            raise IOFailure(f"cannot write attachment record in {directory}: {exc}") from None
        failpoints.hit("store_record_written")
        self._index(record)

    def _container_dir(self, container_id: str, *, sync: bool = True) -> Path:
        """The container's directory, made if missing; its name made durable at once unless
        `sync=False` (the caller fsyncs the root after its own writes)."""
        directory = self._dir(container_id)
        if not directory.exists():
            directory.mkdir(exist_ok=True, mode=0o700)
            if sync:
                fsync_dir(self._root)
        return directory

    def plan(self, records: list[Attachment]) -> None:
        """Durably record every planned attachment (before any delegate runs), with one
        fsync'd write: the journal, then the record files, then one directory fsync."""
        failpoints.hit("store_plan_before")
        if records:
            # The root is fsynced last, after the container's directory: on a journalling
            # filesystem the journal's fsync commits the new directory's name too, so the last
            # fsync finds nothing left to commit (one journal commit fewer per pod).
            directory = self._container_dir(records[0].container_id, sync=False)
            journal = b",".join(
                r.model_dump_json(by_alias=True, exclude_none=True).encode() for r in records
            )
            try:
                atomic_write(directory / JOURNAL, b"[" + journal + b"]", sync_dir=False)
            except OSError as exc:
                raise IOFailure(f"cannot write the plan journal in {directory}: {exc}") from None
            for record in records:
                self.save(record, durable=False)
            fsync_dir(directory)
            fsync_dir(self._root)
        failpoints.hit("store_plan_written")

    def mark_added(self, record: Attachment, result: Result) -> Attachment:
        updated = record.model_copy(update={"state": "added", "result": result})
        failpoints.hit("store_mark_added_before")
        # No fsync: if a power cut tears or loses this write, the planned record (from the file
        # or the journal) stands, and DEL of a planned attachment needs no result.
        self.save(updated, durable=False)
        failpoints.hit("store_mark_added_written")
        return updated

    def remove(self, record: Attachment) -> None:
        failpoints.hit("store_remove_before")
        (self._dir(record.container_id) / record.file_name).unlink(missing_ok=True)
        failpoints.hit("store_removed")

    def discard_planned(self, container_id: str, keep: Collection[AttachmentKey] = ()) -> None:
        """Forget the container's attachments that never ran (an ADD being undone), except
        those in `keep` (their rollback DEL failed: the runtime's DEL retries them), then the
        container itself if nothing else is left."""
        for record in self.load(container_id, quarantine=False).records:
            if record.state == "planned" and record.key not in keep:
                self.remove(record)
        self.remove_container(container_id)

    def quarantine(self, record: Attachment, abandoned: Mapping[str, Any]) -> str:
        """Set aside the record of an attachment given up (its DEL cannot succeed and none
        will follow): written to the quarantine dir as `{"abandoned": <why and what was
        released>, "record": <the record as it was>}`, then removed from the container. Both
        steps are durable; a crash between them leaves the record in place, so the next DEL or
        GC gives it up again. Returns the quarantine file's path."""
        target = self._quarantine / _quarantine_name(
            record.container_id, record.file_name, ".abandoned"
        )
        body = {
            "abandoned": dict(abandoned),
            "record": record.model_dump(mode="json", by_alias=True, exclude_none=True),
        }
        try:
            self._quarantine.mkdir(exist_ok=True, mode=0o700)
            atomic_write(target, json.dumps(body, indent=1).encode())
            durable_unlink(self._dir(record.container_id) / record.file_name)
        except OSError as exc:
            raise IOFailure(f"cannot quarantine attachment record {record.label}: {exc}") from None
        return str(target)

    def remove_container(self, container_id: str) -> None:
        directory = self._dir(container_id)
        if not directory.exists():
            return
        failpoints.hit("store_remove_container_before")
        for leftover in directory.iterdir():
            if leftover.name.startswith("."):
                leftover.unlink(missing_ok=True)  # temp files of an interrupted write
        try:
            directory.rmdir()
        except OSError:
            return  # records remain (a failed DEL keeps them for the retry)
        fsync_dir(self._root)
        failpoints.hit("store_container_removed")
        with self._lock:
            for pod, holders in list(self._pods.items()):
                holders.discard(container_id)
                if not holders:
                    del self._pods[pod]

    def _index(self, record: Attachment) -> None:
        if not record.holder.pod_name:
            return
        pod = (record.holder.pod_namespace, record.holder.pod_name)
        with self._lock:
            self._pods.setdefault(pod, set()).add(record.container_id)

    # --- reading ------------------------------------------------------------------------------

    def get(self, key: AttachmentKey) -> Attachment | None:
        """One attachment's record as it is on disk now (None when it is gone)."""
        path = self._dir(key.container_id) / file_name(key.network, key.ifname)
        try:
            record = self._read(path)
        except FileNotFoundError:
            return None
        return record if record is not None else self._journal(path.parent).get(path.name)

    def load(self, container_id: str, *, quarantine: bool = True) -> ContainerRecords:
        """The container's records in ADD order. An undecodable record is moved to quarantine
        (only callers holding the container's lock may do that; read-only views pass
        quarantine=False). An I/O error raises IOFailure (code 5): the record may be fine, and
        DEL must be retried rather than succeed without it."""
        directory = self._dir(container_id)
        records: list[Attachment] = []
        quarantined: list[str] = []
        try:
            paths = sorted(directory.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return ContainerRecords(container_id, ())
        journal: dict[str, Attachment] | None = None
        for path in paths:
            if path.name.startswith(".") or path.suffix not in (SUFFIX, ".json"):
                continue  # a temp file of an interrupted write, the journal, or nothing of ours
            # (a `.json` left here is a version-1 record the migration could not read)
            try:
                record = self._read(path)
            except FileNotFoundError:
                continue  # removed by a concurrent DEL: gone, not corrupt
            if record is None:
                journal = self._journal(directory) if journal is None else journal
                record = journal.get(path.name)
                if record is not None:
                    log.warning("attachment_record_from_journal", path=str(path))
            if record is not None:
                records.append(record)
            elif quarantine:
                quarantined.append(self._move_to_quarantine(path))
        records.sort(key=lambda r: r.seq)
        return ContainerRecords(container_id, tuple(records), tuple(quarantined))

    def _journal(self, directory: Path) -> dict[str, Attachment]:
        """The container's planned records as ADD journaled them, by file name ({} when there
        is no journal, or it cannot be read: the record files are then all there is)."""
        try:
            entries = json.loads((directory / JOURNAL).read_bytes())
            planned = [Attachment.model_validate(entry) for entry in entries]
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError) as exc:  # ValidationError is a ValueError
            log.error("attachment_journal_unreadable", path=str(directory), error=str(exc)[:300])
            return {}
        return {record.file_name: record for record in planned}

    def _read(self, path: Path) -> Attachment | None:
        """The record, or None when its content cannot be decoded."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise IOFailure(f"cannot read attachment record {path}: {exc.strerror}") from None
        try:
            record = Attachment.model_validate_json(data)
        except (ValidationError, ValueError) as exc:
            record, error = None, exc
        version = record.version if record is not None else store_v1.version_of(data)
        if version is not None and version > RECORD_VERSION:
            # Written by a newer plexusd: leave it be, and refuse to guess what it means.
            raise IOFailure(
                f"attachment record {path} has version {version}; this plexusd reads up to "
                f"{RECORD_VERSION}: run the newer plexusd (or roll it forward) to DEL it",
            )
        if record is None:
            log.error("attachment_record_unreadable", path=str(path), error=str(error)[:300])
        return record

    def _move_to_quarantine(self, path: Path) -> str:
        self._quarantine.mkdir(exist_ok=True, mode=0o700)
        target = self._quarantine / _quarantine_name(path.parent.name, path.name)
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

    def of_pod(self, namespace: str, name: str) -> list[ContainerRecords]:
        """Every container of the pod that still has records (a read-only view), oldest first:
        one per sandbox the runtime made for it."""
        with self._lock:
            containers = sorted(self._pods.get((namespace, name), set()))
        found = [self.load(cid, quarantine=False) for cid in containers]
        return sorted((c for c in found if c), key=lambda c: c.created_at)

    def quarantined(self) -> list[str]:
        if not self._quarantine.is_dir():
            return []
        return sorted(str(p) for p in self._quarantine.iterdir())


def _replace_file(path: Path, data: bytes) -> None:
    """Replace `path` atomically (temp file + rename) without fsync: a crash of the process
    leaves the old or the new file; only a power cut can leave it torn (see the module doc)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
