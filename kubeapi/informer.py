"""A list+watch cache of one Kubernetes resource, for the node daemon's and the controller's
adaptors alike (the only two places that talk to the API).

Loop: list (records the resourceVersion) → watch from it with bookmarks → on 410 Gone (an HTTP
status when the watch starts, or an ERROR event in the stream) list again → on any other failure
back off (0.5 s doubling to 30 s) and watch again from the last resourceVersion. Items are what
`convert` makes of each object (None: not cached), keyed by `key`. `on_change(obj)` runs on the
informer's thread after the cache has taken each ADDED/MODIFIED/DELETED object, and with None
after every (re)list: consumers that read the cache are level-triggered, so a missed event costs
nothing but a moment.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, Generic, TypeVar

import structlog
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

log = structlog.get_logger(__name__)

WATCH_TIMEOUT: Final = 300  # seconds the API server keeps one watch open
REQUEST_TIMEOUT: Final = (5.0, 15.0)  # connect, read: a list or a GET

V = TypeVar("V")
JSON = Mapping[str, Any]


class Gone(Exception):
    """The resourceVersion is too old (410): list again."""


class WatchFailed(Exception):
    """A watch ERROR event other than 410."""


def namespaced_key(obj: JSON) -> str:
    """`namespace/name` (`/name` for a cluster-scoped object)."""
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def name_key(obj: JSON) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


class Informer(Generic[V]):
    def __init__(
        self,
        name: str,
        list_fn: Callable[..., Any],
        convert: Callable[[JSON], V | None],
        *,
        key: Callable[[JSON], str] = namespaced_key,
        on_change: Callable[[JSON | None], None] | None = None,
    ) -> None:
        """`list_fn(**kwargs)` is a kubernetes client list call (`list_node`, a bound
        `list_cluster_custom_object`, ...), called with `_preload_content=False`."""
        self.name = name
        self._list = list_fn
        self._convert = convert
        self._key = key
        self._on_change = on_change
        self._items: dict[str, V] = {}
        self._rv: str | None = None
        self._cond = threading.Condition()
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._response: Any = None
        self._thread = threading.Thread(target=self._run, name=f"informer-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        resp = self._response
        if resp is not None:
            # NOTE: closing the response would block on the reader's buffer lock; shutting the
            # socket down makes the blocked read return at once.
            sock = getattr(getattr(resp, "connection", None), "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    # --- the cache -------------------------------------------------------------------------

    def get(self, key: str) -> V | None:
        with self._cond:
            return self._items.get(key)

    def values(self) -> list[V]:
        with self._cond:
            return list(self._items.values())

    def wait_for(self, key: str, accept: Callable[[V], bool], timeout: float) -> V | None:
        """Wait up to `timeout` for an item at `key` that `accept`s (the watch may lag)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                item = self._items.get(key)
                if item is not None and accept(item):
                    return item
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    # --- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                if self._rv is None:
                    self._relist()
                self._watch()
                backoff = 0.5
            except Gone:
                log.info("watch_expired_relisting", resource=self.name)
                self._rv = None
            except Exception as exc:  # noqa: BLE001 - an informer must outlive any failure
                if self._stop.is_set():
                    return  # stop() closed the stream under us
                log.warning(
                    "watch_failed", resource=self.name, error=str(exc)[:200], retry_in=backoff
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _relist(self) -> None:
        resp = self._list(_preload_content=False, _request_timeout=REQUEST_TIMEOUT)
        data = json.loads(resp.data)
        items: dict[str, V] = {}
        for obj in data.get("items") or []:
            item = self._convert(obj)
            if item is not None:
                items[self._key(obj)] = item
        with self._cond:
            self._items = items
            self._rv = str(data["metadata"]["resourceVersion"])
            self._cond.notify_all()
        self.synced.set()
        log.info("informer_listed", resource=self.name, count=len(items), rv=self._rv)
        if self._on_change is not None:
            self._on_change(None)

    def _watch(self) -> None:
        try:
            resp = self._list(
                watch=True,
                resource_version=self._rv,
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_TIMEOUT,
                _preload_content=False,
                _request_timeout=(REQUEST_TIMEOUT[0], WATCH_TIMEOUT + 30),
            )
        except ApiException as exc:
            if exc.status == 410:
                raise Gone() from None
            raise
        self._response = resp
        try:
            for line in _lines(resp):
                if self._stop.is_set():
                    return
                self._apply(json.loads(line))
        finally:
            self._response = None
            with contextlib.suppress(Exception):
                resp.release_conn()

    def _apply(self, event: JSON) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise WatchFailed(f"watch error: {obj.get('message', obj)}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        item = self._convert(obj) if kind in ("ADDED", "MODIFIED") else None
        with self._cond:
            if item is not None:
                self._items[self._key(obj)] = item
            elif kind in ("ADDED", "MODIFIED", "DELETED"):
                self._items.pop(self._key(obj), None)
            if rv:
                self._rv = str(rv)
            self._cond.notify_all()
        if self._on_change is not None and kind in ("ADDED", "MODIFIED", "DELETED"):
            self._on_change(obj)


def _lines(resp: Any) -> Iterator[str]:
    for line in iter_resp_lines(resp):
        if line:
            yield line if isinstance(line, str) else line.decode()
