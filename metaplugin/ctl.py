"""plexusctl: the admin's CLI.

    plexusctl version                       CNI versions Plexus speaks
    plexusctl attachments [--json]          what the node daemon has attached, per container
    plexusctl network-status NS/POD         the pod's network-status JSON (local mode's source)
    plexusctl policy NS/POD [--json]        the network policy in force on the pod, per
                                            interface and direction, with its drop counters
    plexusctl validate FILE...              the admission webhook's checks on manifest files
    plexusctl health [--live]               the daemon's /readyz (or /healthz)
    plexusctl topology [--format F]         this node's pods, interfaces and networks: a text
                                            tree, Graphviz DOT (--format dot) or SVG (svg)

It talks to plexusd over the same unix socket as the shim (`--socket`, or `--config` to take
runDir from the daemon config).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from cnispec import cni, confdir
from cnispec.errors import PlexusError
from cnispec.validation import check_manifests
from metaplugin import client, topology
from metaplugin import config as daemon_config


def _get(sock_path: str, url: str) -> tuple[int, bytes]:
    try:
        return client.get(sock_path, url)
    except OSError as exc:
        raise SystemExit(f"plexusctl: cannot reach plexusd at {sock_path}: {exc}") from None


def _socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return str(args.socket)
    if args.config:
        values = daemon_config.load_file(args.config)
        return daemon_config.build(values).socket_path
    return str(Path("/run/plexus") / daemon_config.SOCKET_NAME)


def cmd_version(args: argparse.Namespace) -> int:
    print(json.dumps(cni.version_result(cni.LATEST_VERSION)))
    return 0


def cmd_attachments(args: argparse.Namespace) -> int:
    _, body = _get(_socket_path(args), "/v1/attachments")
    data: list[dict[str, Any]] = json.loads(body)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    rows: list[tuple[str, ...]] = [("CONTAINER", "POD", "IFNAME", "NETWORK", "STATE", "IPS")]
    for container in data:
        for att in container["attachments"]:
            ips = [ip["address"] for ip in (att.get("result") or {}).get("ips", [])]
            pod = f"{att['pod_namespace']}/{att['pod_name']}" if att["pod_name"] else "-"
            rows.append(
                (
                    container["containerID"][:12],
                    pod,
                    att["ifname"],
                    att["network"],
                    att["state"],
                    ",".join(ips) or "-",
                )
            )
    table(rows)
    _, body = _get(_socket_path(args), "/v1/quarantine")
    for path in json.loads(body):
        kind = (
            "abandoned (its DEL could not succeed)" if path.endswith(".abandoned") else "unreadable"
        )
        print(f"quarantined ({kind}) record: {path}")
    return 0


def cmd_network_status(args: argparse.Namespace) -> int:
    namespace, _, name = args.pod.rpartition("/")
    status, body = _get(
        _socket_path(args), f"/v1/network-status?namespace={namespace or 'default'}&name={name}"
    )
    if status != 200:
        print(
            f"plexusctl: no attachments recorded for pod {namespace or 'default'}/{name}",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(json.loads(body), indent=2))
    return 0


def cmd_policy(args: argparse.Namespace) -> int:
    namespace, _, name = args.pod.rpartition("/")
    query = urlencode({"namespace": namespace or "default", "name": name})
    status, body = _get(_socket_path(args), f"/v1/policy?{query}")
    if status != 200:
        print(f"plexusctl: {json.loads(body).get('error', body.decode())}", file=sys.stderr)
        return 1
    view: dict[str, Any] = json.loads(body)
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    state = "enforcing" if view["enforcing"] else "no policy selects it: open"
    print(f"pod {view['pod']}  netns {view['netns']}  table {view['table']} ({state})")
    for itf in view["interfaces"]:
        role = "primary" if itf["primary"] else "secondary"
        print(f"{itf['ifname']} ({itf['network']}, {role})")
        for direction in ("ingress", "egress"):
            _print_direction(direction, itf[direction], itf["trustedSources"])
    return 0


def _port_range(p: dict[str, Any]) -> str:
    last = f"-{p['last']}" if p["last"] != p["first"] else ""
    return f"{p['protocol']}/{p['first']}{last}"


def _print_direction(direction: str, side: dict[str, Any], trusted: list[str]) -> None:
    if not side["isolated"]:
        print(f"  {direction}: open (no policy selects it)")
        return
    print(
        f"  {direction}: isolated by {', '.join(side['selectedBy'])}; "
        f"dropped {side['droppedPackets']} packets"
    )
    if direction == "ingress" and trusted:
        print(f"    allow from {', '.join(trusted)} (the node: health checks)")
    word = "from" if direction == "ingress" else "to"
    for allow in side["allows"]:
        peers = ", ".join(allow["cidrs"]) if allow["cidrs"] is not None else "anywhere"
        ports = ", ".join(map(_port_range, allow["ports"])) if allow["ports"] else "every port"
        print(f"    allow {word} {peers or 'nobody'} on {ports}  [{', '.join(allow['by'])}]")
    if not side["allows"]:
        print("    (no allows: everything else is dropped)")


def cmd_validate(args: argparse.Namespace) -> int:
    """The admission webhook's verdicts for manifest files (`cnispec.validation`), each
    problem at its file:line; non-zero when any document is refused. Without an API the
    references a pod makes (and NADs' resourceNames) are not looked up: that is said."""
    refused = checked = 0
    for file in args.files:
        try:
            found = check_manifests(
                Path(file).read_text(), file, conf_for_empty=_conf_lookup(args.cni_conf_dir)
            )
        except (PlexusError, OSError, UnicodeDecodeError) as exc:
            refused += 1
            print(f"FAIL {getattr(exc, 'msg', exc)}")
            continue
        for doc in found:
            if doc.verdict is None:
                print(f"skip {file}:{doc.line}: {doc.kind} (not checked)")
                continue
            checked += 1
            for line, problem in doc.errors:
                print(f"FAIL {file}:{line}: {doc.verdict.subject}: {problem}")
            for line, problem in doc.warnings:
                print(f"warn {file}:{line}: {doc.verdict.subject}: {problem}")
            if doc.verdict.allowed:
                print(f"ok   {file}:{doc.line}: {doc.verdict.subject}")
            else:
                refused += 1
        if not any(doc.verdict for doc in found):
            refused += 1
            print(f"FAIL {file}: no NetworkAttachmentDefinition or pod found")
    return 1 if refused else 0


def _conf_lookup(conf_dir: str) -> Callable[[str], dict[str, Any] | None]:
    def find(name: str) -> dict[str, Any] | None:
        found = confdir.find_by_name(conf_dir, name)
        return found[1] if found is not None else None

    return find


def cmd_health(args: argparse.Namespace) -> int:
    # --live: is the daemon serving at all (liveness; it serves DELs even with the API down).
    status, body = _get(_socket_path(args), "/healthz" if args.live else "/readyz")
    print(body.decode().strip())
    return 0 if status == 200 else 1


def _sriov_rows(args: argparse.Namespace, url: str) -> list[dict[str, Any]] | None:
    status, body = _get(_socket_path(args), url)
    if status != 200:
        print(f"plexusctl: {json.loads(body).get('error', body.decode())}", file=sys.stderr)
        return None
    rows: list[dict[str, Any]] = json.loads(body)
    return rows


def cmd_pools(args: argparse.Namespace) -> int:
    pools = _sriov_rows(args, "/v1/pools")
    if pools is None:
        return 1
    if args.json:
        print(json.dumps(pools, indent=2))
        return 0
    rows: list[tuple[str, ...]] = [("RESOURCE", "TYPE", "VFS", "HEALTHY", "FREE", "IN USE", "ENV")]
    for p in pools:
        rows.append(
            (
                p["resourceName"],
                p["deviceType"],
                str(p["total"]),
                str(p["healthy"]),
                str(p["free"]),
                str(p["inUse"]),
                p["env"],
            )
        )
    table(rows)
    return 0


def cmd_vfs(args: argparse.Namespace) -> int:
    vfs = _sriov_rows(args, "/v1/vfs")
    if vfs is None:
        return 1
    if args.json:
        print(json.dumps(vfs, indent=2))
        return 0
    rows: list[tuple[str, ...]] = [
        ("VF", "PF", "#", "POOL", "DRIVER", "NETDEV", "STATE", "HEALTH", "HOLDER")
    ]
    for v in vfs:
        health = "healthy" if v["healthy"] else f"unhealthy: {v['reason']}"
        rows.append(
            (
                v["pci"],
                v["pf"] or v["pf_pci"] or "-",
                str(v["index"]) if v["index"] >= 0 else "-",
                v["pool"] or "-",
                v["driver"] or "-",
                v["netdev"] or "-",
                v["state"],
                health,
                v["holder"] or "-",
            )
        )
    table(rows)
    return 0


def cmd_multicast(args: argparse.Namespace) -> int:
    status, body = _get(_socket_path(args), "/v1/multicast")
    if status != 200:
        print(f"plexusctl: plexusd answered {status}: {body.decode()[:200]}", file=sys.stderr)
        return 1
    rows = json.loads(body)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no pod on this node has joined a group on a multicast network")
        return 0
    node = socket.gethostname()
    out = [("NETWORK", "GROUP", "MEMBERS ON " + node, "SENT TO")]
    for row in rows:
        out.append(
            (row["network"], row["group"], ", ".join(row["members"]), ", ".join(row["sentTo"]))
        )
    table(out)
    return 0


GRAPHVIZ_PACKAGE = "graphviz"


def cmd_topology(args: argparse.Namespace) -> int:
    status, body = _get(_socket_path(args), "/v1/attachments")
    if status != 200:
        print(f"plexusctl: plexusd answered {status}: {body.decode()[:200]}", file=sys.stderr)
        return 1
    try:
        pods = topology.build(topology.parse(body))
    except ValueError as exc:  # pydantic's ValidationError: a daemon of another version
        print(f"plexusctl: unexpected /v1/attachments view from plexusd: {exc}", file=sys.stderr)
        return 1
    node = args.node or socket.gethostname()
    if args.format == "tree":
        print("\n".join(topology.render_tree(node, pods)))
        return 0
    dot = topology.render_dot(node, pods)
    if args.format == "dot":
        print(dot, end="")
        return 0
    return _print_svg(dot)


def _print_svg(dot: str) -> int:
    binary = shutil.which("dot")
    if binary is None:
        print(
            "plexusctl: --format svg needs Graphviz's `dot` binary, which is not on PATH: "
            f"install the Debian package {GRAPHVIZ_PACKAGE} (apt-get install {GRAPHVIZ_PACKAGE}), "
            "or take --format dot and render it elsewhere",
            file=sys.stderr,
        )
        return 1
    proc = subprocess.run([binary, "-Tsvg"], input=dot.encode(), capture_output=True, check=False)
    if proc.returncode != 0:
        print(f"plexusctl: dot -Tsvg failed: {proc.stderr.decode().strip()}", file=sys.stderr)
        return 1
    sys.stdout.write(proc.stdout.decode())
    return 0


def table(rows: Sequence[tuple[str, ...]], *, indent: str = "", rule: bool = False) -> None:
    """Print rows as aligned columns (the first row is the header; `rule` underlines it)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [[cell.ljust(w) for cell, w in zip(row, widths, strict=True)] for row in rows]
    if rule:
        lines.insert(1, ["-" * w for w in widths])
    for cells in lines:
        print((indent + "  ".join(cells)).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plexusctl", description="Plexus admin CLI")
    parser.add_argument("--socket", help="plexusd socket (default /run/plexus/plexus.sock)")
    parser.add_argument("--config", help="daemon config file (to find the socket)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("version", help="CNI versions Plexus speaks").set_defaults(fn=cmd_version)
    p = sub.add_parser("attachments", help="attachments recorded on this node")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_attachments)
    p = sub.add_parser("network-status", help="a pod's network-status JSON")
    p.add_argument("pod", metavar="NAMESPACE/NAME")
    p.set_defaults(fn=cmd_network_status)
    p = sub.add_parser("policy", help="the network policy in force on a pod of this node")
    p.add_argument("pod", metavar="NAMESPACE/NAME")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_policy)
    p = sub.add_parser("pools", help="SR-IOV VF pools of this node and how full they are")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_pools)
    p = sub.add_parser("vfs", help="every VF of this node: pool, state, health and holder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_vfs)
    p = sub.add_parser(
        "validate", help="check NADs and pods' network annotations in manifest files"
    )
    p.add_argument("files", nargs="+")
    p.add_argument(
        "--cni-conf-dir",
        default="/etc/cni/net.d",
        help="where NADs without spec.config find their conf",
    )
    p.set_defaults(fn=cmd_validate)
    p = sub.add_parser("health", help="is plexusd ready (or, with --live, alive)")
    p.add_argument("--live", action="store_true", help="liveness: /healthz instead of /readyz")
    p.set_defaults(fn=cmd_health)
    p = sub.add_parser(
        "multicast", help="per network, the groups this node's pods joined and where they go"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_multicast)
    p = sub.add_parser("topology", help="this node's pods, their interfaces and networks")
    p.add_argument(
        "--format",
        choices=("tree", "dot", "svg"),
        default="tree",
        help="tree (text, default), dot (Graphviz DOT) or svg (rendered by Graphviz's dot)",
    )
    p.add_argument("--node", help="the node's name in the picture (default: this host's name)")
    p.set_defaults(fn=cmd_topology)
    args = parser.parse_args(argv)
    result: int = args.fn(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
