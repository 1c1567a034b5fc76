"""Requests in flight, their deadlines, and whether the daemon still completes work.

Every CNI request runs on its own thread with a deadline (the shim's timeout minus a margin, so
the daemon answers before the shim gives up). The connection waits for the answer only until the
deadline, on the transport's event loop (`Job.when_done`: no second thread per request just to
wait); past it the client gets code 11 and the work goes on to its end in the background (its
locks are released when it really finishes: another operation on the same container must not
start while one is still changing it). A request still running well past its deadline (twice
it) means requests have stopped completing: liveness, readiness and CNI STATUS say so, so the
DaemonSet's probe restarts a wedged daemon instead of reporting it green.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger(__name__)


@dataclass(eq=False)
class Job:
    """One request: what it is, when it must answer, and its answer once it has one."""

    command: str
    container_id: str
    timeout: float
    started: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    answer: tuple[int, bytes] | None = None
    overdue: bool = False  # the client was already told code 11
    version: str = ""  # the CNI version the request was made in (its error JSON's)
    _callbacks: list[Callable[[], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def complete(self) -> None:
        """The work has ended and `answer` is final: wake whoever waits for it."""
        with self._lock:
            self.done.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def when_done(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from the worker's thread) once the job is done; at once if it is.
        The transport's event loop waits this way, without a thread per waiting request."""
        with self._lock:
            if not self.done.is_set():
                self._callbacks.append(callback)
                return
        callback()

    @property
    def deadline(self) -> float:
        return self.started + self.timeout

    def age(self, now: float) -> float:
        return now - self.started

    def describe(self, now: float) -> str:
        what = self.command + (f" for container {self.container_id}" if self.container_id else "")
        return f"{what} has run {self.age(now):.0f} s (deadline {self.timeout:.0f} s)"


class Watchdog:
    def __init__(self, *, stuck_factor: float = 2.0) -> None:
        self._lock = threading.Lock()
        self._jobs: set[Job] = set()
        self._stuck_factor = stuck_factor

    @contextmanager
    def track(self, job: Job) -> Iterator[Job]:
        with self._lock:
            self._jobs.add(job)
        try:
            yield job
        finally:
            with self._lock:
                self._jobs.discard(job)
            if job.overdue:
                log.warning(
                    "request_finished_after_deadline",
                    command=job.command,
                    container_id=job.container_id or None,
                    seconds=round(job.age(time.monotonic()), 1),
                    status=job.answer[0] if job.answer else None,
                )

    def in_flight(self) -> int:
        with self._lock:
            return len(self._jobs)

    def stuck(self) -> str | None:
        """Why the daemon no longer completes requests, or None while it does."""
        now = time.monotonic()
        with self._lock:
            late = [j for j in self._jobs if j.age(now) > j.timeout * self._stuck_factor]
        if not late:
            return None
        oldest = max(late, key=lambda j: j.age(now))
        return f"{len(late)} request(s) stopped completing; the oldest: {oldest.describe(now)}"
