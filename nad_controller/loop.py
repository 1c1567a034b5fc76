"""The leader's reconcile loop, shared by the controller's reconcilers (VF pools and NADs:
`reconciler.Reconciler`; multicast membership: `multicast.MembershipReconciler`).

One thread per reconciler. An informer's change marks the world dirty (`notify`); the loop
coalesces a burst (`debounce`), or waits out a failed write's backoff, then runs one
`reconcile_all` — only while this replica leads; a resync every `resync` seconds converges even
if an event was lost. A pass that raises is logged and retried: the loop survives a bad object
or a bug.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class LeaderLoop:
    def __init__(self, *, name: str, debounce: float, resync: float, failure_event: str) -> None:
        self.debounce, self.resync = debounce, resync
        self._failure_event = failure_event
        self._dirty = threading.Event()
        self._leading = threading.Event()
        self._stop = threading.Event()
        self._backoff = 0.0  # seconds to wait after a failed status write (doubles, max 30)
        # what we wrote, per object: until the cache moves past it, our own write is the truth
        self._written: dict[str, tuple[Any, str]] = {}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.observe_pass: Callable[[float], None] | None = None  # seconds of each pass

    def reconcile_all(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        self._thread.join(timeout=10)

    def notify(self, kind: str, obj: object | None) -> None:
        """An informer saw a change (`obj` None: it listed again): recompute everything."""
        self._dirty.set()

    def started_leading(self) -> None:
        self._written.clear()
        self._leading.set()
        self._dirty.set()  # converge from whatever the previous leader left

    def stopped_leading(self) -> None:
        self._leading.clear()

    def _failed_write(self) -> None:
        self._backoff = min(self._backoff * 2 or 0.5, 30.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._dirty.wait(self.resync):
                self._dirty.set()  # resync: time alone can make a state stale
                continue
            if self._stop.is_set():
                return
            if not self._leading.is_set():
                self._leading.wait(self.resync)
                continue
            # Coalesce a burst of writes; after a failed write, back off instead.
            self._stop.wait(max(self.debounce, self._backoff))
            self._dirty.clear()
            started = time.monotonic()
            try:
                self.reconcile_all()
                if self.observe_pass is not None:
                    self.observe_pass(time.monotonic() - started)
            except Exception:  # the loop must survive a bad object or a bug
                log.exception(self._failure_event)
                self._dirty.set()
                self._stop.wait(1.0)
