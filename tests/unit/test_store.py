"""The attachment store: records keyed by (container, network, interface), the records plexusd
9a907b2 wrote migrated when the store opens (tests/fixtures/records-v1), and the pod index."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from cnispec.cni import Result
from cnispec.errors import IOFailure
from metaplugin.store import Attachment, AttachmentKey, AttachmentStore, file_name

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "records-v1"
NETNS = "/run/netns/legacy-pod"


def _v1(state: Path, fixture: str, cid: str) -> list[dict[str, object]]:
    """Put the fixture's records where plexusd 9a907b2 kept them; returns them as written."""
    target = state / "attachments" / cid
    target.mkdir(parents=True)
    written = []
    for source in sorted((FIXTURES / fixture).glob("*.json")):
        text = source.read_text().replace("{root}", "/srv/plexus").replace("{netns}", NETNS)
        (target / source.name).write_text(text)
        written.append(json.loads(text))
    return written


def test_version_1_records_are_migrated_when_the_store_opens(tmp_path: Path) -> None:
    old = _v1(tmp_path, "added", "legacyc1")
    store = AttachmentStore(tmp_path)
    records = store.load("legacyc1").records
    assert [(r.seq, r.ifname, r.network) for r in records] == [
        (o["index"], o["ifname"], o["network"]) for o in old
    ]
    for new, o in zip(records, old, strict=True):
        assert new.holder.container_id == "legacyc1" and new.holder.netns == NETNS
        assert (new.holder.pod_namespace, new.holder.pod_name) == ("default", "legacy")
        assert new.holder.pod_uid == "uid-legacyc1"
        assert (
            new.prepared.model_dump(mode="json", by_alias=True, exclude={"disable_gc"})
            == o["prepared"]
        )
        assert new.state == o["state"] and new.created_at == o["created_at"]
        assert new.cni_args == o["cni_args"] and list(new.cni_path) == o["cni_path"]
        assert new.result is not None
        assert new.result.to_wire("1.1.0") == o["result"]  # the same result, now typed
    assert records[4].default_route == ("10.77.0.1",)
    names = sorted(p.name for p in (tmp_path / "attachments" / "legacyc1").iterdir())
    assert names == sorted(r.file_name for r in records)  # no version-1 file is left
    # plexusd 9a907b2 reads only *.json: after a rollback to it these are passed by, not
    # quarantined, and still there for the next upgrade to DEL.
    assert not any(name.endswith(".json") for name in names)


def test_a_migration_cut_short_runs_again_to_the_same_end(tmp_path: Path) -> None:
    _v1(tmp_path, "mid-add", "legacyc2")
    first = AttachmentStore(tmp_path).load("legacyc2").records
    # A crash after the new files were written, before the old ones went.
    shutil.rmtree(tmp_path / "attachments" / "legacyc2")
    _v1(tmp_path, "mid-add", "legacyc2")
    for record in first:
        (tmp_path / "attachments" / "legacyc2" / record.file_name).write_bytes(
            record.model_dump_json(by_alias=True, exclude_none=True).encode()
        )
    again = AttachmentStore(tmp_path).load("legacyc2").records
    assert again == first
    assert [r.state for r in again] == ["added", "added", "planned"]
    assert len(list((tmp_path / "attachments" / "legacyc2").iterdir())) == 3


def test_an_unreadable_version_1_record_is_quarantined_not_guessed(tmp_path: Path) -> None:
    _v1(tmp_path, "mid-add", "legacyc2")
    (tmp_path / "attachments" / "legacyc2" / "02-net2.json").write_text('{"version": 1, "cont')
    store = AttachmentStore(tmp_path)
    loaded = store.load("legacyc2")
    assert [r.ifname for r in loaded.records] == ["eth0", "net1"]
    assert len(loaded.quarantined) == 1 and store.quarantined() == list(loaded.quarantined)


def test_a_record_of_a_newer_plexusd_is_refused(tmp_path: Path) -> None:
    _v1(tmp_path, "mid-add", "legacyc2")
    store = AttachmentStore(tmp_path)
    record = store.load("legacyc2").records[0]
    path = tmp_path / "attachments" / "legacyc2" / record.file_name
    path.write_text(json.dumps({**json.loads(path.read_text()), "version": 3, "new": {}}))
    with pytest.raises(IOFailure, match="version 3"):
        store.load("legacyc2")


def test_the_key_is_container_network_and_interface(tmp_path: Path) -> None:
    _v1(tmp_path, "added", "legacyc1")
    store = AttachmentStore(tmp_path)
    net1 = store.load("legacyc1").records[1]
    assert net1.key == AttachmentKey("legacyc1", "default/mv", "net1")
    assert store.get(net1.key) == net1
    # Another network on the same interface name is another attachment (a hot-plug that
    # replaces one while a failed DEL keeps the other recorded).
    other = net1.model_copy(update={"network": "default/other", "seq": 9})
    store.save(other)
    assert store.get(other.key) == other and store.get(net1.key) == net1
    assert file_name("default/mv", "net1") != file_name("default/other", "net1")


def test_what_a_pod_has_comes_from_the_index(tmp_path: Path) -> None:
    _v1(tmp_path, "added", "legacyc1")
    _v1(tmp_path, "mid-add", "legacyc2")
    store = AttachmentStore(tmp_path)
    (legacy,) = store.of_pod("default", "legacy")
    assert legacy.container_id == "legacyc1" and len(legacy.records) == 5
    # A second sandbox of the same pod (a restart) is listed after the first.
    later: Attachment = legacy.records[0].model_copy(
        update={
            "holder": legacy.records[0].holder.model_copy(update={"container_id": "legacyc3"}),
            "created_at": legacy.created_at + 60,
        }
    )
    store.save(later)
    assert [c.container_id for c in store.of_pod("default", "legacy")] == ["legacyc1", "legacyc3"]
    store.remove(later)
    store.remove_container("legacyc3")
    assert [c.container_id for c in store.of_pod("default", "legacy")] == ["legacyc1"]
    assert store.of_pod("default", "nobody") == []


@pytest.mark.parametrize("damage", ["newer", "unreadable"])
def test_one_container_it_cannot_read_never_stops_the_store_opening(
    tmp_path: Path, damage: str
) -> None:
    """plexusd opens its store before it serves anything: a record it cannot read now must cost
    only that container's DEL (code 5, retried), never the whole node."""
    _v1(tmp_path, "added", "legacyc1")
    _v1(tmp_path, "mid-add", "legacyc2")
    first = AttachmentStore(tmp_path).load("legacyc2").records[0]
    path = tmp_path / "attachments" / "legacyc2" / first.file_name
    if damage == "newer":
        path.write_text(json.dumps({**json.loads(path.read_text()), "version": 3}))
    else:
        path.unlink()
        path.mkdir()  # reading it is an I/O error, as a failing disk would give
    store = AttachmentStore(tmp_path)  # opens: the other container is served
    assert len(store.load("legacyc1").records) == 5
    assert [c.container_id for c in store.of_pod("default", "legacy")] == ["legacyc1"]
    with pytest.raises(IOFailure) as err:
        store.load("legacyc2")
    assert err.value.code == 5 and store.quarantined() == []


def test_an_abandoned_record_is_set_aside_whole_with_why(tmp_path: Path) -> None:
    _v1(tmp_path, "mid-add", "legacyc2")
    store = AttachmentStore(tmp_path)
    eth0, net1, net2 = store.load("legacyc2").records
    where = store.quarantine(net2, {"why": "the runtime's last DEL", "error": "no master"})
    assert store.quarantined() == [where] and where.endswith(".abandoned")
    kept = json.loads(Path(where).read_text())
    assert kept["abandoned"] == {"why": "the runtime's last DEL", "error": "no master"}
    assert Attachment.model_validate(kept["record"]) == net2  # the record as it was
    assert store.load("legacyc2").records == (eth0, net1)  # and no longer the container's


def test_quarantine_names_fit_a_file_name_whatever_the_container_id(tmp_path: Path) -> None:
    _v1(tmp_path, "mid-add", "legacyc2")
    store = AttachmentStore(tmp_path)
    record = store.load("legacyc2").records[2]
    long_id = "c" * 250
    long = record.model_copy(
        update={"holder": record.holder.model_copy(update={"container_id": long_id})}
    )
    where = Path(store.quarantine(long, {"why": "test"}))
    assert len(where.name) < 255 and where.name.startswith("c" * 48 + "~")
    assert json.loads(where.read_text())["record"]["holder"]["container_id"] == long_id


def test_discarding_an_undone_add_keeps_the_records_whose_rollback_failed(
    tmp_path: Path,
) -> None:
    _v1(tmp_path, "mid-add", "legacyc2")
    store = AttachmentStore(tmp_path)
    eth0, net1, net2 = store.load("legacyc2").records
    assert net2.state == "planned"
    store.discard_planned("legacyc2", keep={net2.key})
    assert store.load("legacyc2").records == (eth0, net1, net2)
    store.discard_planned("legacyc2")
    assert store.load("legacyc2").records == (eth0, net1)


def _planned(tmp_path: Path) -> list[Attachment]:
    """Three attachments of one container as ADD plans them (taken from a migrated fixture)."""
    _v1(tmp_path / "old", "added", "legacyc1")
    records = AttachmentStore(tmp_path / "old").load("legacyc1").records[:3]
    return [
        r.model_copy(
            update={"holder": r.holder.model_copy(update={"container_id": "c9"})}
        ).model_copy(update={"state": "planned", "result": None})
        for r in records
    ]


def test_a_pod_add_makes_one_durable_file_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    planned = _planned(tmp_path)
    store = AttachmentStore(tmp_path / "state")
    synced: list[str] = []
    real = os.fsync

    def counting(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    store.plan(planned)
    added = [store.mark_added(r, planned[0].result or _result()) for r in planned]
    assert synced.count("file") == 1  # the journal; before: one per plan and per mark_added
    assert synced.count("dir") <= 2  # the new container's entry and the container dir
    assert [r.state for r in store.load("c9").records] == ["added"] * 3
    assert store.load("c9").records == tuple(added)


def _result() -> Result:
    return Result()


def test_a_record_torn_by_a_power_cut_is_read_from_the_journal(tmp_path: Path) -> None:
    planned = _planned(tmp_path)
    store = AttachmentStore(tmp_path / "state")
    store.plan(planned)
    store.mark_added(planned[1], _result())
    torn = tmp_path / "state" / "attachments" / "c9" / planned[1].file_name
    torn.write_bytes(b"")  # renamed into place, its data never reached the disk
    loaded = AttachmentStore(tmp_path / "state").load("c9")
    assert loaded.records == tuple(planned)  # the planned state: DEL runs without prevResult
    assert loaded.quarantined == ()
    assert store.get(planned[1].key) == planned[1]


def test_a_record_deleted_is_not_brought_back_by_the_journal(tmp_path: Path) -> None:
    planned = _planned(tmp_path)
    store = AttachmentStore(tmp_path / "state")
    store.plan(planned)
    store.remove(planned[0])
    assert store.load("c9").records == tuple(planned[1:])
    assert store.get(planned[0].key) is None


def test_a_crash_after_the_journal_leaves_nothing_to_undo_and_no_directory(
    tmp_path: Path,
) -> None:
    planned = _planned(tmp_path)
    store = AttachmentStore(tmp_path / "state")
    store.plan(planned)
    for record in planned:  # SIGKILL at store_record_write_before@1: only the journal exists
        (tmp_path / "state" / "attachments" / "c9" / record.file_name).unlink()
    again = AttachmentStore(tmp_path / "state")
    assert not again.load("c9")
    again.remove_container("c9")
    assert again.container_ids() == []
