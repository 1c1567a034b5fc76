"""Waiting for a socket to have data, for the event sources (`sriov.uevents`,
`sriov.linkwatch`). poll, not select: select() cannot watch a descriptor numbered 1024 or more,
which a long-running daemon's sockets can reach."""

from __future__ import annotations

import select
import socket


def readable(sock: socket.socket, seconds: float) -> bool:
    """True when `sock` has data within `seconds` (0 or less: look once, do not wait)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(max(seconds, 0.0) * 1000))
