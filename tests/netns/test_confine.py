"""What one pod or one NAD may make plexusd do, end to end through the installed shim: at most
maxAttachmentsPerPod attachments, host-local leases only under the node admin's data roots,
resolv.conf files only from the allow-list. Every refusal is code 7 and leaves nothing: no link
in the pod, no lease, no record, and nothing created or deleted outside the roots."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from metaplugin.client import get
from testbed.manifests import macvlan, nad
from testbed.netns import Netns
from tests.netns.conftest import NETWORKS, Bed, make_bed

CAP = 4
SECRET = "secret-token-9c2e"


@pytest.fixture
def confined(tmp_path: Path) -> Iterator[Bed]:
    """The local-mode bed with a small attachment cap, the bed's own lease directory as the only
    data root, one allowed resolv.conf, and NADs whose host-local reaches outside them."""
    outside = tmp_path / "outside"
    secret = tmp_path / "shadow"
    secret.write_text(f"nameserver 6.6.6.6\nsearch {SECRET}\n")
    allowed = tmp_path / "resolv.conf"
    allowed.write_text("nameserver 10.0.0.53\nsearch allowed.example\n")

    def local(node: Netns, nads: list[dict[str, Any]]) -> dict[str, Any]:
        ipam_dir = tmp_path / "ipam"

        def mv(subnet: str, **ipam: Any) -> dict[str, Any]:
            conf = macvlan("pxm0", subnet, ipam_dir)
            conf["ipam"].update(ipam)
            return conf

        nads += [
            nad("escape-ref", mv("10.60.1.0/24", dataDir=str(outside))),
            nad("escape-dotdot", mv("10.60.2.0/24", dataDir=f"{ipam_dir}/../outside")),
            nad(
                "escape-builtin",
                # 1.1.0, so GC reaches its IPAM
                {
                    **mv("10.60.3.0/24", dataDir=str(outside)),
                    "type": "plexus-macvlan",
                    "cniVersion": "1.1.0",
                },
            ),
            # In-process, whose result (and so network-status) carries what the IPAM read.
            nad("peek", {**mv("10.60.4.0/24", resolvConf=str(secret)), "type": "plexus-macvlan"}),
            nad("dns", {**mv("10.60.5.0/24", resolvConf=str(allowed)), "type": "plexus-macvlan"}),
        ]
        (tmp_path / "nads").mkdir()
        (tmp_path / "nads" / "nads.yaml").write_text(yaml.safe_dump_all(nads))
        return {
            "localDir": str(tmp_path / "nads"),
            "maxAttachmentsPerPod": CAP,
            "hostLocalDataRoots": [str(ipam_dir)],
            "resolvConfPaths": [str(allowed)],
        }

    with make_bed(tmp_path, local) as b:
        yield b


def test_a_pod_over_the_cap_gets_code_7_and_nothing_is_made(confined: Bed) -> None:
    pod = confined.pod("pod1")
    started = time.monotonic()
    networks = ",".join(["net-a"] * 1000)
    out = confined.runtime.add(
        "c1", pod.path, annotations={NETWORKS: networks}, pod=("default", "pod1")
    )
    elapsed = time.monotonic() - started
    assert (out.returncode, out.body["code"]) == (1, 7)
    assert out.body["msg"] == (
        "pod default/pod1 asks for 1001 network attachments (the cluster network, 0 "
        f"defaultNetworks and 1000 in {NETWORKS}); at most {CAP} are allowed per pod (daemon "
        "config key maxAttachmentsPerPod): ask for fewer networks, or have the node admin raise "
        "the limit"
    )
    confined.assert_nothing_left(pod)
    print(f"refused 1,000 attachments in {elapsed:.2f} s")
    confined.runtime.delete("c1", pod.path, with_prev=False).ok()  # the runtime's cleanup DEL


def test_a_pod_at_exactly_the_cap_gets_every_attachment(confined: Bed) -> None:
    pod = confined.pod("pod1")
    confined.runtime.add("c1", pod.path, annotations={NETWORKS: "net-a, net-a, net-a"}).ok()
    assert set(pod.links()) == {"lo", "eth0", "net1", "net2", "net3"}
    assert len(confined.reservations()) == CAP
    confined.runtime.delete("c1", pod.path).ok()
    confined.assert_nothing_left(pod)


@pytest.mark.parametrize("network", ["escape-ref", "escape-dotdot", "escape-builtin"])
def test_a_nad_whose_leases_would_go_outside_the_roots_is_refused(
    confined: Bed, network: str
) -> None:
    pod = confined.pod("pod1")
    out = confined.runtime.add("c1", pod.path, annotations={NETWORKS: network})
    assert (out.returncode, out.body["code"]) == (1, 7)
    msg = out.body["msg"]
    assert msg.startswith(f"network default/{network}: ipam.dataDir ")
    assert f"{confined.ipam_dir})" in msg and "hostLocalDataRoots" in msg
    assert not (confined.root / "outside").exists()
    confined.assert_nothing_left(pod)
    confined.runtime.delete("c1", pod.path, with_prev=False).ok()


def test_a_resolv_conf_off_the_allow_list_is_refused_and_never_shown(confined: Bed) -> None:
    pod = confined.pod("pod1")
    out = confined.runtime.add("c1", pod.path, annotations={NETWORKS: "peek"})
    assert (out.returncode, out.body["code"]) == (1, 7)
    assert out.body["msg"].startswith("network default/peek: ipam.resolvConf ")
    assert "resolvConfPaths" in out.body["msg"]
    assert SECRET not in out.stdout + out.stderr + confined.daemon.logs()
    confined.assert_nothing_left(pod)
    confined.runtime.delete("c1", pod.path, with_prev=False).ok()

    # The allowed one is read, and its settings are what network-status carries.
    confined.runtime.add(
        "c2", pod.path, annotations={NETWORKS: "dns"}, pod=("default", "pod1")
    ).ok()
    status = network_status(confined, "pod1")
    assert [s.get("dns") for s in status if s["name"] == "default/dns"] == [
        {"nameservers": ["10.0.0.53"], "search": ["allowed.example"]}
    ]
    confined.runtime.delete("c2", pod.path).ok()
    confined.assert_nothing_left(pod)


def network_status(bed: Bed, pod: str) -> list[dict[str, Any]]:
    status, body = get(bed.daemon.socket, f"/v1/network-status?namespace=default&name={pod}")
    assert status == 200, body
    out: list[dict[str, Any]] = json.loads(body)
    return out


def test_gc_never_deletes_outside_the_roots(confined: Bed) -> None:
    """Before, GC ran the in-process host-local over escape-builtin's dataDir and removed every
    address-named file there that no valid attachment held."""
    victim = confined.root / "outside" / "escape-builtin"
    victim.mkdir(parents=True)
    for name in ("10.60.3.7", "10.60.3.8"):
        (victim / name).write_text("someone else's file")
    confined.runtime.invoke("GC", version="1.1.0", extra={"cni.dev/valid-attachments": []}).ok()
    assert sorted(p.name for p in victim.iterdir()) == ["10.60.3.7", "10.60.3.8"]
