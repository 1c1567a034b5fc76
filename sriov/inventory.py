"""The node's live SR-IOV inventory: a `Snapshot` read from sysfs at start and re-read whenever a
pci or net uevent says hardware came, went, moved or changed driver, or a link's operstate
changed (a PF's cable pulled or put back, seen through `sriov.linkwatch`), and every
`rescan_interval` seconds in case an event was lost.

Owned by the node agent (`sriov.agent`), which subscribes to changes to re-match pools and update
the device plugins' health. A burst of uevents (enabling 64 VFs emits a few hundred) is
coalesced into one rescan; a whole scan is cheap (about 10 ms for 1,024 VFs), so there is no
per-device bookkeeping to get wrong.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Final

import structlog

from sriov.model import Snapshot
from sriov.sysfs import Sysfs
from sriov.uevents import OPERSTATE, OVERFLOW, UEvent, UeventSource, open_source

log = structlog.get_logger(__name__)

RELEVANT: Final = {
    "pci": frozenset({"add", "remove", "bind", "unbind", "change", "move"}),
    "net": frozenset({"add", "remove", "move", OPERSTATE}),  # a PF's link went or came
}
QUIET: Final = 0.010  # a burst is over when no uevent came for this long
MAX_BURST: Final = 0.200  # ...or after this long, so a storm cannot delay an update forever
POLL: Final = 0.2  # how often the follower looks at the stop flag

Subscriber = Callable[[Snapshot], None]


def is_relevant(event: UEvent) -> bool:
    return event.action == OVERFLOW or event.action in RELEVANT.get(event.subsystem, ())


class Inventory:
    def __init__(
        self,
        *,
        sysfs: Sysfs,
        source_factory: Callable[[], UeventSource] | None = None,
        rescan_interval: float = 30.0,
    ) -> None:
        self._sysfs = sysfs
        self._source_factory = source_factory or (lambda: open_source(sysfs.root))
        self._rescan_interval = rescan_interval
        self._snapshot = Snapshot()
        self._subscribers: list[Subscriber] = []
        self._scan_lock = threading.Lock()
        self._stop = threading.Event()
        self._source: UeventSource | None = None
        self._thread: threading.Thread | None = None

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def subscribe(self, fn: Subscriber) -> None:
        """`fn(snapshot)` after every change, from the follower thread or from the thread that
        called `refresh()`; it must be thread-safe and must not block for long."""
        self._subscribers.append(fn)

    def start(self) -> None:
        """Open the uevent source, then scan (so no change between the two is missed), then
        follow uevents on a daemon thread. Errors of the source or the first scan propagate."""
        if self._thread is not None:
            return
        self._source = self._source_factory()
        self._stop.clear()
        try:
            self.refresh()
        except BaseException:
            self._source.close()
            self._source = None
            raise
        self._thread = threading.Thread(target=self._follow, name="sriov-inventory", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5)
        source, self._source = self._source, None
        if source is not None:
            source.close()

    def refresh(self) -> Snapshot:
        """Rescan now; subscribers hear of it when something changed."""
        started = time.monotonic()
        with self._scan_lock:
            before = self._snapshot
            after = self._sysfs.scan()
            changed = after != before
            if changed:
                self._snapshot = after
        if changed:
            _log_change(before, after, time.monotonic() - started)
            self._notify()
        return after

    def _notify(self) -> None:
        # Deliver the newest snapshot, not the one this call scanned: two refreshes racing
        # must not leave a subscriber with the older one. No lock is held here, so a
        # subscriber may take its own locks and even call refresh().
        snapshot = self._snapshot
        for fn in list(self._subscribers):
            try:
                fn(snapshot)
            except Exception:  # one broken subscriber must not starve the others
                log.exception("sriov_inventory_subscriber_failed", subscriber=repr(fn))

    # --- the follower thread ------------------------------------------------------------------

    def _follow(self) -> None:
        source = self._source
        assert source is not None
        next_rescan = time.monotonic() + self._rescan_interval
        while not self._stop.is_set():
            timeout = min(POLL, max(next_rescan - time.monotonic(), 0.0))
            try:
                event = source.receive(timeout)
                if event is not None and not self._matters(event):
                    continue
                if event is not None:
                    self._drain(source, event)
                elif time.monotonic() < next_rescan:
                    continue
                self.refresh()
            except Exception:  # the follower must outlive a bad scan or a failed read
                log.exception("sriov_inventory_follow_failed")
                self._stop.wait(POLL)
            next_rescan = time.monotonic() + self._rescan_interval

    def _matters(self, event: UEvent) -> bool:
        """Relevant, and about hardware we could care for: a busy node's pod veths come and go
        (and change operstate) all the time, and must not each cost a rescan."""
        if not is_relevant(event):
            return False
        if event.action == OPERSTATE:
            name = event.properties.get("INTERFACE")
            return any(pf.netdev == name for pf in self._snapshot.pfs.values())
        # The kernel files virtual links (veth, bridge, ...) under /devices/virtual: never a
        # PF or a VF.
        return not (event.subsystem == "net" and event.devpath.startswith("/devices/virtual/"))

    @staticmethod
    def _drain(source: UeventSource, first: UEvent) -> None:
        """Swallow the rest of a burst: uevents until QUIET passes without one."""
        deadline = time.monotonic() + MAX_BURST
        reason = first
        while (left := deadline - time.monotonic()) > 0:
            event = source.receive(min(QUIET, left))
            if event is None:
                break
            if event.action == OVERFLOW:
                reason = event
        if reason.action == OVERFLOW:
            log.warning("sriov_uevents_overflowed")


def _log_change(before: Snapshot, after: Snapshot, took: float) -> None:
    log.info(
        "sriov_inventory_changed",
        pfs=len(after.pfs),
        vfs=len(after.vfs),
        vfs_added=len(after.vfs.keys() - before.vfs.keys()),
        vfs_removed=len(before.vfs.keys() - after.vfs.keys()),
        scan_ms=round(took * 1000, 1),
    )
