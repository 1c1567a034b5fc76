"""Admission and ordering of daemon work.

One operation per container at a time (the CNI spec forbids parallel operations on a container,
and the store relies on it); different containers run concurrently up to `max_concurrent`; at
most `max_queue` more may wait, and anything beyond that is refused at once with CNI code 11
instead of piling up threads and memory (Multus's OOM under bursts, anchors §6 row 6).

Lock order is always worker slot, then container lock, so GC (which already holds a slot when it
locks a stale container) cannot deadlock against a request.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from metaplugin.errors import TryAgainLater


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
                    with self.container_lock(container_id):
                        yield
                else:
                    yield
        finally:
            with self._lock:
                self._admitted -= 1

    @contextmanager
    def container_lock(self, container_id: str) -> Iterator[None]:
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
