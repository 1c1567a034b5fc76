"""Where a network config may make host-local write and read, and the daemon keys that say so
(hostLocalDataRoots, resolvConfPaths) and how many attachments a pod may get
(maxAttachmentsPerPod)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from cnispec.errors import InvalidConfig
from delegates.ipam import IpamPaths
from metaplugin import config as daemon_config


def _parse(argv: list[str]) -> daemon_config.DaemonConfig:
    parser = argparse.ArgumentParser()
    daemon_config.add_arguments(parser)
    return daemon_config.from_args(parser.parse_args(argv))


def _net(*ipams: dict[str, Any]) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "n",
        "plugins": [{"type": "macvlan", "ipam": ipam} for ipam in ipams],
    }


def test_check_config_looks_at_every_host_local_ipam_of_a_conflist(tmp_path: Path) -> None:
    paths = IpamPaths(data_roots=(str(tmp_path),), resolv_confs=())
    inside = {"type": "host-local", "dataDir": str(tmp_path / "a")}
    paths.check_config(_net(inside, {"type": "host-local"}))  # no dataDir: the default
    with pytest.raises(InvalidConfig, match=r"ipam\.dataDir '/srv'"):
        paths.check_config(_net(inside, {"type": "host-local", "dataDir": "/srv"}))
    with pytest.raises(InvalidConfig, match=r"ipam\.resolvConf '/etc/hostname'"):
        single = {"type": "host-local", "resolvConf": "/etc/hostname"}
        paths.check_config({"name": "n", "type": "macvlan", "ipam": single})
    with pytest.raises(InvalidConfig, match=r"ipam\.dataDir must be a path string"):
        paths.check_config(_net({"type": "host-local", "dataDir": ["/a"]}))


def test_check_config_leaves_other_ipam_types_and_odd_shapes_to_their_parsers() -> None:
    paths = IpamPaths(data_roots=(), resolv_confs=())
    paths.check_config(_net({"type": "whereabouts", "dataDir": "/anywhere"}))
    paths.check_config({"name": "n", "plugins": ["not an object", {"type": "x", "ipam": "?"}]})
    paths.check_config({"name": "n", "type": "macvlan", "ipam": {"type": "static"}})


def test_no_roots_allows_nothing(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfig, match=r"on this node \(none\)"):
        IpamPaths(data_roots=(), resolv_confs=()).lease_dir(str(tmp_path), "n")
    with pytest.raises(InvalidConfig, match="allowed are none"):
        IpamPaths(data_roots=(), resolv_confs=()).resolv_conf("/etc/resolv.conf")


def test_daemon_defaults() -> None:
    cfg = daemon_config.DaemonConfig()
    assert cfg.max_attachments_per_pod == 32
    assert cfg.host_local_data_roots == []
    assert cfg.ipam_paths() == IpamPaths(
        data_roots=("/var/lib/cni/networks",),
        resolv_confs=("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"),
    )


def test_keys_from_file_and_flags(tmp_path: Path) -> None:
    conf = tmp_path / "c.yaml"
    conf.write_text(
        "hostLocalDataDir: /leases\nhostLocalDataRoots: [/run/cni-ipam-state]\n"
        "resolvConfPaths: /etc/resolv.conf, /etc/dns\nmaxAttachmentsPerPod: 16\n"
    )
    cfg = _parse(["--config", str(conf)])
    assert cfg.ipam_paths() == IpamPaths(
        data_roots=("/leases", "/run/cni-ipam-state"),  # hostLocalDataDir is always allowed
        resolv_confs=("/etc/resolv.conf", "/etc/dns"),
    )
    assert cfg.max_attachments_per_pod == 16
    cfg = _parse(["--host-local-data-roots", "/a,/b", "--max-attachments-per-pod", "64"])
    assert cfg.host_local_data_roots == ["/a", "/b"] and cfg.max_attachments_per_pod == 64


@pytest.mark.parametrize(
    ("flag", "value", "fragment"),
    [
        ("--host-local-data-roots", "relative/dir", "relative/dir: give absolute paths"),
        ("--resolv-conf-paths", "resolv.conf", "resolv.conf: give absolute paths"),
        ("--max-attachments-per-pod", "0", "maxAttachmentsPerPod"),
    ],
)
def test_bad_values_are_refused(flag: str, value: str, fragment: str) -> None:
    with pytest.raises(InvalidConfig, match=fragment):
        _parse([flag, value])
