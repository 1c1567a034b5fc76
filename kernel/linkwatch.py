"""Link state changes (carrier, operstate) of the netdevs in one network namespace, from rtnetlink.

The kernel sends no uevent when a link loses or regains carrier (a pulled cable, a switch port
going down): only an RTM_NEWLINK on the RTMGRP_LINK multicast group says so. `LinkWatch` listens
there and reports a link only when its IFLA_OPERSTATE differs from the last one it saw, so the
many other RTM_NEWLINKs of a busy node (pod veths made, renamed, given addresses) stay quiet.
`sriov.uevents.open_source` merges it with the uevent source, and the inventory rescans sysfs
(which has each PF's `operstate`) when it reports something.

NOTE: the two attributes needed are parsed with `struct` rather than pyroute2's `ifinfmsg`:
house style (STYLE.md, pyroute2 row) keeps us on pyroute2's `IPRoute` API, and 0.9's `IPRoute`
reads its socket through its own asyncio loop into a queue, so the socket's readiness says
nothing about what `get()` holds and it cannot share one poll() with the uevent socket; the
wire format read here (nlmsghdr, ifinfomsg, rtattr) is the kernel's stable uAPI. The parser is
checked against pyroute2's encoder (tests/unit/test_sriov_sysfs.py) and the kernel's own
messages (tests/netns/test_sriov_inventory.py).
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from collections import deque
from collections.abc import Iterator
from typing import Final, NamedTuple

from kernel.poll import readable

RTMGRP_LINK: Final = 1
RTM_NEWLINK: Final = 16
RTM_DELLINK: Final = 17
IFLA_IFNAME: Final = 3
IFLA_OPERSTATE: Final = 16
RCVBUF: Final = 1024 * 1024  # a few thousand link messages, e.g. a whole node's pods restarting
SO_RCVBUFFORCE: Final = 33  # Linux; missing from Python's socket module before 3.12
# IF_OPER_* (include/uapi/linux/if.h), spelt as sysfs `operstate` spells them.
OPERSTATES: Final = (
    "unknown",
    "notpresent",
    "down",
    "lowerlayerdown",
    "testing",
    "dormant",
    "up",
)
LOST: Final = "lost"  # `LinkChange.operstate` when messages were dropped (receive buffer full)

_NLMSGHDR: Final = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG: Final = struct.Struct("=BxHiII")  # family, type, index, flags, change
_RTATTR: Final = struct.Struct("=HH")  # len, type


class LinkMessage(NamedTuple):
    deleted: bool  # RTM_DELLINK
    ifindex: int
    ifname: str
    operstate: str  # "" when the message does not carry one


class LinkChange(NamedTuple):
    ifname: str  # "" with LOST
    operstate: str  # one of OPERSTATES, or LOST: every link may have changed


def _attrs(data: bytes, offset: int, end: int) -> Iterator[tuple[int, bytes]]:
    while offset + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > end:
            return
        yield kind & 0x3FFF, data[offset + _RTATTR.size : offset + length]  # no NLA_F_ flags
        offset += (length + 3) & ~3


def parse_link_messages(data: bytes) -> list[LinkMessage]:
    """The RTM_NEWLINK/RTM_DELLINK messages of one datagram (anything else is skipped; a
    truncated message ends the list)."""
    found, offset = [], 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            break
        body = offset + _NLMSGHDR.size
        if kind in (RTM_NEWLINK, RTM_DELLINK) and length >= _NLMSGHDR.size + _IFINFOMSG.size:
            index = _IFINFOMSG.unpack_from(data, body)[2]
            ifname, operstate = "", ""
            for attr, value in _attrs(data, body + _IFINFOMSG.size, offset + length):
                if attr == IFLA_IFNAME:
                    ifname = value.split(b"\0", 1)[0].decode("utf-8", "replace")
                elif attr == IFLA_OPERSTATE and value:
                    operstate = OPERSTATES[value[0]] if value[0] < len(OPERSTATES) else "unknown"
            found.append(LinkMessage(kind == RTM_DELLINK, index, ifname, operstate))
        offset += (length + 3) & ~3
    return found


class LinkWatch:
    """Operstate changes of the links in the network namespace of the thread that creates it
    (to follow another netns, create it on a thread that setns'd there, e.g. through
    `delegates.netns.run_in_netns`).

    The first message about a link counts as a change: the link may be a PF whose state
    nobody has compared yet, and a new link comes with a `net add` uevent (hence a rescan) at
    the same moment anyway.
    """

    def __init__(self, *, rcvbuf: int = RCVBUF) -> None:
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
        )
        try:
            try:  # SO_RCVBUFFORCE (root) goes past net.core.rmem_max
                self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self._sock.bind((0, RTMGRP_LINK))
        except OSError:
            self._sock.close()
            raise
        self._seen: dict[int, str] = {}  # ifindex -> last operstate
        self._pending: deque[LinkChange] = deque()

    def fileno(self) -> int:
        return self._sock.fileno()

    def receive(self, timeout: float) -> LinkChange | None:
        """The next operstate change, or None when none came within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self._pending:
            left = deadline - time.monotonic()
            if not readable(self._sock, left):
                return None
            try:
                data = self._sock.recv(65536)  # link messages carry no VF list unless asked
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self._seen.clear()  # what we remember may be stale: every link is new again
                return LinkChange("", LOST)
            self._pending.extend(self._changes(parse_link_messages(data)))
        return self._pending.popleft()

    def _changes(self, messages: list[LinkMessage]) -> Iterator[LinkChange]:
        for msg in messages:
            if msg.deleted:
                self._seen.pop(msg.ifindex, None)  # a gone link is a `net remove` uevent's job
            elif msg.operstate and self._seen.get(msg.ifindex) != msg.operstate:
                self._seen[msg.ifindex] = msg.operstate
                yield LinkChange(msg.ifname, msg.operstate)

    def close(self) -> None:
        self._sock.close()
