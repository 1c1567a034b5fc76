"""Link state changes (carrier, operstate) of the netdevs in one network namespace, from rtnetlink.

The kernel sends no uevent when a link loses or regains carrier (a pulled cable, a switch port
going down): only an RTM_NEWLINK on the RTMGRP_LINK multicast group says so. `LinkWatch` listens
there and reports a link only when its IFLA_OPERSTATE differs from the last one it saw, so the
many other RTM_NEWLINKs of a busy node (pod veths made, renamed, given addresses) stay quiet.
`sriov.uevents.open_source` merges it with the uevent source, and the inventory rescans sysfs
(which has each PF's `operstate`) when it reports something.

Messages are framed by the one rtnetlink transport (`kernel.rtnl.frames`), and only the two
attributes needed (IFLA_IFNAME, IFLA_OPERSTATE) are read, from the kernel's stable uAPI layout
(a full pyroute2 decode costs ~200 us per message, every message of a busy node); the parser is
checked against pyroute2's encoder (tests/unit/test_sriov_sysfs.py) and the kernel's own
messages (tests/netns/test_sriov_inventory.py). The socket is a plain multicast listener, so it
shares one poll() with the uevent socket.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from collections import deque
from collections.abc import Iterator
from typing import Final, NamedTuple

from pyroute2.netlink.rtnl import RTM_DELLINK, RTM_NEWLINK

from kernel.poll import readable
from kernel.rtnl import attributes, frames

RTMGRP_LINK: Final = 1
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
_IFINFOMSG: Final = struct.Struct("=BxHiII")  # family, type, index, flags, change


class LinkMessage(NamedTuple):
    deleted: bool  # RTM_DELLINK
    ifindex: int
    ifname: str
    operstate: str  # "" when the message does not carry one


class LinkChange(NamedTuple):
    ifname: str  # "" with LOST
    operstate: str  # one of OPERSTATES, or LOST: every link may have changed


def parse_link_messages(data: bytes) -> list[LinkMessage]:
    """The RTM_NEWLINK/RTM_DELLINK messages of one datagram (anything else is skipped; a
    truncated message ends the list)."""
    found = []
    for frame in frames(data):
        if frame.kind not in (RTM_NEWLINK, RTM_DELLINK):
            continue
        if frame.end - frame.payload < _IFINFOMSG.size:
            continue
        index = _IFINFOMSG.unpack_from(data, frame.payload)[2]
        ifname, operstate = "", ""
        for attr, value in attributes(data, frame.payload + _IFINFOMSG.size, frame.end):
            if attr == IFLA_IFNAME:
                ifname = value.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif attr == IFLA_OPERSTATE and value:
                operstate = OPERSTATES[value[0]] if value[0] < len(OPERSTATES) else "unknown"
        found.append(LinkMessage(frame.kind == RTM_DELLINK, index, ifname, operstate))
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
