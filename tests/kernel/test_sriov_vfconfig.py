"""sriov.vfconfig against a real driver: a netdevsim PF with 4 VFs in the VM tier (Debian's
kernel, netdevsim built out of tree by tests/vm/runner.py). What `apply` sets is read back both
through `read_vf` and from `ip -d link show` (what a node admin looks at), and `restore` puts
the original back. On a kernel without netdevsim the tests skip; in the VM they must run.

Each test makes its own netdevsim device from inside a fresh "node" namespace (netdevsim puts a
new device's ports in the writer's namespace), finds the PF netdev through the device's sysfs
`net/` directory, never by name, and deletes the device at the end.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator

import pytest

from cnispec.errors import DeviceNotFound, DeviceSettingUnsupported
from sriov import vfconfig
from sriov.records import VfSettings
from testbed.netns import Netns
from tests.support.netdevsim import NUM_VFS, Nsim, netdevsim

pytestmark = pytest.mark.kernel

NetnsFactory = Callable[[str], Netns]
VF = 2  # not 0: an index mix-up shows
# What netdevsim reports for a VF nobody configured (vlan_proto None: no VLAN).
PRISTINE = VfSettings(
    mac="00:00:00:00:00:00",
    vlan=0,
    qos=0,
    spoofchk=False,
    trust=False,
    link_state="auto",
    min_tx_rate=0,
    max_tx_rate=0,
)
EVERYTHING = VfSettings(
    mac="02:5a:00:00:00:02",
    vlan=100,
    qos=3,
    vlan_proto="802.1ad",
    spoofchk=True,
    trust=True,
    link_state="disable",
    min_tx_rate=10,
    max_tx_rate=100,
)


@pytest.fixture
def nsim(require_kernel: Callable[..., None], netns: NetnsFactory) -> Iterator[Nsim]:
    require_kernel("netdevsim")
    with netdevsim(netns("node")) as made:
        yield made


def test_apply_sets_every_field_and_restore_puts_the_original_back(nsim: Nsim) -> None:
    before = nsim.call(vfconfig.read_vf, nsim.pf, VF)
    assert before == PRISTINE
    shown_before = nsim.shown()
    assert sorted(shown_before) == list(range(NUM_VFS))

    fields = nsim.call(vfconfig.apply, nsim.pf, VF, EVERYTHING, before)

    assert set(fields) == set(VfSettings.model_fields)
    assert nsim.call(vfconfig.read_vf, nsim.pf, VF) == EVERYTHING
    shown = nsim.shown()
    assert shown[VF] == {
        "mac": "02:5a:00:00:00:02",
        "vlan": "100",
        "qos": "3",
        "vlan_proto": "802.1ad",
        "spoofchk": "on",
        "trust": "on",
        "link_state": "disable",
        "min_tx_rate": "10",
        "max_tx_rate": "100",
    }
    assert {i: v for i, v in shown.items() if i != VF} == {
        i: v for i, v in shown_before.items() if i != VF
    }

    nsim.call(vfconfig.restore, nsim.pf, VF, before, fields)

    assert nsim.shown() == shown_before
    assert nsim.call(vfconfig.read_vf, nsim.pf, VF) == before


def test_apply_of_some_fields_leaves_the_others_alone(nsim: Nsim) -> None:
    # A VF someone configured by hand: what apply must not touch is not at its default.
    nsim.node.run(
        "ip", "link", "set", nsim.pf, "vf", str(VF), "mac", "02:5a:00:00:00:07",
        "spoofchk", "on", "max_tx_rate", "50", "state", "enable",
    )  # fmt: skip
    before = nsim.call(vfconfig.read_vf, nsim.pf, VF)
    shown_before = nsim.shown()[VF]

    wanted = VfSettings(vlan=42, trust=True)
    fields = nsim.call(vfconfig.apply, nsim.pf, VF, wanted, before)

    # "vlan 42" means QoS 0 and 802.1Q, as with `ip link`: the three are one request.
    assert fields == ("vlan", "qos", "vlan_proto", "trust")
    after = nsim.call(vfconfig.read_vf, nsim.pf, VF)
    assert after == before.model_copy(update={"vlan": 42, "vlan_proto": "802.1q", "trust": True})
    assert nsim.shown()[VF] == shown_before | {"vlan": "42", "trust": "on"}

    nsim.call(vfconfig.restore, nsim.pf, VF, before, fields)
    assert nsim.shown()[VF] == shown_before


def test_a_refused_setting_rolls_back_what_was_set_before_it(nsim: Nsim) -> None:
    before = nsim.call(vfconfig.read_vf, nsim.pf, VF)
    shown_before = nsim.shown()
    # Rates go after VLAN, MAC, spoof checking and trust; the kernel refuses a floor above the
    # ceiling (rtnl_set_vf_rate: EINVAL), so those four must be undone, link-state never set.
    wanted = EVERYTHING.model_copy(update={"min_tx_rate": 200, "max_tx_rate": 100})

    with pytest.raises(DeviceSettingUnsupported) as refused:
        nsim.call(vfconfig.apply, nsim.pf, VF, wanted, before)

    assert refused.value.code == 113
    assert refused.value.msg == (
        f"PF {nsim.pf} (driver netdevsim) refused min_tx_rate=200 max_tx_rate=100 "
        f"for VF {VF}: Invalid argument"
    )
    assert nsim.shown() == shown_before
    assert nsim.call(vfconfig.read_vf, nsim.pf, VF) == before


def test_read_vf_of_an_unknown_vf_pf_or_a_pf_without_vfs(nsim: Nsim) -> None:
    with pytest.raises(DeviceNotFound, match=f"PF {nsim.pf} has {NUM_VFS} VFs: there is no VF 7"):
        nsim.call(vfconfig.read_vf, nsim.pf, 7)
    with pytest.raises(DeviceNotFound, match="no PF netdev nosuch0"):
        nsim.call(vfconfig.read_vf, "nosuch0", 0)
    nsim.node.ip("link", "add", "ve0", "type", "veth", "peer", "name", "ve1")
    assert nsim.call(vfconfig.read_vf, "ve0", 0) == VfSettings()
    # A VF index the PF does not have is refused by the driver, not half applied.
    with pytest.raises(DeviceSettingUnsupported, match="for VF 7: Invalid argument"):
        nsim.call(vfconfig.apply, nsim.pf, 7, VfSettings(trust=True), PRISTINE)


def test_num_vfs_changes_only_through_zero(nsim: Nsim) -> None:
    # Like PCI SR-IOV drivers (sriov_numvfs_store: "%d VFs already enabled"), netdevsim refuses
    # nonzero -> nonzero with EBUSY: why sriov.sysfs.Sysfs.set_num_vfs goes through 0.
    numvfs = nsim.device / "sriov_numvfs"
    with pytest.raises(OSError) as busy:
        numvfs.write_text("2")
    assert busy.value.errno == errno.EBUSY
    assert numvfs.read_text().strip() == str(NUM_VFS)

    numvfs.write_text("0")
    numvfs.write_text("2")
    assert numvfs.read_text().strip() == "2"
    assert sorted(nsim.shown()) == [0, 1]
