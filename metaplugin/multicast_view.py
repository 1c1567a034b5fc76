"""`plexusctl multicast` (GET /v1/multicast): per network, the multicast groups this node's pods
have joined, with the member pods and where the node sends the group's traffic.

Which attachments count: those of a NAD with `"multicast": true` (plexus-macvlan, -ipvlan,
-sriov, -overlay) and every `plexus-overlay` attachment (its bridge snoops IGMP/MLD whatever
the key says). Membership is what the pod's kernel holds on that interface (/proc/net/igmp and
igmp6 in the pod's namespace), minus the groups every interface joins by itself. For an overlay
network, `sentTo` is the VXLAN MDB's list of nodes for the group; without one, "every fabric
node" in local mode (flood, each node's bridge prunes on arrival) and "no other node" in
cluster mode (the controller lists none); a macvlan,
ipvlan or VF network is one L2 segment outside Plexus (`sentTo` is the segment). The routed
primary with `fabric.multicast` (docs/multicast.md): every fabric node in local mode, the nodes
the controller listed in cluster mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import structlog

from cnispec.errors import PlexusError
from delegates.overlay import TYPE as OVERLAY
from delegates.overlay import replication
from kernel.mcast import joined_groups
from metaplugin.store import Attachment

log = structlog.get_logger(__name__)

EVERY_FABRIC_NODE = "every fabric node"
THE_SEGMENT = "the network's own L2 segment"
NO_OTHER_NODE = "no other node"
ROUTED = "plexus-routed"


class FabricReplication(Protocol):
    """The routed primary's replicator (delegates.fabric_mcast.FabricMulticast)."""

    @property
    def listed(self) -> bool: ...

    def replication(self) -> dict[str, list[str]]: ...


def _multicast_plugin(record: Attachment, *, routed: bool) -> dict[str, Any] | None:
    for plugin in record.prepared.plugins:
        if (
            plugin.type == OVERLAY
            or plugin.config.get("multicast") is True
            or (routed and plugin.type == ROUTED)
        ):
            return dict(plugin.config) | {"type": plugin.type}
    return None


def _sent_to(
    plugin: dict[str, Any],
    group: str,
    overlay: dict[str, list[str]] | None,
    fabric: FabricReplication | None,
    *,
    overlay_listed: bool,
) -> list[str]:
    if plugin["type"] == OVERLAY:
        unlisted = NO_OTHER_NODE if overlay_listed else EVERY_FABRIC_NODE
        return (overlay or {}).get(group) or [unlisted]
    if plugin["type"] == ROUTED and fabric is not None:
        if not fabric.listed:
            return [EVERY_FABRIC_NODE]
        return fabric.replication().get(group) or [NO_OTHER_NODE]
    return [THE_SEGMENT]


def view(
    records: Iterable[Attachment],
    *,
    groups_of: Callable[[str, str], list[str]] = joined_groups,
    replication_of: Callable[[int], dict[str, list[str]] | None] = replication,
    fabric: FabricReplication | None = None,
    overlay_listed: bool = False,
) -> list[dict[str, Any]]:
    """Rows sorted by network and group: {network, group, members, sentTo} (this node's).
    `fabric`: the routed primary's replicator when `fabric.multicast` is on; `overlay_listed`:
    cluster mode, where an overlay group without MDB entries goes to no other node."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records:
        plugin = _multicast_plugin(record, routed=fabric is not None)
        if plugin is None or record.state != "added" or not record.netns:
            continue
        try:
            groups = groups_of(record.netns, record.ifname)
        except (OSError, PlexusError) as exc:  # the pod's netns is gone: no members there
            log.debug("multicast_view_skipped", pod=record.holder.pod_ref, error=str(exc))
            continue
        sent: dict[str, list[str]] | None = {}
        if plugin["type"] == OVERLAY and isinstance(plugin.get("vni"), int):
            sent = replication_of(plugin["vni"])
        for group in groups:
            row = rows.setdefault(
                (record.network, group),
                {"network": record.network, "group": group, "members": []},
            )
            row["members"].append(f"{record.holder.pod_ref} ({record.ifname})")
            row["sentTo"] = _sent_to(plugin, group, sent, fabric, overlay_listed=overlay_listed)
    return [rows[key] | {"members": sorted(rows[key]["members"])} for key in sorted(rows)]
