"""Admission and ordering of daemon work.

One operation per container at a time (the CNI spec forbids parallel operations on a container,
and the store relies on it); different containers run concurrently up to `max_concurrent`; at
most `max_queue` more may wait, and anything beyond that is refused at once with CNI code 11
instead of piling up threads and memory (Multus's OOM under bursts, anchors §6 row 6).

GC's delegate phase must not overlap any ADD or DEL (a plugin told which attachments are valid
must not see one being made meanwhile): container work holds a shared gate, GC takes it
exclusively. Lock order is always worker slot, gate, container lock, so nothing can deadlock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

from cnispec.errors import TryAgainLater


class _Gate:
    """Many holders of `shared`, or one of `exclusive`; a waiting exclusive holder goes first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


@dataclass
class _ContainerLock:
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0


class Scheduler:
    def __init__(self, *, max_concurrent: int, max_queue: int) -> None:
        self._limit = max_concurrent + max_queue
        self._workers = threading.BoundedSemaphore(max_concurrent)
        self._lock = threading.Lock()
        self._admitted = 0
        self._containers: dict[str, _ContainerLock] = {}
        self._gate = _Gate()

    @property
    def admitted(self) -> int:
        return self._admitted

    @contextmanager
    def slot(self, container_id: str) -> Iterator[None]:
        """Admit one request, then run it with a worker slot and its container's lock."""
        with self._lock:
            if self._admitted >= self._limit:
                raise TryAgainLater(
                    f"plexusd is saturated ({self._admitted} requests in progress or queued); "
                    "the runtime should retry",
                )
            self._admitted += 1
        try:
            with self._workers:
                if container_id:
                    with self.container(container_id):
                        yield
                else:
                    yield  # GC, STATUS: take what they need themselves
        finally:
            with self._lock:
                self._admitted -= 1

    @contextmanager
    def container(self, container_id: str) -> Iterator[None]:
        """Work on one container's attachments (without a worker slot: spool replay, GC)."""
        with self._gate.shared(), self._container_lock(container_id):
            yield

    def exclusive(self) -> AbstractContextManager[None]:
        """No container work at all meanwhile (GC's delegate phase)."""
        return self._gate.exclusive()

    @contextmanager
    def _container_lock(self, container_id: str) -> Iterator[None]:
        with self._lock:
            entry = self._containers.setdefault(container_id, _ContainerLock())
            entry.users += 1
        try:
            with entry.lock:
                yield
        finally:
            with self._lock:
                entry.users -= 1
                if entry.users == 0:
                    del self._containers[container_id]
