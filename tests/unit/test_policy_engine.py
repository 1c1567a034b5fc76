"""The policy engine without a kernel: which pods' tables it applies, when, and what it reports
(the nft scripts themselves are netpolicy.nft's; tests/netns/test_policy_daemon.py runs them)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from cnispec.cni import Result
from cnispec.errors import PlexusError
from cnispec.identity import Holder
from cnispec.netconf import PreparedNetwork, PreparedPlugin
from kernel.nftables import NftablesError
from metaplugin import ctl
from metaplugin.metrics import DaemonMetrics, LiveSources
from metaplugin.policy_engine import DropLabel, PolicyEngine
from metaplugin.store import Attachment, ContainerRecords
from netpolicy.model import Namespace, Pod, Policy, PolicySpec
from netpolicy.nft import TABLE, drop_counter_name


def attachment(cid: str, pod: str, ifname: str, network: str, *, ip: str, seq: int) -> Attachment:
    plugin = PreparedPlugin(type="bridge", path="/usr/lib/cni/bridge", version="1.0.0", config={})
    namespace, name = pod.split("/")
    result = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": ifname, "sandbox": f"/run/netns/{cid}"}],
        "ips": [{"address": f"{ip}/24", "interface": 0}],
    }
    return Attachment(
        holder=Holder(
            container_id=cid,
            ifname=ifname,
            netns=f"/run/netns/{cid}",
            pod_namespace=namespace,
            pod_name=name,
        ),
        network=network,
        seq=seq,
        is_default=seq == 0,
        runtime_ifname="eth0",
        prepared=PreparedNetwork(name=network, plugins=(plugin,)),
        state="added",
        result=Result.from_wire(result),
    )


class Store:
    def __init__(self) -> None:
        self.pods: dict[str, ContainerRecords] = {}

    def add(self, cid: str, pod: str, ip: str, secondary: str | None = None) -> str:
        records = [attachment(cid, pod, "eth0", "cluster", ip=ip, seq=0)]
        if secondary:
            records.append(attachment(cid, pod, "net1", "default/net-a", ip=secondary, seq=1))
        self.pods[cid] = ContainerRecords(cid, tuple(records))
        return f"/run/netns/{cid}"

    def all(self) -> Iterable[ContainerRecords]:
        return list(self.pods.values())

    def records(self, netns: str) -> list[Attachment]:
        return list(self.pods[netns.rsplit("/", 1)[-1]].records)


class Source:
    def __init__(self) -> None:
        self.policies: tuple[Policy, ...] = ()
        self.namespaces: dict[str, Namespace] = {}
        self.pods: tuple[Pod, ...] = ()
        self.labels: dict[str, dict[str, str]] = {}
        self.is_synced = True
        self.callbacks: list[Callable[[], None]] = []

    def snapshot(self) -> Source:
        return self

    def on_change(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)

    def pod_labels(self, namespace: str, name: str, container_id: str) -> dict[str, str] | None:
        return self.labels.get(f"{namespace}/{name}")

    def synced(self) -> bool:
        return self.is_synced

    def close(self) -> None:
        self.callbacks.clear()


class Kernel:
    def __init__(self) -> None:
        self.applied: list[tuple[str, str]] = []
        self.tables: dict[str, str] = {}
        self.drops: dict[str, dict[str, int]] = {}  # netns -> counter name -> packets
        self.fail: set[str] = set()

    def apply(self, netns: str, script: str) -> None:
        if netns in self.fail:
            raise NftablesError(f"nft refused the rules in {netns}: Error: no")
        self.applied.append((netns, script))
        self.tables[netns] = script
        self.drops[netns] = {}  # a replaced table's counters start at 0

    def list_counters_json(self, netns: str, family: str, table: str) -> dict[str, Any] | None:
        if f"table inet {TABLE} {{\n" not in self.tables.get(netns, ""):
            return None
        counters = [
            {"counter": {"family": family, "table": table, "name": n, "packets": p, "bytes": 0}}
            for n, p in self.drops.get(netns, {}).items()
        ]
        return {"nftables": counters}

    def netns_applied(self) -> list[str]:
        out = [n for n, _ in self.applied]
        self.applied.clear()
        return out


def deny_ingress(namespace: str = "default", name: str = "deny", **labels: str) -> Policy:
    spec = PolicySpec.model_validate(
        {"podSelector": {"matchLabels": labels}, "policyTypes": ["Ingress"]}
    )
    return Policy(kind="NetworkPolicy", namespace=namespace, name=name, spec=spec)


def allow_from(cidr: str, namespace: str = "default", name: str = "allow") -> Policy:
    spec = PolicySpec.model_validate(
        {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": cidr}}]}]}
    )
    return Policy(kind="NetworkPolicy", namespace=namespace, name=name, spec=spec)


@pytest.fixture
def parts() -> tuple[PolicyEngine, Store, Source, Kernel]:
    store, source, kernel = Store(), Source(), Kernel()
    engine = PolicyEngine(
        source=source, store=store, kernel=kernel, node_addresses=lambda: ("192.0.2.1",)
    )
    return engine, store, source, kernel


def test_a_pass_applies_every_pod_then_only_the_ones_that_changed(
    parts: tuple[PolicyEngine, Store, Source, Kernel],
) -> None:
    engine, store, source, kernel = parts
    a = store.add("a", "default/a", "10.0.0.2")
    b = store.add("b", "default/b", "10.0.0.3")
    source.labels = {"default/a": {"app": "a"}, "default/b": {"app": "b"}}
    kernel.tables[b] = f"table inet {TABLE} {{\n}}"  # left by an earlier daemon
    engine.recompute()
    assert kernel.netns_applied() == [b]  # at start: only a table that must go is touched
    assert kernel.tables[b] == f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\n"
    engine.recompute()
    assert kernel.netns_applied() == []
    source.policies = (deny_ingress(app="a"),)
    engine.recompute()
    assert kernel.netns_applied() == [a]
    assert "drop" in kernel.tables[a] and drop_counter_name("eth0", "ingress") in kernel.tables[a]
    assert engine.stats.enforced == 1


def test_nothing_is_applied_before_the_source_synced(
    parts: tuple[PolicyEngine, Store, Source, Kernel],
) -> None:
    engine, store, source, kernel = parts
    store.add("a", "default/a", "10.0.0.2")
    source.is_synced = False
    assert engine.recompute() is True  # to be retried
    assert kernel.applied == []


def test_the_add_hook_protects_the_new_pod_before_it_returns(
    parts: tuple[PolicyEngine, Store, Source, Kernel],
) -> None:
    engine, store, source, kernel = parts
    source.policies = (deny_ingress(),)
    engine.recompute()
    netns = store.add("new", "default/new", "10.0.0.9")
    engine.pod_added(netns, store.records(netns))
    assert kernel.netns_applied() == [netns]
    assert "drop" in kernel.tables[netns]
    engine.recompute()
    assert kernel.netns_applied() == []  # already in force


def test_a_new_pod_no_policy_selects_costs_no_apply(
    parts: tuple[PolicyEngine, Store, Source, Kernel],
) -> None:
    engine, store, _source, kernel = parts
    engine.recompute()
    netns = store.add("new", "default/new", "10.0.0.9")
    engine.pod_added(netns, store.records(netns))
    engine.recompute()
    assert kernel.applied == []


def test_a_failed_apply_fails_the_add_with_the_pod_and_nfts_message(
    parts: tuple[PolicyEngine, Store, Source, Kernel],
) -> None:
    engine, store, source, kernel = parts
    source.policies = (deny_ingress(),)
    netns = store.add("new", "default/new", "10.0.0.9")
    kernel.fail.add(netns)
    with pytest.raises(PlexusError) as caught:
        engine.pod_added(netns, store.records(netns))
    assert "cannot protect pod default/new" in caught.value.msg
    assert "Error: no" in caught.value.msg
    assert engine.stats.apply_failures == 1
    kernel.fail.clear()
    assert engine.recompute() is False  # the next pass applies it
    assert kernel.netns_applied() == [netns]


def test_a_failure_for_one_pod_does_not_stop_the_others(
    parts: tuple[PolicyEngine, Store, Source, Kernel],
) -> None:
    engine, store, source, kernel = parts
    source.policies = (deny_ingress(),)
    a = store.add("a", "default/a", "10.0.0.2")
    b = store.add("b", "default/b", "10.0.0.3")
    kernel.fail.add(a)
    assert engine.recompute() is True
    assert kernel.netns_applied() == [b]


def test_a_deleted_pod_is_forgotten(parts: tuple[PolicyEngine, Store, Source, Kernel]) -> None:
    engine, store, source, _kernel = parts
    source.policies = (deny_ingress(),)
    a = store.add("a", "default/a", "10.0.0.2")
    engine.recompute()
    del store.pods["a"]
    engine.pod_removed(a)
    assert engine.pod_view("default", "a") is None
    engine.recompute()
    assert engine.stats.enforced == 0


def test_drops_never_go_back_when_a_table_is_replaced(
    parts: tuple[PolicyEngine, Store, Source, Kernel],
) -> None:
    engine, store, source, kernel = parts
    source.policies = (deny_ingress(),)
    a = store.add("a", "default/a", "10.0.0.2")
    engine.recompute()
    kernel.netns_applied()
    kernel.drops[a][drop_counter_name("eth0", "ingress")] = 7
    label = DropLabel("default", "NetworkPolicy", "ingress")
    assert engine.dropped() == {label: 7}
    source.policies = (deny_ingress(), allow_from("10.7.0.0/16"))  # a new table, counters at 0
    engine.recompute()
    assert kernel.netns_applied() == [a]
    kernel.drops[a][drop_counter_name("eth0", "ingress")] = 2
    assert engine.dropped() == {label: 9}


def test_a_drop_counts_against_every_kind_that_selects_the_direction(
    parts: tuple[PolicyEngine, Store, Source, Kernel],
) -> None:
    engine, store, source, kernel = parts
    source.policies = (deny_ingress(),)
    source.namespaces = {
        "default": Namespace(name="default", annotations={"plexus.dev/isolation": "namespace"})
    }
    a = store.add("a", "default/a", "10.0.0.2")
    engine.recompute()
    kernel.drops[a][drop_counter_name("eth0", "ingress")] = 3
    assert engine.dropped() == {DropLabel("default", "Isolation+NetworkPolicy", "ingress"): 3}


def test_the_view_says_which_policies_select_each_interface(
    parts: tuple[PolicyEngine, Store, Source, Kernel],
) -> None:
    engine, store, source, kernel = parts
    multi = Policy(
        kind="MultiNetworkPolicy",
        namespace="default",
        name="net-a-web",
        policy_for=("default/net-a",),
        spec=PolicySpec.model_validate(
            {
                "podSelector": {},
                "ingress": [
                    {"ports": [{"port": 80}], "from": [{"ipBlock": {"cidr": "10.9.0.0/16"}}]}
                ],
            }
        ),
    )
    source.policies = (deny_ingress(), multi)
    a = store.add("a", "default/a", "10.0.0.2", secondary="10.9.0.2")
    engine.recompute()
    kernel.drops[a][drop_counter_name("net1", "ingress")] = 4
    view = engine.pod_view("default", "a")
    assert view is not None
    eth0, net1 = view["interfaces"]
    assert eth0["ingress"]["selectedBy"] == ["NetworkPolicy:default/deny"]
    assert eth0["ingress"]["allows"] == []
    assert eth0["trustedSources"] == ["192.0.2.1"]
    assert net1["network"] == "default/net-a"
    assert net1["ingress"]["selectedBy"] == ["MultiNetworkPolicy:default/net-a-web"]
    (allow,) = net1["ingress"]["allows"]
    assert allow["cidrs"] == ["10.9.0.0/16"]
    assert allow["ports"] == [{"protocol": "TCP", "first": 80, "last": 80}]
    assert allow["by"] == ["MultiNetworkPolicy:default/net-a-web"]
    assert net1["ingress"]["droppedPackets"] == 4
    assert net1["egress"]["isolated"] is False


def test_the_add_hook_compiles_the_new_pod_as_the_full_pass_would(
    parts: tuple[PolicyEngine, Store, Source, Kernel],
) -> None:
    engine, store, source, _kernel = parts
    source.policies = (
        deny_ingress(app="web"),
        allow_from("10.0.0.0/30"),
        Policy(
            kind="NetworkPolicy",
            namespace="default",
            name="from-db",
            spec=PolicySpec.model_validate(
                {
                    "podSelector": {},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "db"}}}]}],
                }
            ),
        ),
    )
    source.labels = {"default/a": {"app": "web"}, "default/b": {"app": "db"}, "default/c": {}}
    netns = [
        store.add("a", "default/a", "10.0.0.2"),
        store.add("b", "default/b", "10.0.0.3"),
        store.add("c", "default/c", "10.0.0.4"),
    ]
    full = engine.compile()
    for one in netns:
        assert engine.compile(only=one) == {one: full[one]}


def test_the_metrics_a_scrape_reads(parts: tuple[PolicyEngine, Store, Source, Kernel]) -> None:
    _engine, store, source, kernel = parts
    metrics = DaemonMetrics()
    engine = PolicyEngine(
        source=source,
        store=store,
        kernel=kernel,
        node_addresses=lambda: (),
        observe_apply=metrics.policy_apply_seconds.observe,
    )
    metrics.watch(LiveSources(admitted=lambda: 0, policy=engine.readout))
    source.policies = (deny_ingress(),)
    a = store.add("a", "default/a", "10.0.0.2")
    store.add("b", "default/b", "10.0.0.3")
    kernel.fail.add("/run/netns/b")
    engine.recompute()
    kernel.drops[a][drop_counter_name("eth0", "ingress")] = 5
    text = metrics.render().decode()
    assert "plexus_policy_pods_enforced 1.0" in text
    assert "plexus_policy_apply_failures_total 1.0" in text
    assert "plexus_policy_apply_seconds_count 1.0" in text
    assert (
        'plexus_policy_dropped_packets_total{direction="ingress",namespace="default",'
        'policy_kind="NetworkPolicy"} 5.0'
    ) in text


def test_a_node_without_policies_compiles_nothing(
    parts: tuple[PolicyEngine, Store, Source, Kernel], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, store, source, kernel = parts
    compiled: list[int] = []
    monkeypatch.setattr(
        "metaplugin.policy_engine.compile_world", lambda world: compiled.append(1) or {}
    )
    netns = store.add("a", "default/a", "10.0.0.2")
    engine.pod_added(netns, store.records(netns))
    engine.recompute()
    assert compiled == []
    assert kernel.applied == []
    view = engine.pod_view("default", "a")
    assert view is not None and view["enforcing"] is False
    # the app-isolation label alone makes a policy: then the world is compiled
    source.labels = {"default/a": {"plexus.dev/app": "x"}}
    engine.recompute()
    assert compiled == [1]


def test_plexusctl_policy_prints_what_is_in_force(
    parts: tuple[PolicyEngine, Store, Source, Kernel],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    engine, store, source, kernel = parts
    source.policies = (deny_ingress(), allow_from("10.7.0.0/16"))
    a = store.add("a", "default/a", "10.0.0.2")
    engine.recompute()
    kernel.drops[a][drop_counter_name("eth0", "ingress")] = 3
    view = engine.pod_view("default", "a")
    capsys.readouterr()  # the engine's log lines
    monkeypatch.setattr(ctl, "_get", lambda sock, url: (200, json.dumps(view).encode()))
    assert ctl.main(["--socket", "/nowhere", "policy", "default/a"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"pod default/a  netns {a}  table inet {TABLE} (enforcing)"
    assert out[1] == "eth0 (cluster, primary)"
    assert out[2] == (
        "  ingress: isolated by NetworkPolicy:default/allow, NetworkPolicy:default/deny; "
        "dropped 3 packets"
    )
    assert out[3] == "    allow from 192.0.2.1 (the node: health checks)"
    assert out[4] == "    allow from 10.7.0.0/16 on every port  [NetworkPolicy:default/allow]"
    assert out[5] == "  egress: open (no policy selects it)"
    monkeypatch.setattr(ctl, "_get", lambda sock, url: (404, b'{"error":"no policy state"}'))
    assert ctl.main(["--socket", "/nowhere", "policy", "default/b"]) == 1
