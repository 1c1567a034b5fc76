"""Change notices for directories, from inotify(7): what changed is named, so a reader re-reads
only that, instead of listing and stat()ing a whole directory per lookup.

One inotify instance serves the whole process (each instance counts against the node's
`fs.inotify.max_user_instances`, 128 by default, shared with containerd, systemd and the rest).
Its thread waits for events and hands them to the listeners of the directory they concern, then
lets those listeners settle, off the request path. A reader that must see a change made an instant
ago calls `drain()` first: the kernel queues an event before the writer's close() or rename()
returns, so whatever was written before the request is in the queue by then.

Notices are hints, never the data: a listener re-reads the files named (or, on a queue overflow,
stat()s them all; every `SAFETY_RESCAN` seconds it audits them, for what inotify cannot see), so
events read out of order or twice do no harm.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import struct
import threading
import time
import weakref
from typing import Final, Protocol

import structlog

log = structlog.get_logger(__name__)

IN_ATTRIB: Final = 0x00000004
IN_CLOSE_WRITE: Final = 0x00000008
IN_MOVED_FROM: Final = 0x00000040
IN_MOVED_TO: Final = 0x00000080
IN_CREATE: Final = 0x00000100
IN_DELETE: Final = 0x00000200
IN_DELETE_SELF: Final = 0x00000400
IN_MOVE_SELF: Final = 0x00000800
IN_Q_OVERFLOW: Final = 0x00004000
IN_IGNORED: Final = 0x00008000
IN_ONLYDIR: Final = 0x01000000
IN_NONBLOCK: Final = os.O_NONBLOCK
IN_CLOEXEC: Final = os.O_CLOEXEC

# NOTE: not IN_MODIFY: a file is read once its writer closed it (or renamed it into place), never
# half-written; a writer that keeps a file open is caught by the safety rescan.
_MASK: Final = (
    IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
)
_EVENT: Final = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name
_READ_SIZE: Final = 64 * 1024
SAFETY_RESCAN: Final = 60.0  # what inotify cannot see (a writer that never closes, NFS)


class Listener(Protocol):
    def notice(self, names: set[str], *, rescan: bool, lost: bool) -> None:
        """Called with the watcher's lock held: record what changed, nothing more."""

    def settle(self) -> None:
        """Called from the watcher's thread after a notice: apply what was recorded."""

    def audit(self) -> None:
        """Called from the watcher's thread every `SAFETY_RESCAN` seconds: look for changes
        that no event reported."""


class DirWatcher:
    def __init__(self) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._fd = fd
        self._lock = threading.Lock()
        self._listeners: dict[int, weakref.WeakSet[Listener]] = {}
        self._thread = threading.Thread(target=self._run, name="nad-dirwatch", daemon=True)
        self._thread.start()

    def watch(self, path: str, listener: Listener) -> int:
        """Watch directory `path` for `listener`; OSError when it cannot be (no such directory,
        out of watches)."""
        with self._lock:
            wd = self._libc.inotify_add_watch(self._fd, os.fsencode(path), _MASK)
            if wd < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
            # The same directory watched twice answers the same descriptor: share it.
            self._listeners.setdefault(wd, weakref.WeakSet()).add(listener)
            return int(wd)

    def drain(self) -> None:
        """Hand every queued event to its listeners now (returns at once when there is none)."""
        touched: set[Listener] = set()
        with self._lock:
            self._read_into(touched)

    def _read_into(self, touched: set[Listener]) -> None:
        while True:
            try:
                data = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            self._dispatch(data, touched)

    def _dispatch(self, data: bytes, touched: set[Listener]) -> None:
        per: dict[int, tuple[set[str], bool, bool]] = {}
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            raw = data[offset + _EVENT.size : offset + _EVENT.size + length]
            offset += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:  # events were lost: every listener looks at everything
                for key in self._listeners:
                    names, _, lost = per.get(key, (set(), False, False))
                    per[key] = (names, True, lost)
                continue
            names, rescan, lost = per.get(wd, (set(), False, False))
            if raw:
                names.add(os.fsdecode(raw.rstrip(b"\0")))
            if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
                lost = rescan = True
            per[wd] = (names, rescan, lost)
        for wd, (names, rescan, lost) in per.items():
            listeners = list(self._listeners.get(wd, ()))
            if lost:
                self._forget(wd)
            for listener in listeners:
                listener.notice(names, rescan=rescan, lost=lost)
                touched.add(listener)

    def _forget(self, wd: int) -> None:
        """The directory went away or was replaced: its watch is gone (listeners watch anew)."""
        self._listeners.pop(wd, None)

    def _prune(self) -> None:
        """Give back the watches nobody listens to any more."""
        with self._lock:
            for wd in [wd for wd, listeners in self._listeners.items() if not listeners]:
                del self._listeners[wd]
                self._libc.inotify_rm_watch(self._fd, wd)

    def _run(self) -> None:
        next_audit = time.monotonic() + SAFETY_RESCAN
        poller = select.poll()  # not select(): no limit on the descriptor's number
        poller.register(self._fd, select.POLLIN)
        while True:
            try:
                ready = poller.poll(1000)
                touched: set[Listener] = set()
                audited: list[Listener] = []
                with self._lock:
                    if ready:
                        self._read_into(touched)
                    if time.monotonic() >= next_audit:
                        next_audit = time.monotonic() + SAFETY_RESCAN
                        audited = [x for listeners in self._listeners.values() for x in listeners]
                self._prune()
                for listener in touched:  # outside the lock: a listener re-reads files
                    listener.settle()
                for listener in audited:
                    listener.audit()
                del touched, audited
            except Exception:  # the watcher must outlive any one failure
                log.exception("dirwatch_failed")
                threading.Event().wait(1.0)


_shared: dict[str, DirWatcher | None] = {}  # "watcher" -> it, or None once inotify failed
_shared_lock = threading.Lock()


def shared() -> DirWatcher | None:
    """The process's watcher; None when inotify cannot be had (callers then poll)."""
    with _shared_lock:
        if "watcher" not in _shared:
            try:
                _shared["watcher"] = DirWatcher()
            except (OSError, AttributeError) as exc:  # AttributeError: a libc without inotify
                _shared["watcher"] = None
                log.warning("inotify_unavailable_polling", error=str(exc))
        return _shared["watcher"]
