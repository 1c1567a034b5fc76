"""What counts as a difference between the PF-side settings a NAD set and what the driver
reports (CHECK and the audit's drift correction use it), and what re-applying some of them
sends."""

from __future__ import annotations

from sriov.records import VfSettings
from sriov.vfconfig import differences, only

VLAN_FIELDS = ["vlan", "qos", "vlan_proto"]


def test_without_a_vlan_its_qos_and_protocol_are_not_compared() -> None:
    # sriov-cni takes "vlan: 0, vlanProto: 802.1Q"; drivers report no protocol then.
    wanted = VfSettings(vlan=0, vlan_proto="802.1q")
    reported = VfSettings(vlan=0, qos=0, vlan_proto=None)
    assert differences(wanted, reported, VLAN_FIELDS) == []


def test_a_changed_vlan_is_a_difference() -> None:
    wanted = VfSettings(vlan=100, qos=3, vlan_proto="802.1ad", trust=True)
    reported = VfSettings(vlan=5, qos=3, vlan_proto="802.1ad", trust=True)
    assert differences(wanted, reported, [*VLAN_FIELDS, "trust"]) == ["vlan"]


def test_fields_the_nad_does_not_set_are_not_compared() -> None:
    wanted = VfSettings(spoofchk=True)
    reported = VfSettings(spoofchk=True, trust=True, vlan=7)
    assert differences(wanted, reported, ["spoofchk", "trust", "vlan"]) == []


def test_reapplying_a_field_sends_only_its_request() -> None:
    wanted = VfSettings(
        mac="02:00:00:00:00:01", vlan=100, qos=3, trust=True, min_tx_rate=1, max_tx_rate=9
    )
    assert only(wanted, ["qos"]) == VfSettings(vlan=100, qos=3)  # VLAN, QoS, proto go as one
    assert only(wanted, ["max_tx_rate"]) == VfSettings(min_tx_rate=1, max_tx_rate=9)
    assert only(wanted, ["trust"]) == VfSettings(trust=True)
