"""Named crash points for crash-safety tests and the crash campaign (`testbed.chaos`).

`PLEXUS_FAILPOINTS=store_plan_written` makes plexusd SIGKILL itself the moment it reaches that
point, the way a node loses power or the OOM killer strikes, so a test can prove that a restart
neither loses nor leaks what the interrupted step was doing. `name@N` fires on the N-th hit of
that point instead of the first (to reach the second record written, the third delegate run);
several points are separated by commas and whichever is reached first fires. Every name is
listed, with where it sits, in docs/failpoints.md.

Unset (production), `hit()` is one dict lookup. The environment is read once, at import.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Final

ENV: Final = "PLEXUS_FAILPOINTS"
# Every point a `hit()` names (a unit test keeps this, the code and docs/failpoints.md equal), so
# that a misspelt name in a test fails loudly instead of never firing.
NAMES: Final = frozenset(
    {
        "chain_add_after",
        "chain_add_before",
        "chain_del_after",
        "chain_del_before",
        "chain_gc_after",
        "chain_gc_before",
        "hostlocal_lease_write_before",
        "hostlocal_lease_written",
        "hostlocal_release_before",
        "hostlocal_released",
        "iface_address_added",
        "iface_route_added",
        "iface_up",
        "podlinks_reap_before",
        "podlinks_reaped",
        "routed_ipam_added",
        "routed_node_address_added",
        "routed_node_route_added",
        "routed_pair_remove_before",
        "routed_pair_removed",
        "routed_pod_address_added",
        "routed_pod_route_added",
        "routed_pod_up",
        "routed_veth_create_before",
        "routed_veth_created",
        "spool_replay_before",
        "spool_unlink_before",
        "spool_unlinked",
        "sriov_vf_moved",
        "store_container_removed",
        "store_mark_added_before",
        "store_mark_added_written",
        "store_plan_before",
        "store_plan_written",
        "store_record_write_before",
        "store_record_written",
        "store_remove_before",
        "store_remove_container_before",
        "store_removed",
        "sublink_configured",
        "sublink_create_before",
        "sublink_created",
        "sublink_ipam_added",
        "sublink_remove_before",
        "sublink_removed",
    }
)


def parse(spec: str) -> dict[str, int]:
    """`a,b@3` -> {"a": 1, "b": 3}. A count that is not a positive integer is a typo in a test:
    it raises rather than silently never firing."""
    armed: dict[str, int] = {}
    for item in spec.split(","):
        name, _, count = item.strip().partition("@")
        if not name:
            continue
        if name not in NAMES:
            raise ValueError(f"{ENV}: unknown failpoint {name!r} (see docs/failpoints.md)")
        nth = int(count) if count else 1
        if nth < 1:
            raise ValueError(f"{ENV}: {item!r}: the hit count must be 1 or more")
        armed[name] = nth
    return armed


_ARMED: Final = parse(os.environ.get(ENV, ""))
_hits: dict[str, int] = {}
_lock = threading.Lock()


def hit(name: str) -> None:
    """A durable step is about to happen (or just happened): die here if this point is armed."""
    nth = _ARMED.get(name)
    if nth is None:
        return
    with _lock:
        _hits[name] = seen = _hits.get(name, 0) + 1
    if seen >= nth:
        os.kill(os.getpid(), signal.SIGKILL)
