"""Leader election on a `coordination.k8s.io/v1` Lease, with client-go's semantics.

- A candidate takes the Lease when nobody holds it (absent, or released: empty holder) or when
  the holder has not renewed it for `lease_duration` *as observed locally* (the time this
  process last saw the Lease change, on its own monotonic clock: no trust in clock sync).
- Every write carries the resourceVersion it read: of two candidates racing, one gets 409
  Conflict and stays a follower. A holder that was deposed while partitioned also gets 409.
- The leader renews every `retry_period`; when no renewal has succeeded for `renew_deadline`
  it stops leading (callback first, so it stops reconciling before a follower can take over:
  renew_deadline < lease_duration) and becomes a candidate again.
- On a clean shutdown the leader releases the Lease (empty holder), so the other replica takes
  over at its next try instead of after a whole lease duration.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from nad_controller.api import JSON, ApiFailure, Conflict, LeaseApi

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ElectionTiming:
    """client-go's defaults are 15/10/2 s."""

    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                "leader election needs 0 < retry-period < renew-deadline < lease-duration "
                f"(got {self.retry_period}, {self.renew_deadline}, {self.lease_duration})"
            )


def micro_time(when: float) -> str:
    """metav1.MicroTime: RFC 3339 with microseconds, UTC."""
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    """Runs the election on its own thread; `on_started` / `on_stopped` run on that thread
    when this process gains / loses leadership (`on_stopped` also on shutdown as leader)."""

    def __init__(
        self,
        api: LeaseApi,
        namespace: str,
        name: str,
        identity: str,
        *,
        timing: ElectionTiming,
        on_started: Callable[[], None],
        on_stopped: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.api, self.namespace, self.name, self.identity = api, namespace, name, identity
        self.timing = timing
        self._on_started, self._on_stopped = on_started, on_stopped
        self._clock, self._wall = clock, wall
        self._observed: JSON | None = None  # the Lease spec last seen
        self._observed_at = 0.0  # when it last changed, on our monotonic clock
        self._stop = threading.Event()
        self.leading = threading.Event()
        self._log = log.bind(lease=f"{namespace}/{name}", identity=identity)
        self._thread = threading.Thread(target=self.run, name="leader-election", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, release: bool = True) -> None:
        """Stop campaigning; a leader stops leading and (if `release`) frees the Lease."""
        self._release_on_stop = release
        self._stop.set()
        self._thread.join(timeout=self.timing.renew_deadline + 5)

    _release_on_stop = True

    @property
    def is_leader(self) -> bool:
        return self.leading.is_set()

    def run(self) -> None:
        while not self._stop.is_set():
            if self._try_acquire_or_renew():
                self._lead()
            else:
                self._stop.wait(self.timing.retry_period)

    def _lead(self) -> None:
        self._log.info("leadership_acquired")
        self.leading.set()
        try:
            self._on_started()
            last_renew = self._clock()
            while not self._stop.wait(self.timing.retry_period):
                if self._try_acquire_or_renew():
                    last_renew = self._clock()
                elif self._clock() - last_renew >= self.timing.renew_deadline:
                    self._log.warning("leadership_lost", renew_deadline=self.timing.renew_deadline)
                    return
        finally:
            self.leading.clear()
            self._on_stopped()
            if self._stop.is_set() and self._release_on_stop:
                self._release()

    def _try_acquire_or_renew(self) -> bool:
        try:
            lease = self.api.get_lease(self.namespace, self.name)
            now = self._wall()
            if lease is None:
                self.api.create_lease(self.namespace, self._new_lease(now))
                self._observe({"holderIdentity": self.identity})
                return True
            spec = lease.get("spec") or {}
            self._observe(spec)
            holder = spec.get("holderIdentity") or ""
            if holder and holder != self.identity and not self._expired(spec):
                return False
            mine = holder == self.identity
            new_spec = {
                **spec,
                "holderIdentity": self.identity,
                "leaseDurationSeconds": self._duration_seconds,
                "renewTime": micro_time(now),
            }
            if not mine:
                new_spec["acquireTime"] = micro_time(now)
                new_spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
            body = {**lease, "spec": new_spec}
            written = self.api.replace_lease(self.namespace, self.name, body)
            self._observe(written.get("spec") or new_spec)
            if not mine:
                self._log.info("lease_taken", previous_holder=holder or None)
            return True
        except Conflict:
            return False  # someone else wrote first; read again next time
        except ApiFailure as exc:
            self._log.warning("lease_unavailable", error=str(exc)[:200])
            return False

    @property
    def _duration_seconds(self) -> int:
        return max(1, round(self.timing.lease_duration))  # the API field is whole seconds

    def _new_lease(self, now: float) -> JSON:
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": self._duration_seconds,
                "acquireTime": micro_time(now),
                "renewTime": micro_time(now),
                "leaseTransitions": 0,
            },
        }

    def _observe(self, spec: JSON) -> None:
        if spec != self._observed:
            self._observed, self._observed_at = dict(spec), self._clock()

    def _expired(self, spec: JSON) -> bool:
        duration = float(spec.get("leaseDurationSeconds") or self.timing.lease_duration)
        return self._clock() > self._observed_at + duration

    def _release(self) -> None:
        """Hand the Lease back: empty holder, so a follower need not wait for it to expire."""
        try:
            lease = self.api.get_lease(self.namespace, self.name)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            now = micro_time(self._wall())
            spec = {
                **lease["spec"],
                "holderIdentity": "",
                "leaseDurationSeconds": 1,
                "acquireTime": now,
                "renewTime": now,
            }
            self.api.replace_lease(self.namespace, self.name, {**lease, "spec": spec})
            self._log.info("lease_released")
        except ApiFailure as exc:
            self._log.warning("lease_release_failed", error=str(exc)[:200])
