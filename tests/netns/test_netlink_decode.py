"""`Netlink.link` reads a link's few attributes from the raw answer instead of pyroute2's full
decode (twice per attachment on the ADD path): it must say exactly what the full decode says."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from kernel import rtnl
from kernel.netlink import Link, Netlink, _link
from kernel.rtnl import message
from testbed.netns import Netns, is_root, namespaces
from tests.support.require import missing

pytestmark = pytest.mark.netns


@pytest.fixture
def ns() -> Iterator[Netns]:
    if not is_root():
        missing("needs root to make network namespaces")
    with namespaces() as made:
        node = Netns("decode")
        made.append(node)
        node.run("ip", "link", "add", "m0", "mtu", "1400", "type", "veth", "peer", "name", "m1")
        node.run("ip", "link", "set", "m0", "group", "7", "alias", "the master", "up")
        node.run("ip", "link", "add", "mv0", "link", "m0", "type", "macvlan", "mode", "bridge")
        node.run("ip", "link", "add", "vx0", "type", "vxlan", "id", "42", "dstport", "4789")
        yield node


def test_the_fast_link_decode_says_what_pyroute2_says(ns: Netns) -> None:
    with Netlink.open(ns.path) as nl:
        for name in ("lo", "m0", "m1", "mv0", "vx0"):
            fast = nl.link(name)
            assert fast is not None
            full = _link(nl._nl.request(_getlink(name), 18)[0])  # RTM_GETLINK, decoded in full
            if fast.kind != "vxlan":
                full = Link(**{**_fields(full), "data": {}})  # nobody reads their data
            assert fast == full, name
        assert nl.link("m0") == Link(**{**_fields(nl.require("m0"))})
        vtep = nl.require("vx0")
        assert vtep.kind == "vxlan" and vtep.data.get("IFLA_VXLAN_ID") == 42
        m0 = nl.require("m0")
        assert (m0.mtu, m0.group, m0.alias, m0.up, m0.kind) == (1400, 7, "the master", True, "veth")
        assert nl.link("absent") is None


def _getlink(name: str) -> object:
    return message(ifinfmsg, {}, [("IFLA_IFNAME", name)])


def _fields(link: Link) -> dict[str, object]:
    return {f: getattr(link, f) for f in Link.__slots__}


def test_a_session_opens_each_namespace_once(ns: Netns, monkeypatch: pytest.MonkeyPatch) -> None:
    trips: list[str] = []
    real = rtnl.run_in_netns

    def counting(path: str, fn: Any) -> Any:
        trips.append(path)
        return real(path, fn)

    monkeypatch.setattr(rtnl, "run_in_netns", counting)
    with rtnl.session():
        for _ in range(3):
            with Netlink.open(ns.path) as nl:
                assert nl.require("m0").mtu == 1400
            with Netlink.open() as node:
                assert node.link("m0") is None  # the caller's own namespace, not the pod's
        with Netlink.open(ns.path) as nl:
            kept = nl._nl
    assert trips == [ns.path]  # one trip into the namespace for the whole session
    assert kept._sock.fileno() == -1  # closed when the session ended
    with Netlink.open(ns.path) as nl:
        assert nl.require("m0").mtu == 1400
    assert trips == [ns.path, ns.path]  # outside a session: a socket per open, as before
