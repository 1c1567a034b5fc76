"""Config models of the built-in link delegates: `plexus-routed`, `plexus-macvlan`,
`plexus-ipvlan` (the keys of the reference macvlan/ipvlan plugins) and `plexus-sriov`
(sriov-cni's keys). Unknown keys are ignored, as the reference plugins ignore them."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
OnOff = Literal["on", "off"]


class MulticastKeys(BaseModel):
    """`multicast: true` makes an attachment the pod's way to multicast groups: group routes
    (224.0.0.0/4, ff00::/8) through it, so a socket that joins or sends without naming an
    interface uses this network; `igmpVersion` / `mldVersion` pin the host-side protocol
    version (unset: the kernel's IGMPv3 / MLDv2, falling back to an older querier's)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    multicast: bool = False
    igmp_version: Literal[2, 3] | None = Field(default=None, alias="igmpVersion")
    mld_version: Literal[1, 2] | None = Field(default=None, alias="mldVersion")

    @model_validator(mode="after")
    def _versions_need_multicast(self) -> MulticastKeys:
        if (self.igmp_version or self.mld_version) and not self.multicast:
            raise ValueError('igmpVersion and mldVersion need "multicast": true')
        return self


class RoutedConf(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str
    mtu: int | None = Field(default=None, ge=1280, le=65535)
    link_in_container: bool = Field(default=False, alias="linkInContainer")


class SubLinkConf(MulticastKeys):
    """Keys shared with the reference macvlan/ipvlan plugins (unknown keys are ignored, as the
    reference plugins ignore them), plus the multicast keys."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str
    master: str | None = None
    mtu: int | None = Field(default=None, ge=68, le=65535)
    link_in_container: bool = Field(default=False, alias="linkInContainer")


class MacvlanConf(SubLinkConf):
    mode: Literal["bridge", "private", "vepa", "passthru"] = "bridge"
    mac: str | None = None
    bcqueuelen: int | None = Field(default=None, ge=0)

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str | None) -> str | None:
        if value is not None and not _MAC.match(value):
            raise ValueError(f"{value!r} is not a MAC address")
        return value


class IpvlanConf(SubLinkConf):
    mode: Literal["l2", "l3", "l3s"] = "l2"
    flag: Literal["bridge", "private", "vepa"] = "bridge"

    @model_validator(mode="after")
    def _multicast_needs_l2(self) -> IpvlanConf:
        if self.multicast and self.mode != "l2":
            raise ValueError(
                f"ipvlan in {self.mode} mode carries no multicast (the kernel routes it as IP, "
                "and IP multicast is not routed between ipvlan ports): use mode l2, or "
                'plexus-macvlan, for "multicast": true'
            )
        return self


class SriovConf(MulticastKeys):
    """sriov-cni's keys; unknown keys are ignored, as sriov-cni ignores them. Pure: which VF,
    and what its PF can do, is looked up at ADD time (`delegates.sriov` adds the PF-side
    settings it derives)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = ""
    device_id: str | None = Field(default=None, alias="deviceID")
    vlan: int | None = Field(default=None, ge=0, le=4094)
    vlan_qos: int | None = Field(default=None, alias="vlanQoS", ge=0, le=7)
    vlan_proto: Literal["802.1q", "802.1ad"] | None = Field(default=None, alias="vlanProto")
    mac: str | None = None
    spoofchk: OnOff | None = None
    trust: OnOff | None = None
    link_state: Literal["auto", "enable", "disable"] | None = None
    min_tx_rate: int | None = Field(default=None, ge=0)
    max_tx_rate: int | None = Field(default=None, ge=0)

    @field_validator("vlan_proto", mode="before")
    @classmethod
    def _proto(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value  # sriov-cni takes "802.1Q"

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str | None) -> str | None:
        if value is not None and not _MAC.match(value):
            raise ValueError(f"{value!r} is not a MAC address")
        return value.lower() if value else value

    @model_validator(mode="after")
    def _consistent(self) -> SriovConf:
        if self.vlan_qos is not None and self.vlan is None:
            raise ValueError("vlanQoS needs vlan")
        if self.vlan_qos and not self.vlan:
            raise ValueError("a non-zero vlanQoS needs a non-zero vlan")
        if self.vlan_proto is not None and self.vlan is None:
            raise ValueError("vlanProto needs vlan")
        if self.vlan_proto == "802.1ad" and not self.vlan:
            raise ValueError("vlanProto 802.1ad needs a vlan above 0")
        if self.max_tx_rate and (self.min_tx_rate or 0) > self.max_tx_rate:
            raise ValueError("min_tx_rate is above max_tx_rate")
        if self.multicast and self.trust == "off":
            raise ValueError(
                '"multicast": true needs the VF trusted (a PF driver filters multicast for an '
                'untrusted VF and refuses it allmulticast): drop "trust": "off"'
            )
        return self


class SbrConf(BaseModel):
    """`plexus-sbr`: `table` pins the routing table (else the delegate picks a free one from
    100); a `table` that is not an integer would be ignored by the delegate, so the checks
    refuse it rather than let it pass unnoticed."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str
    table: int | None = Field(default=None, ge=1, le=0xFFFFFFFF)


class OverlayConf(MulticastKeys):
    """`plexus-overlay`: an L2 network spanning the fabric's nodes over VXLAN. `vni` pins the
    segment's VXLAN id (else it is derived from the network's name); `mtu` may only lower the
    one derived from the underlay (checked at ADD, where the underlay is known)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str
    vni: int | None = Field(default=None, ge=1, le=16777215)
    mtu: int | None = Field(default=None, ge=68, le=65535)
    link_in_container: bool = Field(default=False, alias="linkInContainer")
