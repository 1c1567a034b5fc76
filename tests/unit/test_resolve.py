"""Resolution: which networks a pod gets, named how, with which capability arguments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from cnispec.errors import InvalidConfig, NetworkNotFound, NetworkNotPermitted, TryAgainLater
from cnispec.identity import PodInfo
from metaplugin.resolve import Resolver
from tests.support.world import World, nad_manifest, simple_net

NETWORKS = "k8s.v1.cni.cncf.io/networks"


def pod(networks: str | None = None, namespace: str = "default", **extra: str) -> PodInfo:
    annotations = dict(extra)
    if networks is not None:
        annotations[NETWORKS] = networks
    return PodInfo(namespace=namespace, name="p1", uid="u1", annotations=annotations)


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    w.add_nads(
        nad_manifest("net-a", simple_net("net-a")),
        nad_manifest("net-b", simple_net("net-b")),
        nad_manifest("net-c", simple_net("net-c")),
        nad_manifest("caps", simple_net("caps", capabilities={"ips": True, "mac": True})),
        nad_manifest("shared", simple_net("shared"), namespace="global-ns"),
        nad_manifest("other", simple_net("other"), namespace="team-b"),
        nad_manifest("alt-primary", simple_net("alt-primary", "ipvlan"), namespace="kube-system"),
    )
    return w


def test_cluster_network_only_without_annotation(world: World) -> None:
    plan = world.resolver.plan(ifname="eth0", pod=pod(), runtime_config={})
    assert [(a.network, a.ifname, a.is_default) for a in plan] == [("cluster", "eth0", True)]


def test_multus_naming_by_position(world: World) -> None:
    plan = world.resolver.plan(
        ifname="eth0", pod=pod("net-a, net-b@data0, net-c"), runtime_config={}
    )
    assert [(a.network, a.ifname) for a in plan] == [
        ("cluster", "eth0"),
        ("default/net-a", "net1"),
        ("default/net-b", "data0"),
        ("default/net-c", "net3"),
    ]


def test_runtime_config_goes_to_the_cluster_network_only(world: World) -> None:
    rc = {"portMappings": [{"hostPort": 80}], "io.kubernetes.cri.pod-annotations": {}}
    plan = world.resolver.plan(ifname="eth0", pod=pod("net-a"), runtime_config=rc)
    assert plan[0].capability_args == rc
    assert plan[1].capability_args == {}


def test_default_networks_come_first_and_skip_system_namespaces(tmp_path: Path) -> None:
    w = World(tmp_path, defaultNetworks=["net-a"], multusNamespace="default")
    w.add_nads(
        nad_manifest("net-a", simple_net("net-a")), nad_manifest("net-b", simple_net("net-b"))
    )
    plan = w.resolver.plan(ifname="eth0", pod=pod("net-b"), runtime_config={})
    assert [(a.network, a.ifname) for a in plan] == [
        ("cluster", "eth0"),
        ("default/net-a", "net1"),
        ("default/net-b", "net2"),
    ]
    system_pod = PodInfo("kube-system", "p", "u", {})
    plan = w.resolver.plan(ifname="eth0", pod=system_pod, runtime_config={})
    assert [a.network for a in plan] == ["cluster"]


def test_default_network_override(world: World) -> None:
    p = pod(**{"v1.multus-cni.io/default-network": "alt-primary"})
    plan = world.resolver.plan(ifname="eth0", pod=p, runtime_config={})
    assert (plan[0].network, plan[0].ifname, plan[0].is_default) == (
        "kube-system/alt-primary",
        "eth0",
        True,
    )


def test_cluster_network_by_nad_name_conf_name_and_path(tmp_path: Path) -> None:
    w = World(tmp_path, clusterNetwork="cluster")
    assert w.resolver.cluster_network().network == "cluster"  # by conf name
    w.add_nads(nad_manifest("cluster", simple_net("from-nad"), namespace="kube-system"))
    assert w.resolver.cluster_network().network == "kube-system/cluster"  # NAD wins
    path = w.write_conf("99-x.conf", simple_net("by-path"))
    w2 = World(tmp_path / "w2", clusterNetwork=str(path))
    assert w2.resolver.cluster_network().network == "by-path"
    w3 = World(tmp_path / "w3", clusterNetwork=str(w.conf_dir))
    assert w3.resolver.cluster_network().network == "cluster"  # directory: first file


class _ApiDown:
    """A cluster-mode NAD source whose cache misses and whose API cannot be reached."""

    def get(self, namespace: str, name: str) -> None:
        raise TryAgainLater("Kubernetes API unreachable: connection refused")

    def all(self) -> list[Any]:
        return []

    def synced(self) -> bool:
        return True


def test_api_down_cluster_network_named_by_a_conf_still_resolves(tmp_path: Path) -> None:
    w = World(tmp_path, clusterNetwork="cluster")
    resolver = Resolver(config=w.config, nads=_ApiDown())
    with capture_logs() as logs:
        assert resolver.cluster_network().network == "cluster"  # the node's own conf
    assert [e["event"] for e in logs] == ["network_from_conf_dir_api_unreachable"]
    # A name no conf has: the API was the only place left to look, so try again later.
    missing = Resolver(config=World(tmp_path / "w2", clusterNetwork="nope").config, nads=_ApiDown())
    with pytest.raises(TryAgainLater, match="unreachable"):
        missing.cluster_network()


def test_missing_cluster_network_is_network_not_found(tmp_path: Path) -> None:
    w = World(tmp_path, clusterNetwork="nope")
    with pytest.raises(NetworkNotFound, match="clusterNetwork 'nope'"):
        w.resolver.cluster_network()


def test_nad_without_spec_config_uses_conf_file_of_that_name(world: World) -> None:
    world.write_conf("50-ondisk.conf", simple_net("ondisk", "ipvlan"))
    world.add_nads(nad_manifest("ondisk", None), file="more.yaml")
    plan = world.resolver.plan(ifname="eth0", pod=pod("ondisk"), runtime_config={})
    assert plan[1].config["type"] == "ipvlan"


def test_nad_config_without_name_gets_the_nad_name(world: World) -> None:
    world.add_nads(
        nad_manifest("anon", {"cniVersion": "1.0.0", "type": "macvlan"}), file="more.yaml"
    )
    plan = world.resolver.plan(ifname="eth0", pod=pod("anon"), runtime_config={})
    assert plan[1].config["name"] == "anon"


def test_missing_nad_is_network_not_found(world: World) -> None:
    with pytest.raises(NetworkNotFound, match="default/ghost not found"):
        world.resolver.plan(ifname="eth0", pod=pod("ghost"), runtime_config={})


def test_capability_arguments_need_a_declared_capability(world: World) -> None:
    sel = json.dumps([{"name": "caps", "ips": ["10.5.0.9/24"], "mac": "0a:00:00:00:00:09"}])
    plan = world.resolver.plan(ifname="eth0", pod=pod(sel), runtime_config={})
    assert plan[1].capability_args == {"ips": ["10.5.0.9/24"], "mac": "0a:00:00:00:00:09"}
    with pytest.raises(InvalidConfig, match="declares the capability 'ips'"):
        world.resolver.plan(
            ifname="eth0",
            pod=pod(json.dumps([{"name": "net-a", "ips": ["10.5.0.9"]}])),
            runtime_config={},
        )
    with pytest.raises(InvalidConfig, match="'infinibandGUID'"):
        world.resolver.plan(
            ifname="eth0",
            pod=pod(json.dumps([{"name": "caps", "infiniband-guid": "00:11:22:33:44:55:66:77"}])),
            runtime_config={},
        )


def test_cni_args_merge_into_every_plugin_and_win(world: World) -> None:
    world.add_nads(
        nad_manifest(
            "chained",
            {
                "cniVersion": "1.0.0",
                "name": "chained",
                "plugins": [
                    {"type": "macvlan", "args": {"cni": {"a": 1, "b": 1}}},
                    {"type": "tuning"},
                ],
            },
        ),
        file="more.yaml",
    )
    sel = json.dumps([{"name": "chained", "cni-args": {"b": 2, "c": 3}}])
    plan = world.resolver.plan(ifname="eth0", pod=pod(sel), runtime_config={})
    plugins = plan[1].config["plugins"]
    assert plugins[0]["args"]["cni"] == {"a": 1, "b": 2, "c": 3}
    assert plugins[1]["args"]["cni"] == {"b": 2, "c": 3}


def test_duplicate_interface_names_are_refused(world: World) -> None:
    with pytest.raises(InvalidConfig, match="interface net2 is used by both"):
        world.resolver.plan(ifname="eth0", pod=pod("net-a@net2, net-b"), runtime_config={})
    with pytest.raises(InvalidConfig, match="interface eth0"):
        world.resolver.plan(ifname="eth0", pod=pod("net-a@eth0"), runtime_config={})


def test_one_default_route_per_family(world: World) -> None:
    ok = json.dumps(
        [
            {"name": "net-a", "default-route": ["10.1.0.1"]},
            {"name": "net-b", "default-route": ["fd00::1"]},
        ]
    )
    plan = world.resolver.plan(ifname="eth0", pod=pod(ok), runtime_config={})
    assert plan[1].default_route == ("10.1.0.1",)
    bad = json.dumps(
        [
            {"name": "net-a", "default-route": ["10.1.0.1"]},
            {"name": "net-b", "default-route": ["10.2.0.1"]},
        ]
    )
    with pytest.raises(InvalidConfig, match="IPv4 is requested by both"):
        world.resolver.plan(ifname="eth0", pod=pod(bad), runtime_config={})


def test_namespace_isolation(tmp_path: Path) -> None:
    w = World(tmp_path, namespaceIsolation=True, globalNamespaces="global-ns")
    w.add_nads(
        nad_manifest("shared", simple_net("shared"), namespace="global-ns"),
        nad_manifest("other", simple_net("other"), namespace="team-b"),
        nad_manifest("mine", simple_net("mine"), namespace="team-a"),
    )
    p = pod("mine, global-ns/shared", namespace="team-a")
    assert len(w.resolver.plan(ifname="eth0", pod=p, runtime_config={})) == 3
    with pytest.raises(NetworkNotPermitted) as err:
        w.resolver.plan(
            ifname="eth0", pod=pod("team-b/other", namespace="team-a"), runtime_config={}
        )
    assert err.value.code == 103
    assert "team-a/p1 may not use network team-b/other" in err.value.msg


def test_isolation_off_allows_any_namespace(world: World) -> None:
    plan = world.resolver.plan(ifname="eth0", pod=pod("team-b/other"), runtime_config={})
    assert plan[1].network == "team-b/other"


def test_device_id_goes_into_config_and_capability(world: World) -> None:
    sel = json.dumps([{"name": "net-a", "deviceID": "0000:03:02.3"}])
    plan = world.resolver.plan(ifname="eth0", pod=pod(sel), runtime_config={})
    assert plan[1].config["deviceID"] == "0000:03:02.3"
    assert plan[1].capability_args["deviceID"] == "0000:03:02.3"


def test_invalid_nad_config_names_the_network(world: World) -> None:
    world.add_nads(nad_manifest("bad", {"cniVersion": "1.0.0", "name": "bad"}), file="bad.yaml")
    with pytest.raises(InvalidConfig, match="network default/bad"):
        world.resolver.plan(ifname="eth0", pod=pod("bad"), runtime_config={})


# --- limits: attachments per pod, and where a NAD's host-local may reach ----------------------


def test_a_pod_asking_for_more_attachments_than_allowed_is_refused_before_resolving(
    tmp_path: Path,
) -> None:
    w = World(tmp_path, maxAttachmentsPerPod=4)
    w.add_nads(nad_manifest("net-a", simple_net("net-a")))
    with pytest.raises(InvalidConfig) as err:
        # "ghost" would be NetworkNotFound: the count comes first, so nothing is looked up.
        w.resolver.plan(
            ifname="eth0", pod=pod(",".join(["net-a"] * 999 + ["ghost"])), runtime_config={}
        )
    assert err.value.code == 7
    assert err.value.msg == (
        "pod default/p1 asks for 1001 network attachments (the cluster network, 0 "
        "defaultNetworks and 1000 in k8s.v1.cni.cncf.io/networks); at most 4 are allowed per "
        "pod (daemon config key maxAttachmentsPerPod): ask for fewer networks, or have the node "
        "admin raise the limit"
    )


def test_a_pod_at_exactly_the_limit_gets_every_attachment(tmp_path: Path) -> None:
    w = World(tmp_path, maxAttachmentsPerPod=4)
    w.add_nads(nad_manifest("net-a", simple_net("net-a")))
    plan = w.resolver.plan(ifname="eth0", pod=pod("net-a, net-a, net-a"), runtime_config={})
    assert [a.ifname for a in plan] == ["eth0", "net1", "net2", "net3"]


def test_the_limit_counts_default_networks_except_in_system_namespaces(tmp_path: Path) -> None:
    w = World(
        tmp_path, maxAttachmentsPerPod=3, defaultNetworks=["net-a"], multusNamespace="default"
    )
    w.add_nads(nad_manifest("net-a", simple_net("net-a")))
    w.resolver.plan(ifname="eth0", pod=pod("net-a"), runtime_config={})
    with pytest.raises(InvalidConfig, match=r"asks for 4 .* 1 defaultNetworks and 2 in"):
        w.resolver.plan(ifname="eth0", pod=pod("net-a, net-a"), runtime_config={})
    system = pod("default/net-a, default/net-a", namespace="kube-system")
    assert len(w.resolver.plan(ifname="eth0", pod=system, runtime_config={})) == 3


def _host_local_nad(name: str, **ipam: str) -> dict[str, Any]:
    config = {
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {"type": "macvlan", "ipam": {"type": "host-local", "subnet": "10.1.0.0/24", **ipam}},
            {"type": "tuning"},
        ],
    }
    return nad_manifest(name, config)


def test_a_nad_whose_host_local_writes_outside_the_roots_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "leases", tmp_path / "elsewhere"
    w = World(tmp_path, hostLocalDataDir=str(root), hostLocalDataRoots=[])
    w.add_nads(
        _host_local_nad("inside", dataDir=str(root / "team-a")),
        _host_local_nad("outside", dataDir=str(outside)),
        _host_local_nad("dotdot", dataDir=f"{root}/../elsewhere"),
    )
    assert w.resolver.plan(ifname="eth0", pod=pod("inside"), runtime_config={})
    for name in ("outside", "dotdot"):
        with pytest.raises(InvalidConfig) as err:
            w.resolver.plan(ifname="eth0", pod=pod(name), runtime_config={})
        assert err.value.code == 7
        assert err.value.msg.startswith(f"network default/{name}: ipam.dataDir ")
        assert f"outside the directories host-local may use on this node ({root})" in err.value.msg
        assert "hostLocalDataRoots" in err.value.msg
    assert not outside.exists()


def test_host_local_data_roots_widen_where_a_nad_may_write(tmp_path: Path) -> None:
    extra = tmp_path / "run-ipam"
    w = World(tmp_path, hostLocalDataRoots=[str(extra)])
    w.add_nads(_host_local_nad("kindish", dataDir=str(extra / "state")))
    assert w.resolver.plan(ifname="eth0", pod=pod("kindish"), runtime_config={})


def test_a_nad_whose_host_local_reads_a_file_off_the_allow_list_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "shadow"
    secret.write_text("nameserver 6.6.6.6\n")
    allowed = tmp_path / "resolv.conf"
    w = World(tmp_path, resolvConfPaths=[str(allowed)])
    w.add_nads(
        _host_local_nad("reads-secret", resolvConf=str(secret)),
        _host_local_nad("reads-resolv", resolvConf=str(allowed)),
    )
    with pytest.raises(
        InvalidConfig, match=r"^network default/reads-secret: ipam.resolvConf "
    ) as err:
        w.resolver.plan(ifname="eth0", pod=pod("reads-secret"), runtime_config={})
    assert "6.6.6.6" not in err.value.msg and "resolvConfPaths" in err.value.msg
    assert w.resolver.plan(ifname="eth0", pod=pod("reads-resolv"), runtime_config={})


def test_a_conf_file_of_the_node_admin_is_not_confined(tmp_path: Path) -> None:
    """A NAD without spec.config runs the admin's conf from cniConfDir: theirs to point anywhere
    (kind's primary keeps leases in /run/cni-ipam-state)."""
    w = World(tmp_path)
    ondisk = _host_local_nad("ondisk", dataDir="/run/cni-ipam-state")["spec"]["config"]
    w.write_conf("50-ondisk.conflist", json.loads(ondisk))
    w.add_nads(nad_manifest("ondisk", None))
    assert w.resolver.plan(ifname="eth0", pod=pod("ondisk"), runtime_config={})


def test_gc_skips_a_nad_that_reaches_outside(tmp_path: Path) -> None:
    w = World(tmp_path, hostLocalDataRoots=[str(tmp_path / "leases")])
    w.add_nads(_host_local_nad("outside", dataDir=str(tmp_path / "elsewhere")))
    assert "default/outside" not in [n.network for n in w.resolver.known_networks()]


def test_empty_namespace_in_a_selection_is_the_pods(tmp_path: Path) -> None:
    # NPWG §4.1.2.1.1 and Multus: "namespace": "" is the pod's own; isolation agrees.
    w = World(tmp_path, namespaceIsolation=True)
    w.add_nads(nad_manifest("mine", simple_net("mine"), namespace="team-a"))
    sel = json.dumps([{"name": "mine", "namespace": ""}])
    plan = w.resolver.plan(ifname="eth0", pod=pod(sel, namespace="team-a"), runtime_config={})
    assert [(a.network, a.ifname) for a in plan[1:]] == [("team-a/mine", "net1")]


def test_unknown_keys_do_not_fail_the_pod_and_are_logged_once(world: World) -> None:
    sel = json.dumps(
        [
            {"name": "net-a", "colour": "blue", "interfce": "data0"},
            {"name": "net-b", "Interface": "data1"},
            {"name": "net-c"},
        ]
    )
    with capture_logs() as logs:
        plan = world.resolver.plan(ifname="eth0", pod=pod(sel), runtime_config={})
    assert [(a.network, a.ifname) for a in plan[1:]] == [
        ("default/net-a", "net1"),
        ("default/net-b", "data1"),
        ("default/net-c", "net3"),
    ]
    ignored = [e for e in logs if e["event"] == "network_selection_keys_ignored"]
    assert len(ignored) == 1
    assert ignored[0]["log_level"] == "warning"
    assert ignored[0]["elements"] == [
        {"network": "default/net-a", "ignored": ["colour", "interfce"], "read_as": {}},
        {"network": "default/net-b", "ignored": [], "read_as": {"Interface": "interface"}},
    ]


def test_a_clean_annotation_logs_nothing(world: World) -> None:
    with capture_logs() as logs:
        world.resolver.plan(ifname="eth0", pod=pod("net-a, net-b@data0"), runtime_config={})
    assert [e for e in logs if e["event"] == "network_selection_keys_ignored"] == []


def test_interface_with_a_second_at_sign_is_code_7(world: World) -> None:
    with pytest.raises(InvalidConfig) as err:
        world.resolver.plan(ifname="eth0", pod=pod("net-a, net-b@if1@if2"), runtime_config={})
    assert err.value.code == 7
    assert "item 1 ('net-b@if1@if2')" in err.value.msg


def test_empty_capability_values_need_no_capability(world: World) -> None:
    # Multus reads "ips": [] and "mac": "" as not given; so no capability is needed for them.
    sel = json.dumps([{"name": "net-a", "ips": [], "mac": "", "portMappings": [], "bandwidth": {}}])
    plan = world.resolver.plan(ifname="eth0", pod=pod(sel), runtime_config={})
    assert plan[1].capability_args == {}
