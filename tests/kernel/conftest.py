"""Fixtures for the kernel tier: tests that need a kernel feature this machine may lack.

`require_kernel("ipvlan", "dummy")` skips a test, with the reason, on a kernel without those
features; the VM tier (`make kernel`, tests/vm/runner.py) boots Debian's stock kernel, where
they exist. Inside that VM (PLEXUS_VM=1) a missing feature fails the test instead: the VM exists
to provide it, so a skip there would hide a broken runner. A feature counts as present when its
module is loaded, or when the kernel knows the link kind: probed in a throw-away namespace, so
the probe never touches the host's network. netdevsim is no link kind: it is present when its bus
is (/sys/bus/netdevsim) or when `modprobe netdevsim` loads it; in the VM the runner loads its own
out-of-tree build, and when that build failed PLEXUS_VM_MISSING carries the reason.

`netns("role")` makes a uniquely named namespace (random run prefix, random per-test token) and
deletes every namespace it made when the test ends, passed or failed.
"""

from __future__ import annotations

import errno
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

import pytest

from testbed.netns import Netns, namespaces

# A feature is named after its module; the value is the rtnetlink link kind it provides.
_LINK_KINDS = {"dummy": "dummy", "ipvlan": "ipvlan", "8021q": "vlan", "macvlan": "macvlan"}
_LINK_KINDS |= {"veth": "veth", "vxlan": "vxlan", "bridge": "bridge"}


@cache
def kernel_has(feature: str) -> bool:
    if feature == "netdevsim":
        return _netdevsim_present()
    if feature not in _LINK_KINDS:
        known = sorted([*_LINK_KINDS, "netdevsim"])
        raise ValueError(f"no probe for kernel feature {feature!r}; known: {known}")
    # Loaded: the VM loads its modules before the command, so this answers there without a probe.
    return Path("/sys/module", feature).is_dir() or _link_kind_exists(_LINK_KINDS[feature])


def _netdevsim_present() -> bool:
    bus = Path("/sys/bus/netdevsim")
    if bus.is_dir():
        return True
    # Loading it creates no device, so it changes nothing a test or the host's network sees.
    try:
        subprocess.run(["modprobe", "-q", "netdevsim"], check=False, capture_output=True)
    except OSError:  # no modprobe (kmod) at all
        return False
    return bus.is_dir()


def _link_kind_exists(kind: str) -> bool:
    # Imported here: in the VM the /sys/module check answers, and pyroute2's import costs
    # seconds under TCG.
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with namespaces() as made:
        probe = Netns(f"probe-{secrets.token_hex(2)}")
        made.append(probe)
        try:
            with IPRoute(netns=probe.path) as ipr:
                ipr.link("add", ifname="probe0", kind=kind)
        except NetlinkError as exc:
            # EOPNOTSUPP is rtnetlink's "Unknown device type". Any other error (EINVAL: no parent
            # link for ipvlan, no VLAN id) means the kind exists and only the bare request failed.
            code: int = exc.code
            return code != errno.EOPNOTSUPP
    return True


@pytest.fixture
def require_kernel() -> Callable[..., None]:
    def require(*features: str) -> None:
        absent = [f for f in features if not kernel_has(f)]
        if not absent:
            return
        what = ", ".join(absent)
        if os.environ.get("PLEXUS_VM") == "1":
            why = os.environ.get("PLEXUS_VM_MISSING") or "missing from PLEXUS_VM_MODULES?"
            pytest.fail(f"the VM's kernel has no {what}: {why}")
        pytest.skip(f"this kernel has no {what}; runs in the VM tier: make kernel")

    return require


@pytest.fixture
def netns() -> Iterator[Callable[[str], Netns]]:
    token = secrets.token_hex(2)
    with namespaces() as made:

        def make(role: str) -> Netns:
            ns = Netns(f"{token}-{role}")
            made.append(ns)
            return ns

        yield make
