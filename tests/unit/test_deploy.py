"""deploy/ stays in step with the code: every manifest parses, the daemon config in the
ConfigMap is a valid DaemonConfig, and the example NADs validate."""

from __future__ import annotations

from pathlib import Path

import yaml

from cnispec.nad import network_config, parse_manifests
from cnispec.netconf import NetworkConfigList
from metaplugin.config import DaemonConfig
from sriov.pools import parse_pools

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_every_manifest_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert files
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert docs, path
        assert all("kind" in d for d in docs), path


def test_configmap_holds_a_valid_daemon_config() -> None:
    (cm,) = yaml.safe_load_all((DEPLOY / "configmap.yaml").read_text())
    cfg = DaemonConfig.model_validate(yaml.safe_load(cm["data"]["plexusd.yaml"]))
    assert cfg.cni_conf_dir == "/host/etc/cni/net.d"


def test_configmap_holds_a_valid_vf_pools_file() -> None:
    (cm,) = yaml.safe_load_all((DEPLOY / "configmap.yaml").read_text())
    cfg = DaemonConfig.model_validate(yaml.safe_load(cm["data"]["plexusd.yaml"]))
    assert cfg.vf_pools == "/etc/plexus/vf-pools.yaml"  # the ConfigMap's own mount
    pools = parse_pools(cm["data"]["vf-pools.yaml"], "configmap.yaml")
    assert [p.resource_name for p in pools.pools] == [
        "plexus.dev/intel_vf",
        "plexus.dev/intel_dpdk",
    ]


def test_kustomization_lists_existing_files() -> None:
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    for resource in kust["resources"]:
        assert (DEPLOY / resource).is_file(), resource


def test_example_nads_validate() -> None:
    nads = [
        n
        for p in sorted((DEPLOY / "examples").glob("*.yaml"))
        for n in parse_manifests(p.read_text(), str(p))
    ]
    assert nads
    for nad in nads:
        NetworkConfigList.parse(network_config(nad, "/nonexistent"))
