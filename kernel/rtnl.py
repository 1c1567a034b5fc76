"""The one rtnetlink transport: requests and answers on a NETLINK_ROUTE socket, messages encoded
and decoded with pyroute2's message classes, the framing (sequence numbers, acks, errors, end
of dump, interrupted dumps) read here; and the one place where netlink errnos become Plexus
errors.

Everything in `kernel` that speaks rtnetlink goes through it: the `Netlink` adaptor (links,
addresses, routes, rules, neighbours), the PF-side VF codec (`kernel.vf`) and the link-state
listener (`kernel.linkwatch`, which reads a multicast group with `frames` and `attributes`:
decoding every RTM_NEWLINK of a busy node with pyroute2 costs ~200 us, reading its two
attributes a few).

NOTE: pyroute2's own IPRoute runs each request through an asyncio loop, which costs about
twice the kernel round trip (the built-in delegates make ~10 requests per attachment), and its
0.9 sync path raced on a status key under concurrent requests (KeyError 'nlm_generator' seen
once in a few hundred ADDs): the hot path talks to the socket directly.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final

from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
)
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError

from cnispec.errors import InvalidConfig, KernelUnsupported, PlexusError, TryAgainLater
from kernel.netns import run_in_netns

NLMSG_HDR: Final = struct.Struct("=LHHLL")  # len, type, flags, seq, pid
_RTATTR: Final = struct.Struct("=HH")  # len, type
RECV_BUFFER: Final = 1 << 20
_SOL_NETLINK: Final = 270
_NETLINK_CAP_ACK: Final = 10
_REQUEST_TIMEOUT: Final = 10.0


class LinkExists(InvalidConfig):
    """A link of that name is already there: the runtime or the NAD asked for an interface
    name the pod already uses (a configuration error, code 7)."""


class LinkNotFound(InvalidConfig):
    """A link the request names (master, interface to chain on) is not there (code 7)."""


class AlreadyExists(PlexusError):
    """Some other object (route, neighbour, rule) with those keys is already there."""


# The kernel is busy or slow, not wrong: the runtime should retry (CNI code 11).
_TRANSIENT: Final = frozenset({errno.ETIMEDOUT, errno.EBUSY, errno.EAGAIN, errno.ENOBUFS})


def translate(exc: NetlinkError, what: str, *, link: bool = False) -> PlexusError:
    """One place where netlink errnos become Plexus errors. `link`: the object is a link, so
    EEXIST/ENODEV are about an interface name."""
    if exc.code == errno.EEXIST:
        return (LinkExists if link else AlreadyExists)(f"{what}: already exists")
    if exc.code == errno.ENODEV:
        return LinkNotFound(f"{what}: no such device")
    if exc.code in (errno.EOPNOTSUPP, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
        return KernelUnsupported(f"{what}: not supported by this kernel ({os.strerror(exc.code)})")
    if exc.code in _TRANSIENT:
        return TryAgainLater(f"{what}: {os.strerror(exc.code)}; try again")
    return PlexusError(f"{what}: {os.strerror(exc.code)} (netlink error {exc.code})")


@dataclass(frozen=True, slots=True)
class Frame:
    """One netlink message of a datagram: its header fields and where its payload lies."""

    kind: int
    flags: int
    seq: int
    start: int  # offset of the header in the datagram
    end: int  # offset just past the message

    @property
    def payload(self) -> int:
        return self.start + NLMSG_HDR.size


def frames(data: bytes) -> Iterator[Frame]:
    """The messages of one datagram, in order; a truncated one ends it."""
    offset = 0
    while offset + NLMSG_HDR.size <= len(data):
        length, kind, flags, seq, _pid = NLMSG_HDR.unpack_from(data, offset)
        if length < NLMSG_HDR.size or offset + length > len(data):
            return
        yield Frame(kind, flags, seq, offset, offset + length)
        offset += (length + 3) & ~3


def attributes(data: bytes, offset: int, end: int) -> Iterator[tuple[int, bytes]]:
    """The (type, value) attributes between `offset` and `end` (rtattr TLVs, NLA_F_ flags
    cleared), for a reader that needs two attributes and not a whole decoded message."""
    while offset + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > end:
            return
        yield kind & 0x3FFF, data[offset + _RTATTR.size : offset + length]
        offset += (length + 3) & ~3


def _raise_for(code: int) -> None:
    if code:
        raise NetlinkError(abs(code))


def message(cls: Any, fields: dict[str, Any], attrs: list[tuple[str, Any]]) -> Any:
    """A pyroute2 message of class `cls` with its header fields and attributes set."""
    msg = cls()
    for key, value in fields.items():
        msg[key] = value
    msg["attrs"] = attrs
    return msg


class Rtnl:
    """Synchronous rtnetlink requests on one socket, bound to the namespace it was born in."""

    def __init__(self, sock: socket.socket) -> None:
        # Acks without a copy of the request: nothing to decode, and less to copy.
        sock.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)
        sock.settimeout(_REQUEST_TIMEOUT)  # the kernel always answers; never hang if it did not
        sock.bind((0, 0))
        self._sock = sock
        self._seq = 0

    @classmethod
    @contextmanager
    def open(cls, netns: str | None = None) -> Iterator[Rtnl]:
        """A socket of the namespace at `netns` (made on a pooled thread that entered it: a
        socket stays in the namespace it was born in), or of the caller's own. ~0.3 ms,
        against ~8 ms for pyroute2's `IPRoute(netns=...)`, which forks. Inside `session()`,
        the socket of each namespace is made once and reused until the session ends."""
        cache = _session.get()
        if cache is not None:
            # By the namespace's identity, not its path: a path such as /proc/<pid>/fd/<n> (a
            # temporary namespace) may name another namespace later in the same request. The
            # cached socket keeps its namespace alive, so that identity is not reused meanwhile.
            st = os.stat(netns) if netns else None
            key = (st.st_dev, st.st_ino) if st else (0, 0)
            if (transport := cache.get(key)) is None:
                transport = cache[key] = cls._make(netns)
            yield transport
            return
        transport = cls._make(netns)
        try:
            yield transport
        finally:
            transport.close()

    @classmethod
    def _make(cls, netns: str | None) -> Rtnl:
        sock = run_in_netns(netns, route_socket) if netns else route_socket()
        try:
            return cls(sock)
        except BaseException:
            sock.close()
            raise

    def request(self, msg: Any, msg_type: int, flags: int = 0, *, dump: bool = False) -> list[Any]:
        """Send one request; return the decoded messages of the answer (NetlinkError on a
        negative ack). `dump` is explicit: NLM_F_DUMP's bits are NLM_F_EXCL's on a NEW request."""
        out = []
        for raw in self.request_raw(msg, msg_type, flags, dump=dump):
            reply = type(msg)(raw)
            reply.decode()
            out.append(reply)
        return out

    def request_raw(
        self, msg: Any, msg_type: int, flags: int = 0, *, dump: bool = False
    ) -> list[bytes]:
        """`request`, answering each message as its raw bytes (header included), for a caller
        that reads a few attributes itself: pyroute2 decodes a link in ~150 us."""
        if dump:
            flags |= NLM_F_DUMP
        self._seq += 1
        msg["header"]["type"] = msg_type
        msg["header"]["flags"] = flags | NLM_F_REQUEST | (0 if dump else NLM_F_ACK)
        msg["header"]["sequence_number"] = self._seq
        msg.encode()
        self._sock.send(msg.data)
        answer: list[bytes] = []
        interrupted = False
        while True:
            try:
                data = self._sock.recv(RECV_BUFFER)
            except TimeoutError:
                raise NetlinkError(errno.ETIMEDOUT) from None
            for frame in frames(data):
                if frame.seq != self._seq:
                    continue
                # The kernel flags each message of a dump during which the set changed.
                interrupted |= bool(frame.flags & NLM_F_DUMP_INTR)
                if frame.kind == NLMSG_ERROR:
                    _raise_for(struct.unpack_from("i", data, frame.payload)[0])
                    return answer
                if frame.kind == NLMSG_DONE:
                    if frame.end - frame.payload >= 4:  # a dump can end with an error code
                        _raise_for(struct.unpack_from("i", data, frame.payload)[0])
                    if interrupted:
                        raise NetlinkDumpInterrupted()
                    return answer
                answer.append(data[frame.start : frame.end])

    def close(self) -> None:
        self._sock.close()


# The sockets of the current session (one CNI request), by namespace (st_dev, st_ino); (0, 0) is
# the caller's own.
_session: ContextVar[dict[tuple[int, int], Rtnl] | None] = ContextVar("rtnl_session", default=None)


@contextmanager
def session() -> Iterator[None]:
    """One rtnetlink socket per namespace for everything run inside (one CNI request, on its
    own thread): a pod ADD opened the pod's namespace 5-6 times, each a trip into it on a
    pooled thread. Replies are matched by sequence number, so a request cut short by an error
    leaves nothing that a later one could take for its own answer."""
    cache: dict[tuple[int, int], Rtnl] = {}
    token = _session.set(cache)
    try:
        yield
    finally:
        _session.reset(token)
        for transport in cache.values():
            transport.close()


def route_socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, 0)
