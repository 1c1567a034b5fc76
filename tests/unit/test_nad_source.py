"""Local mode's NAD directory as the daemon sees it while files come, change and go: the next
request sees what the files say now, and pays for the files that changed only, never for all
of them (10,000 NADs made an ADD 17x slower and a GC never finish)."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from cnispec.errors import NetworkNotFound
from delegates.ipam import HostLocalIpam, IpamPaths
from delegates.plugin import PluginRequest
from metaplugin import dirwatch, manifest_dir, nad_source
from metaplugin.nad_source import LocalNadSource
from tests.support.world import World, nad_manifest, simple_net
from tests.unit.test_orchestrator import request


def write(directory: Path, file: str, *docs: dict[str, Any]) -> Path:
    path = directory / file
    path.write_text(yaml.safe_dump_all(docs))
    return path


def manifest(name: str, plugin: str = "macvlan", namespace: str = "default") -> dict[str, Any]:
    return nad_manifest(name, simple_net(name, plugin), namespace=namespace)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The manifest files read, in order."""
    seen: list[str] = []
    real = nad_source._read

    def counting(path: str) -> Any:
        seen.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(nad_source, "_read", counting)
    return seen


@pytest.mark.parametrize("watch", [True, False], ids=["inotify", "polling"])
def test_a_nad_added_changed_and_removed_is_what_the_next_lookup_sees(
    tmp_path: Path, watch: bool, reads: list[str]
) -> None:
    src = LocalNadSource(str(tmp_path), watch=watch)
    for i in range(50):
        write(tmp_path, f"n{i:02d}.yaml", manifest(f"net-{i}"))
    assert src.get("default", "net-7") is not None
    assert sorted(reads) == [f"n{i:02d}.yaml" for i in range(50)]
    reads.clear()

    write(tmp_path, "late.yaml", manifest("late"))
    assert src.get("default", "late") is not None
    write(tmp_path, "late.yaml", manifest("late", "ipvlan"))
    found = src.get("default", "late")
    assert found is not None and '"ipvlan"' in found.config
    (tmp_path / "late.yaml").unlink()
    assert src.get("default", "late") is None
    assert src.get("default", "net-49") is not None
    assert set(reads) == {"late.yaml"}  # never the 50 others again


def test_a_rewrite_that_keeps_size_and_mtime_is_still_seen(tmp_path: Path) -> None:
    """Two writes within one clock tick leave mtime and size alone: inotify names the file."""
    src = LocalNadSource(str(tmp_path))
    path = write(tmp_path, "a.yaml", manifest("net-a", "aaaa"))
    assert src.get("default", "net-a") is not None
    before = path.stat()
    write(tmp_path, "a.yaml", manifest("net-a", "bbbb"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    found = src.get("default", "net-a")
    assert found is not None and '"bbbb"' in found.config


def test_a_removed_nad_gets_the_error_of_one_that_never_existed(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.add_nads(manifest("net-b"), file="b.yaml")
    world.orchestrator.add(request("ADD", "c1", networks="net-b"))
    (world.nad_dir / "b.yaml").unlink()
    with pytest.raises(NetworkNotFound) as gone:
        world.orchestrator.add(request("ADD", "c2", networks="net-b"))
    with pytest.raises(NetworkNotFound) as never:
        world.orchestrator.add(request("ADD", "c2", networks="net-z"))
    assert gone.value.code == never.value.code == 102
    assert gone.value.msg == never.value.msg.replace("net-z", "net-b")


def test_a_broken_file_is_reported_and_the_others_still_work(tmp_path: Path) -> None:
    src = LocalNadSource(str(tmp_path))
    write(tmp_path, "a.yaml", manifest("net-a"))
    assert src.get("default", "net-a") is not None
    (tmp_path / "b.yaml").write_text("kind: [NetworkAttachmentDefinition\n")
    (tmp_path / "c.yaml").write_bytes(b"metadata: {name: \xff}\n")
    assert src.get("default", "net-a") is not None
    errors = src.errors()
    assert any("b.yaml: not valid YAML" in e for e in errors)
    assert any("c.yaml: not UTF-8" in e for e in errors)
    write(tmp_path, "b.yaml", manifest("net-b"))  # fixed: used, and no longer reported
    assert src.get("default", "net-b") is not None
    assert not any("b.yaml" in e for e in src.errors())


def test_a_nad_defined_twice_is_taken_from_the_first_file_until_that_one_goes(
    tmp_path: Path,
) -> None:
    src = LocalNadSource(str(tmp_path))
    write(tmp_path, "b.yaml", manifest("dup", "second"))
    assert '"second"' in (src.get("default", "dup") or pytest.fail()).config
    write(tmp_path, "a.yaml", manifest("dup", "first"))
    assert '"first"' in (src.get("default", "dup") or pytest.fail()).config
    assert src.errors() == [
        f"{tmp_path}/b.yaml: NetworkAttachmentDefinition default/dup is defined twice; "
        "the first one is used"
    ]
    (tmp_path / "a.yaml").unlink()
    assert '"second"' in (src.get("default", "dup") or pytest.fail()).config
    assert src.errors() == []


def test_a_configmap_swapped_in_through_its_data_symlink_is_seen(tmp_path: Path) -> None:
    """kubelet mounts a ConfigMap as symlinks through `..data`, swapped in one rename: no event
    ever names the manifest itself."""
    (tmp_path / "..v1").mkdir()
    write(tmp_path / "..v1", "nads.yaml", manifest("net-a", "old"))
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "nads.yaml").symlink_to("..data/nads.yaml")
    src = LocalNadSource(str(tmp_path))
    assert '"old"' in (src.get("default", "net-a") or pytest.fail()).config

    (tmp_path / "..v2").mkdir()
    write(tmp_path / "..v2", "nads.yaml", manifest("net-a", "new"))
    (tmp_path / "..data_tmp").symlink_to("..v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert '"new"' in (src.get("default", "net-a") or pytest.fail()).config


def test_a_directory_made_after_start_and_removed_later(tmp_path: Path) -> None:
    directory = tmp_path / "nads"
    src = LocalNadSource(str(directory))
    assert src.get("default", "net-a") is None
    directory.mkdir()
    write(directory, "a.yaml", manifest("net-a"))
    assert src.get("default", "net-a") is not None
    (directory / "a.yaml").unlink()
    directory.rmdir()
    assert src.get("default", "net-a") is None
    directory.mkdir()
    write(directory, "a.yaml", manifest("net-a"))
    assert src.get("default", "net-a") is not None


def test_gc_with_many_nads_reads_no_manifest_again(tmp_path: Path, reads: list[str]) -> None:
    """A GC looked every NAD up, and each lookup listed and stat()ed the whole directory:
    10,000 NADs never finished. It now works from one snapshot of the index."""
    world = World(tmp_path)
    n = 500
    for i in range(n):
        write(
            world.nad_dir,
            f"n{i:03d}.yaml",
            nad_manifest(f"net-{i}", simple_net(f"net-{i}", cniVersion="1.1.0")),
        )
    world.orchestrator.add(request("ADD", "keep", networks="net-1"))
    reads.clear()
    world.collector.gc(
        request(
            "GC",
            "",
            version="1.1.0",
            extra_config={"cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]},
        )
    )
    gc_of = {
        c.config["name"]: c.config["cni.dev/valid-attachments"]
        for c in world.exec.calls
        if c.command == "GC"
    }
    assert len(gc_of) == n + 1  # every NAD's network, and the cluster's
    assert gc_of["net-1"] == [{"containerID": "keep", "ifname": "net1"}]
    assert gc_of["net-2"] == []
    assert reads == []
    assert world.collector.stats.network_failures == 0


def test_a_lookup_with_nothing_changed_looks_at_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every lookup listed and stat()ed the whole directory (1,143 ms per ADD at 10,000)."""
    for i in range(200):
        write(tmp_path, f"n{i:03d}.yaml", manifest(f"net-{i}"))
    src = LocalNadSource(str(tmp_path))
    assert src.get("default", "net-0") is not None
    me = threading.get_ident()  # the watcher's thread settles changes too, and rescans
    looked: list[str] = []
    listed: list[str] = []
    signature, scandir = manifest_dir.signature, os.scandir

    def looking(path: str) -> Any:
        if threading.get_ident() == me:
            looked.append(os.path.basename(path))
        return signature(path)

    def listing(path: str) -> Any:
        if threading.get_ident() == me:
            listed.append(path)
        return scandir(path)

    monkeypatch.setattr(manifest_dir, "signature", looking)
    monkeypatch.setattr(manifest_dir.os, "scandir", listing)
    for i in range(200):
        assert src.get("default", f"net-{i}") is not None
    assert (looked, listed) == ([], [])
    write(tmp_path, "n007.yaml", manifest("net-7", "ipvlan"))
    assert '"ipvlan"' in (src.get("default", "net-7") or pytest.fail()).config
    assert looked in ([], ["n007.yaml"])  # by the watcher, or by this lookup: no other file
    assert listed == []


def test_host_local_gc_of_a_network_that_never_leased_here_resolves_no_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GC runs for every NAD; resolving (and confining) each one's lease directory, symlink by
    symlink, was most of a 10,000-NAD GC, for directories that do not exist."""
    resolved: list[str] = []
    real = IpamPaths.lease_dir

    def counting(self: IpamPaths, data_dir: object, network: str) -> Path:
        resolved.append(network)
        return real(self, data_dir, network)

    monkeypatch.setattr(IpamPaths, "lease_dir", counting)
    ipam = HostLocalIpam(paths=IpamPaths(data_roots=(str(tmp_path),)))

    def req(name: str, cid: str = "c1", valid: list[str] | None = None) -> PluginRequest:
        config: dict[str, Any] = {
            "cniVersion": "1.1.0",
            "name": name,
            "ipam": {
                "type": "host-local",
                "dataDir": str(tmp_path),
                "ranges": [[{"subnet": "10.1.0.0/24"}]],
            },
        }
        if valid is not None:
            config["cni.dev/valid-attachments"] = [
                {"containerID": c, "ifname": "eth0"} for c in valid
            ]
        return PluginRequest(
            container_id=cid, netns="/proc/self/ns/net", ifname="eth0", config=config
        )

    ipam.add(req("used"))
    resolved.clear()
    for i in range(100):
        ipam.gc(req(f"never-{i}", valid=[]))
    assert resolved == []
    ipam.gc(req("used", valid=[]))  # ... and one that did lease is collected as before
    assert resolved == ["used"]
    assert list((tmp_path / "used").glob("10.*")) == []


def test_the_audit_finds_a_change_no_event_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """inotify cannot see everything (a writer that never closes its file, a network
    filesystem): the watcher audits every minute, without holding up lookups."""
    src = LocalNadSource(str(tmp_path))
    write(tmp_path, "a.yaml", manifest("net-a", "old"))
    write(tmp_path, "b.yaml", manifest("net-b"))
    assert src.get("default", "net-a") is not None
    monkeypatch.setattr(src, "notice", lambda *a, **kw: None)  # every event lost from here
    write(tmp_path, "a.yaml", manifest("net-a", "new"))
    (tmp_path / "b.yaml").unlink()
    write(tmp_path, "c.yaml", manifest("net-c"))
    src.audit()
    assert '"new"' in (src.get("default", "net-a") or pytest.fail()).config
    assert src.get("default", "net-b") is None
    assert src.get("default", "net-c") is not None


def test_a_directory_that_cannot_be_watched_is_looked_at_on_every_lookup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of inotify watches (the node's limit is shared with everything else): the NADs are
    still read, and a change still seen by the next lookup."""
    watcher = dirwatch.shared()
    assert watcher is not None

    def no_watches(path: str, listener: object) -> int:
        raise OSError(errno.ENOSPC, "inotify_add_watch: No space left on device")

    monkeypatch.setattr(watcher, "watch", no_watches)
    src = LocalNadSource(str(tmp_path))
    write(tmp_path, "a.yaml", manifest("net-a", "old"))
    assert '"old"' in (src.get("default", "net-a") or pytest.fail()).config
    write(tmp_path, "a.yaml", manifest("net-a", "new-and-longer"))
    assert '"new-and-longer"' in (src.get("default", "net-a") or pytest.fail()).config


def test_a_nad_directory_swapped_through_its_symlink_is_seen(tmp_path: Path) -> None:
    """The daemon may be pointed at a symlink its admin swaps to another directory: no event
    comes from the directory watched."""
    for version, plugin in (("v1", "old"), ("v2", "new")):
        (tmp_path / version).mkdir()
        write(tmp_path / version, "a.yaml", manifest("net-a", plugin))
    (tmp_path / "nads").symlink_to("v1")
    src = LocalNadSource(str(tmp_path / "nads"))
    assert '"old"' in (src.get("default", "net-a") or pytest.fail()).config
    (tmp_path / "nads.tmp").symlink_to("v2")
    os.replace(tmp_path / "nads.tmp", tmp_path / "nads")
    assert '"new"' in (src.get("default", "net-a") or pytest.fail()).config
    (tmp_path / "nads.tmp").symlink_to("gone")
    os.replace(tmp_path / "nads.tmp", tmp_path / "nads")
    assert src.get("default", "net-a") is None
