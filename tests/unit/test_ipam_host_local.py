"""The in-process host-local IPAM: config, allocation order, requested IPs, DEL/CHECK/GC, the
on-disk format and concurrency. Every test uses its own dataDir under tmp_path."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from cnispec.cni import VALID_ATTACHMENTS_KEY
from cnispec.errors import InvalidConfig, PlexusError, TryAgainLater
from delegates.ipam import HostLocalIpam, IpamPaths, _disk
from delegates.ipam._disk import DiskStore
from delegates.ipam._ranges import RangeConf, allocation_order, build_range, build_range_set
from delegates.ipam.host_local import AllocationFailed, ReservationMissing
from delegates.plugin import PluginRequest

NET = "testnet"


def _conf(data_dir: Path, ipam: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {
        "cniVersion": "1.1.0",
        "name": NET,
        "ipam": {"type": "host-local", "dataDir": str(data_dir), **ipam},
        **top,
    }


def _ipam(root: Path) -> HostLocalIpam:
    """An allocator whose data root and resolv.conf allow-list are the test's own directory."""
    return HostLocalIpam(paths=IpamPaths(data_roots=(str(root),), resolv_confs=(str(root),)))


def _req(config: dict[str, Any], cid: str = "c1", ifname: str = "eth0", args: str = ""):
    return PluginRequest(
        container_id=cid, netns="/proc/self/ns/net", ifname=ifname, cni_args=args, config=config
    )


def _v4(data_dir: Path, subnet: str = "10.1.0.0/29", **rng: str) -> dict[str, Any]:
    return _conf(data_dir, {"ranges": [[{"subnet": subnet, **rng}]]})


def _addrs(ipam: HostLocalIpam, config: dict[str, Any], cid: str, **kw: Any) -> list[str]:
    return [ip.address for ip in ipam.add(_req(config, cid, **kw)).ips]


def _leases(data_dir: Path) -> dict[str, bytes]:
    out = {}
    for path in (data_dir / NET).iterdir():
        try:
            ipaddress.ip_address(path.name)
        except ValueError:
            continue
        out[path.name] = path.read_bytes()
    return out


# --- allocation order -------------------------------------------------------------------------


def test_first_address_skips_network_and_gateway_then_round_robin(tmp_path: Path) -> None:
    ipam, conf = _ipam(tmp_path), _v4(tmp_path)
    assert _addrs(ipam, conf, "a") == ["10.1.0.2/29"]
    assert _addrs(ipam, conf, "b") == ["10.1.0.3/29"]
    ipam.delete(_req(conf, "a"))
    # Round-robin: the freed .2 is not reused until the range has been walked through.
    assert _addrs(ipam, conf, "c") == ["10.1.0.4/29"]
    assert (tmp_path / NET / "last_reserved_ip.0").read_text() == "10.1.0.4"


def test_wraps_to_range_start_after_range_end(tmp_path: Path) -> None:
    ipam = _ipam(tmp_path)
    conf = _v4(tmp_path, "10.1.0.0/24", rangeStart="10.1.0.10", rangeEnd="10.1.0.12")
    assert [_addrs(ipam, conf, c)[0] for c in "abc"] == [
        "10.1.0.10/24",
        "10.1.0.11/24",
        "10.1.0.12/24",
    ]
    ipam.delete(_req(conf, "a"))
    assert _addrs(ipam, conf, "d") == ["10.1.0.10/24"]


def test_exhaustion_names_the_range_and_what_to_do(tmp_path: Path) -> None:
    ipam, conf = _ipam(tmp_path), _v4(tmp_path)  # /29: .2 .. .6 usable
    for cid in "abcde":
        ipam.add(_req(conf, cid))
    with pytest.raises(AllocationFailed) as err:
        ipam.add(_req(conf, "f"))
    assert err.value.code == 999  # what the reference's skel answers for this
    assert "range set 0 (10.1.0.1-10.1.0.6)" in err.value.msg
    assert "DEL or GC" in err.value.msg
    assert len(_leases(tmp_path)) == 5


def test_gateway_inside_the_range_is_never_handed_out(tmp_path: Path) -> None:
    ipam = _ipam(tmp_path)
    conf = _v4(
        tmp_path, "10.1.0.0/24", rangeStart="10.1.0.2", rangeEnd="10.1.0.4", gateway="10.1.0.3"
    )
    got = [_addrs(ipam, conf, c)[0] for c in "ab"]
    assert got == ["10.1.0.2/24", "10.1.0.4/24"]
    with pytest.raises(AllocationFailed):
        ipam.add(_req(conf, "c"))


def test_dual_stack_gets_one_address_per_range_set(tmp_path: Path) -> None:
    conf = _conf(tmp_path, {"ranges": [[{"subnet": "10.1.0.0/24"}], [{"subnet": "fd00:1::/64"}]]})
    result = _ipam(tmp_path).add(_req(conf))
    assert [(ip.address, ip.gateway) for ip in result.ips] == [
        ("10.1.0.2/24", "10.1.0.1"),
        ("fd00:1::2/64", "fd00:1::1"),
    ]
    assert all(ip.interface is None for ip in result.ips)
    assert _leases(tmp_path) == {"10.1.0.2": b"c1\r\neth0", "fd00:1::2": b"c1\r\neth0"}
    assert (tmp_path / NET / "last_reserved_ip.1").read_text() == "fd00:1::2"


def test_a_failing_range_set_releases_what_the_call_reserved(tmp_path: Path) -> None:
    ranges = [[{"subnet": "10.1.0.0/24"}], [{"subnet": "fd00::/125", "rangeEnd": "fd00::2"}]]
    ipam, conf = _ipam(tmp_path), _conf(tmp_path, {"ranges": ranges})
    ipam.add(_req(conf, "a"))  # takes the only v6 address
    with pytest.raises(AllocationFailed, match="range set 1"):
        ipam.add(_req(conf, "b"))
    assert sorted(_leases(tmp_path)) == ["10.1.0.2", "fd00::2"]


def test_a_set_of_two_ranges_continues_into_the_second(tmp_path: Path) -> None:
    rs = [
        {"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.10", "rangeEnd": "10.1.0.11"},
        {"subnet": "10.2.0.0/24", "rangeStart": "10.2.0.10", "rangeEnd": "10.2.0.11"},
    ]
    ipam, conf = _ipam(tmp_path), _conf(tmp_path, {"ranges": [rs]})
    got = [ipam.add(_req(conf, c)).ips[0] for c in "abc"]
    assert [(ip.address, ip.gateway) for ip in got] == [
        ("10.1.0.10/24", "10.1.0.1"),
        ("10.1.0.11/24", "10.1.0.1"),
        ("10.2.0.10/24", "10.2.0.1"),
    ]


def test_allocation_order_resumes_after_last_reserved_across_ranges() -> None:
    rs = build_range_set(
        [
            RangeConf(subnet="10.1.0.0/24", rangeStart="10.1.0.1", rangeEnd="10.1.0.3"),
            RangeConf(subnet="10.2.0.0/24", rangeStart="10.2.0.5", rangeEnd="10.2.0.6"),
        ],
        index=0,
    )
    order = [str(ip) for _, ip in allocation_order(rs, ipaddress.ip_address("10.1.0.3"))]
    # .1 of the first range is its gateway and never offered.
    assert order == ["10.2.0.5", "10.2.0.6", "10.1.0.2", "10.1.0.3"]
    fresh = [str(ip) for _, ip in allocation_order(rs, ipaddress.ip_address("192.0.2.1"))]
    assert fresh == ["10.1.0.2", "10.1.0.3", "10.2.0.5", "10.2.0.6"]


# --- requested addresses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("top", "args"),
    [
        ({"runtimeConfig": {"ips": ["10.1.0.50/24"]}}, ""),
        ({"runtimeConfig": {"ips": ["10.1.0.50"]}}, ""),
        ({"args": {"cni": {"ips": ["10.1.0.50"]}}}, ""),
        ({}, "IgnoreUnknown=1;IP=10.1.0.50;K8S_POD_NAME=p"),
    ],
    ids=["capability-cidr", "capability-plain", "args", "cni-args"],
)
def test_requested_ip_from_each_source(tmp_path: Path, top: dict[str, Any], args: str) -> None:
    conf = _conf(tmp_path, {"ranges": [[{"subnet": "10.1.0.0/24"}]]}, **top)
    assert _addrs(_ipam(tmp_path), conf, "a", args=args) == ["10.1.0.50/24"]
    assert (tmp_path / NET / "last_reserved_ip.0").read_text() == "10.1.0.50"


def test_requested_ips_of_all_sources_combine_across_range_sets(tmp_path: Path) -> None:
    conf = _conf(
        tmp_path,
        {"ranges": [[{"subnet": "10.1.0.0/24"}], [{"subnet": "fd00::/64"}]]},
        runtimeConfig={"ips": ["fd00::99/64"]},
        args={"cni": {"ips": ["10.1.0.7"]}},
    )
    assert _addrs(_ipam(tmp_path), conf, "a", args="IP=10.1.0.7") == [
        "10.1.0.7/24",
        "fd00::99/64",
    ]


def test_requested_ip_outside_every_range_set_is_a_config_error(tmp_path: Path) -> None:
    conf = _v4(tmp_path, "10.1.0.0/24", rangeEnd="10.1.0.100")
    conf["runtimeConfig"] = {"ips": ["10.1.0.200"]}
    with pytest.raises(InvalidConfig) as err:
        _ipam(tmp_path).add(_req(conf))
    assert err.value.code == 7
    assert "10.1.0.200" in err.value.msg and "10.1.0.1-10.1.0.100" in err.value.msg
    assert not (tmp_path / NET).exists()


def test_two_requested_ips_in_one_range_set_are_refused(tmp_path: Path) -> None:
    conf = _v4(tmp_path, "10.1.0.0/24")
    conf["runtimeConfig"] = {"ips": ["10.1.0.5", "10.1.0.6/24"]}
    with pytest.raises(InvalidConfig, match="both in range set 0"):
        _ipam(tmp_path).add(_req(conf))


def test_requesting_the_gateway_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfig, match="gateway"):
        _ipam(tmp_path).add(_req(_v4(tmp_path, "10.1.0.0/24"), args="IP=10.1.0.1"))


def test_requested_ip_held_by_another_container_names_the_holder(tmp_path: Path) -> None:
    ipam, conf = _ipam(tmp_path), _v4(tmp_path, "10.1.0.0/24")
    ipam.add(_req(conf, "first", args="IP=10.1.0.9"))
    with pytest.raises(
        AllocationFailed, match=r"10\.1\.0\.9 is already reserved by container first"
    ):
        ipam.add(_req(conf, "second", args="IP=10.1.0.9"))


# --- config -----------------------------------------------------------------------------------


def test_legacy_single_range_form_comes_before_ranges(tmp_path: Path) -> None:
    ipam = {
        "subnet": "10.5.0.0/24",
        "rangeStart": "10.5.0.100",
        "rangeEnd": "10.5.0.101",
        "gateway": "10.5.0.254",
        "ranges": [[{"subnet": "fd00::/64"}]],
    }
    result = _ipam(tmp_path).add(_req(_conf(tmp_path, ipam)))
    assert [(ip.address, ip.gateway) for ip in result.ips] == [
        ("10.5.0.100/24", "10.5.0.254"),
        ("fd00::2/64", "fd00::1"),
    ]


def test_defaults_exclude_network_and_ipv4_broadcast() -> None:
    v4 = build_range(RangeConf(subnet="10.0.0.0/30"), where="r")
    assert (str(v4.start), str(v4.end), str(v4.gateway)) == ("10.0.0.1", "10.0.0.2", "10.0.0.1")
    v6 = build_range(RangeConf(subnet="fd00::/126"), where="r")
    assert (str(v6.start), str(v6.end), str(v6.gateway)) == ("fd00::1", "fd00::3", "fd00::1")


@pytest.mark.parametrize(
    ("ipam", "fragment"),
    [
        ({"subnet": "10.1.0.5/24"}, "host bits set; did you mean 10.1.0.0/24"),
        ({"subnet": "10.1.0.0"}, "needs a prefix length"),
        ({"subnet": "10.1.0.0/31"}, "too small"),
        ({"subnet": "bogus/24"}, "is not a network"),
        ({"subnet": "10.1.0.0/24", "rangeStart": "10.2.0.1"}, "not in network 10.1.0.0/24"),
        ({"subnet": "10.1.0.0/24", "rangeEnd": "10.1.0.255"}, "broadcast"),
        ({"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.0"}, "network or broadcast"),
        (
            {"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.50", "rangeEnd": "10.1.0.40"},
            "rangeStart 10.1.0.50 is after rangeEnd 10.1.0.40",
        ),
        ({"subnet": "10.1.0.0/24", "gateway": "fd00::1"}, "same family"),
        ({"ranges": []}, "no IP ranges"),
        ({"ranges": [[]]}, "range set 0 is empty"),
        (
            {"ranges": [[{"subnet": "10.1.0.0/24"}, {"subnet": "10.1.0.0/25"}]]},
            "ranges 10.1.0.1-10.1.0.254 and 10.1.0.1-10.1.0.126 overlap",
        ),
        (
            {"ranges": [[{"subnet": "10.1.0.0/24"}], [{"subnet": "10.1.0.128/25"}]]},
            "range set 0 overlaps with range set 1",
        ),
        ({"ranges": [[{"subnet": "10.1.0.0/24"}, {"subnet": "fd00::/64"}]]}, "mixes IPv4 and IPv6"),
        ({"ranges": [[{"rangeStart": "10.1.0.1"}]]}, "subnet"),
        ({"subnet": "10.1.0.0/24", "routes": [{"dst": "nope"}]}, "ipam.routes[0]"),
    ],
)
def test_invalid_config_is_code_7_with_a_readable_reason(
    tmp_path: Path, ipam: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(InvalidConfig) as err:
        _ipam(tmp_path).add(_req(_conf(tmp_path, ipam)))
    assert err.value.code == 7
    assert fragment in err.value.msg


def test_ranges_that_share_a_subnet_but_not_addresses_are_allowed(tmp_path: Path) -> None:
    rs = [
        {"subnet": "10.1.0.0/24", "rangeEnd": "10.1.0.100"},
        {"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.101"},
    ]
    assert _addrs(_ipam(tmp_path), _conf(tmp_path, {"ranges": [rs]}), "a") == ["10.1.0.2/24"]


@pytest.mark.parametrize("name", ["", "../escape", "a/b"])
def test_network_name_must_be_a_safe_directory_name(tmp_path: Path, name: str) -> None:
    conf = _v4(tmp_path)
    conf["name"] = name
    with pytest.raises(InvalidConfig, match="network 'name'"):
        _ipam(tmp_path).add(_req(conf))


def test_routes_and_resolv_conf_make_the_result(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(
        "# comment\n; another\nnameserver 10.0.0.53\nnameserver fd00::53\n"
        "domain example.org\nsearch a.example b.example\noptions ndots:2 edns0\nbogus\n"
    )
    ipam = {
        "subnet": "10.1.0.0/24",
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/16", "gw": "10.1.0.254"}],
        "resolvConf": str(resolv),
    }
    wire = _ipam(tmp_path).add(_req(_conf(tmp_path, ipam))).to_wire("1.1.0")
    assert wire["routes"] == [{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/16", "gw": "10.1.0.254"}]
    assert wire["dns"] == {
        "nameservers": ["10.0.0.53", "fd00::53"],
        "domain": "example.org",
        "search": ["a.example", "b.example"],
        "options": ["ndots:2", "edns0"],
    }


def test_unreadable_resolv_conf_is_an_io_failure(tmp_path: Path) -> None:
    ipam = {"subnet": "10.1.0.0/24", "resolvConf": str(tmp_path / "missing")}
    with pytest.raises(PlexusError) as err:
        _ipam(tmp_path).add(_req(_conf(tmp_path, ipam)))
    assert err.value.code == 5 and "resolvConf" in err.value.msg


def test_default_data_dir_is_used_without_ipam_data_dir(tmp_path: Path) -> None:
    conf = {
        "cniVersion": "1.1.0",
        "name": NET,
        "ipam": {"type": "host-local", "subnet": "10.1.0.0/24"},
    }
    HostLocalIpam(default_data_dir=str(tmp_path / "state")).add(_req(conf))
    assert (tmp_path / "state" / NET / "10.1.0.2").read_bytes() == b"c1\r\neth0"


# --- ADD twice, DEL, CHECK, restart -----------------------------------------------------------


def test_second_add_of_the_same_attachment_is_refused_like_the_reference(tmp_path: Path) -> None:
    ipam, conf = _ipam(tmp_path), _v4(tmp_path)
    ipam.add(_req(conf))
    with pytest.raises(AllocationFailed, match="duplicate allocation is not allowed") as err:
        ipam.add(_req(conf))
    assert err.value.code == 999
    assert _leases(tmp_path) == {"10.1.0.2": b"c1\r\neth0"}
    # Another interface of the same container is another attachment.
    assert _addrs(ipam, conf, "c1", ifname="net1") == ["10.1.0.3/29"]


def test_delete_is_idempotent_and_matches_the_interface(tmp_path: Path) -> None:
    ipam, conf = _ipam(tmp_path), _v4(tmp_path)
    ipam.add(_req(conf, "c1", ifname="eth0"))
    ipam.add(_req(conf, "c1", ifname="net1"))
    ipam.delete(_req(conf, "c1", ifname="eth0"))
    ipam.delete(_req(conf, "c1", ifname="eth0"))
    assert _leases(tmp_path) == {"10.1.0.3": b"c1\r\nnet1"}


def test_delete_without_any_state_succeeds_and_creates_nothing(tmp_path: Path) -> None:
    _ipam(tmp_path).delete(_req(_v4(tmp_path)))
    assert not (tmp_path / NET).exists()


def test_delete_needs_only_name_and_data_dir(tmp_path: Path) -> None:
    ipam, conf = _ipam(tmp_path), _v4(tmp_path)
    ipam.add(_req(conf))
    broken = _conf(tmp_path, {"ranges": "not a list"})
    ipam.delete(_req(broken))
    assert _leases(tmp_path) == {}


def test_delete_releases_a_legacy_container_id_only_lease(tmp_path: Path) -> None:
    ipam, conf = _ipam(tmp_path), _v4(tmp_path)
    ipam.add(_req(conf, "other"))
    (tmp_path / NET / "10.1.0.5").write_bytes(b"old-container")
    ipam.delete(_req(conf, "old-container"))
    assert sorted(_leases(tmp_path)) == ["10.1.0.2"]


def test_check_passes_with_the_lease_and_names_a_missing_one(tmp_path: Path) -> None:
    conf = _conf(tmp_path, {"ranges": [[{"subnet": "10.1.0.0/24"}], [{"subnet": "fd00::/64"}]]})
    ipam = _ipam(tmp_path)
    ipam.add(_req(conf))
    ipam.check(_req(conf))
    (tmp_path / NET / "fd00::2").unlink()
    with pytest.raises(ReservationMissing) as err:
        ipam.check(_req(conf))
    assert "range set 1 (fd00::1-fd00::ffff:ffff:ffff:ffff)" in err.value.msg
    assert "range set 0" not in err.value.msg
    with pytest.raises(ReservationMissing, match="container nobody interface eth0"):
        ipam.check(_req(conf, "nobody"))


def test_check_without_a_lease_directory_fails(tmp_path: Path) -> None:
    with pytest.raises(ReservationMissing):
        _ipam(tmp_path).check(_req(_v4(tmp_path)))


def test_a_new_instance_sees_the_existing_leases(tmp_path: Path) -> None:
    conf = _v4(tmp_path)
    _ipam(tmp_path).add(_req(conf, "a"))
    restarted = _ipam(tmp_path)
    restarted.check(_req(conf, "a"))
    with pytest.raises(AllocationFailed, match="duplicate"):
        restarted.add(_req(conf, "a"))
    assert _addrs(restarted, conf, "b") == ["10.1.0.3/29"]


# --- GC ---------------------------------------------------------------------------------------


def _gc_conf(data_dir: Path, valid: list[tuple[str, str]], key: str = VALID_ATTACHMENTS_KEY):
    conf = _v4(data_dir, "10.1.0.0/24")
    conf[key] = [{"containerID": c, "ifname": i} for c, i in valid]
    return conf


def test_gc_releases_exactly_the_attachments_not_listed(tmp_path: Path) -> None:
    ipam, conf = _ipam(tmp_path), _v4(tmp_path, "10.1.0.0/24")
    for cid, ifname in [("keep", "eth0"), ("keep", "net1"), ("gone", "eth0")]:
        ipam.add(_req(conf, cid, ifname=ifname))
    (tmp_path / NET / "10.1.0.50").write_bytes(b"legacy-live")
    (tmp_path / NET / "10.1.0.51").write_bytes(b"legacy-dead")
    ipam.gc(_req(_gc_conf(tmp_path, [("keep", "eth0"), ("legacy-live", "eth0")])))
    assert _leases(tmp_path) == {"10.1.0.2": b"keep\r\neth0", "10.1.0.50": b"legacy-live"}
    assert (tmp_path / NET / "lock").exists()
    assert (tmp_path / NET / "last_reserved_ip.0").exists()


def test_gc_reads_the_legacy_attachments_key_and_an_empty_list(tmp_path: Path) -> None:
    ipam, conf = _ipam(tmp_path), _v4(tmp_path, "10.1.0.0/24")
    ipam.add(_req(conf, "a"))
    ipam.add(_req(conf, "b"))
    ipam.gc(_req(_gc_conf(tmp_path, [("a", "eth0")], key="cni.dev/attachments")))
    assert list(_leases(tmp_path)) == ["10.1.0.2"]
    ipam.gc(_req(_gc_conf(tmp_path, [])))
    assert _leases(tmp_path) == {}


def test_gc_without_the_valid_list_refuses_to_release_anything(tmp_path: Path) -> None:
    ipam, conf = _ipam(tmp_path), _v4(tmp_path)
    ipam.add(_req(conf))
    with pytest.raises(InvalidConfig, match=VALID_ATTACHMENTS_KEY):
        ipam.gc(_req(conf))
    assert len(_leases(tmp_path)) == 1


# --- store details ----------------------------------------------------------------------------


def test_stale_temporary_files_from_a_crash_are_cleaned_up(tmp_path: Path) -> None:
    ipam, conf = _ipam(tmp_path), _v4(tmp_path)
    ipam.add(_req(conf, "a"))
    stale = tmp_path / NET / ".plexus-tmp-deadbeef"
    stale.write_bytes(b"x\r\neth0")
    ipam.add(_req(conf, "b"))
    assert not stale.exists()
    assert sorted(p.name for p in (tmp_path / NET).iterdir()) == [
        "10.1.0.2",
        "10.1.0.3",
        "last_reserved_ip.0",
        "lock",
    ]


def test_lock_file_is_created_like_the_reference(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        _ipam(tmp_path).add(_req(_v4(tmp_path)))
    finally:
        os.umask(old)
    assert (tmp_path / NET / "lock").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / NET / "10.1.0.2").stat().st_mode & 0o777 == 0o644


def test_a_held_lock_makes_the_caller_try_again_later(tmp_path: Path) -> None:
    directory = tmp_path / NET
    directory.mkdir()
    fd = os.open(directory / "lock", os.O_CREAT | os.O_RDONLY, 0o750)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(TryAgainLater) as err, DiskStore(directory, lock_timeout=0.05):
            pass
        assert err.value.code == 11
    finally:
        os.close(fd)
    with DiskStore(directory, lock_timeout=0.05) as store:
        assert store.reservations() == {}


def test_threads_of_the_daemon_wait_their_turn_without_polling_the_flock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A waiter polled the flock with a backoff up to 20 ms, sleeping on after the holder was
    # done (a burst of pods on one network queued on it); now it waits on a mutex and is woken.
    directory = tmp_path / NET
    refused: list[int] = []
    real = fcntl.flock

    def recording(fd: int, op: int) -> None:
        try:
            real(fd, op)
        except BlockingIOError:
            refused.append(fd)
            raise

    monkeypatch.setattr(_disk.fcntl, "flock", recording)
    waiting, done = threading.Event(), threading.Event()

    def second() -> None:
        waiting.set()
        with DiskStore(directory) as store:
            assert store.reservations() == {}
        done.set()

    with DiskStore(directory):
        waiter = threading.Thread(target=second)
        waiter.start()
        waiting.wait(5)
        threading.Event().wait(0.05)  # the waiter's chance to poll, as it did before
        assert not done.is_set()
    waiter.join(5)
    assert done.is_set() and refused == []


def test_fifty_threads_get_fifty_distinct_addresses(tmp_path: Path) -> None:
    conf = _v4(tmp_path, "10.1.0.0/24")
    ipam = _ipam(tmp_path)
    results: dict[str, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(50)

    def worker(n: int) -> None:
        try:
            barrier.wait()
            results[f"c{n}"] = ipam.add(_req(conf, f"c{n}")).ips[0].address
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results.values())) == 50
    leases = _leases(tmp_path)
    assert len(leases) == 50
    for cid, address in results.items():
        assert leases[address.split("/")[0]] == f"{cid}\r\neth0".encode()


# --- confinement: dataDir and resolvConf name only what the node admin allows ------------------


def _confined(tmp_path: Path) -> tuple[HostLocalIpam, Path, Path]:
    """An allocator allowed `root` for leases and `root/resolv.conf`; `outside` is a sibling."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    (root / "resolv.conf").write_text("nameserver 10.0.0.53\n")
    paths = IpamPaths(data_roots=(str(root),), resolv_confs=(str(root / "resolv.conf"),))
    return HostLocalIpam(default_data_dir=str(root), paths=paths), root, outside


def _escapes(root: Path, outside: Path) -> dict[str, str]:
    (root / "link").symlink_to(outside, target_is_directory=True)
    return {
        "outside": str(outside),
        "dotdot": f"{root}/../{outside.name}",
        "symlink": str(root / "link"),
        "prefix": f"{root}-sibling",  # shares the root's spelling, not its directory
    }


@pytest.mark.parametrize("how", ["outside", "dotdot", "symlink", "prefix"])
def test_a_data_dir_outside_the_roots_is_refused_and_nothing_is_made(
    tmp_path: Path, how: str
) -> None:
    ipam, root, outside = _confined(tmp_path)
    data_dir = _escapes(root, outside)[how]
    conf = _v4(Path(data_dir))
    for verb in (ipam.add, ipam.check, ipam.delete):
        with pytest.raises(InvalidConfig) as err:
            verb(_req(conf))
        assert err.value.code == 7
        assert f"ipam.dataDir {data_dir!r}" in err.value.msg
        assert str(root) in err.value.msg and "hostLocalDataRoots" in err.value.msg
    assert not outside.exists() and not Path(f"{root}-sibling").exists()


def test_a_relative_data_dir_is_refused(tmp_path: Path) -> None:
    ipam, _, _ = _confined(tmp_path)
    with pytest.raises(InvalidConfig, match="'leases' is not an absolute path"):
        ipam.add(_req(_v4(Path("leases"))))


def test_a_symlinked_lease_directory_is_not_followed_out(tmp_path: Path) -> None:
    ipam, root, outside = _confined(tmp_path)
    outside.mkdir()
    (root / NET).symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidConfig, match="outside"):
        ipam.add(_req(_v4(root)))
    assert list(outside.iterdir()) == []


def test_data_dirs_inside_the_roots_work(tmp_path: Path) -> None:
    ipam, root, _ = _confined(tmp_path)
    (root / "alias").symlink_to(root / "real", target_is_directory=True)
    assert _addrs(ipam, _v4(root / "team-a"), "a") == ["10.1.0.2/29"]
    assert _addrs(ipam, _v4(root), "a") == ["10.1.0.2/29"]
    assert _addrs(ipam, _v4(root / "alias"), "a") == ["10.1.0.2/29"]
    assert sorted(p.name for p in root.iterdir()) == ["alias", "real", "resolv.conf", "team-a", NET]
    assert (root / "real" / NET / "10.1.0.2").read_bytes() == b"a\r\neth0"


def test_gc_never_deletes_outside_the_roots(tmp_path: Path) -> None:
    """What a NAD with `dataDir: /somewhere` used to get: every address-named file there gone."""
    ipam, _, outside = _confined(tmp_path)
    victim = outside / NET
    victim.mkdir(parents=True)
    (victim / "10.1.0.7").write_text("not a lease of ours")
    (victim / "fd00::7").write_text("nor this")
    with pytest.raises(InvalidConfig, match="outside"):
        ipam.gc(_req(_gc_conf(outside, [])))
    assert sorted(p.name for p in victim.iterdir()) == ["10.1.0.7", "fd00::7"]


def _resolving(data_dir: Path, resolv_conf: str) -> dict[str, Any]:
    return _conf(data_dir, {"subnet": "10.1.0.0/29", "resolvConf": resolv_conf})


SECRET = "nameserver 6.6.6.6\nsearch secret-token-4f1c\n"


def test_a_resolv_conf_off_the_allow_list_is_refused_unread(tmp_path: Path) -> None:
    ipam, root, outside = _confined(tmp_path)
    outside.mkdir()
    secret = outside / "shadow"
    secret.write_text(SECRET)
    (root / "sneaky").symlink_to(secret)
    for path in (secret, root / "sneaky", Path("resolv.conf")):
        conf = _resolving(root, str(path))
        with pytest.raises(InvalidConfig) as err:
            ipam.add(_req(conf))
        assert err.value.code == 7 and "resolvConfPaths" in err.value.msg
        assert str(root / "resolv.conf") in err.value.msg
        assert "6.6.6.6" not in err.value.msg and "secret-token" not in err.value.msg
    assert not (root / NET).exists()  # refused before any lease was taken


def test_an_allowed_resolv_conf_is_read_through_its_symlink(tmp_path: Path) -> None:
    ipam, root, _ = _confined(tmp_path)
    (root / "via-link").symlink_to(root / "resolv.conf")
    paths = IpamPaths(data_roots=(str(root),), resolv_confs=(str(root / "via-link"),))
    for cid, allocator, name in (
        ("a", ipam, "via-link"),
        ("b", HostLocalIpam(paths=paths), "resolv.conf"),
    ):
        conf = _resolving(root, str(root / name))
        assert allocator.add(_req(conf, cid)).dns.nameservers == ["10.0.0.53"]


def test_an_allowed_directory_allows_the_files_under_it(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "dns").mkdir(parents=True)
    (root / "dns" / "team-a.conf").write_text("nameserver 10.9.0.53\n")
    paths = IpamPaths(data_roots=(str(root),), resolv_confs=(str(root / "dns"),))
    conf = _resolving(root, str(root / "dns" / "team-a.conf"))
    assert HostLocalIpam(paths=paths).add(_req(conf)).dns.nameservers == ["10.9.0.53"]


def test_a_huge_or_special_resolv_conf_is_refused_without_blocking(tmp_path: Path) -> None:
    ipam, root, _ = _confined(tmp_path)
    paths = IpamPaths(data_roots=(str(root),), resolv_confs=(str(root),))
    ipam = HostLocalIpam(paths=paths)
    (root / "huge").write_text("nameserver 10.0.0.53\n" * 4000)  # 84 KB
    os.mkfifo(root / "fifo")  # opening it to read would block until a writer came
    for name, fragment in (("huge", "larger than 64 KiB"), ("fifo", "not a regular file")):
        with pytest.raises(InvalidConfig, match=fragment):
            ipam.add(_req(_resolving(root, str(root / name))))
    assert not (root / NET).exists()
