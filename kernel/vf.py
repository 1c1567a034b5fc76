"""The PF-side VF codec: what `ip link set <pf> vf N ...` sends and `ip -d link show <pf>` reads,
on the one rtnetlink transport (`kernel.rtnl`), and the netdev's driver name for messages.

`PfLink.read(name)` reads the PF with its VF list (RTEXT_FILTER_VF); `set_vf` sends one
IFLA_VF_INFO attribute per request, acknowledged. What the attributes mean (which settings,
in which order, how to undo them) is `sriov.vfconfig`'s business.

NOTE: the request is encoded here rather than through pyroute2's `link("set", vf=...)`: its
IFLA_VF_VLAN_INFO is 14 bytes and the kernel wants the 16 of `struct ifla_vf_vlan_info`
(rtnetlink.c do_setvfinfo answers EINVAL), so no VLAN protocol could be set through it.
"""

from __future__ import annotations

import array
import errno
import fcntl
import socket
import struct
from dataclasses import dataclass
from typing import Any, Final

from pyroute2.netlink import nla, nlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_GETLINK, RTM_NEWLINK
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from cnispec.errors import DeviceNotFound
from kernel.rtnl import Rtnl, message, translate

_IFLA_VFINFO_LIST: Final = 22
_RTEXT_FILTER_VF: Final = 1  # without it the kernel leaves IFLA_VFINFO_LIST out
_SIOCETHTOOL: Final = 0x8946
_ETHTOOL_GDRVINFO: Final = 3
_DRVINFO_SIZE: Final = 196  # sizeof(struct ethtool_drvinfo)


class _SetVfMsg(nlmsg):  # type: ignore[misc]  # pyroute2 is untyped
    """RTM_NEWLINK with only IFLA_VFINFO_LIST: one VF setting per request."""

    fields = (
        ("family", "B"),
        ("__align", "x"),
        ("ifi_type", "H"),
        ("index", "i"),
        ("flags", "I"),
        ("change", "I"),
    )
    nla_map = ((_IFLA_VFINFO_LIST, "IFLA_VFINFO_LIST", "vf_list"),)

    class vf_list(nla):  # type: ignore[misc]  # pyroute2 finds nested classes by name
        nla_map = ((1, "IFLA_VF_INFO", "vf_info"),)

        class vf_info(nla):  # type: ignore[misc]
            # include/uapi/linux/if_link.h: IFLA_VF_* and their structs, all led by __u32 vf
            nla_map = (
                (1, "IFLA_VF_MAC", "vf_mac"),
                (4, "IFLA_VF_SPOOFCHK", "vf_setting"),
                (5, "IFLA_VF_LINK_STATE", "vf_setting"),
                (6, "IFLA_VF_RATE", "vf_rate"),
                (9, "IFLA_VF_TRUST", "vf_setting"),
                (12, "IFLA_VF_VLAN_LIST", "vf_vlan_list"),
            )

            class vf_mac(nla):  # type: ignore[misc]
                fields = (("vf", "I"), ("mac", "32s"))

            class vf_setting(nla):  # type: ignore[misc]
                fields = (("vf", "I"), ("setting", "I"))

            class vf_rate(nla):  # type: ignore[misc]
                fields = (("vf", "I"), ("min_tx_rate", "I"), ("max_tx_rate", "I"))

            class vf_vlan_list(nla):  # type: ignore[misc]
                nla_map = ((1, "IFLA_VF_VLAN_INFO", "vlan_info"),)

                class vlan_info(nla):  # type: ignore[misc]
                    # struct ifla_vf_vlan_info, padded to its 16 bytes
                    fields = (
                        ("vf", "I"),
                        ("vlan", "I"),
                        ("qos", "I"),
                        ("proto", ">H"),
                        ("__pad", "2x"),
                    )


@dataclass(frozen=True, slots=True)
class PfLink:
    """A PF netdev of the caller's namespace as the kernel reports it with its VFs."""

    name: str
    index: int
    num_vfs: int
    # pyroute2 IFLA_VF_INFO attributes, one per VF; None when the kernel sent no VF list (a
    # link without SR-IOV, or a PF with no VFs enabled)
    vf_infos: tuple[Any, ...] | None

    @classmethod
    def read(cls, name: str) -> PfLink:
        """DeviceNotFound when the node's namespace has no netdev of that name."""
        request = message(
            ifinfmsg, {}, [("IFLA_IFNAME", name), ("IFLA_EXT_MASK", _RTEXT_FILTER_VF)]
        )
        try:
            with Rtnl.open() as nl:
                (link,) = nl.request(request, RTM_GETLINK)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                raise DeviceNotFound(
                    f"no PF netdev {name} in the node's network namespace"
                ) from None
            raise translate(exc, f"reading PF {name}") from None
        vfs = link.get_attr("IFLA_VFINFO_LIST")
        infos = tuple(vfs.get_attrs("IFLA_VF_INFO")) if vfs is not None else None
        return cls(name, int(link["index"]), int(link.get_attr("IFLA_NUM_VF") or 0), infos)


def set_vf(nl: Rtnl, pf_index: int, attr: tuple[str, Any]) -> None:
    """One RTM_NEWLINK carrying one IFLA_VF_INFO attribute (say `("IFLA_VF_TRUST", {"vf": 3,
    "setting": 1})`), acknowledged; NetlinkError (with the kernel's errno) on refusal."""
    msg = _SetVfMsg()
    msg["index"] = pf_index
    msg["attrs"] = [("IFLA_VFINFO_LIST", {"attrs": [("IFLA_VF_INFO", {"attrs": [attr]})]})]
    nl.request(msg, RTM_NEWLINK)


def netdev_driver(ifname: str) -> str:
    """The netdev's driver, for messages: ETHTOOL_GDRVINFO on a socket of the caller's netns
    (sysfs would show another namespace's view unless it was mounted in this one)."""
    info = array.array("B", struct.pack("I", _ETHTOOL_GDRVINFO).ljust(_DRVINFO_SIZE, b"\0"))
    ifreq = struct.pack("16sP", ifname.encode()[:15], info.buffer_info()[0]).ljust(40, b"\0")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            fcntl.ioctl(sock, _SIOCETHTOOL, ifreq)
    except OSError:
        return "unknown"
    return info.tobytes()[4:36].split(b"\0")[0].decode(errors="replace") or "unknown"
