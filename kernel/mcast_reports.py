"""Membership reports as they reach the node: one AF_PACKET socket on every interface of the
node's namespace, with a classic BPF filter in the kernel that keeps only what a host sends when
it joins or leaves a group — IGMP, and IPv6 packets with a hop-by-hop header (MLD reports always
carry the router-alert option there) — arriving at the node (never what the node sends). So
plexusd learns of a pod's join or leave the moment the pod's kernel announces it, with no
querier and no per-interface socket. Which groups the pod holds is then read from the pod's
kernel (kernel.mcast), which is exact; the report itself is only the signal.
"""

from __future__ import annotations

import ctypes
import select
import socket
import time
from typing import Final

ETH_P_ALL: Final = 0x0003
_SO_ATTACH_FILTER: Final = 26
_SOL_PACKET: Final = 263
_PACKET_IGNORE_OUTGOING: Final = 23  # Linux 4.20
_PACKET_OUTGOING: Final = 4
_SKF_AD_PKTTYPE: Final = 0xFFFFF000 + 4

# (code, jt, jf, k); jumps are counted from the next instruction.
_LD_W_ABS, _LD_H_ABS, _LD_B_ABS = 0x20, 0x28, 0x30
_JEQ_K, _RET_K = 0x15, 0x06
_PROGRAM: Final = (
    (_LD_W_ABS, 0, 0, _SKF_AD_PKTTYPE),  # 0: the packet's direction
    (_JEQ_K, 8, 0, _PACKET_OUTGOING),  # 1: the node's own -> drop
    (_LD_H_ABS, 0, 0, 12),  # 2: ethertype
    (_JEQ_K, 0, 2, 0x0800),  # 3: IPv4 -> 4, else -> 6
    (_LD_B_ABS, 0, 0, 23),  # 4: IPv4 protocol
    (_JEQ_K, 3, 4, 2),  # 5: IGMP -> keep, else drop
    (_JEQ_K, 0, 3, 0x86DD),  # 6: IPv6 -> 7, else drop
    (_LD_B_ABS, 0, 0, 20),  # 7: IPv6 next header
    (_JEQ_K, 0, 1, 0),  # 8: hop-by-hop -> keep, else drop
    (_RET_K, 0, 0, 128),  # 9: keep (the headers are all anyone reads)
    (_RET_K, 0, 0, 0),  # 10: drop
)


class _SockFilter(ctypes.Structure):
    _fields_ = (
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    )


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter)))


def _attach(sock: socket.socket) -> None:
    program = (_SockFilter * len(_PROGRAM))(*(_SockFilter(*op) for op in _PROGRAM))
    fprog = _SockFprog(len(_PROGRAM), ctypes.cast(program, ctypes.POINTER(_SockFilter)))
    # setsockopt copies the program while `program` is alive (it is, until we return)
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, bytes(fprog))


class ReportWatch:
    """The interfaces (by name) membership reports arrived on, as they arrive."""

    def __init__(self) -> None:
        # Unbound: every interface of the namespace. What queued before the filter was attached
        # is read and dropped once.
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            # Outgoing packets are not even copied to this socket (an ETH_P_ALL tap clones
            # every transmitted packet before any filter runs); the filter checks it again.
            self._sock.setsockopt(_SOL_PACKET, _PACKET_IGNORE_OUTGOING, 1)
            _attach(self._sock)
            self._sock.setblocking(False)
            self._drain()
        except BaseException:
            self._sock.close()
            raise

    def wait(self, timeout: float, *, linger: float = 0.002) -> set[str]:
        """The interfaces with a report within `timeout` seconds (empty when none); after the
        first one, `linger` more seconds gather what arrived with it (several pods joining at
        once); short, since the caller's reaction is what a joining pod waits for."""
        ready, _, _ = select.select([self._sock], [], [], max(timeout, 0.0))
        if not ready:
            return set()
        out: set[str] = set()
        end = time.monotonic() + linger
        while True:
            out |= self._drain()
            left = end - time.monotonic()
            if left <= 0 or not select.select([self._sock], [], [], left)[0]:
                return out

    def _drain(self) -> set[str]:
        out: set[str] = set()
        while True:
            try:
                _data, where = self._sock.recvfrom(128)
            except BlockingIOError:
                return out
            out.add(str(where[0]))  # AF_PACKET's address: (ifname, proto, pkttype, ...)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()
