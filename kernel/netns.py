"""Work inside a network namespace without moving any shared thread.

`run_in_netns(path, fn)` runs `fn` on a dedicated, short-lived thread that calls setns(2) and
then exits, so the daemon's own threads never change namespace (the reference plugins' `ns.Do`
discipline, without reusing the thread). Netlink work goes through `Netlink.open(netns)`, which
only makes its socket here; this is for the few things that need a thread in the namespace
(interface-name lookups, packet sockets, per-netns procfs). `temporary_netns()` makes a private
namespace held by an fd (the staging area for renaming a physical link out of sight), and
`netns_fd()` opens one to hand to the kernel (IFLA_NET_NS_FD).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from cnispec.errors import PlexusError
from kernel import libc

T = TypeVar("T")


# NOTE: O_NONBLOCK because a namespace path comes from the runtime (CNI_NETNS): one naming a
# FIFO would block open() for ever and pin the worker and its container's lock. A namespace file
# ignores the flag; anything else then fails setns(2) with EINVAL, as it should.
NETNS_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK


def run_in_netns(path: str, fn: Callable[[], T]) -> T:
    """Run `fn()` in the network namespace at `path` on a throw-away thread."""
    box: dict[str, object] = {}

    def worker() -> None:
        try:
            fd = os.open(path, NETNS_OPEN_FLAGS)
            try:
                libc.setns(fd)
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


@dataclass(frozen=True, slots=True)
class HeldNetns:
    """A network namespace kept alive by an open fd (it has no task and no bind mount)."""

    fd: int

    @property
    def path(self) -> str:
        # A path any thread of ours can open to enter the namespace held by `fd`.
        return f"/proc/{os.getpid()}/fd/{self.fd}"


def _fresh_netns_fd() -> int:
    """On a throw-away thread: unshare a new network namespace and keep an fd on it (the
    namespace lives as long as the fd; the thread, the only task in it, then exits)."""
    fds: list[int] = []
    errors: list[OSError] = []

    def worker() -> None:
        try:
            libc.unshare_netns()
            fds.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
        except OSError as exc:
            errors.append(exc)

    thread = threading.Thread(target=worker, name="tmp-netns", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise PlexusError(f"cannot make a temporary network namespace: {errors[0]}")
    return fds[0]


@contextmanager
def temporary_netns() -> Iterator[HeldNetns]:
    """A new, empty network namespace for the duration of the block. NOTE: a physical netdev
    left in it goes back to the initial namespace when it dies; a veth would be destroyed, so
    callers move everything out first."""
    fd = _fresh_netns_fd()
    try:
        yield HeldNetns(fd)
    finally:
        os.close(fd)


@contextmanager
def netns_fd(path: str | None) -> Iterator[int]:
    """An fd on the namespace at `path`, or on the calling thread's own (the node's)."""
    try:
        fd = os.open(path or "/proc/thread-self/ns/net", NETNS_OPEN_FLAGS)
    except OSError as exc:
        raise PlexusError(f"network namespace {path or 'of the node'}: {exc.strerror}") from None
    try:
        yield fd
    finally:
        os.close(fd)
