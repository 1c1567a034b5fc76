"""The fabric's feed: peers from the daemon config, reconciled when the set of nodes changes and
again after a failure, never dying on one."""

from __future__ import annotations

import time
from typing import Any

from cnispec.errors import PlexusError
from delegates.fabric import Peer, vtep_address, vtep_mac
from metaplugin.config import DaemonConfig
from metaplugin.fabric_sync import FabricSync, config_peers


class FakeFabric:
    """Stands in for delegates.fabric.Fabric (which is tested against the kernel in
    tests/netns): records what the sync loop asks of it."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.fail_next = 0
        self.pod_cidrs: tuple[str, ...] = ()

    def reconcile(self, peers: list[Peer]) -> list[str]:
        if self.fail_next:
            self.fail_next -= 1
            raise PlexusError("netlink said no")
        self.calls.append([p.name for p in peers])
        return []

    def set_pod_cidrs(self, cidrs: tuple[str, ...]) -> bool:
        changed, self.pod_cidrs = cidrs != self.pod_cidrs, cidrs
        return changed


def test_peers_from_config_accept_one_or_many_addresses() -> None:
    cfg = DaemonConfig.model_validate(
        {
            "fabric": {
                "nodes": [
                    {"name": "a", "address": "192.0.2.1", "podCIDRs": ["10.1.0.0/24"]},
                    {
                        "name": "b",
                        "addresses": ["192.0.2.2", "2001:db8::2"],
                        "podCIDRs": ["10.2.0.0/24"],
                    },
                ]
            }
        }
    )
    peers = config_peers(cfg)
    assert [p.addresses for p in peers] == [("192.0.2.1",), ("192.0.2.2", "2001:db8::2")]
    assert peers[1].address == "192.0.2.2"
    assert peers[1].address_of(10) == "2001:db8::2"  # AF_INET6


def test_vtep_identity_is_stable_and_distinct() -> None:
    assert vtep_mac("node-1") == vtep_mac("node-1") != vtep_mac("node-2")
    assert vtep_mac("node-1").startswith("0e:")  # locally administered, unicast
    assert vtep_address("10.244.3.0/24") == "10.244.3.0"


def test_sync_reconciles_on_change_and_survives_failures() -> None:
    fabric = FakeFabric()
    peers: list[Any] = [Peer("a", ("192.0.2.1",), ("10.1.0.0/24",))]
    sync = FabricSync(fabric, lambda: list(peers), interval=0.02)  # type: ignore[arg-type]
    fabric.fail_next = 1
    sync.start()
    try:
        deadline = time.monotonic() + 5
        while not fabric.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fabric.calls == [["a"]]  # the failed pass was retried
        peers.append(Peer("b", ("192.0.2.2",), ("10.2.0.0/24",)))
        while len(fabric.calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fabric.calls[-1] == ["a", "b"]
        time.sleep(0.1)
        assert len(fabric.calls) == 2  # no change: no reconcile
    finally:
        sync.stop()


def test_unknown_peers_never_reconcile_to_nothing() -> None:
    """Before the API listed the nodes, the peers are unknown (None), not absent: reconciling
    then would delete every route to the other nodes."""
    fabric = FakeFabric()
    answer: list[Any] = [None]
    sync = FabricSync(fabric, lambda: answer[0])  # type: ignore[arg-type]
    sync.sync_once()
    assert fabric.calls == []
    answer[0] = [Peer("a", ("192.0.2.1",), ("10.1.0.0/24",))]
    sync.sync_once()
    assert fabric.calls == [["a"]]


def test_pod_cidrs_assigned_later_are_taken_and_force_a_pass() -> None:
    fabric = FakeFabric()
    cidrs: list[Any] = [None]
    peers = [Peer("a", ("192.0.2.1",), ("10.1.0.0/24",))]
    sync = FabricSync(fabric, lambda: peers, own_pod_cidrs=lambda: cidrs[0])  # type: ignore[arg-type]
    sync.sync_once()
    assert fabric.pod_cidrs == () and len(fabric.calls) == 1
    sync.sync_once()
    assert len(fabric.calls) == 1  # nothing changed
    cidrs[0] = ["10.9.0.0/24"]
    sync.sync_once()
    assert fabric.pod_cidrs == ("10.9.0.0/24",) and len(fabric.calls) == 2


def test_a_failing_first_pass_is_not_fatal() -> None:
    fabric = FakeFabric()
    fabric.fail_next = 1
    sync = FabricSync(fabric, lambda: [])  # type: ignore[arg-type]
    sync.sync_once()  # logged, not raised: plexusd must start and retry
    sync.sync_once()
    assert fabric.calls == [[]]
