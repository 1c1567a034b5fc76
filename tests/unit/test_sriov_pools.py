"""The VF pools file: errors that name file:line, VF ranges, selector matching, first-match
assignment, numVfs per PF and the device plugin's environment variable name."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest

from cnispec.errors import InvalidConfig
from cnispec.vfpools import PfRef, PoolsFile, PoolSpec, env_name
from sriov.model import LinkType, Pf, Snapshot, Vf
from sriov.pools import assign, desired_num_vfs, load_pools, matches, parse_pools

SOURCE = "/etc/plexus/vf-pools.yaml"


def _pf(
    pci: str,
    netdev: str | None,
    nvfs: int,
    *,
    vendor: str = "8086",
    device: str = "154c",
    driver: str = "iavf",
    link_type: LinkType = "ether",
) -> Pf:
    vfs = tuple(
        Vf(
            pci=f"{pci[:-4]}{2 + i // 8:02x}.{i % 8}",
            pf_pci=pci,
            index=i,
            vendor=vendor,
            device=device,
            driver=driver,
            numa_node=0,
            netdev=f"{netdev}v{i}" if netdev else None,
            link_type=link_type,
        )
        for i in range(nvfs)
    )
    return Pf(
        pci=pci,
        vendor=vendor,
        device="1572",
        driver="i40e",
        numa_node=0,
        netdev=netdev,
        link_type=link_type,
        total_vfs=64,
        num_vfs=nvfs,
        vfs=vfs,
    )


def _snapshot(*pfs: Pf) -> Snapshot:
    return Snapshot(pfs={pf.pci: pf for pf in pfs})


def _pools(text: str) -> PoolsFile:
    return parse_pools(dedent(text), SOURCE)


def _error(text: str) -> str:
    with pytest.raises(InvalidConfig) as info:
        _pools(text)
    return info.value.msg


def _spec(**selectors: object) -> PoolSpec:
    return PoolSpec.model_validate({"resourceName": "plexus.dev/p", "selectors": selectors})


# --- parsing --------------------------------------------------------------------------------------


def test_a_full_file_parses_and_normalises_ids_link_types_and_addresses() -> None:
    pools = _pools(
        """\
        pools:
          - resourceName: plexus.dev/intel_vf
            selectors:
              vendors: [0x8086, "0X15B3", 8086]
              devices: [154c]
              drivers: [iavf]
              pfNames: ["ens1f0#0-3,6", ens1f1]
              rootDevices: [0000:3B:00.0#1-2, 3b:00.1]
              linkTypes: [ETH, ib]
            deviceType: vfio-pci
            numVfs: 8
            mtu: 9000
        """
    )
    (spec,) = pools.pools
    sel = spec.selectors
    assert sel.vendors == ("8086", "15b3", "8086")
    assert sel.devices == ("154c",)
    assert sel.pf_names == (PfRef("ens1f0", ((0, 3), (6, 6))), PfRef("ens1f1"))
    assert sel.root_devices == (PfRef("0000:3b:00.0", ((1, 2),)), PfRef("0000:3b:00.1"))
    assert sel.link_types == ("ether", "infiniband")
    assert (spec.device_type, spec.num_vfs, spec.mtu) == ("vfio-pci", 8, 9000)
    dumped = pools.model_dump(by_alias=True, exclude_none=True)
    assert dumped["pools"][0]["selectors"]["pfNames"] == ("ens1f0#0-3,6", "ens1f1")
    assert dumped["pools"][0]["deviceType"] == "vfio-pci"


def test_defaults_and_an_empty_pools_list() -> None:
    spec = _spec(drivers=["iavf"])
    assert (spec.device_type, spec.num_vfs, spec.mtu) == ("netdevice", None, None)
    assert _pools("pools: []\n").pools == ()


def test_backwards_range_names_file_line_and_field() -> None:
    msg = _error(
        """\
        pools:
          - resourceName: plexus.dev/a
            selectors:
              vendors: ["8086"]
          - resourceName: plexus.dev/b
            selectors:
              pfNames:
                - ens1f0#3-1
        """
    )
    assert msg == (
        f"{SOURCE}:8: pools[1].selectors.pfNames[0]: 'ens1f0#3-1' has a range that runs backwards"
    )


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("ens1f0#-1", "has a negative VF index"),
        ("ens1f0#1--3", "has a negative VF index"),
        ("ens1f0#a-3", "is not a VF index or range"),
        ("ens1f0#1-2-3", "is not a VF index or range"),
        ("ens1f0#1,,2", "has an empty VF range"),
        ("ens1f0#", "has an empty VF range"),
        ("ens1f0#0-70000", "is beyond 65535"),
        ("ens1f0#٣", "is not a VF index or range"),  # a non-ASCII digit
        ("a-name-longer-than-15#1", "is not a netdev name"),
    ],
)
def test_bad_pf_name_entries_are_refused_with_their_line(entry: str, problem: str) -> None:
    msg = _error(
        f"""\
        pools:
          - resourceName: plexus.dev/a
            selectors:
              pfNames: [ens2, "{entry}"]
        """
    )
    assert msg.startswith(f"{SOURCE}:4: pools[0].selectors.pfNames[1]: {entry!r}")
    assert problem in msg


def test_root_devices_take_pci_addresses_only() -> None:
    msg = _error(
        """\
        pools:
          - resourceName: plexus.dev/a
            selectors:
              rootDevices: [ens1f0]
        """
    )
    assert msg == (
        f"{SOURCE}:4: pools[0].selectors.rootDevices[0]: 'ens1f0': 'ens1f0' is not a PCI "
        "address like 0000:3b:00.0"
    )


def test_several_errors_are_reported_together_in_line_order() -> None:
    msg = _error(
        """\
        pools:
          - resourceName: plexus.dev/a
            selectors:
              vendors: [80860]
              linkTypes: [wifi]
            mtu: 20
            numVFs: 4
            deviceType: sriov
        """
    )
    parts = msg.split("; ")
    assert [p.split(": ")[0] for p in parts] == [f"{SOURCE}:{n}" for n in (4, 5, 6, 7, 8)]
    assert "80860 is not a PCI id: 4 hex digits" in parts[0]
    assert "'wifi' is not a link type: use ether (eth) or infiniband (ib)" in parts[1]
    assert "pools[0].mtu: Input should be greater than or equal to 68 (got 20)" in parts[2]
    assert "pools[0].numVFs: unknown field" in parts[3]
    assert (
        "pools[0].deviceType: Input should be 'netdevice' or 'vfio-pci' (got 'sriov')" in (parts[4])
    )


def test_empty_selectors_match_nothing_and_say_so() -> None:
    msg = _error(
        """\
        pools:
          - resourceName: plexus.dev/a
            selectors: {}
        """
    )
    assert msg.startswith(f"{SOURCE}:3: pools[0].selectors: empty selectors match no VF")
    msg = _error(
        """\
        pools:
          - resourceName: plexus.dev/a
            selectors:
              drivers: []
        """
    )
    assert msg == (
        f"{SOURCE}:4: pools[0].selectors.drivers: an empty list matches nothing: list at least "
        "one entry, or leave it out"
    )


def test_missing_fields_point_at_the_pool_that_lacks_them() -> None:
    msg = _error(
        """\
        pools:
          - resourceName: plexus.dev/a
            selectors: {drivers: [iavf]}
          - mtu: 1500
        """
    )
    assert msg == (
        f"{SOURCE}:4: pools[1].resourceName: is required; {SOURCE}:4: pools[1].selectors: is required"
    )


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("intel_vf", "is not a resource name like plexus.dev/intel_vf"),
        ("Plexus.dev/x", "prefix 'Plexus.dev': it must be a lowercase DNS subdomain"),
        ("plexus..dev/x", "prefix 'plexus..dev': it must be a lowercase DNS subdomain"),
        ("plexus.dev/x y", "has name 'x y'"),
        ("plexus.dev/_x", "has name '_x'"),
        ("plexus.dev/", "has name ''"),
    ],
)
def test_resource_names_must_suit_kubelet(name: str, problem: str) -> None:
    msg = _error(
        f"""\
        pools:
          - selectors: {{drivers: [iavf]}}
            resourceName: "{name}"
        """
    )
    assert msg.startswith(f"{SOURCE}:3: pools[0].resourceName: {name!r} ")
    assert problem in msg


def test_resource_names_are_unique_and_the_repeat_is_pointed_at() -> None:
    msg = _error(
        """\
        pools:
          - resourceName: plexus.dev/a
            selectors: {drivers: [iavf]}
          - resourceName: plexus.dev/b
            selectors: {drivers: [iavf]}
          - resourceName: plexus.dev/a
            selectors: {drivers: [mlx5_core]}
        """
    )
    assert msg == (
        f"{SOURCE}:6: pools[2].resourceName: 'plexus.dev/a' is already the resourceName of "
        "pools[0]: resourceNames must be unique"
    )


def test_num_vfs_needs_a_selector_that_picks_pfs() -> None:
    msg = _error(
        """\
        pools:
          - resourceName: plexus.dev/a
            selectors: {drivers: [iavf]}
            numVfs: 4
        """
    )
    assert msg.startswith(f"{SOURCE}:4: pools[0].numVfs: numVfs needs rootDevices or pfNames")


def test_num_vfs_is_never_written_to_every_pf_of_a_vendor() -> None:
    # A vendor alone would also pick the node's uplink, and a numVfs write resets a PF.
    msg = _error(
        """        pools:
          - resourceName: plexus.dev/a
            selectors: {vendors: ["8086"], devices: ["154c"]}
            numVfs: 8
        """
    )
    assert "numVfs needs rootDevices or pfNames" in msg


def test_pools_whose_pods_would_share_an_env_variable_are_refused() -> None:
    msg = _error(
        """        pools:
          - resourceName: plexus.dev/intel.vf
            selectors: {vendors: ["8086"]}
          - resourceName: plexus.dev/intel-vf
            selectors: {vendors: ["15b3"]}
        """
    )
    assert msg.startswith(f"{SOURCE}:4: pools[1].resourceName: ")
    assert "PCIDEVICE_PLEXUS_DEV_INTEL_VF" in msg


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("kubernetes.io/vf", "kubernetes.io names are kubelet's own"),
        ("requests.plexus.dev/vf", "reserves for quota"),
    ],
)
def test_resource_names_kubelet_refuses_are_refused(name: str, problem: str) -> None:
    msg = _error(f"pools:\n  - resourceName: {name}\n    selectors: {{vendors: ['8086']}}\n")
    assert problem in msg


def test_a_single_label_prefix_is_a_resource_name_kubelet_takes() -> None:
    pools = parse_pools(
        "pools:\n  - resourceName: intel/vf\n    selectors: {vendors: ['8086']}\n", SOURCE
    )
    assert pools.pools[0].resource_name == "intel/vf"


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("pools:\n  - resourceName: [a\n", 3, "not valid YAML"),
        ("pools:\n\t- a\n", 2, "not valid YAML"),
        ("- a\n", 1, "(top level): expected a mapping, got list"),
        ("pools:\n  - resourceName: a\n    resourceName: b\n", 3, "duplicate key 'resourceName'"),
        ("pools: 3\n", 1, "pools: Input should be a valid tuple"),
        ("", 1, "the file is empty"),
        ("# only a comment\n", 1, "the file is empty"),
        ("pool: []\n", 1, "pools: is required"),
    ],
)
def test_malformed_files(text: str, line: int, problem: str) -> None:
    msg = _error(text)
    assert msg.startswith(f"{SOURCE}:{line}: ")
    assert problem in msg


def test_load_pools_reads_the_file_and_names_it_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "vf-pools.yaml"
    path.write_text("pools:\n  - resourceName: plexus.dev/a\n    selectors: {vendors: [xyz]}\n")
    with pytest.raises(InvalidConfig, match=rf"^{path}:3: pools\[0\]\.selectors\.vendors\[0\]: "):
        load_pools(path)
    path.write_text("pools:\n  - resourceName: plexus.dev/a\n    selectors: {vendors: [15b3]}\n")
    assert load_pools(path).pools[0].selectors.vendors == ("15b3",)
    with pytest.raises(InvalidConfig, match=r"cannot read VF pools file .*No such file"):
        load_pools(tmp_path / "absent.yaml")
    path.write_bytes(b"pools: [\xff]\n")
    with pytest.raises(InvalidConfig, match="cannot read VF pools file"):
        load_pools(path)


# --- ranges and matching --------------------------------------------------------------------------


def test_ranges_cover_exactly_their_indexes() -> None:
    ref = _spec(pfNames=["p#0-2,5,7-7"]).selectors.pf_names
    assert ref is not None
    assert [i for i in range(10) if ref[0].covers(i)] == [0, 1, 2, 5, 7]
    assert str(ref[0]) == "p#0-2,5,7"
    assert all(PfRef("p").covers(i) for i in (0, 63, 65535))


def test_every_given_field_must_match_and_any_entry_within_one() -> None:
    pf = _pf("0000:3b:00.0", "ens1f0", 8)
    vf = pf.vfs[4]
    assert matches(_spec(vendors=["8086"]), vf, pf)
    assert matches(_spec(vendors=["15b3", "8086"], devices=["154c"]), vf, pf)
    assert not matches(_spec(vendors=["8086"], devices=["1889"]), vf, pf)
    assert matches(_spec(drivers=["mlx5_core", "iavf"]), vf, pf)
    assert not matches(_spec(drivers=["vfio-pci"]), vf, pf)
    assert matches(_spec(linkTypes=["eth"]), vf, pf)
    assert not matches(_spec(linkTypes=["ib"]), vf, pf)
    assert matches(_spec(pfNames=["ens1f1", "ens1f0#4"]), vf, pf)
    assert not matches(_spec(pfNames=["ens1f0#0-3,5"]), vf, pf)
    assert matches(_spec(rootDevices=["3b:00.0#2-4"]), vf, pf)
    assert not matches(_spec(rootDevices=["0000:3b:00.1"]), vf, pf)
    assert not matches(_spec(rootDevices=["0000:3b:00.0"], pfNames=["ens9"]), vf, pf)


def test_pf_names_never_match_a_pf_without_a_netdev_and_unbound_vfs_match_no_driver() -> None:
    pf = _pf("0000:3b:00.0", None, 2, driver="")
    vf = pf.vfs[0]
    unbound = Vf(**{**{s: getattr(vf, s) for s in Vf.__slots__}, "driver": None})
    assert not matches(_spec(pfNames=["ens1f0"]), vf, pf)
    assert not matches(_spec(drivers=["iavf"]), unbound, pf)
    assert matches(_spec(rootDevices=["0000:3b:00.0"]), unbound, pf)


def test_device_type_does_not_select() -> None:
    pf = _pf("0000:3b:00.0", "ens1f0", 2, driver="iavf")
    spec = PoolSpec.model_validate(
        {
            "resourceName": "plexus.dev/d",
            "deviceType": "vfio-pci",
            "selectors": {"vendors": ["8086"]},
        }
    )
    assert matches(spec, pf.vfs[0], pf)


def test_a_vf_goes_to_the_first_matching_pool_in_pci_and_index_order() -> None:
    pools = _pools(
        """\
        pools:
          - resourceName: plexus.dev/first4
            selectors: {pfNames: ["ens1f0#0-3"]}
          - resourceName: plexus.dev/intel
            selectors: {vendors: ["8086"]}
          - resourceName: plexus.dev/never
            selectors: {pfNames: [ens1f0]}
          - resourceName: plexus.dev/mellanox
            selectors: {vendors: ["15b3"]}
        """
    )
    # Given out of order, to show the result's order does not depend on the snapshot's.
    snap = _snapshot(_pf("0000:5e:00.0", "ens2f0", 2), _pf("0000:3b:00.0", "ens1f0", 6))
    got = {pool: [(vf.pf_pci, vf.index) for vf in vfs] for pool, vfs in assign(snap, pools).items()}
    assert got == {
        "plexus.dev/first4": [("0000:3b:00.0", i) for i in range(4)],
        "plexus.dev/intel": [
            ("0000:3b:00.0", 4),
            ("0000:3b:00.0", 5),
            ("0000:5e:00.0", 0),
            ("0000:5e:00.0", 1),
        ],
        "plexus.dev/never": [],
        "plexus.dev/mellanox": [],
    }
    assert list(got) == [p.resource_name for p in pools.pools]


def test_desired_num_vfs_uses_pf_level_selectors_and_takes_the_largest() -> None:
    pools = _pools(
        """\
        pools:
          - resourceName: plexus.dev/a
            selectors: {pfNames: ["ens1f0#0-1"], devices: [ffff]}
            numVfs: 4
          - resourceName: plexus.dev/b
            selectors: {rootDevices: ["0000:3b:00.0"]}
            numVfs: 16
          - resourceName: plexus.dev/c
            selectors: {vendors: ["15b3"], pfNames: [ib0]}
            numVfs: 8
          - resourceName: plexus.dev/d
            selectors: {pfNames: [ens2f0]}
            numVfs: 2
          - resourceName: plexus.dev/e
            selectors: {pfNames: [ens2f0]}
          - resourceName: plexus.dev/f
            selectors: {vendors: ["15b3"], pfNames: [ib0], linkTypes: [ether]}
            numVfs: 32
        """
    )
    snap = _snapshot(
        _pf("0000:3b:00.0", "ens1f0", 0),
        _pf("0000:5e:00.0", "ens2f0", 0),
        _pf("0000:af:00.0", "ib0", 0, vendor="15b3", link_type="infiniband"),
        _pf("0000:d8:00.0", "ens9", 0, vendor="1af4"),
    )
    # ens1f0: a (4; its VF ranges and device do not matter at PF level) and b (16) -> 16;
    # ens2f0: d (2); ib0: c (8), not f (wrong link type); ens9: no pool -> left alone.
    assert desired_num_vfs(snap, pools) == {
        "0000:3b:00.0": 16,
        "0000:5e:00.0": 2,
        "0000:af:00.0": 8,
    }


def test_num_vfs_zero_is_a_wish_too() -> None:
    pools = _pools(
        """\
        pools:
          - resourceName: plexus.dev/a
            selectors: {pfNames: [ens1f0]}
            numVfs: 0
        """
    )
    assert desired_num_vfs(_snapshot(_pf("0000:3b:00.0", "ens1f0", 4)), pools) == {
        "0000:3b:00.0": 0
    }


@pytest.mark.parametrize(
    ("resource", "env"),
    [
        ("plexus.dev/intel_vf", "PCIDEVICE_PLEXUS_DEV_INTEL_VF"),
        ("example.com/mlx-5.vf", "PCIDEVICE_EXAMPLE_COM_MLX_5_VF"),
    ],
)
def test_env_name(resource: str, env: str) -> None:
    assert env_name(resource) == env
