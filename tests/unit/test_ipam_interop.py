"""Plexus's in-process IPAM against the reference Go binaries (Debian's containernetworking-plugins)
sharing one dataDir: the same results, the same files, no address handed out twice, each side
releasing the other's leases, and both running at once under the shared flock."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from delegates.ipam import HostLocalIpam, IpamPaths, StaticIpam
from delegates.plugin import PluginRequest

CNI_DIR = Path("/usr/lib/cni")
HOST_LOCAL = CNI_DIR / "host-local"
STATIC = CNI_DIR / "static"
NET = "interop"
VERSION = "1.0.0"  # the newest version the Debian binaries (plugins 1.1.1) speak

needs_host_local = pytest.mark.skipif(
    not os.access(HOST_LOCAL, os.X_OK),
    reason=f"{HOST_LOCAL} is missing (apt-get install containernetworking-plugins)",
)
needs_static = pytest.mark.skipif(
    not os.access(STATIC, os.X_OK),
    reason=f"{STATIC} is missing (apt-get install containernetworking-plugins)",
)


class GoFailed(Exception):
    def __init__(self, answer: dict[str, Any]) -> None:
        super().__init__(answer.get("msg", answer))
        self.answer = answer


def _env(command: str, cid: str, ifname: str, args: str) -> dict[str, str]:
    return {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": cid,
        "CNI_NETNS": "/proc/self/ns/net",
        "CNI_IFNAME": ifname,
        "CNI_PATH": str(CNI_DIR),
        "CNI_ARGS": args,
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }


def _go(
    binary: Path,
    command: str,
    config: dict[str, Any],
    cid: str,
    *,
    ifname: str = "eth0",
    args: str = "",
) -> dict[str, Any]:
    proc = subprocess.run(
        [str(binary)],
        input=json.dumps(config).encode(),
        env=_env(command, cid, ifname, args),
        capture_output=True,
        timeout=60,
        check=False,
    )
    answer: dict[str, Any] = json.loads(proc.stdout) if proc.stdout.strip() else {}
    if proc.returncode != 0:
        raise GoFailed(answer or {"msg": proc.stderr.decode()})
    return answer


def _conf(data_dir: Path, ranges: list[Any] | None = None, **ipam: Any) -> dict[str, Any]:
    return {
        "cniVersion": VERSION,
        "name": NET,
        "ipam": {
            "type": "host-local",
            "dataDir": str(data_dir),
            "ranges": ranges or [[{"subnet": "10.20.0.0/24"}]],
            **ipam,
        },
    }


def _req(config: dict[str, Any], cid: str, ifname: str = "eth0", args: str = "") -> PluginRequest:
    return PluginRequest(
        container_id=cid, netns="/proc/self/ns/net", ifname=ifname, cni_args=args, config=config
    )


def _py_add(config: dict[str, Any], cid: str, ifname: str = "eth0") -> dict[str, Any]:
    return _ipam(config).add(_req(config, cid, ifname)).to_wire(VERSION)


def _ipam(config: dict[str, Any]) -> HostLocalIpam:
    """In-process host-local allowed the config's dataDir and a resolv.conf beside it."""
    data_dir = config["ipam"]["dataDir"]
    paths = IpamPaths(data_roots=(data_dir,), resolv_confs=(str(Path(data_dir).parent),))
    return HostLocalIpam(paths=paths)


def _first_ip(answer: dict[str, Any]) -> str:
    return str(answer["ips"][0]["address"])


def _tree(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mode & 0o777) for p in directory.iterdir()}


def _leases(directory: Path) -> dict[str, bytes]:
    return {
        name: content
        for name, (content, _) in _tree(directory).items()
        if name != "lock" and not name.startswith("last_reserved_ip.")
    }


@needs_host_local
def test_alternating_adds_share_leases_and_round_robin(tmp_path: Path) -> None:
    conf = _conf(tmp_path)
    got = [
        _first_ip(_go(HOST_LOCAL, "ADD", conf, "go-a")),
        _first_ip(_py_add(conf, "py-b")),
        _first_ip(_go(HOST_LOCAL, "ADD", conf, "go-c")),
        _first_ip(_py_add(conf, "py-d")),
    ]
    assert got == ["10.20.0.2/24", "10.20.0.3/24", "10.20.0.4/24", "10.20.0.5/24"]
    assert _leases(tmp_path / NET) == {
        "10.20.0.2": b"go-a\r\neth0",
        "10.20.0.3": b"py-b\r\neth0",
        "10.20.0.4": b"go-c\r\neth0",
        "10.20.0.5": b"py-d\r\neth0",
    }


@needs_host_local
def test_results_and_files_are_the_same_as_the_binarys(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 10.0.0.53\nsearch a.example b.example\noptions ndots:3\n")
    ranges = [
        [{"subnet": "10.30.0.0/29"}, {"subnet": "10.31.0.0/24", "rangeStart": "10.31.0.100"}],
        [{"subnet": "fd00:30::/124", "gateway": "fd00:30::7"}],
    ]
    extra = {"routes": [{"dst": "0.0.0.0/0"}], "resolvConf": str(resolv)}
    go_conf = _conf(tmp_path / "go", ranges, **extra)
    py_conf = _conf(tmp_path / "py", ranges, **extra)
    for n in range(7):  # past the /29 into the second range, and past the v6 gateway
        assert _go(HOST_LOCAL, "ADD", go_conf, f"c{n}") == _py_add(py_conf, f"c{n}")
    for conf in (go_conf, py_conf):
        _ipam(conf).delete(_req(conf, "c1"))
    assert _go(HOST_LOCAL, "ADD", go_conf, "c9", args="IP=10.30.0.3") == _ipam(py_conf).add(
        _req(py_conf, "c9", args="IP=10.30.0.3")
    ).to_wire(VERSION)
    assert _tree(tmp_path / "go" / NET) == _tree(tmp_path / "py" / NET)


@needs_host_local
def test_each_side_releases_the_others_leases_by_container_and_ifname(tmp_path: Path) -> None:
    conf = _conf(tmp_path)
    _go(HOST_LOCAL, "ADD", conf, "go", ifname="eth0")
    _go(HOST_LOCAL, "ADD", conf, "go", ifname="net1")
    _py_add(conf, "py", "eth0")
    _py_add(conf, "py", "net1")
    _ipam(conf).delete(_req(conf, "go", "eth0"))
    _go(HOST_LOCAL, "DEL", conf, "py", ifname="net1")
    assert _leases(tmp_path / NET) == {"10.20.0.3": b"go\r\nnet1", "10.20.0.4": b"py\r\neth0"}
    _go(HOST_LOCAL, "DEL", conf, "py", ifname="eth0")
    _ipam(conf).delete(_req(conf, "go", "net1"))
    assert _leases(tmp_path / NET) == {}


@needs_host_local
def test_each_side_sees_the_others_leases_on_check_and_second_add(tmp_path: Path) -> None:
    conf = _conf(tmp_path)
    _py_add(conf, "py")
    _go(HOST_LOCAL, "ADD", conf, "go")
    _go(HOST_LOCAL, "CHECK", conf, "py")
    _ipam(conf).check(_req(conf, "go"))
    with pytest.raises(GoFailed, match="duplicate allocation is not allowed"):
        _go(HOST_LOCAL, "ADD", conf, "py")
    with pytest.raises(GoFailed, match="Failed to find address"):
        _go(HOST_LOCAL, "CHECK", conf, "nobody")


@needs_host_local
def test_the_binary_releases_a_lease_plexus_wrote_after_a_legacy_one(tmp_path: Path) -> None:
    conf = _conf(tmp_path)
    _py_add(conf, "c1")
    (tmp_path / NET / "10.20.0.9").write_bytes(b"old")  # pre-ifname format
    _go(HOST_LOCAL, "DEL", conf, "old")
    _go(HOST_LOCAL, "DEL", conf, "c1")
    assert _leases(tmp_path / NET) == {}


@needs_host_local
def test_concurrent_go_and_plexus_adds_get_distinct_addresses(tmp_path: Path) -> None:
    conf = _conf(tmp_path)
    ipam = _ipam(conf)
    ours: dict[str, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(21)

    def plexus(n: int) -> None:
        try:
            barrier.wait()
            ours[f"py{n}"] = ipam.add(_req(conf, f"py{n}")).ips[0].address
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=plexus, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    payload = json.dumps(conf).encode()
    procs = {
        f"go{n}": subprocess.Popen(
            [str(HOST_LOCAL)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_env("ADD", f"go{n}", "eth0", ""),
        )
        for n in range(20)
    }
    barrier.wait()
    theirs = {}
    for cid, proc in procs.items():
        out, _ = proc.communicate(payload, timeout=60)
        assert proc.returncode == 0, out
        theirs[cid] = _first_ip(json.loads(out))
    for t in threads:
        t.join()
    assert errors == []
    everything = {**ours, **theirs}
    assert len(set(everything.values())) == 40
    leases = _leases(tmp_path / NET)
    assert {ip: content.decode() for ip, content in leases.items()} == {
        address.split("/")[0]: f"{cid}\r\neth0" for cid, address in everything.items()
    }


STATIC_CASES = [
    (
        {
            "addresses": [
                {"address": "10.0.0.5/24", "gateway": "10.0.0.1"},
                {"address": "fd00::5/64"},
            ],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0.1"}],
            "dns": {"nameservers": ["1.1.1.1"], "domain": "example.org"},
        },
        "",
        {},
    ),
    (
        {"addresses": [{"address": "10.0.0.5/24", "gateway": "10.0.0.1"}]},
        "IgnoreUnknown=1;IP=10.1.0.5/24,10.2.0.5/24;GATEWAY=10.0.0.254,10.1.0.1",
        {},
    ),
    (
        {"addresses": [{"address": "10.0.0.5/24"}]},
        "IP=10.1.0.5/24",
        {"runtimeConfig": {"ips": ["10.7.0.5/24"]}, "args": {"cni": {"ips": ["10.8.0.5/24"]}}},
    ),
    ({"addresses": [{"address": "10.0.0.5/24"}]}, "", {"args": {"cni": {"ips": ["10.8.0.5/24"]}}}),
    ({}, "", {}),
]


@needs_static
@pytest.mark.parametrize(("ipam", "cni_args", "top"), STATIC_CASES)
def test_static_answers_like_the_binary(
    ipam: dict[str, Any], cni_args: str, top: dict[str, Any]
) -> None:
    config = {"cniVersion": VERSION, "name": "s", "ipam": {"type": "static", **ipam}, **top}
    theirs = _go(STATIC, "ADD", config, "c1", args=cni_args)
    ours = StaticIpam().add(_req(config, "c1", args=cni_args)).to_wire(VERSION)
    assert ours == theirs
