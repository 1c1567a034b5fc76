"""Multicast membership across nodes in cluster mode (issue 13 item 4): the MulticastNodeState
shape, the controller's aggregation into each node's `status.replicateTo`, and the node's
`MembershipSync` (spec from the local membership, status to the replicators), all against the
API stand-in through the real `kubernetes` client. Waits are generous bounds, never the
measured quantity (the latency is `make bench-mcast-membership`'s)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from pydantic import ValidationError

from cnispec.mcast_api import (
    MulticastNodeSpec,
    aggregate,
    canonical_group,
    clean_groups,
    clean_replicate_to,
    replicate_to,
)
from delegates.fabric import Peer
from metaplugin.mcast_sync import MembershipSync, overlay_replicators
from nad_controller.controller import Controller, Settings
from nad_controller.k8s import ClusterApi
from nad_controller.leader import ElectionTiming
from tests.k8s_standin import ApiStandin

G, V, PLURAL = "plexus.dev", "v1alpha1", "multicastnodestates"
FAST = ElectionTiming(lease_duration=2.0, renew_deadline=1.5, retry_period=0.2)
NODES = ("node-1", "node-2", "node-3")
PEERS = [Peer(n, (f"192.0.2.{i}", f"2001:db8::{i}"), ()) for i, n in enumerate(NODES, 1)]
OVL = "overlay/4097"


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


# --- fakes: metaplugin.mcast_members.LocalMembership and a domain's replicator ------------------


class FakeMembership:
    """`LocalMembership`'s two methods; callbacks run on a thread of their own, as its do."""

    def __init__(self) -> None:
        self._groups: dict[str, frozenset[str]] = {}
        self._subscribers: list[Callable[[dict[str, frozenset[str]]], None]] = []

    def snapshot(self) -> dict[str, frozenset[str]]:
        return dict(self._groups)

    def subscribe(self, callback: Callable[[dict[str, frozenset[str]]], None]) -> None:
        self._subscribers.append(callback)

    def set(self, domain: str, *groups: str) -> None:
        if groups:
            self._groups[domain] = frozenset(groups)
        else:
            self._groups.pop(domain, None)
        for callback in self._subscribers:
            threading.Thread(target=callback, args=(self.snapshot(),)).start()


class FakeReplicator:
    def __init__(self, answer: bool = True) -> None:
        self.answer = answer
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.lock = threading.Lock()

    def set_group_members(self, group: str, node_addresses: Iterable[str]) -> bool:
        with self.lock:
            self.calls.append((group, tuple(node_addresses)))
        return self.answer

    def last(self, group: str) -> tuple[str, ...] | None:
        with self.lock:
            found = [a for g, a in self.calls if g == group]
        return found[-1] if found else None

    def replication(self) -> dict[str, list[str]]:
        """What it holds now, as FabricMulticast answers it (the sync's inventory)."""
        with self.lock:
            held: dict[str, list[str]] = {}
            for group, addresses in self.calls:
                held[group] = list(addresses)
        return {g: a for g, a in held.items() if a}


# --- fixtures ------------------------------------------------------------------------------------


def node(standin: ApiStandin, name: str) -> dict[str, Any]:
    return standin.get("Node", None, name) or standin.create(
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}
    )


def state_object(standin: ApiStandin, name: str, groups: dict[str, list[str]]) -> None:
    """A node's object as its plexusd writes it (create with spec and an ownerReference)."""
    made = node(standin, name)
    owner = {"apiVersion": "v1", "kind": "Node", "name": name, "uid": made["metadata"]["uid"]}
    standin.create({"apiVersion": f"{G}/{V}", "kind": "MulticastNodeState",
                    "metadata": {"name": name, "ownerReferences": [owner]},
                    "spec": {"nodeName": name, "groups": groups}})  # fmt: skip


def set_groups(kube: client.ApiClient, name: str, groups: dict[str, list[str]]) -> None:
    client.CustomObjectsApi(kube).patch_cluster_custom_object(
        G, V, PLURAL, name, [{"op": "add", "path": "/spec/groups", "value": groups}],
        _content_type="application/json-patch+json",
    )  # fmt: skip


def replicate(standin: ApiStandin, name: str) -> dict[str, Any] | None:
    obj = standin.get("MulticastNodeState", None, name)
    return None if obj is None else (obj.get("status") or {}).get("replicateTo")


def status_writes(standin: ApiStandin) -> int:
    return sum(
        1
        for method, path in standin.requests
        if method == "PATCH" and path.startswith(f"/apis/{G}/{V}/{PLURAL}/") and "/status" in path
    )


@pytest.fixture
def controllers(kube: client.ApiClient) -> Iterator[list[Controller]]:
    running: list[Controller] = []
    yield running
    for c in running:
        c.stop()


def controller(kube: client.ApiClient, running: list[Controller], name: str = "ctl") -> Controller:
    settings = Settings(namespace="plexus-system", identity=name, timing=FAST, debounce=0.02,
                        resync=1.0)  # fmt: skip
    made = Controller(ClusterApi(kube), settings)
    running.append(made)
    made.start()
    return made


@pytest.fixture
def syncs() -> Iterator[list[MembershipSync]]:
    running: list[MembershipSync] = []
    yield running
    for s in running:
        s.stop()


def node_sync(
    kube: client.ApiClient,
    running: list[MembershipSync],
    name: str,
    membership: FakeMembership,
    replicator: FakeReplicator | None = None,
    *,
    peers: Callable[[], list[Peer] | None] = lambda: PEERS,
) -> MembershipSync:
    sync = MembershipSync(kube, name, membership, peers=peers, family=lambda: socket.AF_INET,
                          debounce=0.02, resync=60.0, pending_retry=0.2)  # fmt: skip
    if replicator is not None:
        sync.register("overlay/", lambda d: replicator if d == OVL else None)
    running.append(sync)
    sync.start()
    return sync


# --- the shape -----------------------------------------------------------------------------------


def test_groups_are_canonical_multicast_addresses_and_bad_entries_are_skipped() -> None:
    assert canonical_group("FF05::0001") == "ff05::1"
    assert canonical_group(" 239.1.1.1") == "239.1.1.1"
    for bad in ("10.0.0.1", "2001:db8::1", "239.1.1", "", 239):
        with pytest.raises(ValueError):
            canonical_group(bad)
    raw = {
        OVL: ["239.1.1.1", "FF05::1", "10.0.0.1", "239.1.1.1"],
        "fabric": ["224.0.0.251"],
        "overlay/0": ["239.9.9.9"],  # no such VNI
        "overlay/x": ["239.9.9.9"],
        "bogus": ["239.9.9.9"],
        "overlay/7": [],
    }
    groups, problems = clean_groups(raw)
    assert groups == {OVL: ("239.1.1.1", "ff05::1"), "fabric": ("224.0.0.251",)}
    assert len(problems) == 4
    assert any("'10.0.0.1' is not a multicast address" in p for p in problems)
    # the model (what a node writes) refuses instead of skipping
    with pytest.raises(ValidationError, match="not a multicast address"):
        MulticastNodeSpec(node_name="n", groups={OVL: ("10.0.0.1",)})
    with pytest.raises(ValidationError, match="replication domain"):
        MulticastNodeSpec(node_name="n", groups={"overlay/16777216": ("239.1.1.1",)})
    targets, problems = clean_replicate_to({OVL: {"FF05::1": ["b", "a", ""]}, "x": {}})
    assert targets == {OVL: {"ff05::1": ("a", "b")}} and len(problems) == 1


def test_each_node_replicates_to_the_other_members_only() -> None:
    membership = aggregate({
        "a": {OVL: ["239.1.1.1", "239.2.2.2"]},
        "b": {OVL: ["239.1.1.1"], "fabric": ["ff05::1"]},
        "c": {},
    })  # fmt: skip
    assert replicate_to(membership, "a") == {
        OVL: {"239.1.1.1": ["b"]},
        "fabric": {"ff05::1": ["b"]},
    }
    assert replicate_to(membership, "b") == {OVL: {"239.1.1.1": ["a"], "239.2.2.2": ["a"]}}
    assert replicate_to(membership, "c") == {
        OVL: {"239.1.1.1": ["a", "b"], "239.2.2.2": ["a"]},
        "fabric": {"ff05::1": ["b"]},
    }


def test_the_crd_admits_what_the_model_writes_and_refuses_what_is_not_multicast() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    crd = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "deploy/crds/multicastnodestates.yaml").read_text()
    )
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = MulticastNodeSpec(node_name="n", groups={OVL: ("FF05::1", "239.1.1.1")})
    good = {"spec": spec.model_dump(mode="json", by_alias=True),
            "status": {"replicateTo": replicate_to(aggregate({"m": spec.groups}), "n")}}  # fmt: skip
    jsonschema.validate(good, schema)
    bad = {"spec": {"nodeName": "n", "groups": {OVL: ["10.0.0.1"]}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


# --- the controller --------------------------------------------------------------------------------


def test_controller_writes_each_node_the_other_nodes_with_members(
    standin: ApiStandin, kube: client.ApiClient, controllers: list[Controller]
) -> None:
    state_object(standin, "node-1", {OVL: ["239.1.1.1"]})
    state_object(standin, "node-2", {OVL: ["239.1.1.1", "239.2.2.2"], "fabric": ["ff05::1"]})
    state_object(standin, "node-3", {})
    controller(kube, controllers)
    assert wait_until(lambda: replicate(standin, "node-3") is not None)
    assert wait_until(lambda: replicate(standin, "node-1") == {
        OVL: {"239.1.1.1": ["node-2"], "239.2.2.2": ["node-2"]}, "fabric": {"ff05::1": ["node-2"]}
    })  # fmt: skip
    # the nodes' statuses are written concurrently: each is waited for
    assert wait_until(lambda: replicate(standin, "node-2") == {OVL: {"239.1.1.1": ["node-1"]}})
    assert wait_until(lambda: replicate(standin, "node-3") == {
        OVL: {"239.1.1.1": ["node-1", "node-2"], "239.2.2.2": ["node-2"]},
        "fabric": {"ff05::1": ["node-2"]},
    })  # fmt: skip
    # node-2 leaves 239.2.2.2 and the fabric group: the lists shrink (keys removed, not kept)
    set_groups(kube, "node-2", {OVL: ["239.1.1.1"]})
    assert wait_until(lambda: replicate(standin, "node-3") == {
        OVL: {"239.1.1.1": ["node-1", "node-2"]}
    })  # fmt: skip
    assert wait_until(lambda: replicate(standin, "node-1") == {OVL: {"239.1.1.1": ["node-2"]}})


def test_controller_writes_a_status_only_when_it_changes_for_that_node(
    standin: ApiStandin, kube: client.ApiClient, controllers: list[Controller]
) -> None:
    state_object(standin, "node-1", {OVL: ["239.1.1.1"]})
    state_object(standin, "node-2", {OVL: ["239.1.1.1"]})
    state_object(standin, "node-3", {})
    ctl = controller(kube, controllers)
    assert wait_until(lambda: ctl.multicast.writes == 3)
    # node-3 joins a group only node-3 has: only the other two nodes' lists change
    set_groups(kube, "node-3", {OVL: ["239.3.3.3"]})
    assert wait_until(lambda: replicate(standin, "node-1") == {
        OVL: {"239.1.1.1": ["node-2"], "239.3.3.3": ["node-3"]}
    })  # fmt: skip
    assert wait_until(lambda: ctl.multicast.writes == 5)
    # the same groups written again, and the resync passes: no write
    set_groups(kube, "node-1", {OVL: ["239.1.1.1"]})
    passes = []
    ctl.multicast.observe_pass = passes.append
    assert wait_until(lambda: len(passes) >= 2)  # resync=1 s: at least one full pass after
    assert ctl.multicast.writes == 5
    assert status_writes(standin) == 5


def test_a_node_that_is_gone_counts_no_more(
    standin: ApiStandin, kube: client.ApiClient, controllers: list[Controller]
) -> None:
    for name in NODES:
        state_object(standin, name, {OVL: ["239.1.1.1"]})
    # an object whose Node does not exist (yet, or any more): never counted, never written
    standin.create({"apiVersion": f"{G}/{V}", "kind": "MulticastNodeState",
                    "metadata": {"name": "ghost"},
                    "spec": {"nodeName": "ghost", "groups": {OVL: ["239.1.1.1"]}}})  # fmt: skip
    ctl = controller(kube, controllers)
    assert wait_until(lambda: replicate(standin, "node-1") == {
        OVL: {"239.1.1.1": ["node-2", "node-3"]}
    })  # fmt: skip
    standin.delete("v1", "Node", None, "node-3")
    # the stand-in's garbage collector deletes the node's object with it (ownerReference)
    assert standin.get("MulticastNodeState", None, "node-3") is None
    assert wait_until(lambda: replicate(standin, "node-1") == {OVL: {"239.1.1.1": ["node-2"]}})
    assert wait_until(lambda: replicate(standin, "node-2") == {OVL: {"239.1.1.1": ["node-1"]}})
    assert replicate(standin, "ghost") is None
    assert ctl.multicast.members == 2
    metrics = ctl.metrics.render().decode()
    assert "plexus_controller_multicast_member_nodes 2.0" in metrics
    assert "plexus_controller_multicast_groups 1.0" in metrics
    assert "plexus_controller_multicast_status_writes_total" in metrics


def test_only_the_leader_writes_membership(
    standin: ApiStandin, kube: client.ApiClient, controllers: list[Controller]
) -> None:
    state_object(standin, "node-1", {OVL: ["239.1.1.1"]})
    state_object(standin, "node-2", {})
    a, b = controller(kube, controllers, "ctl-a"), controller(kube, controllers, "ctl-b")
    assert wait_until(lambda: replicate(standin, "node-2") == {OVL: {"239.1.1.1": ["node-1"]}})
    assert wait_until(lambda: a.is_leader or b.is_leader)
    leader, follower = (a, b) if a.is_leader else (b, a)
    # the counter moves once the write has returned, after the stand-in already serves it
    assert wait_until(lambda: leader.multicast.writes >= 1)
    assert follower.multicast.writes == 0


# --- the node -------------------------------------------------------------------------------------


def test_node_publishes_its_groups_in_an_object_its_node_owns(
    standin: ApiStandin, kube: client.ApiClient, syncs: list[MembershipSync]
) -> None:
    made = node(standin, "node-1")
    membership = FakeMembership()
    membership.set(OVL, "FF05::1", "239.1.1.1")
    sync = node_sync(kube, syncs, "node-1", membership)

    def spec() -> dict[str, Any] | None:
        obj = standin.get("MulticastNodeState", None, "node-1")
        return None if obj is None else obj["spec"]

    assert wait_until(lambda: spec() == {
        "nodeName": "node-1", "groups": {OVL: ["239.1.1.1", "ff05::1"]}
    })  # fmt: skip
    obj = standin.get("MulticastNodeState", None, "node-1")
    assert obj is not None
    (owner,) = obj["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "Node",
        "node-1",
        made["metadata"]["uid"],
    )
    membership.set("fabric", "239.5.5.5")
    membership.set(OVL)  # the last member of the overlay's groups left
    assert wait_until(lambda: (spec() or {}).get("groups") == {"fabric": ["239.5.5.5"]})
    # someone deletes the object: it is made again
    standin.delete(f"{G}/{V}", "MulticastNodeState", None, "node-1")
    assert wait_until(lambda: (spec() or {}).get("groups") == {"fabric": ["239.5.5.5"]})
    assert wait_until(lambda: not sync.publish_once())  # its watch has caught up
    writes = sync.stats.spec_writes
    # a status write (the controller's) or a resync is no reason to write the spec
    client.CustomObjectsApi(kube).patch_cluster_custom_object_status(
        G, V, PLURAL, "node-1", {"status": {"replicateTo": {}}},
        _content_type="application/merge-patch+json",
    )  # fmt: skip
    assert replicate(standin, "node-1") == {}
    time.sleep(0.2)  # the publisher has looked at the object again (its debounce is 20 ms)
    assert not sync.publish_once()
    assert sync.stats.spec_writes == writes


def test_status_drives_the_replicator_and_a_group_that_leaves_gets_an_empty_list(
    standin: ApiStandin, kube: client.ApiClient, syncs: list[MembershipSync]
) -> None:
    state_object(standin, "node-1", {})
    replicator = FakeReplicator()
    fabric = FakeReplicator()
    sync = node_sync(kube, syncs, "node-1", FakeMembership(), replicator)
    sync.register_domain("fabric", fabric)
    status = client.CustomObjectsApi(kube).patch_cluster_custom_object_status

    def write(replicate_to: dict[str, Any]) -> None:
        status(G, V, PLURAL, "node-1", [{"op": "add", "path": "/status",
                                         "value": {"replicateTo": replicate_to}}],
               _content_type="application/json-patch+json")  # fmt: skip

    write({OVL: {"239.1.1.1": ["node-2", "node-3"], "239.2.2.2": ["node-3"]},
           "fabric": {"ff05::1": ["node-2"]}, "overlay/9": {"239.9.9.9": ["node-2"]}})  # fmt: skip
    assert wait_until(lambda: replicator.last("239.2.2.2") == ("192.0.2.3",))
    assert replicator.last("239.1.1.1") == ("192.0.2.2", "192.0.2.3")
    assert wait_until(lambda: fabric.last("ff05::1") == ("192.0.2.2",))
    assert sync.applied[OVL] == {"239.1.1.1": ("192.0.2.2", "192.0.2.3"),
                                 "239.2.2.2": ("192.0.2.3",)}  # fmt: skip
    assert "overlay/9" not in sync.applied  # no replicator serves it: nothing handed over
    calls = len(replicator.calls)
    # node-3 leaves 239.1.1.1; 239.2.2.2 has no other member any more
    write({OVL: {"239.1.1.1": ["node-2"]}})
    assert wait_until(lambda: replicator.last("239.2.2.2") == ())
    assert replicator.last("239.1.1.1") == ("192.0.2.2",)
    assert wait_until(lambda: fabric.last("ff05::1") == ())
    assert len(replicator.calls) == calls + 2  # only the two groups that changed
    assert sync.applied == {OVL: {"239.1.1.1": ("192.0.2.2",)}}


def test_a_replicator_with_nothing_to_program_yet_is_asked_again(
    standin: ApiStandin, kube: client.ApiClient, syncs: list[MembershipSync]
) -> None:
    state_object(standin, "node-1", {})
    replicator = FakeReplicator(answer=False)  # an overlay segment not on this node yet
    peers: list[Peer] | None = None  # the fabric has not listed the nodes yet
    sync = node_sync(kube, syncs, "node-1", FakeMembership(), replicator, peers=lambda: peers)
    client.CustomObjectsApi(kube).patch_cluster_custom_object_status(
        G, V, PLURAL, "node-1", {"status": {"replicateTo": {OVL: {"239.1.1.1": ["node-2"]}}}},
        _content_type="application/merge-patch+json",
    )  # fmt: skip
    time.sleep(0.5)
    assert replicator.calls == []  # who is where is unknown: nothing changed
    peers = PEERS
    sync.resync_now()  # what the daemon does when the fabric's peers change
    assert wait_until(lambda: len(replicator.calls) >= 2)  # asked, and again
    assert sync.applied == {}
    replicator.answer = True  # the segment is made (a pod of the network arrives)
    assert wait_until(lambda: sync.applied == {OVL: {"239.1.1.1": ("192.0.2.2",)}})


def test_overlay_replicators_serve_overlay_domains_by_vni() -> None:
    calls = []

    class Overlay:
        def set_vni_group_members(self, vni: int, group: str, addresses: Iterable[str]) -> bool:
            calls.append((vni, group, list(addresses)))
            return True

    resolve = overlay_replicators(Overlay())
    assert resolve("fabric") is None and resolve("overlay/x") is None
    replicator = resolve("overlay/4097")
    assert replicator is not None
    assert replicator.set_group_members("239.1.1.1", ["192.0.2.2"])
    assert calls == [(4097, "239.1.1.1", ["192.0.2.2"])]


def test_api_failures_and_an_expired_watch_lose_nothing(
    standin: ApiStandin, kube: client.ApiClient, syncs: list[MembershipSync]
) -> None:
    node(standin, "node-1")
    standin.fail_next("POST", f"/apis/{G}/{V}/{PLURAL}", 503, times=2)
    membership = FakeMembership()
    membership.set(OVL, "239.1.1.1")
    replicator = FakeReplicator()
    sync = node_sync(kube, syncs, "node-1", membership, replicator)
    assert wait_until(lambda: replicate(standin, "node-1") is None
                      and standin.get("MulticastNodeState", None, "node-1") is not None)  # fmt: skip
    assert sync.stats.failures >= 2
    standin.fail_next("PATCH", f"/apis/{G}/{V}/{PLURAL}/node-1", 500, times=2)
    membership.set(OVL, "239.1.1.1", "239.2.2.2")

    def groups() -> Any:
        return (standin.get("MulticastNodeState", None, "node-1") or {})["spec"].get("groups")

    assert wait_until(lambda: groups() == {OVL: ["239.1.1.1", "239.2.2.2"]})
    # the watch's history is compacted and the stream cut: the informer lists again (410)
    # and takes in the status written meanwhile
    assert standin.wait_for_watches(1)
    standin.compact()
    obj = standin.get("MulticastNodeState", None, "node-1")
    assert obj is not None
    obj["status"] = {"replicateTo": {OVL: {"239.7.7.7": ["node-2"]}}}
    standin.update(obj)
    standin.compact()
    standin.close_watches(abrupt=True)
    assert wait_until(lambda: replicator.last("239.7.7.7") == ("192.0.2.2",))


def test_membership_travels_from_one_node_to_the_others_through_the_controller(
    standin: ApiStandin, kube: client.ApiClient, syncs: list[MembershipSync],
    controllers: list[Controller],
) -> None:  # fmt: skip
    """The whole path: a join on node-1 -> its object's spec -> the controller -> node-2's
    and node-3's status -> their replicators, given node-1's underlay address; a leave undoes
    it. (No timing asserted: `make bench-mcast-membership` measures it.)"""
    for name in NODES:
        node(standin, name)
    members = {n: FakeMembership() for n in NODES}
    replicators = {n: FakeReplicator() for n in NODES}
    for name in NODES:
        node_sync(kube, syncs, name, members[name], replicators[name])
    controller(kube, controllers)
    members["node-1"].set(OVL, "239.1.1.1")
    members["node-3"].set(OVL, "239.1.1.1", "ff05::2")
    assert wait_until(lambda: replicators["node-2"].last("239.1.1.1") == ("192.0.2.1", "192.0.2.3"))
    assert wait_until(lambda: replicators["node-2"].last("ff05::2") == ("192.0.2.3",))
    assert wait_until(lambda: replicators["node-1"].last("239.1.1.1") == ("192.0.2.3",))
    assert wait_until(lambda: replicators["node-3"].last("239.1.1.1") == ("192.0.2.1",))
    assert replicators["node-3"].last("ff05::2") is None  # its own group, no one else has it
    members["node-1"].set(OVL)  # node-1's last member leaves
    assert wait_until(lambda: replicators["node-2"].last("239.1.1.1") == ("192.0.2.3",))
    assert wait_until(lambda: replicators["node-3"].last("239.1.1.1") == ())


def test_status_patch_sends_only_what_changed() -> None:
    from nad_controller.multicast import status_patch

    current = {OVL: {"239.1.1.1": ["a"], "239.2.2.2": ["a", "b"]}, "fabric": {"ff05::1": ["b"]}}
    want = {OVL: {"239.1.1.1": ["a"], "239.2.2.2": ["b"], "239.3.3.3": ["c"]}, "overlay/9": {
        "239.9.9.9": ["a"]}}  # fmt: skip
    patch = status_patch(current, want)
    assert patch == {
        OVL: {"239.2.2.2": ["b"], "239.3.3.3": ["c"]},
        "fabric": None,
        "overlay/9": {"239.9.9.9": ["a"]},
    }
    assert status_patch(want, want) == {}
    assert status_patch(current, {})["fabric"] is None


# --- the daemon's hook --------------------------------------------------------------------------


class FakeFabric:
    """What the daemon's hook reads of `delegates.fabric.Fabric`."""

    def __init__(self) -> None:
        self.peers = tuple(PEERS)
        self.watchers: list[Callable[[tuple[Peer, ...]], None]] = []

    def underlay(self) -> tuple[object, str]:
        return object(), "192.0.2.1"

    def watch_peers(self, watcher: Callable[[tuple[Peer, ...]], None]) -> None:
        self.watchers.append(watcher)


def test_the_daemon_wires_the_sync_in_cluster_mode_with_a_fabric(
    standin: ApiStandin, kube: client.ApiClient
) -> None:
    from delegates.overlay import TYPE, Overlay
    from delegates.registry import PluginRegistry
    from metaplugin.config import DaemonConfig
    from metaplugin.daemon import Daemon, Sources
    from metaplugin.status import NullSink

    node(standin, "node-1")
    fabric: Any = FakeFabric()
    registry = PluginRegistry(builtins={TYPE: Overlay(ipam=None, fabric=fabric)})  # type: ignore[arg-type]
    sources = Sources(nads=None, pods=None, sink=NullSink(), synced=threading.Event(), api=kube)  # type: ignore[arg-type]
    daemon = Daemon(DaemonConfig(node_name="node-1"))
    assert daemon._membership_sync(sources, fabric, registry, None) is None  # no membership
    # the node's LocalMembership, and the routed primary's replicator (`_start_multicast`)
    membership, routed = FakeMembership(), FakeReplicator()
    # a restarted plexusd's replicator read an entry back that no status lists any more
    routed.set_group_members("239.5.5.5", ["192.0.2.9"])
    daemon._fabric_multicast = routed  # type: ignore[assignment]
    membership.set("fabric", "239.4.4.4")
    sync = daemon._membership_sync(sources, fabric, registry, membership)
    assert sync is not None
    try:
        assert wait_until(lambda: (standin.get("MulticastNodeState", None, "node-1") or {}).get(
            "spec", {}).get("groups") == {"fabric": ["239.4.4.4"]})  # fmt: skip
        assert len(fabric.watchers) == 2  # the overlay's and the sync's (peers changed -> resync)
        client.CustomObjectsApi(kube).patch_cluster_custom_object_status(
            G, V, PLURAL, "node-1", {"status": {"replicateTo": {"fabric": {"239.4.4.4": [
                "node-2", "node-3"]}}}}, _content_type="application/merge-patch+json",
        )  # fmt: skip
        assert wait_until(lambda: routed.last("239.4.4.4") == ("192.0.2.2", "192.0.2.3"))
        assert wait_until(lambda: routed.last("239.5.5.5") == ())  # taken away
    finally:
        sync.stop()
    local = Daemon(DaemonConfig(node_name="node-1", local_dir="/nads"))
    assert local._membership_sync(sources, fabric, registry, membership) is None  # local mode


def test_every_canonical_group_the_model_admits_the_crd_admits() -> None:
    import ipaddress
    import re

    from hypothesis import given, settings
    from hypothesis import strategies as st

    crd = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "deploy/crds/multicastnodestates.yaml").read_text()
    )
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    item = spec["properties"]["groups"]["additionalProperties"]["items"]
    pattern = re.compile(item["pattern"])
    v4 = st.integers(0xE0000000, 0xEFFFFFFF).map(ipaddress.IPv4Address)
    v6 = st.integers(0xFF << 120, (1 << 128) - 1).map(ipaddress.IPv6Address)

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(v4, v6))
    def check(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        group = canonical_group(str(address).upper())
        assert pattern.match(group) and len(group) <= item["maxLength"], group

    check()
    assert not pattern.match("10.0.0.1") and not pattern.match("2001:db8::1")


def test_what_a_previous_life_programmed_and_the_status_no_longer_lists_is_taken_away(
    standin: ApiStandin, kube: client.ApiClient, syncs: list[MembershipSync]
) -> None:
    state_object(standin, "node-1", {})
    client.CustomObjectsApi(kube).patch_cluster_custom_object_status(
        G, V, PLURAL, "node-1", {"status": {"replicateTo": {OVL: {"239.1.1.1": ["node-2"]}}}},
        _content_type="application/merge-patch+json",
    )  # fmt: skip
    replicator = FakeReplicator()
    kernel = {OVL: {"239.1.1.1": ("192.0.2.2",), "239.8.8.8": ("192.0.2.3",)}}
    sync = MembershipSync(kube, "node-1", FakeMembership(), peers=lambda: PEERS,
                          family=lambda: socket.AF_INET, debounce=0.02)  # fmt: skip
    sync.register("overlay/", lambda d: replicator if d == OVL else None, programmed=lambda: kernel)
    syncs.append(sync)
    sync.start()
    assert wait_until(lambda: replicator.last("239.8.8.8") == ())
    assert wait_until(lambda: sync.applied == {OVL: {"239.1.1.1": ("192.0.2.2",)}})
