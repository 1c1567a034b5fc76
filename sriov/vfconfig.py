"""PF-side configuration of one VF through rtnetlink: what `ip link set <pf> vf N ...` changes
(MAC, VLAN with QoS and protocol, spoof checking, trust, link state, rate limits).

`read_vf` snapshots a VF's settings, `apply` sets what a NAD asks for (and rolls itself back when
the driver refuses something), `restore` puts back what `apply` changed. Called by the
`plexus-sriov` delegate (ADD, DEL, CHECK), `sriov.release` and `sriov.audit`, always on a PF in
the node's network namespace, i.e. the caller's: no fork, no namespace switch. The messages
themselves are `kernel.vf`'s, sent on the one rtnetlink transport.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, get_args

from pyroute2.netlink.exceptions import NetlinkError

from cnispec.errors import (
    DeviceNotFound,
    DeviceSettingUnsupported,
    InvalidConfig,
    PlexusError,
)
from kernel.rtnl import Rtnl
from kernel.vf import PfLink, netdev_driver, set_vf
from sriov.records import LinkState, VfSettings, VlanProto

_PROTOS: Final[dict[VlanProto, int]] = {"802.1q": 0x8100, "802.1ad": 0x88A8}
_LINK_STATES: Final[tuple[LinkState, ...]] = get_args(LinkState)  # IFLA_VF_LINK_STATE_* order
_NOT_REPORTED: Final = 0xFFFFFFFF  # the kernel's -1 for spoofchk/trust a driver does not report
# What `restore` falls back on for a field the driver did not report before: the kernel's and
# the drivers' own defaults ("no VLAN", no MAC, no limits). Spoof checking has none: drivers
# differ (Intel's on, netdevsim's off), so an unreported spoofchk is never written back.
_DEFAULTS: Final = VfSettings(
    mac="00:00:00:00:00:00",
    vlan=0,
    qos=0,
    vlan_proto="802.1q",
    trust=False,
    link_state="auto",
    min_tx_rate=0,
    max_tx_rate=0,
)


# --------------------------------------------------------------------------------- encoding


def _mac_attr(vf: int, s: VfSettings) -> tuple[str, Any]:
    return "IFLA_VF_MAC", {
        "vf": vf,
        "mac": bytes.fromhex(str(s.mac).replace(":", "")).ljust(32, b"\0"),
    }


def _vlan_attr(vf: int, s: VfSettings) -> tuple[str, Any]:
    assert s.vlan_proto is not None  # _Setting.values completed every field
    info = {"vf": vf, "vlan": s.vlan, "qos": s.qos, "proto": _PROTOS[s.vlan_proto]}
    return "IFLA_VF_VLAN_LIST", {"attrs": [("IFLA_VF_VLAN_INFO", info)]}


def _rate_attr(vf: int, s: VfSettings) -> tuple[str, Any]:
    return "IFLA_VF_RATE", {"vf": vf, "min_tx_rate": s.min_tx_rate, "max_tx_rate": s.max_tx_rate}


def _setting_attr(name: str, value: Callable[[VfSettings], int]) -> Callable[..., Any]:
    return lambda vf, s: (name, {"vf": vf, "setting": value(s)})


@dataclass(frozen=True)
class _Setting:
    """One request's worth of VfSettings fields (the kernel sets VLAN, QoS and protocol as one,
    and both rates as one)."""

    fields: tuple[str, ...]
    attr: Callable[[int, VfSettings], tuple[str, Any]]
    # apply: a field the NAD leaves out keeps its current value (True: rates) or takes the
    # default (False: "vlan 100" means QoS 0, 802.1Q, as with `ip link`)
    keep_current: bool = False

    def values(self, wanted: VfSettings, fallback: VfSettings) -> VfSettings | None:
        """`wanted` completed from `fallback`; None when a field is known in neither."""
        merged = {f: _first(getattr(wanted, f), getattr(fallback, f)) for f in self.fields}
        return None if None in merged.values() else VfSettings.model_validate(merged)


# The order of the requests: the VF's link comes up (link_state) only once everything else is
# set; restore uses the same order, so the MAC is put back while trust is still on (see restore).
_SETTINGS: Final = (
    _Setting(("vlan", "qos", "vlan_proto"), _vlan_attr),
    _Setting(("mac",), _mac_attr),
    _Setting(("spoofchk",), _setting_attr("IFLA_VF_SPOOFCHK", lambda s: int(bool(s.spoofchk)))),
    _Setting(("trust",), _setting_attr("IFLA_VF_TRUST", lambda s: int(bool(s.trust)))),
    _Setting(("min_tx_rate", "max_tx_rate"), _rate_attr, keep_current=True),
    _Setting(
        ("link_state",),
        _setting_attr("IFLA_VF_LINK_STATE", lambda s: _LINK_STATES.index(s.link_state)),
    ),
)


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


# --------------------------------------------------------------------------------- decoding


def _vlan_list(attr: Any) -> dict[str, Any]:
    for info in attr.get_attrs("IFLA_VF_VLAN_INFO")[:1]:
        proto = {v: k for k, v in _PROTOS.items()}.get(info["proto"])
        return {"vlan": info["vlan"], "qos": info["qos"], "vlan_proto": proto}
    return {}


def _flag(value: int) -> bool | None:
    return None if value == _NOT_REPORTED else bool(value)


def _link_state(value: int) -> LinkState | None:
    return _LINK_STATES[value] if value < len(_LINK_STATES) else None


# IFLA_VF_INFO attribute -> the VfSettings fields it reports. The kernel sends IFLA_VF_VLAN_LIST
# (with the protocol) after IFLA_VF_VLAN (without), so the later one wins.
_READERS: Final[Mapping[str, Callable[[Any], dict[str, Any]]]] = {
    "IFLA_VF_MAC": lambda a: {"mac": a["mac"]},
    "IFLA_VF_VLAN": lambda a: {"vlan": a["vlan"], "qos": a["qos"]},
    "IFLA_VF_VLAN_LIST": _vlan_list,
    "IFLA_VF_SPOOFCHK": lambda a: {"spoofchk": _flag(a["spoofchk"])},
    "IFLA_VF_TRUST": lambda a: {"trust": _flag(a["trust"])},
    "IFLA_VF_LINK_STATE": lambda a: {"link_state": _link_state(a["link_state"])},
    "IFLA_VF_RATE": lambda a: {"min_tx_rate": a["min_tx_rate"], "max_tx_rate": a["max_tx_rate"]},
}


def _decode(vf_info: Any) -> VfSettings:
    values: dict[str, Any] = {}
    for name, attr in vf_info["attrs"]:
        if name in _READERS:
            values |= _READERS[name](attr)
    if not values.get("vlan") and not values.get("qos"):
        # No VLAN: the protocol means nothing, and drivers disagree on what they report for it
        # (netdevsim 0 until a VLAN was set once, others 802.1Q).
        values["vlan_proto"] = None
    return VfSettings.model_validate(values)


# --------------------------------------------------------------------------------------- API


def read_vf(pf_ifname: str, vf_index: int) -> VfSettings:
    """The PF-side settings of VF `vf_index` as the PF's driver reports them. A field the driver
    does not report is None; a link with no VF information at all (a veth) gives all None."""
    pf = PfLink.read(pf_ifname)
    if pf.vf_infos is None:
        return VfSettings()
    for vf_info in pf.vf_infos:
        if _vf_of(vf_info) == vf_index:
            return _decode(vf_info)
    raise DeviceNotFound(f"PF {pf_ifname} has {pf.num_vfs} VFs: there is no VF {vf_index}")


def apply(pf_ifname: str, vf_index: int, wanted: VfSettings, before: VfSettings) -> tuple[str, ...]:
    """Set the fields of `wanted` that are not None, one request per `_SETTINGS` entry, and
    return the names of the fields set (what `restore` must put back). If the driver refuses
    one, what was set is put back from `before` and DeviceSettingUnsupported says which."""
    if wanted.vlan is None and (wanted.qos is not None or wanted.vlan_proto is not None):
        raise InvalidConfig(f"VF {vf_index} of PF {pf_ifname}: vlanQoS and vlanProto need a vlan")
    done: list[str] = []
    pf = PfLink.read(pf_ifname)
    with Rtnl.open() as nl:
        for setting, values in _requests(wanted, before):
            try:
                set_vf(nl, pf.index, setting.attr(vf_index, values))
            except NetlinkError as exc:
                refusal = (
                    f"PF {pf_ifname} (driver {netdev_driver(pf_ifname)}) refused "
                    f"{_describe(setting, values)} for VF {vf_index}: {os.strerror(exc.code)}"
                )
                break
            done += setting.fields
        else:
            return tuple(done)
    try:
        restore(pf_ifname, vf_index, before, done)
    except PlexusError as undo:
        refusal += f"; and then {undo.msg}"
    raise DeviceSettingUnsupported(refusal)


def _requests(wanted: VfSettings, before: VfSettings) -> Iterator[tuple[_Setting, VfSettings]]:
    """The settings `wanted` touches, in order, each with the complete values to send."""
    for setting in _SETTINGS:
        if all(getattr(wanted, f) is None for f in setting.fields):
            continue
        fallback = _merge(before, _DEFAULTS) if setting.keep_current else _DEFAULTS
        values = setting.values(wanted, fallback)
        assert values is not None  # _DEFAULTS knows every field these settings can miss
        yield setting, values


def differences(wanted: VfSettings, now: VfSettings, fields: Sequence[str]) -> list[str]:
    """The `fields` whose value in `now` is not the one `wanted` sets. Without a VLAN, its QoS
    and protocol mean nothing, and drivers report them differently (netdevsim none, others
    802.1Q): they are not compared then."""
    no_vlan = not wanted.vlan
    return [
        f
        for f in fields
        if getattr(wanted, f) is not None
        and not (no_vlan and f in ("qos", "vlan_proto"))
        and getattr(now, f) != getattr(wanted, f)
    ]


def only(settings: VfSettings, fields: Sequence[str]) -> VfSettings:
    """`settings` reduced to the requests that carry `fields` (VLAN, QoS and protocol go as
    one; so do both rates): what re-applying just those fields sends."""
    keep = {f for s in _SETTINGS if set(s.fields) & set(fields) for f in s.fields}
    return VfSettings.model_validate({f: getattr(settings, f) for f in keep})


def restore(pf_ifname: str, vf_index: int, before: VfSettings, fields: Sequence[str]) -> None:
    """Put back `fields` (as returned by `apply`) from `before`. Best effort: every setting is
    tried, then one PlexusError lists those that failed. A PF that is gone is DeviceNotFound."""
    failures: list[str] = []
    pf = PfLink.read(pf_ifname)
    with Rtnl.open() as nl:
        # In apply's order, so the MAC goes back before trust is turned off again: some drivers
        # (i40e, ice) refuse an untrusted VF's MAC change, zero included, until trust is on.
        for setting in _SETTINGS:
            if not set(setting.fields) & set(fields):
                continue
            values = setting.values(before, _DEFAULTS)
            if values is None:
                continue  # spoofchk the driver never reported: nothing known to put back
            try:
                set_vf(nl, pf.index, setting.attr(vf_index, values))
            except NetlinkError as exc:
                failures.append(f"{_describe(setting, values)}: {os.strerror(exc.code)}")
    if failures:
        raise PlexusError(
            f"could not restore VF {vf_index} of PF {pf_ifname}: {'; '.join(failures)}"
        )


# ---------------------------------------------------------------------------------- helpers


def _vf_of(vf_info: Any) -> int | None:
    mac = vf_info.get_attr("IFLA_VF_MAC")  # the kernel sends it for every VF
    return None if mac is None else int(mac["vf"])


def _merge(primary: VfSettings, fallback: VfSettings) -> VfSettings:
    return VfSettings.model_validate(
        {f: _first(getattr(primary, f), getattr(fallback, f)) for f in VfSettings.model_fields}
    )


def _describe(setting: _Setting, values: VfSettings) -> str:
    return " ".join(f"{f}={getattr(values, f)}" for f in setting.fields)
