"""Traffic control over rtnetlink: the `clsact` qdisc and u32 filters whose actions copy
(mirred) or drop packets. The routed primary's multicast replication (delegates.fabric_mcast) is
built from these: this kernel family may lack multicast routing (CONFIG_IP_MROUTE), tc never does.

A filter is addressed by (device, hook, priority, protocol): one u32 classifier per priority, so
replacing a filter is "delete that priority, add it again", and the caller owns a priority range.
pyroute2 encodes the u32 selector and the actions; requests go through `kernel.rtnl.Rtnl` like
every other rtnetlink request (no asyncio loop, the node's or a pod's namespace).
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final, Literal

from pyroute2.netlink import NLM_F_CREATE, NLM_F_EXCL
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTM_DELQDISC,
    RTM_DELTFILTER,
    RTM_GETTFILTER,
    RTM_NEWQDISC,
    RTM_NEWTFILTER,
)
from pyroute2.netlink.rtnl.tcmsg import cls_u32, tcmsg

from kernel.rtnl import NLMSG_HDR, Rtnl, message, translate

ETH_P_IP: Final = 0x0800
ETH_P_IPV6: Final = 0x86DD
_TC_H_CLSACT: Final = 0xFFFFFFF1
_CLSACT_HANDLE: Final = 0xFFFF0000
HOOKS: Final = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
_TCMSG: Final = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info

Hook = Literal["ingress", "egress"]


def u32_key(value: int, mask: int, offset: int) -> str:
    """A 32-bit u32 key in pyroute2's notation: the word at `offset` (from the network header)
    ANDed with `mask` equals `value`."""
    return f"0x{value & mask:08x}/0x{mask:08x}+{offset}"


def _copies(targets: Sequence[int]) -> list[dict[str, Any]]:
    """A copy out of each target device: mirrors, the last one a redirect, which takes the
    packet itself (no other action module is needed: many kernels build only mirred)."""
    last = len(targets) - 1
    return [
        {
            "kind": "mirred",
            "direction": "egress",
            "action": "redirect" if i == last else "mirror",
            "ifindex": ifindex,
        }
        for i, ifindex in enumerate(targets)
    ]


class Tc:
    """tc requests on one namespace's rtnetlink socket."""

    def __init__(self, transport: Rtnl) -> None:
        self._nl = transport

    @classmethod
    @contextmanager
    def open(cls, netns: str | None = None) -> Iterator[Tc]:
        with Rtnl.open(netns) as transport:
            yield cls(transport)

    def ensure_clsact(self, ifindex: int) -> None:
        """A clsact qdisc on the device (idempotent): the hooks filters attach to."""
        fields = {"index": ifindex, "handle": _CLSACT_HANDLE, "parent": _TC_H_CLSACT}
        try:
            self._nl.request(
                message(tcmsg, fields, [("TCA_KIND", "clsact")]),
                RTM_NEWQDISC,
                NLM_F_CREATE | NLM_F_EXCL,
            )
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise translate(exc, f"clsact qdisc on interface #{ifindex}") from None

    def delete_clsact(self, ifindex: int) -> None:
        """The device's clsact qdisc and every filter on it gone (idempotent)."""
        fields = {"index": ifindex, "handle": _CLSACT_HANDLE, "parent": _TC_H_CLSACT}
        try:
            self._nl.request(message(tcmsg, fields, [("TCA_KIND", "clsact")]), RTM_DELQDISC)
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                raise translate(exc, f"deleting clsact on #{ifindex}") from None

    def set_filter(
        self,
        ifindex: int,
        hook: Hook,
        prio: int,
        protocol: int,
        *,
        keys: Sequence[str],
        copy_to: Sequence[int],
    ) -> None:
        """The u32 filter at (`hook`, `prio`, `protocol`) of the device is now exactly this one
        (the old one, if any, deleted first: a packet in between meets the next priority). A
        matching packet is sent out of every device in `copy_to` and goes no further; with
        `copy_to` empty it is let through untouched (and the later priorities are skipped)."""
        self.delete_filter(ifindex, hook, prio, protocol)
        request = {"protocol": protocol, "prio": prio}
        cls_u32.fix_request(request)
        fields = {"index": ifindex, "handle": 0, "parent": HOOKS[hook], "info": request["info"]}
        options = cls_u32.get_parameters(
            {"keys": list(keys), "action": _copies(copy_to), "target": 0}
        )
        # No class to bind to: clsact has none (a classid there is ENOENT); the actions decide.
        options["attrs"] = [a for a in options["attrs"] if a[0] != "TCA_U32_CLASSID"]
        msg = message(tcmsg, fields, [("TCA_KIND", "u32"), ("TCA_OPTIONS", options)])
        try:
            self._nl.request(msg, RTM_NEWTFILTER, NLM_F_CREATE | NLM_F_EXCL)
        except NetlinkError as exc:
            raise translate(exc, f"tc filter {hook} prio {prio} on interface #{ifindex}") from None

    def delete_filter(self, ifindex: int, hook: Hook, prio: int, protocol: int) -> None:
        info = (prio << 16) | socket.htons(protocol)
        fields = {"index": ifindex, "handle": 0, "parent": HOOKS[hook], "info": info}
        try:
            self._nl.request(message(tcmsg, fields, []), RTM_DELTFILTER)
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                raise translate(exc, f"deleting tc filter prio {prio} on #{ifindex}") from None

    def filters(self, ifindex: int, hook: Hook) -> set[tuple[int, int]]:
        """The (priority, protocol) pairs with a filter on the device's hook."""
        fields = {"index": ifindex, "handle": 0, "parent": HOOKS[hook], "info": 0}
        try:
            raws = self._nl.request_raw(message(tcmsg, fields, []), RTM_GETTFILTER, dump=True)
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.EINVAL, errno.ENOENT):
                return set()
            raise translate(exc, f"tc filters on #{ifindex}") from None
        out: set[tuple[int, int]] = set()
        for raw in raws:
            _family, index, _handle, _parent, info = _TCMSG.unpack_from(raw, NLMSG_HDR.size)
            if index == ifindex:
                out.add((info >> 16, socket.ntohs(info & 0xFFFF)))
        return out
