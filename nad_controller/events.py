"""core/v1 Events on VFPools, deduplicated and rate-limited like client-go's recorder: the same
(object, type, reason, message) again bumps `count` and `lastTimestamp` of the Event already
written instead of creating another; each object may emit `burst` Events, then one per
`refill` seconds (the rest are logged and dropped)."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import structlog

from nad_controller.api import ApiFailure, NotFound, StatusWriter

log = structlog.get_logger(__name__)

COMPONENT: Final = "plexus-controller"
# Events of cluster-scoped objects live in "default", where `kubectl describe` looks for them;
# a namespaced object's (a NAD's) in its own namespace.
EVENT_NAMESPACE: Final = "default"
MESSAGE_MAX: Final = 1024


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class _Seen:
    name: str
    count: int
    first: str
    namespace: str


class EventRecorder:
    def __init__(
        self,
        api: StatusWriter,
        instance: str,
        burst: int = 10,
        refill: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api, self.instance = api, instance
        self.burst, self.refill, self._clock = burst, refill, clock
        self._buckets: dict[str, _Bucket] = {}
        self._seen: dict[tuple[str, ...], _Seen] = {}
        self._lock = threading.Lock()

    def record(self, involved: dict[str, Any], kind: str, reason: str, message: str) -> None:
        uid = str(involved.get("uid", ""))
        message = message[:MESSAGE_MAX]
        key = (uid, kind, reason, message)
        if not self._take(uid):
            log.info("event_rate_limited", object=involved.get("name"), reason=reason)
            return
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        with self._lock:
            seen = self._seen.get(key)
        try:
            if seen is not None:
                seen.count += 1
                patch = {"count": seen.count, "lastTimestamp": now}
                self.api.patch_event(seen.namespace, seen.name, patch)
                return
            self._create(
                key=key, involved=involved, kind=kind, reason=reason, message=message, now=now
            )
        except NotFound:  # the Event expired (TTL): start a new one
            with self._lock:
                self._seen.pop(key, None)
            self._create(
                key=key, involved=involved, kind=kind, reason=reason, message=message, now=now
            )
        except ApiFailure as exc:
            log.warning("event_failed", object=involved.get("name"), error=str(exc)[:200])

    def _create(
        self,
        *,
        key: tuple[str, ...],
        involved: dict[str, Any],
        kind: str,
        reason: str,
        message: str,
        now: str,
    ) -> None:
        name = f"{involved.get('name')}.{secrets.token_hex(8)}"
        namespace = str(involved.get("namespace") or EVENT_NAMESPACE)
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "type": kind,
            "count": 1,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "source": {"component": COMPONENT},
            "reportingComponent": f"plexus.dev/{COMPONENT}",
            "reportingInstance": self.instance,
        }
        try:
            self.api.create_event(namespace, body)
        except ApiFailure as exc:
            log.warning("event_failed", object=involved.get("name"), error=str(exc)[:200])
            return
        with self._lock:
            self._seen[key] = _Seen(name, 1, now, namespace)
            if len(self._seen) > 4096:  # bounded: forget the oldest
                self._seen.pop(next(iter(self._seen)))

    def _take(self, uid: str) -> bool:
        now = self._clock()
        with self._lock:
            bucket = self._buckets.setdefault(uid, _Bucket(float(self.burst), now))
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) / self.refill)
            bucket.at = now
            if bucket.tokens < 1:
                return False
            bucket.tokens -= 1
            return True
