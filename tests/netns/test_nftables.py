"""kernel.nftables: libnftables through ctypes, inside a namespace the test makes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from kernel import nftables
from kernel.nftables import NftablesError
from netpolicy import nft
from netpolicy.model import Allow, DirectionRules, InterfaceRules, PodRules, PortRange
from netpolicy.nft import render
from testbed.netns import Netns, namespaces

TABLE = """
table inet t1 {
    counter c_drop { }
    chain input {
        type filter hook input priority filter; policy accept;
        tcp dport 9 counter name c_drop drop
    }
}
"""


@pytest.fixture
def two() -> Iterator[tuple[Netns, Netns]]:
    with namespaces() as made:
        a, b = Netns("nfta"), Netns("nftb")
        made.extend([a, b])
        yield a, b


def _tables(ns: Netns) -> list[str]:
    out = json.loads(ns.run("nft", "-j", "list", "tables").stdout)
    return [e["table"]["name"] for e in out["nftables"] if "table" in e]


def test_apply_lands_in_the_named_netns_only(two: tuple[Netns, Netns]) -> None:
    a, b = two
    nftables.apply(a.path, TABLE)
    assert _tables(a) == ["t1"]
    assert _tables(b) == []
    listed = nftables.list_table_json(a.path, "inet", "t1")
    assert listed is not None
    counters = [e["counter"] for e in listed["nftables"] if "counter" in e]
    assert [c["name"] for c in counters] == ["c_drop"]
    assert nftables.list_table_json(b.path, "inet", "t1") is None


def test_a_refused_script_changes_nothing_and_says_why(two: tuple[Netns, Netns]) -> None:
    a, _ = two
    nftables.apply(a.path, TABLE)
    bad = (
        "delete table inet t1\ntable inet t1 {\n chain input {\n counter name nosuch drop\n }\n}\n"
    )
    with pytest.raises(NftablesError) as caught:
        nftables.apply(a.path, bad)
    assert "Error: Could not process rule" in caught.value.msg
    assert a.path in caught.value.msg
    # one transaction: the delete before the error did not happen either
    assert _tables(a) == ["t1"]


def test_replace_in_one_transaction(two: tuple[Netns, Netns]) -> None:
    a, _ = two
    replace = "table inet t1 {}\ndelete table inet t1\n" + TABLE.replace("dport 9", "dport 10")
    nftables.apply(a.path, replace)  # the table need not exist yet
    nftables.apply(a.path, replace)
    rules = a.run("nft", "list", "table", "inet", "t1").stdout
    assert "dport 10" in rules
    nftables.apply(a.path, "table inet t1 {}\ndelete table inet t1\n")
    assert _tables(a) == []


def test_a_namespace_that_is_gone_is_an_error(tmp_path: object) -> None:
    with pytest.raises(OSError):
        nftables.apply("/run/netns/px-no-such-namespace", TABLE)


def test_counters_alone(two: tuple[Netns, Netns]) -> None:
    a, b = two
    nftables.apply(a.path, TABLE)
    listed = nftables.list_counters_json(a.path, "inet", "t1")
    assert listed is not None
    items = [e for e in listed["nftables"] if "metainfo" not in e]
    assert [e["counter"]["name"] for e in items] == ["c_drop"]
    assert nftables.list_counters_json(b.path, "inet", "t1") is None


def test_listings_from_many_threads_at_once() -> None:
    """libnftables 1.0.6 prints a set's type as JSON through a static strtok: threads listing
    tables with sets at once (while others applied) aborted the process (json.c:
    set_dtype_json: Assertion failed). Listings are serialised; this would die without that."""
    allows = tuple(
        Allow(
            cidrs=(f"10.{k}.0.0/24", f"10.{k}.1.7/32", "fd00::/64"),
            ports=(PortRange(protocol="TCP", first=80 + k, last=81 + k),),
            by=(f"NetworkPolicy:a/p{k}",),
        )
        for k in range(6)
    )
    side = DirectionRules(isolated=True, allows=allows, selected_by=("NetworkPolicy:a/p0",))
    rules = PodRules(
        pod="a/b",
        netns="-",
        interfaces=(
            InterfaceRules(ifname="eth0", network="c", primary=True, ingress=side, egress=side),
        ),
    )
    script = render(rules)
    with namespaces() as made:
        paths = []
        for i in range(16):
            ns = Netns(f"nftl{i}")
            made.append(ns)
            paths.append(ns.path)
            nftables.apply(ns.path, script)

        def work(path: str) -> bool:
            for _ in range(30):
                if nftables.list_table_json(path, "inet", nft.TABLE) is None:
                    return False
                nftables.apply(path, script)
            return True

        with ThreadPoolExecutor(len(paths)) as pool:
            assert all(pool.map(work, paths))
