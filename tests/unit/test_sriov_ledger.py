"""The durable VF ledger: compare-and-set transitions, one file per VF that is not plainly free,
records that survive a restart, unreadable records turning their VF unhealthy, and the pool free
index behind reserve."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest
from structlog.testing import capture_logs

import sriov.ledger
from cnispec.errors import DeviceUnavailable, IOFailure
from cnispec.identity import Holder
from sriov.ledger import Ledger
from sriov.records import HostState, VfRecord, VfSettings, VfState

POOL = "plexus.dev/intel_vf"
FREE, RESERVED, ATTACHED, RELEASING, UNHEALTHY = (
    VfState.FREE,
    VfState.RESERVED,
    VfState.ATTACHED,
    VfState.RELEASING,
    VfState.UNHEALTHY,
)


def _pci(i: int) -> str:
    return f"0000:3b:{2 + i // 8:02x}.{i % 8}"


def _holder(cid: str = "c1", ifname: str = "net1") -> Holder:
    return Holder(
        container_id=cid, ifname=ifname, netns="/run/netns/p", pod_namespace="ns", pod_name="pod-a"
    )


def _files(state: Path) -> list[str]:
    return sorted(p.name for p in (state / "vfs").iterdir())


def _pool(state: Path, size: int) -> Ledger:
    ledger = Ledger(state)
    members = [_pci(i) for i in range(size)]
    random.Random(7).shuffle(members)  # set_pool's order must not matter
    ledger.set_pool(POOL, members)
    return ledger


# --- records and transitions ----------------------------------------------------------------------


def test_an_unknown_vf_is_free_and_costs_no_file(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    assert ledger.get(_pci(0)) == VfRecord(pci=_pci(0))
    assert ledger.records() == []
    assert _files(tmp_path) == []


def test_a_full_cycle_is_on_disk_at_every_step_and_free_deletes_the_file(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    pci, path = _pci(1), tmp_path / "vfs" / f"{_pci(1)}.json"
    reserved = ledger.transition(pci, expect={FREE}, to=RESERVED, holder=_holder(), pool=POOL)
    assert reserved.updated > 0
    assert VfRecord.model_validate_json(path.read_bytes()) == reserved
    ledger.transition(
        pci,
        expect={RESERVED},
        to=RESERVED,
        host=HostState(name="ens1f0v1", mac="02:00:00:00:00:01", mtu=1500),
        pf_before=VfSettings(vlan=0, spoofchk=True),
        pf_applied=("vlan",),
    )
    ledger.transition(pci, expect={RESERVED}, to=ATTACHED)
    on_disk = json.loads(path.read_text())
    assert on_disk["state"] == "attached"
    assert on_disk["holder"]["container_id"] == "c1"
    assert on_disk["host"]["name"] == "ens1f0v1"
    assert on_disk["pf_applied"] == ["vlan"]
    ledger.transition(pci, expect={RESERVED, ATTACHED}, to=RELEASING)
    freed = ledger.transition(pci, expect={RELEASING}, to=FREE)
    assert freed.model_copy(update={"updated": 0.0}) == VfRecord(pci=pci)
    assert not path.exists()
    assert _files(tmp_path) == []
    assert ledger.held_by("c1", "net1") is None


def test_compare_and_set_refuses_and_names_the_vf_state_and_holder(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.transition(_pci(2), expect={FREE}, to=ATTACHED, holder=_holder("c9", "net2"))
    with pytest.raises(DeviceUnavailable) as info:
        ledger.transition(_pci(2), expect={FREE}, to=RESERVED, holder=_holder())
    assert info.value.msg == (
        f"VF {_pci(2)} is attached (held by pod ns/pod-a, container c9, net2), not free"
    )
    assert info.value.cni_code == 111
    assert ledger.get(_pci(2)).holder == _holder("c9", "net2")  # untouched


def test_an_unhealthy_vf_says_why_when_refused(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.transition(_pci(0), expect={FREE}, to=UNHEALTHY, reason="netdev missing")
    with pytest.raises(DeviceUnavailable, match=r"is unhealthy: netdev missing, not free"):
        ledger.transition(_pci(0), expect={FREE}, to=RESERVED, holder=_holder())


def test_transition_refuses_unknown_fields_and_the_key_fields(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    with pytest.raises(TypeError, match="holdr"):
        ledger.transition(_pci(0), expect={FREE}, to=RESERVED, holdr=_holder())
    with pytest.raises(TypeError, match="pci"):
        ledger.transition(_pci(0), expect={FREE}, to=RESERVED, pci=_pci(1))
    assert _files(tmp_path) == []


def test_one_attachment_cannot_hold_two_vfs(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.transition(_pci(0), expect={FREE}, to=RESERVED, holder=_holder())
    with pytest.raises(DeviceUnavailable, match=rf"c1/net1 already holds VF {_pci(0)}"):
        ledger.transition(_pci(1), expect={FREE}, to=RESERVED, holder=_holder())
    assert ledger.get(_pci(1)).state is FREE


def test_put_stamps_and_stores_and_a_free_record_with_content_keeps_its_file(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path)
    stored = ledger.put(VfRecord(pci=_pci(3), state=FREE, reason="was unhealthy: healed"))
    assert stored.updated > 0
    assert _files(tmp_path) == [f"{_pci(3)}.json"]
    ledger.put(VfRecord(pci=_pci(3)))
    assert _files(tmp_path) == []


def test_records_survive_a_restart_with_their_holder_index(tmp_path: Path) -> None:
    first = _pool(tmp_path, 4)
    reserved = first.reserve(POOL, _holder())
    first.transition(_pci(3), expect={FREE}, to=UNHEALTHY, reason="no netdev")
    again = Ledger(tmp_path)
    assert again.records() == [reserved, first.get(_pci(3))]
    assert again.held_by("c1", "net1") == reserved
    again.set_pool(POOL, [_pci(i) for i in range(4)])
    assert again.free_count(POOL) == 2  # 0 is reserved, 3 unhealthy
    assert again.reserve(POOL, _holder()) == reserved  # the retried ADD after a restart


def test_a_failed_write_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = _pool(tmp_path, 2)

    def disk_full(path: Path, data: bytes, **_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sriov.ledger, "atomic_write", disk_full)
    with pytest.raises(IOFailure, match=r"cannot write VF record .*: No space left on device"):
        ledger.reserve(POOL, _holder())
    assert ledger.get(_pci(0)).state is FREE
    assert ledger.free_count(POOL) == 2
    assert ledger.held_by("c1", "net1") is None
    monkeypatch.undo()
    assert ledger.reserve(POOL, _holder()).pci == _pci(0)


# --- unreadable records -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"",
        b'{"pci": "0000:3b:02.0", "state": "lost"}',
        json.dumps({"pci": "0000:3b:02.1", "state": "attached"}).encode(),  # another VF's
    ],
)
def test_an_unreadable_record_makes_its_vf_unhealthy_not_a_crash(
    tmp_path: Path, content: bytes
) -> None:
    (tmp_path / "vfs").mkdir()
    path = tmp_path / "vfs" / f"{_pci(0)}.json"
    path.write_bytes(content)
    good = VfRecord(pci=_pci(5), state=ATTACHED, holder=_holder())
    (tmp_path / "vfs" / f"{_pci(5)}.json").write_text(good.model_dump_json())
    with capture_logs() as logs:
        ledger = Ledger(tmp_path)
    record = ledger.get(_pci(0))
    assert record.state is UNHEALTHY
    assert str(path) in record.reason
    assert "heal or remove it" in record.reason
    assert ledger.get(_pci(5)) == good  # the others are still read
    assert [e["event"] for e in logs] == ["vf_record_unreadable"]
    assert logs[0]["log_level"] == "error"
    ledger.set_pool(POOL, [_pci(0), _pci(5)])
    with pytest.raises(DeviceUnavailable, match=r"has no free VF \(1 in use, 1 unhealthy\)"):
        ledger.reserve(POOL, _holder("c2"))
    # An audit that heals it replaces the broken file.
    ledger.transition(_pci(0), expect={UNHEALTHY}, to=FREE)
    assert not path.exists()


def test_temp_files_of_an_interrupted_write_are_removed(tmp_path: Path) -> None:
    (tmp_path / "vfs").mkdir()
    (tmp_path / "vfs" / f".{_pci(0)}.json.tmp-123-456").write_text("{")
    assert Ledger(tmp_path).records() == []
    assert _files(tmp_path) == []


# --- pools and reserve ------------------------------------------------------------------------


def test_reserve_gives_the_lowest_free_pci_first(tmp_path: Path) -> None:
    ledger = _pool(tmp_path, 20)
    got = [ledger.reserve(POOL, _holder(f"c{i}")).pci for i in range(5)]
    assert got == [_pci(i) for i in range(5)]
    record = ledger.get(_pci(0))
    assert (record.state, record.pool, record.holder) == (RESERVED, POOL, _holder("c0"))
    ledger.transition(_pci(2), expect={RESERVED}, to=FREE)
    assert ledger.reserve(POOL, _holder("c9")).pci == _pci(2)
    assert ledger.reserve(POOL, _holder("c10")).pci == _pci(5)
    assert ledger.free_count(POOL) == 14


def test_reserve_is_idempotent_for_the_same_attachment(tmp_path: Path) -> None:
    ledger = _pool(tmp_path, 4)
    first = ledger.reserve(POOL, _holder("c1", "net1"))
    assert ledger.reserve(POOL, _holder("c1", "net1")) == first
    ledger.transition(first.pci, expect={RESERVED}, to=ATTACHED)
    assert ledger.reserve(POOL, _holder("c1", "net1")).pci == first.pci
    assert ledger.reserve(POOL, _holder("c1", "net2")).pci == _pci(1)
    assert ledger.free_count(POOL) == 2


def test_an_attachment_holding_a_vf_of_another_pool_is_refused(tmp_path: Path) -> None:
    ledger = _pool(tmp_path, 2)
    ledger.set_pool("plexus.dev/other", [_pci(10)])
    ledger.reserve("plexus.dev/other", _holder())
    with pytest.raises(DeviceUnavailable, match=rf"c1/net1 already holds VF {_pci(10)}"):
        ledger.reserve(POOL, _holder())
    assert ledger.free_count(POOL) == 2


def test_an_exhausted_pool_counts_what_is_in_use_and_unhealthy(tmp_path: Path) -> None:
    ledger = _pool(tmp_path, 3)
    ledger.reserve(POOL, _holder("c1"))
    ledger.reserve(POOL, _holder("c2"))
    ledger.transition(_pci(2), expect={FREE}, to=UNHEALTHY, reason="gone from sysfs")
    assert ledger.free_count(POOL) == 0
    with pytest.raises(DeviceUnavailable) as info:
        ledger.reserve(POOL, _holder("c3"))
    assert info.value.msg == f"pool {POOL} has no free VF (2 in use, 1 unhealthy)"
    with pytest.raises(
        DeviceUnavailable, match=r"pool plexus\.dev/none has no VF that can be given"
    ):
        ledger.reserve("plexus.dev/none", _holder("c3"))


def test_claiming_by_pci_and_freeing_keep_the_free_index_right(tmp_path: Path) -> None:
    ledger = _pool(tmp_path, 4)
    ledger.transition(_pci(0), expect={FREE}, to=RESERVED, holder=_holder("k1"), pool=POOL)
    assert ledger.free_count(POOL) == 3
    assert ledger.reserve(POOL, _holder("c1")).pci == _pci(1)
    ledger.transition(_pci(0), expect={RESERVED}, to=FREE)
    assert ledger.free_count(POOL) == 3
    assert ledger.reserve(POOL, _holder("c2")).pci == _pci(0)


def test_members_removed_while_held_stay_held_and_do_not_come_back_free(tmp_path: Path) -> None:
    ledger = _pool(tmp_path, 4)
    held = ledger.reserve(POOL, _holder("c1"))
    ledger.set_pool(POOL, [_pci(2), _pci(3)])  # 0 (held) and 1 (free) leave the pool
    assert ledger.get(held.pci) == held
    assert ledger.held_by("c1", "net1") == held
    assert ledger.free_count(POOL) == 2
    ledger.transition(held.pci, expect={RESERVED}, to=FREE)
    assert ledger.free_count(POOL) == 2  # not a member any more
    assert [ledger.reserve(POOL, _holder(f"d{i}")).pci for i in range(2)] == [_pci(2), _pci(3)]
    with pytest.raises(DeviceUnavailable, match="has no free VF"):
        ledger.reserve(POOL, _holder("d9"))
    ledger.set_pool(POOL, [_pci(i) for i in range(4)])  # they come back
    assert ledger.free_count(POOL) == 2
    assert ledger.reserve(POOL, _holder("e1")).pci == _pci(0)


def test_a_vf_moving_to_another_pool_leaves_the_first(tmp_path: Path) -> None:
    ledger = _pool(tmp_path, 3)
    ledger.set_pool("plexus.dev/b", [_pci(0)])
    assert (ledger.free_count(POOL), ledger.free_count("plexus.dev/b")) == (2, 1)
    assert ledger.reserve(POOL, _holder("c1")).pci == _pci(1)
    ledger.drop_pool("plexus.dev/b")
    assert ledger.free_count("plexus.dev/b") == 0
    assert ledger.free_count(POOL) == 1  # 0 left POOL when it joined b


def test_drop_pool_keeps_held_records(tmp_path: Path) -> None:
    ledger = _pool(tmp_path, 3)
    held = ledger.reserve(POOL, _holder())
    ledger.drop_pool(POOL)
    assert ledger.free_count(POOL) == 0
    assert ledger.get(held.pci) == held
    ledger.transition(held.pci, expect={RESERVED}, to=FREE)
    with pytest.raises(DeviceUnavailable, match="no VF that can be given out"):
        ledger.reserve(POOL, _holder("c2"))


def test_concurrent_reserves_never_share_a_vf(tmp_path: Path) -> None:
    ledger = _pool(tmp_path, 40)
    got: list[str] = []
    errors: list[Exception] = []

    def worker(n: int) -> None:
        for i in range(6):
            try:
                got.append(ledger.reserve(POOL, _holder(f"t{n}-{i}")).pci)
            except DeviceUnavailable as exc:
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(got) == [_pci(i) for i in range(40)]
    assert len(errors) == 8
    assert len(_files(tmp_path)) == 40
