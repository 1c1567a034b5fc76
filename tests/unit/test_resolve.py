"""Resolution: which networks a pod gets, named how, with which capability arguments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from cnispec.errors import InvalidConfig, NetworkNotFound, NetworkNotPermitted
from cnispec.identity import PodInfo
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
