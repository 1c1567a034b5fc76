"""`plexusctl multicast`'s rows from attachment records: which attachments count (multicast:
true, every overlay), one row per network and group with its member pods, and where the node
sends the group (an overlay's VXLAN MDB list, else every fabric node; a macvlan's segment)."""

from __future__ import annotations

from typing import Any

from cnispec.identity import Holder
from cnispec.netconf import PreparedNetwork, PreparedPlugin
from metaplugin.multicast_view import EVERY_FABRIC_NODE, NO_OTHER_NODE, THE_SEGMENT, view
from metaplugin.store import Attachment


def record(pod: str, network: str, plugin: str, config: dict[str, Any], **kw: Any) -> Attachment:
    return Attachment(
        holder=Holder(
            container_id=f"c-{pod}", ifname="net1", netns=f"/run/netns/{pod}",
            pod_namespace="default", pod_name=pod,
        ),
        network=network,
        seq=1,
        is_default=False,
        runtime_ifname="eth0",
        prepared=PreparedNetwork(
            name=network, plugins=(PreparedPlugin(type=plugin, path="", version="1.0.0",
                                                  config=config),)
        ),
        state=kw.get("state", "added"),
    )  # fmt: skip


JOINED = {
    "/run/netns/a": ["239.1.1.1", "ff3e::1"],
    "/run/netns/b": ["239.1.1.1"],
    "/run/netns/c": ["239.9.9.9"],
    "/run/netns/d": ["239.1.1.1"],
}


def groups_of(netns: str, ifname: str) -> list[str]:
    assert ifname == "net1"
    if netns == "/run/netns/gone":
        raise OSError("no such netns")
    return JOINED.get(netns, [])


def test_rows_per_network_and_group_with_members_and_where_they_go() -> None:
    records = [
        record("a", "default/ovl", "plexus-overlay", {"vni": 70000}),
        record("b", "default/ovl", "plexus-overlay", {"vni": 70000}),
        record("c", "default/mc", "plexus-macvlan", {"multicast": True}),
        record("d", "default/plain", "plexus-macvlan", {}),  # not a multicast network
        record("gone", "default/mc", "plexus-macvlan", {"multicast": True}),  # netns gone
        record("a", "default/mc", "plexus-macvlan", {"multicast": True}, state="planned"),
    ]
    mdb = {70000: {"239.1.1.1": ["192.0.2.3"]}}
    rows = view(records, groups_of=groups_of, replication_of=mdb.get)
    assert rows == [
        {"network": "default/mc", "group": "239.9.9.9", "members": ["default/c (net1)"],
         "sentTo": [THE_SEGMENT]},
        {"network": "default/ovl", "group": "239.1.1.1",
         "members": ["default/a (net1)", "default/b (net1)"], "sentTo": ["192.0.2.3"]},
        {"network": "default/ovl", "group": "ff3e::1", "members": ["default/a (net1)"],
         "sentTo": [EVERY_FABRIC_NODE]},
    ]  # fmt: skip


class Replicator:
    def __init__(self, listed: bool, lists: dict[str, list[str]]) -> None:
        self.listed, self._lists = listed, lists

    def replication(self) -> dict[str, list[str]]:
        return self._lists


def test_cluster_mode_sends_unlisted_groups_to_no_other_node() -> None:
    """Overlay and routed primary in cluster mode: a group without a list stays on the node."""
    records = [
        record("a", "default/ovl", "plexus-overlay", {"vni": 70000}),
        record("c", "pods", "plexus-routed", {}),
    ]
    fabric = Replicator(True, {"239.9.9.9": ["192.0.2.7"]})
    rows = view(
        records,
        groups_of=groups_of,
        replication_of=lambda vni: {},
        fabric=fabric,
        overlay_listed=True,
    )
    assert [(r["network"], r["group"], r["sentTo"]) for r in rows] == [
        ("default/ovl", "239.1.1.1", [NO_OTHER_NODE]),
        ("default/ovl", "ff3e::1", [NO_OTHER_NODE]),
        ("pods", "239.9.9.9", ["192.0.2.7"]),
    ]
    local = view(
        records, groups_of=groups_of, replication_of=lambda vni: {}, fabric=Replicator(False, {})
    )
    assert {r["group"]: r["sentTo"] for r in local} == {
        "239.1.1.1": [EVERY_FABRIC_NODE],
        "ff3e::1": [EVERY_FABRIC_NODE],
        "239.9.9.9": [EVERY_FABRIC_NODE],
    }
