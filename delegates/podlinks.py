"""The links the built-in delegates make in a pod, as one set: each carries `PLEXUS_GROUP` as
its device group, so a pod's teardown can delete them all in one RTM_DELLINK. The kernel then
waits for one RCU grace period instead of one per link (~22 ms each here). The orchestrator
calls `reap` on DEL: before the delegates' own DELs when every plugin of the pod is a built-in,
after them otherwise (an exec'd plugin may need its interface to clean up)."""

from __future__ import annotations

from typing import Final

from cnispec import failpoints
from kernel.netlink import Netlink

PLEXUS_GROUP: Final = 0x504C58


def reap(netns: str) -> None:
    """Delete every link the built-in delegates made in the pod at `netns`, in one request."""
    with Netlink.open(netns) as pod:
        failpoints.hit("podlinks_reap_before")
        pod.delete_group(PLEXUS_GROUP)
        failpoints.hit("podlinks_reaped")
