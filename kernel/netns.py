"""Work inside a network namespace without moving any shared thread.

`run_in_netns(path, fn)` runs `fn` on a worker thread of a small pool kept for nothing else: it
calls setns(2) into the namespace, runs `fn`, and goes back to the process's own namespace
before it serves anyone again (the reference plugins' `ns.Do`), so the daemon's request threads
never change namespace. A worker that cannot go back exits instead of being reused. Netlink work
goes through `Netlink.open(netns)`, which only makes its socket here; this is for the few things
that need a thread in the namespace (interface-name lookups, packet sockets, per-netns procfs).
NOTE: a thread per call, as before, cost a thread start (~0.3-1 ms with the GIL contended) about
eight times per pod ADD; a pooled worker costs a queue handoff. `temporary_netns()` makes a private
namespace held by an fd (the staging area for renaming a physical link out of sight), and
`netns_fd()` opens one to hand to the kernel (IFLA_NET_NS_FD).
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cnispec.errors import PlexusError
from kernel import libc

T = TypeVar("T")


# NOTE: O_NONBLOCK because a namespace path comes from the runtime (CNI_NETNS): one naming a
# FIFO would block open() for ever and pin the worker and its container's lock. A namespace file
# ignores the flag; anything else then fails setns(2) with EINVAL, as it should.
NETNS_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK


_MAX_IDLE = 8  # workers kept for the next call; a burst may use more, which then exit


class _Worker:
    """One pooled thread: takes a job, enters its namespace, runs it, comes home."""

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self.jobs: queue.SimpleQueue[tuple[str, Callable[[], Any], _Box] | None] = (
            queue.SimpleQueue()
        )
        thread = threading.Thread(target=self._loop, name="netns-worker", daemon=True)
        thread.start()

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            path, fn, box = job
            home = True
            try:
                fd = os.open(path, NETNS_OPEN_FLAGS)
                try:
                    libc.setns(fd)
                finally:
                    os.close(fd)
                box.value = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller thread
                box.error = exc
            finally:
                home = self._pool.go_home()
                box.done.set()
            if not (home and self._pool.put_back(self)):
                return  # a thread that cannot leave a pod's namespace is never reused


@dataclass(slots=True)
class _Box:
    done: threading.Event = field(default_factory=threading.Event)
    value: Any = None
    error: BaseException | None = None


class _Pool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._home: int | None = None

    def _home_fd(self) -> int:
        # The thread group leader's namespace: the process's own, which a pooled worker
        # returns to (never a namespace it happened to be started from, which it would pin).
        with self._lock:
            if self._home is None:
                self._home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            return self._home

    def go_home(self) -> bool:
        try:
            libc.setns(self._home_fd())
        except OSError:
            return False
        return True

    def put_back(self, worker: _Worker) -> bool:
        with self._lock:
            if len(self._idle) >= _MAX_IDLE:
                return False
            self._idle.append(worker)
            return True

    def run(self, path: str, fn: Callable[[], T]) -> T:
        self._home_fd()
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            worker = _Worker(self)
        box = _Box()
        worker.jobs.put((path, fn, box))
        box.done.wait()
        if box.error is not None:
            raise box.error
        return box.value  # type: ignore[no-any-return]


_POOL = _Pool()


def run_in_netns(path: str, fn: Callable[[], T]) -> T:
    """Run `fn()` in the network namespace at `path` on a pooled worker thread."""
    return _POOL.run(path, fn)


def existing_interfaces(netns: str, names: list[str]) -> list[str]:
    """Which of `names` exist in the namespace at `netns` (one trip into it for all)."""

    def probe() -> list[str]:
        found = []
        for name in names:
            try:
                socket.if_nametoindex(name)
            except OSError:
                continue
            found.append(name)
        return found

    return run_in_netns(netns, probe)


def current_netns_inode() -> int:
    return os.stat(f"/proc/self/task/{threading.get_native_id()}/ns/net").st_ino


@dataclass(frozen=True, slots=True)
class HeldNetns:
    """A network namespace kept alive by an open fd (it has no task and no bind mount)."""

    fd: int

    @property
    def path(self) -> str:
        # A path any thread of ours can open to enter the namespace held by `fd`.
        return f"/proc/{os.getpid()}/fd/{self.fd}"


def _fresh_netns_fd() -> int:
    """On a throw-away thread: unshare a new network namespace and keep an fd on it (the
    namespace lives as long as the fd; the thread, the only task in it, then exits)."""
    fds: list[int] = []
    errors: list[OSError] = []

    def worker() -> None:
        try:
            libc.unshare_netns()
            fds.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
        except OSError as exc:
            errors.append(exc)

    thread = threading.Thread(target=worker, name="tmp-netns", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise PlexusError(f"cannot make a temporary network namespace: {errors[0]}")
    return fds[0]


@contextmanager
def temporary_netns() -> Iterator[HeldNetns]:
    """A new, empty network namespace for the duration of the block. NOTE: a physical netdev
    left in it goes back to the initial namespace when it dies; a veth would be destroyed, so
    callers move everything out first."""
    fd = _fresh_netns_fd()
    try:
        yield HeldNetns(fd)
    finally:
        os.close(fd)


@contextmanager
def netns_fd(path: str | None) -> Iterator[int]:
    """An fd on the namespace at `path`, or on the calling thread's own (the node's)."""
    try:
        fd = os.open(path or "/proc/thread-self/ns/net", NETNS_OPEN_FLAGS)
    except OSError as exc:
        raise PlexusError(f"network namespace {path or 'of the node'}: {exc.strerror}") from None
    try:
        yield fd
    finally:
        os.close(fd)
