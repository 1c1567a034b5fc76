"""API objects (the dicts a manifest file or the API server gives) made into the compiler's
inputs: NetworkPolicy and MultiNetworkPolicy → `Policy`, Namespace → `Namespace`, Pod → `Pod`.

Every failure is an `InvalidConfig` that names the object ("NetworkPolicy team-a/web: ..."), so
a bad manifest in a directory of hundreds, or one bad object in a watch, says which it is.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from typing import Any, Final

from pydantic import ValidationError

from cnispec.annotations import NETWORK_STATUS_ANNOTATION
from cnispec.errors import InvalidConfig
from netpolicy.model import (
    POLICY_FOR_ANNOTATION,
    ContainerPort,
    Namespace,
    Pod,
    PodInterface,
    Policy,
    PolicySpec,
)

NETWORK_POLICY: Final = ("networking.k8s.io/v1", "NetworkPolicy")
MULTI_NETWORK_POLICY: Final = ("k8s.cni.cncf.io/v1beta1", "MultiNetworkPolicy")
NAMESPACE: Final = ("v1", "Namespace")
POD: Final = ("v1", "Pod")
POLICY_KINDS: Final = frozenset({NETWORK_POLICY[1], MULTI_NETWORK_POLICY[1]})
PRIMARY_IFNAME: Final = "eth0"

JSON = Mapping[str, Any]


def describe(obj: JSON) -> str:
    """`Kind namespace/name` of an object, for messages (whatever is missing shows as '?')."""
    found = obj.get("metadata")
    meta: JSON = found if isinstance(found, Mapping) else {}
    kind = obj.get("kind") or "object"
    name = meta.get("name") or "?"
    namespace = meta.get("namespace")
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


def policy_from_object(obj: JSON) -> Policy:
    """A NetworkPolicy or a MultiNetworkPolicy (its `policy-for` annotation resolved to
    "namespace/name" NAD keys against the policy's own namespace)."""
    kind = _check_kind(obj, (NETWORK_POLICY, MULTI_NETWORK_POLICY))
    namespace, name = _identity(obj, namespaced=True)
    where = describe(obj)
    spec = _spec(obj, where)
    policy_for: tuple[str, ...] = ()
    if kind == MULTI_NETWORK_POLICY[1]:
        annotations = _string_map(_meta(obj).get("annotations"), where, "metadata.annotations")
        policy_for = parse_policy_for(annotations.get(POLICY_FOR_ANNOTATION), namespace, where)
    return Policy(
        kind=NETWORK_POLICY[1] if kind == NETWORK_POLICY[1] else MULTI_NETWORK_POLICY[1],
        namespace=namespace,
        name=name,
        spec=spec,
        policy_for=policy_for,
    )


def parse_policy_for(value: str | None, namespace: str, where: str) -> tuple[str, ...]:
    """`k8s.v1.cni.cncf.io/policy-for`: comma-separated NAD names, `name` meaning the policy's
    namespace, or `ns/name`. A MultiNetworkPolicy without it would govern nothing at all, which
    is never what its author meant: refused, with the fix."""
    if value is None or not value.strip():
        raise InvalidConfig(
            f"{where}: no {POLICY_FOR_ANNOTATION} annotation, so it governs no network; "
            f"name the NetworkAttachmentDefinitions it is for (e.g. "
            f'{POLICY_FOR_ANNOTATION}: "{namespace}/macvlan-net")'
        )
    keys: dict[str, None] = {}
    for raw in value.split(","):
        item = raw.strip()
        if not item:
            continue
        parts = item.split("/")
        if len(parts) == 1:
            ns, name = namespace, parts[0]
        elif len(parts) == 2 and all(parts):
            ns, name = parts
        else:
            raise InvalidConfig(
                f"{where}: {POLICY_FOR_ANNOTATION} names {item!r}: write a network as 'name' "
                "(in the policy's namespace) or 'namespace/name'"
            )
        keys[f"{ns}/{name}"] = None
    if not keys:
        raise InvalidConfig(f"{where}: {POLICY_FOR_ANNOTATION} names no network ({value!r})")
    return tuple(keys)


def namespace_from_object(obj: JSON) -> Namespace:
    _check_kind(obj, (NAMESPACE,))
    _, name = _identity(obj, namespaced=False)
    where = describe(obj)
    meta = _meta(obj)
    return Namespace(
        name=name,
        labels=_string_map(meta.get("labels"), where, "metadata.labels"),
        annotations=_string_map(meta.get("annotations"), where, "metadata.annotations"),
    )


def pod_from_object(obj: JSON) -> Pod:
    """A pod as a peer (and, for the engine, a source of labels and named ports): its primary
    addresses from status.podIPs (eth0), its secondaries' from the network-status annotation.
    A network-status entry that says `default: true` is the primary: its addresses add to
    podIPs' (a runtime may report one family only)."""
    _check_kind(obj, (POD,))
    namespace, name = _identity(obj, namespaced=True)
    where = describe(obj)
    meta = _meta(obj)
    labels = _string_map(meta.get("labels"), where, "metadata.labels")
    annotations = _string_map(meta.get("annotations"), where, "metadata.annotations")
    status = _mapping(obj.get("status"), where, "status")
    primary = [_address(ip.get("ip"), where, "status.podIPs") for ip in _pod_ips(status, where)]
    entries = network_status(annotations.get(NETWORK_STATUS_ANNOTATION), where)
    primary_network = ""
    interfaces: list[PodInterface] = []
    for entry in entries:
        if entry.primary:
            primary_network = entry.network
            primary += [a for a in entry.addresses if a not in primary]
        else:
            interfaces.append(entry)
    if primary or primary_network:
        interfaces.insert(
            0,
            PodInterface(
                ifname=PRIMARY_IFNAME,
                network=primary_network,
                primary=True,
                addresses=tuple(dict.fromkeys(primary)),
            ),
        )
    return Pod(
        namespace=namespace,
        name=name,
        uid=str(meta.get("uid") or ""),
        labels=labels,
        interfaces=tuple(interfaces),
        named_ports=_named_ports(_mapping(obj.get("spec"), where, "spec"), where),
    )


def network_status(value: str | None, where: str) -> list[PodInterface]:
    """The interfaces `k8s.v1.cni.cncf.io/network-status` lists (`name`: the network, "ns/name"
    for a NAD; `interface`; `ips`; `default`: the primary)."""
    if value is None or not value.strip():
        return []
    try:
        data = json.loads(value)
    except json.JSONDecodeError as exc:
        raise InvalidConfig(
            f"{where}: {NETWORK_STATUS_ANNOTATION} is not JSON ({exc.msg} at {exc.pos})"
        ) from None
    if not isinstance(data, list):
        raise InvalidConfig(f"{where}: {NETWORK_STATUS_ANNOTATION} is not a list")
    out: list[PodInterface] = []
    for i, entry in enumerate(data):
        field = f"{NETWORK_STATUS_ANNOTATION}[{i}]"
        if not isinstance(entry, Mapping):
            raise InvalidConfig(f"{where}: {field} is not an object")
        network = entry.get("name")
        if not isinstance(network, str) or not network:
            raise InvalidConfig(f"{where}: {field} has no network name")
        default = entry.get("default") is True
        ifname = entry.get("interface") or (PRIMARY_IFNAME if default else "")
        if not isinstance(ifname, str) or not ifname:
            continue  # a device-only entry (no netdev in the pod): nothing to match on
        ips = entry.get("ips") or []
        if not isinstance(ips, list):
            raise InvalidConfig(f"{where}: {field}.ips is not a list")
        out.append(
            PodInterface(
                ifname=ifname,
                network=network,
                primary=default,
                addresses=tuple(_address(ip, where, f"{field}.ips") for ip in ips),
            )
        )
    return out


# ---- helpers ------------------------------------------------------------------------------------


def _check_kind(obj: JSON, accepted: tuple[tuple[str, str], ...]) -> str:
    if not isinstance(obj, Mapping):
        raise InvalidConfig(f"not an API object: {type(obj).__name__}")
    kind, api_version = obj.get("kind"), obj.get("apiVersion")
    for want_version, want_kind in accepted:
        if kind == want_kind:
            if api_version not in (None, want_version):
                raise InvalidConfig(
                    f"{describe(obj)}: apiVersion {api_version!r} is not served; use {want_version}"
                )
            return want_kind
    names = " or ".join(f"{v} {k}" for v, k in accepted)
    raise InvalidConfig(f"{describe(obj)}: kind {kind!r} is not a {names}")


def _meta(obj: JSON) -> JSON:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        raise InvalidConfig(f"{describe(obj)}: no metadata")
    return meta


def _identity(obj: JSON, *, namespaced: bool) -> tuple[str, str]:
    meta = _meta(obj)
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidConfig(f"{describe(obj)}: metadata.name is missing")
    namespace = meta.get("namespace") or ("default" if namespaced else "")
    if not isinstance(namespace, str):
        raise InvalidConfig(f"{describe(obj)}: metadata.namespace is not a string")
    return namespace, name


def _spec(obj: JSON, where: str) -> PolicySpec:
    spec = obj.get("spec")
    if spec is None:
        spec = {}
    if not isinstance(spec, Mapping):
        raise InvalidConfig(f"{where}: spec is not an object")
    try:
        return PolicySpec.model_validate(spec)
    except ValidationError as exc:
        raise InvalidConfig(f"{where}: {_describe(exc, 'spec')}") from None


def _describe(exc: ValidationError, root: str) -> str:
    problems = []
    for error in exc.errors()[:3]:
        path = ".".join([root, *(str(p) for p in error["loc"])])
        problems.append(f"{path}: {error['msg']}")
    more = len(exc.errors()) - len(problems)
    return "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")


def _mapping(value: Any, where: str, field: str) -> JSON:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidConfig(f"{where}: {field} is not an object")
    return value


def _string_map(value: Any, where: str, field: str) -> dict[str, str]:
    found = _mapping(value, where, field)
    for key, item in found.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise InvalidConfig(f"{where}: {field}[{key!r}] is not a string (quote it)")
    return dict(found)


def _address(value: Any, where: str, field: str) -> str:
    """A bare address (a prefix length, as some plugins report it, is dropped)."""
    try:
        return str(ipaddress.ip_interface(str(value)).ip)
    except ValueError:
        raise InvalidConfig(f"{where}: {field} holds {value!r}, not an IP address") from None


def _pod_ips(status: JSON, where: str) -> list[JSON]:
    ips = status.get("podIPs")
    if ips is None:
        single = status.get("podIP")
        return [{"ip": single}] if single else []
    if not isinstance(ips, list) or not all(isinstance(ip, Mapping) for ip in ips):
        raise InvalidConfig(f"{where}: status.podIPs is not a list of {{ip: ...}}")
    return [ip for ip in ips if ip.get("ip")]


def _named_ports(spec: JSON, where: str) -> tuple[ContainerPort, ...]:
    """Every named port of the pod's containers (named ports exist for policies to use)."""
    out: dict[tuple[str, str], ContainerPort] = {}
    containers = spec.get("containers") or []
    if not isinstance(containers, list):
        raise InvalidConfig(f"{where}: spec.containers is not a list")
    for c, container in enumerate(containers):
        ports = (container.get("ports") if isinstance(container, Mapping) else None) or []
        if not isinstance(ports, list):
            raise InvalidConfig(f"{where}: spec.containers[{c}].ports is not a list")
        for p, port in enumerate(ports):
            if not isinstance(port, Mapping) or not port.get("name"):
                continue
            field = f"spec.containers[{c}].ports[{p}]"
            try:
                named = ContainerPort(
                    name=port["name"],
                    protocol=port.get("protocol") or "TCP",
                    port=port.get("containerPort"),
                )
            except ValidationError as exc:
                raise InvalidConfig(f"{where}: {_describe(exc, field)}") from None
            out.setdefault((named.name, named.protocol), named)
    return tuple(out.values())
