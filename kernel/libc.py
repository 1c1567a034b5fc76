"""The libc calls Python's standard library lacks: setns(2) and unshare(2), for network
namespaces only. Callers run them on a throw-away thread (`kernel.netns`): a thread that changed
namespace never goes back to serving requests."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Final

CLONE_NEWNET: Final = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(ret: int) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace open at `fd`."""
    _check(_libc.setns(fd, CLONE_NEWNET))


def unshare_netns() -> None:
    """Give the calling thread a new network namespace of its own."""
    _check(_libc.unshare(CLONE_NEWNET))
