"""`plexusctl topology`: this node's pods, their interfaces and the networks they join.

The input is the daemon's read-only `/v1/attachments` view (one entry per container, each
attachment record's `view()`), validated here with pydantic because it crosses a process
boundary. Everything after parsing is pure: `build` folds the records into pods and
interfaces, `render_tree` draws the text tree a terminal shows, `render_dot` writes Graphviz
DOT (node -> pod -> interface -> network). Rendering SVG is `dot -Tsvg` on that text, done by
plexusctl, not here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _View(BaseModel):
    # The daemon's view carries more than a picture needs (cni_args, created_at, ...).
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class WireInterface(_View):
    name: str
    mac: str | None = None
    sandbox: str | None = None
    pci_id: str | None = Field(default=None, alias="pciID")


class WireIP(_View):
    address: str
    interface: int | None = None


class WireResult(_View):
    interfaces: tuple[WireInterface, ...] = ()
    ips: tuple[WireIP, ...] = ()


class WirePlugin(_View):
    type: str
    config: dict[str, Any] = Field(default_factory=dict)


class WirePrepared(_View):
    plugins: tuple[WirePlugin, ...] = ()


class AttachmentView(_View):
    container_id: str
    network: str
    ifname: str
    netns: str = ""
    pod_namespace: str = ""
    pod_name: str = ""
    is_default: bool = False
    state: str = "added"
    result: WireResult | None = None
    prepared: WirePrepared = WirePrepared()


class ContainerView(_View):
    container_id: str = Field(alias="containerID")
    attachments: tuple[AttachmentView, ...] = ()


CONTAINERS = TypeAdapter(list[ContainerView])


@dataclass(frozen=True)
class Interface:
    ifname: str
    network: str
    type: str  # the network's first plugin (the one that makes the link)
    ips: tuple[str, ...]
    mac: str
    vf_pci: str  # SR-IOV: the VF's PCI address; "" otherwise
    state: str
    default: bool


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    container_id: str
    netns: str
    interfaces: tuple[Interface, ...]

    @property
    def ref(self) -> str:
        # A container without pod identity (a runtime that sends no K8S_POD_* args).
        return f"{self.namespace}/{self.name}" if self.name else f"container {self.short_id}"

    @property
    def short_id(self) -> str:
        return self.container_id[:12]


def parse(body: bytes | str) -> list[ContainerView]:
    """The `/v1/attachments` JSON (raises pydantic's ValidationError on a foreign shape)."""
    return CONTAINERS.validate_json(body)


def build(containers: Sequence[ContainerView]) -> list[Pod]:
    """Pods in name order, each with its interfaces in attachment order."""
    pods = [
        Pod(
            namespace=c.attachments[0].pod_namespace,
            name=c.attachments[0].pod_name,
            container_id=c.container_id,
            netns=c.attachments[0].netns,
            interfaces=tuple(_interface(a) for a in c.attachments),
        )
        for c in containers
        if c.attachments
    ]
    return sorted(pods, key=lambda p: (p.namespace, p.name, p.container_id))


def _interface(att: AttachmentView) -> Interface:
    result = att.result or WireResult()
    # The pod-side entry (sandbox set) carries the pod's MAC; a host-side veth shares the name
    # only by accident, so it is the fallback.
    index, own = next(
        ((i, x) for i, x in enumerate(result.interfaces) if x.name == att.ifname and x.sandbox),
        next(((i, x) for i, x in enumerate(result.interfaces) if x.name == att.ifname), (-1, None)),
    )
    ips = tuple(ip.address for ip in result.ips if ip.interface is None or ip.interface == index)
    vf = (own.pci_id if own else None) or next(
        (str(p.config["deviceID"]) for p in att.prepared.plugins if p.config.get("deviceID")), ""
    )
    return Interface(
        ifname=att.ifname,
        network=att.network,
        type=att.prepared.plugins[0].type if att.prepared.plugins else "?",
        ips=ips,
        mac=(own.mac or "") if own else "",
        vf_pci=vf,
        state=att.state,
        default=att.is_default,
    )


def networks(pods: Sequence[Pod]) -> dict[str, list[tuple[Pod, Interface]]]:
    """Each network (in name order) with the pod interfaces attached to it."""
    out: dict[str, list[tuple[Pod, Interface]]] = {}
    for pod in pods:
        for iface in pod.interfaces:
            out.setdefault(iface.network, []).append((pod, iface))
    return dict(sorted(out.items()))


def _describe(iface: Interface) -> str:
    parts = [iface.ifname, f"net {iface.network}", iface.type]
    parts.append(",".join(iface.ips) if iface.ips else "no IP")
    if iface.mac:
        parts.append(iface.mac)
    if iface.vf_pci:
        parts.append(f"VF {iface.vf_pci}")
    if iface.default:
        parts.append("default")
    if iface.state != "added":
        parts.append(f"[{iface.state}]")  # planned: its ADD has not finished (or failed)
    return "  ".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def render_tree(node: str, pods: Sequence[Pod]) -> list[str]:
    """node -> pod -> interface, then node -> network -> pod interface."""
    nets = networks(pods)
    lines = [f"{node}  ({_count(len(pods), 'pod')}, {_count(len(nets), 'network')})"]
    if not pods:
        lines.append("└── no attachments recorded")
        return lines
    lines.append("├── pods")
    for i, pod in enumerate(pods):
        last = i == len(pods) - 1
        lines.append(f"│   {'└' if last else '├'}── {pod.ref}  ({pod.short_id}  {pod.netns})")
        stem = "│   " + ("    " if last else "│   ")
        for j, iface in enumerate(pod.interfaces):
            branch = "└" if j == len(pod.interfaces) - 1 else "├"
            lines.append(f"{stem}{branch}── {_describe(iface)}")
    lines.append("└── networks")
    for i, (name, members) in enumerate(nets.items()):
        last = i == len(nets) - 1
        types = ",".join(sorted({iface.type for _, iface in members}))
        count = _count(len(members), "interface")
        lines.append(f"    {'└' if last else '├'}── {name}  ({types}, {count})")
        stem = "    " + ("    " if last else "│   ")
        for j, (pod, iface) in enumerate(members):
            branch = "└" if j == len(members) - 1 else "├"
            ips = ",".join(iface.ips) or "no IP"
            lines.append(f"{stem}{branch}── {pod.ref} {iface.ifname}  {ips}")
    return lines


def _q(text: str) -> str:
    """A DOT double-quoted string (IDs and labels alike)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def render_dot(node: str, pods: Sequence[Pod]) -> str:
    """Graphviz DOT: the node, each pod (box), each interface (record-like box) and each
    network (ellipse); edges node -> pod -> interface -> network."""
    out = [
        "digraph plexus_topology {",
        "  rankdir=LR;",
        '  node [fontname="monospace", fontsize=10];',
        f"  {_q('node:' + node)} [shape=box3d, label={_q(node)}];",
    ]
    for name, members in networks(pods).items():
        types = ",".join(sorted({iface.type for _, iface in members}))
        label = _q(f"{name}\n{types}")
        out.append(f"  {_q('net:' + name)} [shape=ellipse, label={label}];")
    for pod in pods:
        pod_id = "pod:" + pod.container_id
        out.append(f"  {_q(pod_id)} [shape=box, style=rounded, label={_q(pod.ref)}];")
        out.append(f"  {_q('node:' + node)} -> {_q(pod_id)};")
        for iface in pod.interfaces:
            if_id = f"if:{pod.container_id}/{iface.ifname}"
            lines = [iface.ifname, *iface.ips]
            lines += [iface.mac] if iface.mac else []
            lines += [f"VF {iface.vf_pci}"] if iface.vf_pci else []
            lines += [f"[{iface.state}]"] if iface.state != "added" else []
            style = ", style=bold" if iface.default else ""  # the pod's default route
            out.append(f"  {_q(if_id)} [shape=box{style}, label={_q(chr(10).join(lines))}];")
            out.append(f"  {_q(pod_id)} -> {_q(if_id)};")
            out.append(f"  {_q(if_id)} -> {_q('net:' + iface.network)} [label={_q(iface.type)}];")
    out.append("}")
    return "\n".join(out) + "\n"
