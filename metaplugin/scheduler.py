"""Admission and ordering of daemon work.

One operation per container at a time (the CNI spec forbids parallel operations on a container,
and the store relies on it); different containers run concurrently up to `max_concurrent`; at
most `max_queue` more may wait, and anything beyond that is refused at once with CNI code 11
instead of piling up threads and memory (Multus's OOM under bursts, anchors §6 row 6).

GC's delegate phase must not overlap any ADD or DEL (a plugin told which attachments are valid
must not see one being made meanwhile): container work holds a shared gate, GC takes it
exclusively. Lock order is always worker slot, gate, container lock, so nothing can deadlock.

Every wait is bounded by the request's deadline (`request_deadline`, set by the server for the
thread that runs the request): a request that cannot get what it waits for in time answers
code 11 naming what held it, instead of hanging its client and everything queued behind it.
Work without a request (spool replay at start-up) has no deadline and may wait.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from cnispec.errors import TryAgainLater

# The monotonic time by which the current request must have answered; None: no deadline.
request_deadline: ContextVar[float | None] = ContextVar("request_deadline", default=None)


def _remaining() -> float | None:
    deadline = request_deadline.get()
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def _timed_out(what: str) -> TryAgainLater:
    return TryAgainLater(
        f"plexusd could not start this request before its deadline: {what}; the runtime "
        "should retry",
    )


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
            if not self._cond.wait_for(
                lambda: not (self._exclusive or self._waiting), timeout=_remaining()
            ):
                raise _timed_out("a garbage collection held every container")
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
            try:
                done = self._cond.wait_for(
                    lambda: not (self._exclusive or self._shared), timeout=_remaining()
                )
            finally:
                self._waiting -= 1
                # A waiting exclusive holder blocks new shared ones: wake them if it gives up.
                self._cond.notify_all()
            if not done:
                raise _timed_out(f"{self._shared} container operations still running")
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
    since: float = 0.0  # when the current holder got it (monotonic), for the refusal message


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
    def admission(self) -> Iterator[None]:
        """Count one request in, before anything of it is read: refused at once when full."""
        with self._lock:
            if self._admitted >= self._limit:
                raise TryAgainLater(
                    f"plexusd is saturated ({self._admitted} requests in progress or queued); "
                    "the runtime should retry",
                )
            self._admitted += 1
        try:
            yield
        finally:
            with self._lock:
                self._admitted -= 1

    @contextmanager
    def worker(self, container_id: str) -> Iterator[None]:
        """Run admitted work with a worker slot and, when it names one, its container's lock."""
        if not self._workers.acquire(timeout=_remaining()):
            raise _timed_out("every worker stayed busy")
        try:
            if container_id:
                with self.container(container_id):
                    yield
            else:
                yield  # GC, STATUS: take what they need themselves
        finally:
            self._workers.release()

    @contextmanager
    def slot(self, container_id: str) -> Iterator[None]:
        """Admit one request, then run it with a worker slot and its container's lock."""
        with self.admission(), self.worker(container_id):
            yield

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
            if not entry.lock.acquire(timeout=-1 if (left := _remaining()) is None else left):
                held = time.monotonic() - entry.since
                raise _timed_out(
                    f"another operation on container {container_id} has run for {held:.0f} s"
                )
            try:
                entry.since = time.monotonic()
                yield
            finally:
                entry.lock.release()
        finally:
            with self._lock:
                entry.users -= 1
                if entry.users == 0:
                    del self._containers[container_id]
