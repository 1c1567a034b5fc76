"""The main job on its embedded local default: Plexus in local mode on one machine, driven by a
real container runtime (containerd's CRI, as kubelet drives it).

It starts containerd and plexusd in their own mount and network namespace, defines two secondary
networks as NAD manifests, runs three pods that ask for them through the
k8s.v1.cni.cncf.io/networks annotation, prints each pod's interfaces, addresses and
network-status, checks that two pods reach each other over a secondary network, and removes
everything it made. Run it with `sudo make demo` (or `.venv/bin/python -m demo.local_demo` as
root from the repository's top directory); `tests/e2e/test_demo.py` runs it on every CI run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from metaplugin.ctl import table
from testbed import BedUnavailable
from testbed.cri import ContainerdBed, Pod, containerd_bed
from testbed.manifests import bridge_conflist, macvlan, nad

PLEXUSCTL = str(Path(sys.executable).with_name("plexusctl"))
NETWORKS = "k8s.v1.cni.cncf.io/networks"

PODS: list[tuple[str, str]] = [
    ("frontend", "blue"),
    (
        "backend",
        json.dumps(
            [
                {"name": "blue", "interface": "blue0"},
                {"name": "red", "ips": ["10.20.0.10/24"], "mac": "0a:58:0a:14:00:0a"},
            ]
        ),
    ),
    ("db", "red@data0"),
]


def setup(root: Path) -> tuple[Path, Path]:
    ipam_dir = root / "ipam"
    (root / "nads").mkdir()
    (root / "nads" / "networks.yaml").write_text(
        yaml.safe_dump_all(
            [
                # blue runs in plexusd (the built-in macvlan); red execs Debian's reference plugin.
                nad("blue", macvlan("demo0", "10.10.0.0/24", ipam_dir, type="plexus-macvlan")),
                nad(
                    "red",
                    macvlan(
                        "demo0", "10.20.0.0/24", ipam_dir, capabilities={"ips": True, "mac": True}
                    ),
                ),
            ]
        )
    )
    cluster = root / "cluster.conflist"
    cluster.write_text(json.dumps(bridge_conflist("cluster", "demobr0", "10.88.0.0/24", ipam_dir)))
    return root / "nads", cluster


def show(rt: ContainerdBed, pods: list[Pod], socket: str) -> None:
    rows = [("POD", "IFACE", "KIND", "ADDRESS", "MAC")]
    for pod in pods:
        for name, link in rt.links(pod.netns).items():
            if name == "lo":
                continue
            kind = link.get("linkinfo", {}).get("info_kind", "?")
            addrs = ",".join(rt.addresses(pod.netns, name)) or "-"
            rows.append((pod.name, name, kind, addrs, link.get("address", "")))
    print("\nInterfaces, as `ip -d addr` shows them inside each pod:")
    table(rows, indent="  ", rule=True)
    print("\nk8s.v1.cni.cncf.io/network-status (from `plexusctl network-status`):")
    for pod in pods:
        out = subprocess.run(
            [PLEXUSCTL, "--socket", socket, "network-status", f"{pod.namespace}/{pod.name}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        entries = json.loads(out)
        print(f"  {pod.namespace}/{pod.name}:")
        for e in entries:
            print(f"    {json.dumps(e, separators=(', ', ': '))}")


def ping(rt: ContainerdBed, src: Pod, dst: Pod, dst_if: str, via: str) -> bool:
    target = rt.addresses(dst.netns, dst_if)[0].split("/")[0]
    out = rt.in_netns(
        src.netns, "/bin/busybox", "ping", "-c", "3", "-W", "2", "-I", via, target, check=False
    )
    ok = out.returncode == 0
    summary = next((line for line in out.stdout.splitlines() if "packets" in line), out.stderr)
    print(
        f"  {src.name}:{via} -> {dst.name}:{dst_if} ({target}): "
        f"{'OK' if ok else 'FAILED'}  [{summary.strip()}]"
    )
    return ok


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run it as root (sudo make demo): it makes network namespaces", file=sys.stderr)
        return 2
    try:
        return run()
    except BedUnavailable as exc:
        print(f"demo: this machine cannot run it: {exc}", file=sys.stderr)
        return 2


def run() -> int:
    with tempfile.TemporaryDirectory(prefix="plexus-demo-") as tmp:
        root = Path(tmp)
        nads, cluster = setup(root)
        print("Starting containerd (own mount + network namespace) and plexusd in local mode...")
        with containerd_bed(root / "runtime") as rt:
            rt.in_netns("", "ip", "link", "add", "demo0", "type", "veth", "peer", "name", "demo1")
            rt.in_netns("", "ip", "link", "set", "demo0", "up")
            rt.in_netns("", "ip", "link", "set", "demo1", "up")
            daemon = rt.start_plexusd(
                {
                    "localDir": str(nads),
                    "clusterNetwork": str(cluster),
                    "stateDir": str(root / "state"),
                    "runDir": str(root / "run"),
                    "logLevel": "info",
                }
            )
            pods = []
            for name, networks in PODS:
                pod = rt.run_pod(name, annotations={NETWORKS: networks})
                print(
                    f"  RunPodSandbox {name:9} {NETWORKS}: {networks}"
                    f"   ({pod.seconds * 1000:.0f} ms)"
                )
                pods.append(pod)
            show(rt, pods, daemon.socket)
            print("\nConnectivity over the secondary networks:")
            ok = ping(rt, pods[0], pods[1], "blue0", "net1")
            ok &= ping(rt, pods[1], pods[2], "data0", "net2")
            print("\nTearing down (StopPodSandbox + RemovePodSandbox, as kubelet does)...")
            for pod in pods:
                rt.stop_pod(pod)
                rt.remove_pod(pod)
            left = daemon.attachments()
            ok &= not left
            print(f"  attachments left on the node: {len(left)}")
        print("Done: containerd, plexusd and their namespaces are gone; the machine is as before.")
    print("demo: OK" if ok else "demo: FAILED (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
