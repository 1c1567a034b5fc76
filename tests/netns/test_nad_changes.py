"""Local mode's NAD directory changing under a running plexusd: the next ADD uses what the files
say now, without the daemon re-reading the directory for it."""

from __future__ import annotations

import os

import yaml

from testbed.manifests import macvlan, nad
from tests.netns.conftest import NETWORKS, Bed


def _write(bed: Bed, file: str, subnet: str) -> None:
    doc = nad("net-late", macvlan("pxm0", subnet, bed.ipam_dir))
    tmp = bed.root / "nads" / f".{file}.tmp"
    tmp.write_text(yaml.safe_dump(doc))
    os.replace(tmp, bed.root / "nads" / file)  # as kubectl-less tooling and editors do


def test_a_nad_added_changed_and_removed_is_what_the_next_add_sees(bed: Bed) -> None:
    pods = [bed.pod(f"pod{i}") for i in range(3)]
    _write(bed, "late.yaml", "10.93.0.0/24")
    bed.runtime.add("c0", pods[0].path, annotations={NETWORKS: "net-late"}).ok()
    assert pods[0].addresses("net1")[0].startswith("10.93.0.")

    _write(bed, "late.yaml", "10.94.0.0/24")
    bed.runtime.add("c1", pods[1].path, annotations={NETWORKS: "net-late"}).ok()
    assert pods[1].addresses("net1")[0].startswith("10.94.0.")

    (bed.root / "nads" / "late.yaml").unlink()
    gone = bed.runtime.add("c2", pods[2].path, annotations={NETWORKS: "net-late"})
    never = bed.runtime.add("c2", pods[2].path, annotations={NETWORKS: "net-never"})
    assert gone.returncode == never.returncode == 1
    assert gone.body["code"] == never.body["code"] == 102
    assert gone.body["msg"] == never.body["msg"].replace("net-never", "net-late")

    for cid, pod in zip(("c0", "c1"), pods, strict=False):
        bed.runtime.delete(cid, pod.path).ok()
    bed.assert_nothing_left(*pods)


def test_a_broken_nad_file_is_reported_and_the_others_still_work(bed: Bed) -> None:
    (bed.root / "nads" / "broken.yaml").write_text("kind: [NetworkAttachmentDefinition\n")
    pod = bed.pod("pod1")
    bed.runtime.add("c1", pod.path, annotations={NETWORKS: "net-a"}).ok()
    assert pod.addresses("net1")[0].startswith("10.89.0.")
    reported = [e for e in bed.daemon.events("nad_manifest_invalid") if "broken.yaml" in e["error"]]
    assert reported and "not valid YAML" in reported[0]["error"]
    bed.runtime.delete("c1", pod.path).ok()
    bed.assert_nothing_left(pod)
