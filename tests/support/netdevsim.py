"""A netdevsim PF with SR-IOV VFs for the kernel tier (Debian's kernel in the VM; netdevsim is
built out of tree by tests/vm/runner.py). netdevsim puts a new device's ports in the namespace
of whoever creates it, so the device is made from inside the test's "node" namespace; the PF
netdev is found through the device's sysfs `net/` directory, never by name. `ip -d link show`
is parsed the way a node admin reads it.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kernel.netns import run_in_netns
from testbed.netns import Netns

T = TypeVar("T")
BUS = Path("/sys/bus/netdevsim")
NUM_VFS = 4  # netdevsim's default max_vfs

# `ip -d link` prints a VF's settings as one line of ", "-separated items; these are the items
# a user checks, by VfSettings field. Items for a zero VLAN or QoS are left out by iproute2.
IP_ITEMS = {
    "mac": r"link/ether (\S+)",
    "vlan": r"^vlan (\d+)$",
    "qos": r"^qos (\d+)$",
    "vlan_proto": r"^vlan protocol (\S+)$",
    "spoofchk": r"^spoof checking (on|off)$",
    "trust": r"^trust (on|off)$",
    "link_state": r"^link-state (\w+)$",
    "min_tx_rate": r"^min_tx_rate (\d+)Mbps$",
    "max_tx_rate": r"^max_tx_rate (\d+)Mbps$",
}


@dataclass(frozen=True)
class Nsim:
    node: Netns
    device: Path  # /sys/bus/netdevsim/devices/netdevsimN
    pf: str  # the PF's netdev, in `node`

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a vfconfig function the way the daemon does: in the node's namespace."""
        return run_in_netns(self.node.path, lambda: fn(*args))

    def shown(self) -> dict[int, dict[str, str]]:
        """Every VF's settings as `ip -d link show <pf>` prints them, by VF index."""
        text = self.node.run("ip", "-d", "link", "show", self.pf).stdout
        vfs: dict[int, dict[str, str]] = {}
        for index, rest in re.findall(r"^\s+vf (\d+)\s+(.*)$", text, re.MULTILINE):
            items = [item.strip() for item in rest.split(",")]
            vfs[int(index)] = {
                field: found.group(1)
                for field, pattern in IP_ITEMS.items()
                for found in filter(None, (re.search(pattern, item) for item in items))
            }
        return vfs


@contextmanager
def netdevsim(node: Netns, num_vfs: int = NUM_VFS) -> Iterator[Nsim]:
    """A netdevsim device with one port (the PF) in `node` and `num_vfs` VFs; deleted after."""
    dev_id = 1000 + secrets.randbelow(1 << 20)  # ids are global to the kernel
    while (BUS / "devices" / f"netdevsim{dev_id}").exists():
        dev_id += 1
    node.run("sh", "-c", f"echo '{dev_id} 1' > {BUS}/new_device")
    device = BUS / "devices" / f"netdevsim{dev_id}"
    try:
        (device / "sriov_numvfs").write_text(str(num_vfs))
        # Listed in the node's own view of sysfs: the PF lives in its namespace.
        (pf,) = node.run("ls", f"{device}/net").stdout.split()
        yield Nsim(node, device, pf)
    finally:
        (BUS / "del_device").write_text(str(dev_id))
