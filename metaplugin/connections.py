"""Bounds on what clients of the daemon socket can hold: connections, time, body bytes.

A client is anything that can open the socket (a shim, a probe, plexusctl, a bug). Without these
bounds 200 slow clients held 204 threads, one byte every 10 s kept a thread for ever, and eight
concurrent 3.9 MB bodies took the daemon from 63 to 371 MiB (its limit is 128 Mi):
- at most `max_connections` connections are served at once; beyond that the daemon stops
  accepting, and later clients wait in the kernel's listen backlog, without a thread;
- a connection must deliver its whole request within `read_deadline` seconds, however it trickles
  (a timer shuts the socket down; a per-recv timeout would let one byte per timeout through);
- the bytes of request bodies read and not yet answered stay under `body_budget`: a body that
  would exceed it is refused (code 11) before it is read.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final

from cnispec.errors import TryAgainLater

MAX_BODY: Final = 1024 * 1024  # a conflist with the pod's annotations (256 KiB at most) fits
BODY_BUDGET: Final = 4 * MAX_BODY
MAX_CONNECTIONS: Final = 128
READ_DEADLINE: Final = 10.0
WRITE_TIMEOUT: Final = 10.0  # a client that stops reading its answer is dropped after this


@dataclass
class ConnectionLimits:
    max_connections: int = MAX_CONNECTIONS
    max_body: int = MAX_BODY
    body_budget: int = BODY_BUDGET
    read_deadline: float = READ_DEADLINE
    _connections: threading.BoundedSemaphore = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _body_bytes: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._connections = threading.BoundedSemaphore(self.max_connections)

    def open_connection(self, timeout: float) -> bool:
        """Take a connection slot, waiting up to `timeout` for one."""
        return self._connections.acquire(timeout=timeout)

    def close_connection(self) -> None:
        self._connections.release()

    @contextmanager
    def body(self, length: int) -> Iterator[None]:
        """Reserve `length` bytes of the body budget for the life of one request."""
        with self._lock:
            if self._body_bytes + length > self.body_budget:
                raise TryAgainLater(
                    f"plexusd is reading {self._body_bytes} bytes of other requests; a "
                    f"{length}-byte request must wait: the runtime should retry",
                )
            self._body_bytes += length
        try:
            yield
        finally:
            with self._lock:
                self._body_bytes -= length

    @property
    def body_bytes(self) -> int:
        return self._body_bytes


class ReadDeadlines:
    """Shuts a connection's reading side down when its request is not in by its deadline.

    One reaper thread for every connection (a timer per connection would double the threads
    that the bound on connections is there to limit).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, socket.socket]] = []
        self._cancelled: set[int] = set()
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._reap, name="read-deadlines", daemon=True)
        self._thread.start()

    def watch(self, sock: socket.socket, seconds: float) -> int:
        token = next(self._seq)
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + seconds, token, sock))
            self._cond.notify()
        return token

    def cancel(self, token: int) -> None:
        with self._cond:
            self._cancelled.add(token)

    def _reap(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                due, token, sock = self._heap[0]
                wait = due - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                if token in self._cancelled:
                    self._cancelled.discard(token)
                    continue
            with contextlib.suppress(OSError):  # already closed: nothing to cut short
                sock.shutdown(socket.SHUT_RD)  # a blocked recv returns EOF at once
