"""Work inside a pod's network namespace without moving any shared thread.

`run_in_netns(path, fn)` runs `fn` on a dedicated, short-lived thread that calls setns(2) and
then exits, so the daemon's own threads never change namespace (the reference plugins' `ns.Do`
discipline, without reusing the thread). Netlink work goes through `Netlink.open(netns)`, which
only makes its socket here; this is for the few things that need a thread in the namespace
(interface-name lookups, packet sockets, per-netns procfs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import threading
from collections.abc import Callable
from typing import Final, TypeVar

_CLONE_NEWNET: Final = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

T = TypeVar("T")


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def run_in_netns(path: str, fn: Callable[[], T]) -> T:
    """Run `fn()` in the network namespace at `path` on a throw-away thread."""
    box: dict[str, object] = {}

    def worker() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            box["value"] = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised in the caller thread
            box["error"] = exc

    thread = threading.Thread(target=worker, name="netns-worker", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def existing_interfaces(netns: str, names: list[str]) -> list[str]:
    """Which of `names` exist in the namespace at `netns` (one trip into it for all)."""

    def probe() -> list[str]:
        found = []
        for name in names:
            try:
                socket.if_nametoindex(name)
            except OSError:
                continue
            found.append(name)
        return found

    return run_in_netns(netns, probe)


def current_netns_inode() -> int:
    return os.stat(f"/proc/self/task/{threading.get_native_id()}/ns/net").st_ino
