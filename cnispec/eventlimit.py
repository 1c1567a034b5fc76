"""Which Kubernetes Events to write, and how: the pure half of an event recorder (no API, no
threads, the clock injected), after the ideas of client-go's EventCorrelator.

- Identical Events (same object, type, reason and message) seen again within `window` seconds
  are one Event: the writer PATCHes its `count` and `lastTimestamp` instead of creating another.
- Every object has a token bucket (`burst` API writes, then one per `refill` seconds), and all
  objects together share one more (`global_burst`, one per `global_refill`), so a crash-looping
  pod cannot flood the API. A dropped repeat still counts: the next write carries the true count.
- Drops are counted (`dropped`); `Drop.report` is true for the first drop of an object in each
  `window`, so the caller logs one line per object and window, not one per drop.

Both tables are bounded (`max_keys`, oldest forgotten first)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Create:
    """Write a new Event (count 1); tell `created` its name."""


@dataclass(frozen=True, slots=True)
class Bump:
    """PATCH Event `name` to `count`."""

    name: str
    count: int


@dataclass(frozen=True, slots=True)
class Drop:
    """Rate-limited: write nothing. `report`: the first drop of this object in this window."""

    report: bool
    dropped: int  # drops of this object in this window so far


Decision = Create | Bump | Drop
Key = tuple[str, str, str, str]  # (object, type, reason, message)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


@dataclass(slots=True)
class _Seen:
    name: str | None  # None until `created` (or when the create failed)
    count: int
    at: float


@dataclass(slots=True)
class _Drops:
    since: float
    count: int


class EventLimiter:
    def __init__(
        self,
        *,
        burst: int = 10,
        refill: float = 300.0,
        global_burst: int = 100,
        global_refill: float = 1.0,
        window: float = 600.0,
        max_keys: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst, self.refill = burst, refill
        self.global_burst, self.global_refill = global_burst, global_refill
        self.window, self.max_keys, self._clock = window, max_keys, clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._global = _Bucket(float(global_burst), clock())
        self._seen: OrderedDict[Key, _Seen] = OrderedDict()
        self._drops: dict[str, _Drops] = {}
        self.dropped = 0  # every drop since start

    def decide(self, obj: str, kind: str, reason: str, message: str) -> Decision:
        """What to do with one more Event about `obj` (a stable key: its uid, or ns/name)."""
        now = self._clock()
        key = (obj, kind, reason, message)
        seen = self._seen.get(key)
        if seen is not None and now - seen.at > self.window:
            seen = None  # too old: a new Event, as the aggregation window ended
        if seen is not None:
            seen.count += 1
            seen.at = now
            self._seen.move_to_end(key)
        if not self._take(obj, now):
            self._remember(key, seen or _Seen(None, 1, now))
            return self._drop(obj, now)
        if seen is not None and seen.name is not None:
            return Bump(seen.name, seen.count)
        self._remember(key, _Seen(None, seen.count if seen else 1, now))
        return Create()

    def count(self, obj: str, kind: str, reason: str, message: str) -> int:
        """The count a new Event for this key should carry (repeats dropped before it)."""
        seen = self._seen.get((obj, kind, reason, message))
        return seen.count if seen is not None else 1

    def created(self, obj: str, kind: str, reason: str, message: str, name: str) -> None:
        """The Event `decide` asked for exists as `name`: repeats patch it."""
        seen = self._seen.get((obj, kind, reason, message))
        if seen is not None:
            seen.name = name

    def forget(self, obj: str, kind: str, reason: str, message: str) -> None:
        """The Event is gone (expired: 404 on PATCH): create it anew, with the count so far."""
        seen = self._seen.get((obj, kind, reason, message))
        if seen is not None:
            seen.name = None

    def _remember(self, key: Key, seen: _Seen) -> None:
        self._seen[key] = seen
        self._seen.move_to_end(key)
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)

    def _take(self, obj: str, now: float) -> bool:
        bucket = self._buckets.get(obj)
        if bucket is None:
            bucket = self._buckets[obj] = _Bucket(float(self.burst), now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(obj)
        _refill(bucket, now, self.burst, self.refill)
        _refill(self._global, now, self.global_burst, self.global_refill)
        if bucket.tokens < 1 or self._global.tokens < 1:
            return False
        bucket.tokens -= 1
        self._global.tokens -= 1
        return True

    def _drop(self, obj: str, now: float) -> Drop:
        self.dropped += 1
        drops = self._drops.get(obj)
        if drops is None or now - drops.since > self.window:
            if len(self._drops) >= self.max_keys:
                self._drops.clear()  # only the once-per-window log lines are at stake
            self._drops[obj] = _Drops(now, 1)
            return Drop(report=True, dropped=1)
        drops.count += 1
        return Drop(report=False, dropped=drops.count)


def _refill(bucket: _Bucket, now: float, burst: int, refill: float) -> None:
    bucket.tokens = min(float(burst), bucket.tokens + max(0.0, now - bucket.at) / refill)
    bucket.at = now
