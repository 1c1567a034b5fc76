"""host-local's on-disk reservation store, kept byte-compatible with the reference binary.

The point of this module is that Plexus and containernetworking/plugins' `host-local` can share
one dataDir. Layout of `<dataDir>/<network>/` (checked against plugins 1.1.1):

- one file per reserved address, named after the address as Go's `net.IP.String()` prints it
  (Python's `str()` prints the same), mode 0644, holding `<containerID>\\r\\n<ifname>` with no
  trailing newline. Older reference versions wrote the container ID alone; such files are still
  matched (by container ID only) on release, lookup and GC.
- `last_reserved_ip.<range set index>`: the address most recently reserved in that range set, no
  newline; allocation resumes after it (round-robin).
- `lock`: an empty file (the reference creates it 0750) that every process `flock(LOCK_EX)`s around
  each read-modify-write. The reference's go-filemutex takes the same flock, so Plexus and the
  binary exclude each other; flock locks belong to the open file description, so each call here
  opens its own descriptor and threads of one process exclude each other too (they first queue
  on an in-process mutex per directory, so only another process is ever waited for by polling).

Writes are atomic, not fsynced, as in the reference: a reservation is written to a temporary
file and hard-linked into place (link() fails if the name exists, so it is as exclusive as the
reference's O_EXCL, and no reader ever sees a half-written file); `last_reserved_ip.N` is
replaced by rename. No fsync, because the only failure it would guard against, a power cut or a
kernel crash, also ends every pod whose lease it would keep, and Plexus's own record of the
attachment is already durable (the orchestrator fsyncs its plan before any delegate runs): the
DEL that follows a reboot releases by container ID whatever lease did or did not reach the disk.
What a power cut can leave is what it leaves the reference binary: a lease file without content,
which the CNI GC verb removes (it holds no live attachment). A SIGKILL loses nothing (the page
cache survives the process). Dropping the fsyncs (a data and a directory fsync per reservation,
a directory fsync per release) cut about 3 ms of a three-attachment pod's ADD here, and the stalls
their journal commits caused to every other file operation. Temporary files are only ever created
under the lock, so one found by a later lock holder is left over from a crash and is removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol

from cnispec import failpoints
from cnispec.errors import IOFailure, TryAgainLater
from delegates.ipam._ranges import IPAddress

LOCK_FILE: Final = "lock"
LAST_RESERVED_PREFIX: Final = "last_reserved_ip."
LINE_BREAK: Final = "\r\n"
# How long a call waits for another holder (Plexus or the Go binary) before answering "try again".
LOCK_TIMEOUT: Final = 30.0
_TMP_PREFIX: Final = ".plexus-tmp-"
_MAX_LEASE: Final = 64 * 1024  # a lease is a container ID and an interface name
# link() is not offered everywhere (some FUSE and network filesystems); fall back to O_EXCL.
_NO_LINK: Final = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS)


@dataclass(frozen=True, slots=True)
class Owner:
    """Who holds a reservation. `ifname` is None for the legacy container-ID-only format."""

    container_id: str
    ifname: str | None

    @classmethod
    def parse(cls, data: bytes) -> Owner:
        # The reference compares TrimSpace(content); strip the same way before splitting.
        cid, sep, ifname = data.decode(errors="replace").strip().partition(LINE_BREAK)
        return cls(cid, ifname if sep else None)

    def is_exactly(self, container_id: str, ifname: str) -> bool:
        return self.container_id == container_id.strip() and self.ifname == ifname

    def is_legacy_of(self, container_id: str) -> bool:
        return self.ifname is None and self.container_id == container_id.strip()


class ReservationStore(Protocol):
    """What the host-local allocator needs from a store, always called with the lock held."""

    def reservations(self) -> dict[IPAddress, Owner]: ...

    def find(self, container_id: str, ifname: str) -> list[IPAddress]: ...

    def reserve(self, ip: IPAddress, container_id: str, ifname: str, range_id: int) -> bool: ...

    def last_reserved(self, range_id: int) -> IPAddress | None: ...

    def release(self, ips: Iterable[IPAddress]) -> None: ...


class DiskStore:
    """One network's directory, exclusively locked for the life of the `with` block."""

    def __init__(self, directory: Path, *, lock_timeout: float = LOCK_TIMEOUT) -> None:
        self.directory = directory
        self._timeout = lock_timeout
        self._lock_fd = -1
        self._mutex = _mutex_of(directory)

    def __enter__(self) -> DiskStore:
        # Threads of this process queue on a mutex first and are woken the moment it is free;
        # the flock then only ever waits for another process (the reference binary). Before,
        # every thread polled the flock with a backoff up to 20 ms: in a burst of pods on one
        # network a waiter slept on long after the lock was free.
        if not self._mutex.acquire(timeout=self._timeout):
            raise _busy(self.directory / LOCK_FILE, self._timeout)
        try:
            self._open_and_lock()
        except BaseException:
            self._mutex.release()
            raise
        return self

    def _open_and_lock(self) -> None:
        try:
            self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            flags = os.O_CREAT | os.O_RDONLY | os.O_CLOEXEC
            self._lock_fd = os.open(self.directory / LOCK_FILE, flags, 0o750)
        except OSError as exc:
            raise IOFailure(
                f"host-local: cannot open {self.directory / LOCK_FILE}: {exc}"
            ) from None
        try:
            _flock(self._lock_fd, self._timeout, self.directory / LOCK_FILE)
        except BaseException:
            os.close(self._lock_fd)
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            os.close(self._lock_fd)  # closing the last descriptor drops the flock
        finally:
            self._mutex.release()

    # --- reads ---------------------------------------------------------------------------------

    def reservations(self) -> dict[IPAddress, Owner]:
        out: dict[IPAddress, Owner] = {}
        for name, content in self._leases():
            ip = _ip_named(name)
            if ip is not None:
                out[ip] = Owner.parse(content)
        return out

    def _leases(self) -> Iterator[tuple[str, bytes]]:
        """(file name, content) of every file that may be a lease; temp files left by a crash
        are removed on the way (see module doc). os-level calls: every ADD and DEL reads every
        lease of the network (as the reference does), 110 of them per network on a full node."""
        try:
            entries = list(os.scandir(self.directory))
        except OSError as exc:
            raise IOFailure(f"host-local: cannot list {self.directory}: {exc}") from None
        for entry in entries:
            name = entry.name
            if name.startswith(_TMP_PREFIX):
                with contextlib.suppress(OSError):
                    self._remove(Path(entry.path))
                continue
            if name == LOCK_FILE or name.startswith(LAST_RESERVED_PREFIX):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue  # vanished or unreadable: as the reference
            try:
                content = os.read(fd, _MAX_LEASE)
            except OSError:
                continue
            finally:
                os.close(fd)
            yield name, content

    def find(self, container_id: str, ifname: str) -> list[IPAddress]:
        """Addresses held by (container, ifname); if none, those of a legacy container-ID-only
        reservation of this container (the reference's fallback order)."""
        wanted = container_id.strip().encode()
        exact, legacy = [], []
        for name, content in self._leases():
            if wanted not in content:
                continue  # most leases: someone else's, known without decoding them
            ip = _ip_named(name)
            if ip is None:
                continue
            owner = Owner.parse(content)
            if owner.is_exactly(container_id, ifname):
                exact.append(ip)
            elif owner.is_legacy_of(container_id):
                legacy.append(ip)
        return exact or legacy

    def last_reserved(self, range_id: int) -> IPAddress | None:
        try:
            text = (self.directory / f"{LAST_RESERVED_PREFIX}{range_id}").read_text()
        except (OSError, UnicodeDecodeError):
            return None  # lost round-robin position is not critical (as the reference)
        return _ip_named(text.strip())

    # --- writes --------------------------------------------------------------------------------

    def reserve(self, ip: IPAddress, container_id: str, ifname: str, range_id: int) -> bool:
        """Reserve `ip` unless someone holds it; False when taken."""
        path = self.directory / str(ip)
        if os.path.lexists(path):
            return False
        content = f"{container_id.strip()}{LINE_BREAK}{ifname}".encode()
        failpoints.hit("hostlocal_lease_write_before")
        try:
            if not self._create_exclusive(path, content):
                return False
        except OSError as exc:
            raise IOFailure(f"host-local: cannot write reservation {path}: {exc}") from None
        failpoints.hit("hostlocal_lease_written")
        last = self.directory / f"{LAST_RESERVED_PREFIX}{range_id}"
        try:
            self._replace(last, str(ip).encode())
        except OSError as exc:
            self._remove(path)
            raise IOFailure(f"host-local: cannot write {last}: {exc}") from None
        return True

    def release(self, ips: Iterable[IPAddress]) -> None:
        failures = []
        for ip in ips:
            failpoints.hit("hostlocal_release_before")
            try:
                self._remove(self.directory / str(ip))
            except OSError as exc:
                failures.append(f"{ip}: {exc.strerror}")
            failpoints.hit("hostlocal_released")
        if failures:
            raise IOFailure(
                f"host-local: could not release {', '.join(failures)} in {self.directory}"
            )

    def _create_exclusive(self, path: Path, content: bytes) -> bool:
        tmp = self._write_tmp(content)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
            return self._create_in_place(path, content)
        finally:
            self._remove(tmp)
        return True

    def _create_in_place(self, path: Path, content: bytes) -> bool:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return False
        try:
            _write_all(fd, content)
        except OSError:
            self._remove(path)
            raise
        finally:
            os.close(fd)
        return True

    def _replace(self, path: Path, content: bytes) -> None:
        tmp = self._write_tmp(content)
        try:
            os.replace(tmp, path)
        except OSError:
            self._remove(tmp)
            raise

    def _write_tmp(self, content: bytes) -> Path:
        tmp = self.directory / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, content)
        except OSError:
            os.close(fd)
            self._remove(tmp)
            raise
        os.close(fd)
        return tmp

    def _remove(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _write_all(fd: int, content: bytes) -> None:
    view = memoryview(content)
    while view:
        view = view[os.write(fd, view) :]


_MUTEXES: dict[str, threading.Lock] = {}
_MUTEXES_LOCK = threading.Lock()


def _mutex_of(directory: Path) -> threading.Lock:
    """The in-process lock of one network's directory (one per network: a bounded set)."""
    with _MUTEXES_LOCK:
        return _MUTEXES.setdefault(str(directory), threading.Lock())


def _busy(path: Path, timeout: float) -> TryAgainLater:
    return TryAgainLater(
        f"host-local: {path} has been locked by another process for {timeout:.0f}s; "
        "retry, and if it persists find the holder with `fuser -v` on that file"
    )


def _flock(fd: int, timeout: float, path: Path) -> None:
    """Exclusive flock with a deadline: a blocking flock cannot be interrupted, and a daemon
    thread stuck behind a wedged holder forever is worse than a retried ADD."""
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if time.monotonic() >= deadline:
            raise _busy(path, timeout)
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def _ip_named(name: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None
