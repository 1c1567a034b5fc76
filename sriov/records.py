"""What the node agent remembers about each VF, durably: its state, who holds it, and what to put
back when it is released (its netdev's host name, MAC and MTU; the PF-side settings ADD changed).

One owner moves a VF through free -> reserved -> attached -> releasing -> free (plus unhealthy,
left only by an audit that heals it); `sriov.ledger.Ledger` stores these records and
`sriov.agent.NodeAgent` is the only writer.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict

from cnispec.identity import Holder

LinkState = Literal["auto", "enable", "disable"]
VlanProto = Literal["802.1q", "802.1ad"]


class VfState(StrEnum):
    FREE = "free"
    RESERVED = "reserved"  # promised to a holder; ADD is (or was, before a crash) under way
    ATTACHED = "attached"  # in the holder's netns, configured
    RELEASING = "releasing"  # DEL (or a heal) is putting it back
    UNHEALTHY = "unhealthy"  # could not be healed: never given out until an audit heals it


class VfSettings(BaseModel):
    """PF-side settings of one VF (what `ip link set <pf> vf N ...` changes). None means "not
    set / not reported by the driver": apply leaves it alone, restore does not touch it."""

    model_config = ConfigDict(frozen=True)

    mac: str | None = None
    vlan: int | None = None
    qos: int | None = None
    vlan_proto: VlanProto | None = None
    spoofchk: bool | None = None
    trust: bool | None = None
    link_state: LinkState | None = None
    min_tx_rate: int | None = None
    max_tx_rate: int | None = None


class HostState(BaseModel):
    """The VF netdev as it was in the node's netns before ADD moved it."""

    model_config = ConfigDict(frozen=True)

    name: str
    mac: str | None = None
    mtu: int | None = None
    alias: str | None = None  # the admin's own alias, put back when ours comes off
    up: bool | None = None  # VFs usually rest down in the node; one the admin had up stays up


class VfRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    pci: str
    state: VfState = VfState.FREE
    pool: str | None = None
    holder: Holder | None = None
    # Filled before ADD changes anything, so a restart after a crash knows what to put back.
    host: HostState | None = None
    pf_before: VfSettings | None = None  # the PF-side settings as they were before ADD
    pf_applied: tuple[str, ...] = ()  # the VfSettings fields ADD set (only those are restored)
    pf_set: VfSettings | None = None  # what ADD set them to: the audit puts back any drift
    reason: str = ""  # why unhealthy
    updated: float = 0.0
