"""LocalMembership: which groups this node's pods hold, per domain, from the pods' kernels; a
report re-reads only its port, a refresh re-lists; subscribers hear of changes only."""

from __future__ import annotations

import threading
import time

from metaplugin.mcast_members import FABRIC, LocalMembership, Port, overlay_domain


class Watch:
    def __init__(self) -> None:
        self.pending: set[str] = set()
        self.closed = False
        self.lock = threading.Lock()

    def wait(self, timeout: float) -> set[str]:
        time.sleep(min(timeout, 0.01))
        with self.lock:
            out, self.pending = self.pending, set()
        return out

    def close(self) -> None:
        self.closed = True


def ports() -> list[Port]:
    return [
        Port(FABRIC, "default/a (eth0)", "/run/netns/a", "eth0", "pxa"),
        Port(FABRIC, "default/b (eth0)", "/run/netns/b", "eth0", "pxb"),
        Port(overlay_domain(70000), "default/a (net1)", "/run/netns/a", "net1", "pxc"),
    ]


def test_snapshot_members_and_ports_per_domain() -> None:
    held = {("/run/netns/a", "eth0"): ["239.1.1.1"], ("/run/netns/a", "net1"): ["ff3e::1"]}
    membership = LocalMembership(ports, read=lambda ns, ifn: held.get((ns, ifn), []))
    heard: list[dict[str, frozenset[str]]] = []
    membership.subscribe(heard.append)
    assert membership.pass_once() is True
    assert membership.snapshot() == {
        FABRIC: frozenset({"239.1.1.1"}),
        "overlay/70000": frozenset({"ff3e::1"}),
    }
    assert membership.members(FABRIC) == {"239.1.1.1": frozenset({"pxa"})}
    assert membership.ports(FABRIC) == frozenset({"pxa", "pxb"})
    assert membership.pass_once() is False  # nothing changed: nobody is told
    assert len(heard) == 1


def test_a_report_rereads_its_port_only_and_an_unreadable_pod_holds_nothing() -> None:
    reads: list[str] = []
    held = {"pxa": ["239.1.1.1"], "pxb": []}

    def read(netns: str, ifname: str) -> list[str]:
        name = {"/run/netns/a": "pxa", "/run/netns/b": "pxb"}[netns]
        reads.append(name)
        if name == "pxb" and held["pxb"] == ["gone"]:
            raise OSError("no such netns")
        return held[name] if ifname == "eth0" else []

    membership = LocalMembership(ports, read=read)
    membership.pass_once()
    reads.clear()
    held["pxb"] = ["239.2.2.2"]
    assert membership.pass_once({"pxb", "unknown0"}) is True
    assert reads == ["pxb"]
    assert membership.members(FABRIC) == {
        "239.1.1.1": frozenset({"pxa"}),
        "239.2.2.2": frozenset({"pxb"}),
    }
    held["pxb"] = ["gone"]
    membership.pass_once({"pxb"})
    assert membership.members(FABRIC) == {"239.1.1.1": frozenset({"pxa"})}


def test_the_thread_follows_reports_and_refreshes() -> None:
    held = {"pxa": [], "pxb": []}
    listed = [ports()[0]]
    watch = Watch()
    membership = LocalMembership(
        lambda: list(listed),
        read=lambda ns, ifn: held["pxa" if ns.endswith("a") else "pxb"],
        watch=lambda: watch,
        resync_s=3600,
    )
    changed = threading.Event()
    membership.subscribe(lambda _: changed.set())
    membership.start()
    try:
        deadline = time.monotonic() + 5
        while membership.ports(FABRIC) != {"pxa"} and time.monotonic() < deadline:
            time.sleep(0.01)
        changed.clear()
        held["pxa"] = ["239.1.1.1"]
        with watch.lock:
            watch.pending.add("pxa")  # the pod's kernel announced the join
        assert changed.wait(5)
        assert membership.snapshot() == {FABRIC: frozenset({"239.1.1.1"})}
        changed.clear()
        listed.append(ports()[1])  # an ADD: refreshed without any report
        membership.refresh()
        assert changed.wait(5)
        assert membership.ports(FABRIC) == {"pxa", "pxb"}
        changed.clear()
        listed.clear()  # every pod gone: the report socket is closed
        membership.refresh()
        assert changed.wait(5)
        deadline = time.monotonic() + 5
        while not watch.closed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watch.closed
    finally:
        membership.stop()


def test_link_local_groups_are_not_published() -> None:
    """They never leave a node: the overlay floods them, the routed primary never forwards."""
    groups = ["239.1.1.1", "224.0.0.251", "ff02::fb", "ff12::1", "ff05::2", "ff3e::1"]
    membership = LocalMembership(lambda: ports()[:1], read=lambda ns, ifn: groups)
    membership.pass_once()
    assert membership.snapshot() == {FABRIC: frozenset({"239.1.1.1", "ff05::2", "ff3e::1"})}
