"""Pod annotations Plexus reads: `k8s.v1.cni.cncf.io/networks` and
`v1.multus-cni.io/default-network`.

Both forms of the networks annotation are parsed (NPWG v1.3 §4 plus Multus's extensions): the
short form `net`, `ns/net`, `ns/net@ifname` as a comma list, and the JSON list form. A value
Plexus would act on is validated strictly: anything malformed fails the pod with a message naming
the element and the key. What Multus reads leniently is read the same way, so a pod that works
on Multus works here: keys Plexus does not know are ignored (the resolver logs them), a known
key spelled in another case is read as that key (Go's encoding/json does), an empty value asks
for nothing, and an empty namespace is the pod's. Every such choice, and where the spec and
Multus part, is in docs/annotations.md.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cnispec import cni, jsontext
from cnispec.errors import InvalidConfig

NETWORKS_ANNOTATION: Final = "k8s.v1.cni.cncf.io/networks"
DEFAULT_NETWORK_ANNOTATION: Final = "v1.multus-cni.io/default-network"
NETWORK_STATUS_ANNOTATION: Final = "k8s.v1.cni.cncf.io/network-status"
RESOURCE_NAME_ANNOTATION: Final = "k8s.v1.cni.cncf.io/resourceName"

_LABEL: Final = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_LABEL: Final = re.compile(f"^{_LABEL}$")
_DNS1123_SUBDOMAIN: Final = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
# A namespace is a DNS-1123 label (Kubernetes enforces 63). A NAD's name is whatever Kubernetes
# lets it be, a DNS-1123 subdomain of up to 253 (NPWG asks for a label, only recommends 63;
# Multus's JSON form checks nothing): the JSON form can name any NAD that exists. The short form
# keeps the spec's label, as Multus's short-form parser does.
_NAMESPACE_MAX: Final = 63
_NAME_MAX: Final = 253


def _check_label(value: str, what: str, limit: int, *, dots: bool = False) -> str:
    pattern, shape = (_DNS1123_SUBDOMAIN, "subdomain") if dots else (_DNS1123_LABEL, "label")
    if len(value) > limit or not pattern.match(value):
        allowed = "'-' and '.'" if dots else "'-'"
        raise ValueError(
            f"{what} {value!r} is not a DNS-1123 {shape} (lower-case letters, digits and "
            f"{allowed}, starting and ending with a letter or digit, at most {limit} characters)"
        )
    return value


def _check_ip(value: str, *, prefix: bool = True) -> str:
    """An IPv4/IPv6 address, with a /prefix when `prefix`; never a zone (`fe80::1%eth0`), which
    Python would take and no plugin can use (Go's ParseIP refuses it)."""
    try:
        if "%" in value:
            raise ValueError
        if prefix and "/" in value:
            ipaddress.ip_interface(value)
        else:
            ipaddress.ip_address(value)
    except ValueError:
        shape = "address (with optional /prefix)" if prefix else "address (no /prefix)"
        raise ValueError(f"{value!r} is not an IPv4/IPv6 {shape}") from None
    return value


def _hardware_address(value: str, size: int, what: str, example: str) -> str:
    """A `size`-byte address in any notation Go's net.ParseMAC reads (what Multus validates
    with): `aa:bb:..`, `aa-bb-..` or `aabb.ccdd..`; returned lower-case with colons, the one
    notation every plugin (built-in or exec'd) reads."""
    groups = re.fullmatch(r"[0-9A-Fa-f]{2}([:-])[0-9A-Fa-f]{2}(?:\1[0-9A-Fa-f]{2})*", value)
    dotted = re.fullmatch(r"[0-9A-Fa-f]{4}(?:\.[0-9A-Fa-f]{4})*", value)
    digits = re.sub(r"[:.-]", "", value) if groups or dotted else ""
    if len(digits) != 2 * size:
        raise ValueError(f"{what} {value!r} is not a {size}-byte {example}")
    return ":".join(digits[i : i + 2] for i in range(0, len(digits), 2)).lower()


def _fold_keys(data: Any, keys: frozenset[str]) -> Any:
    """Multus and the NAD client decode with Go's encoding/json, which matches a key to a field
    ignoring case (`IPs` is `ips`): add each such key under its spec spelling. The original key
    stays, as an extra the model reports; a key given twice is refused, not silently picked."""
    if not isinstance(data, dict):
        return data
    folded = {key.casefold(): key for key in keys}
    out = dict(data)
    for key in data:
        spec = folded.get(key.casefold()) if isinstance(key, str) else None
        if spec is None or spec == key:
            continue
        if spec in out:
            raise ValueError(f"key {spec!r} is given twice (also as {key!r})")
        out[spec] = data[key]
    return out


def _empty_is_absent(value: Any) -> Any:
    """An empty string, list or object asks for nothing, as in Multus (`"mac": ""`, `"ips": []`)."""
    return None if value in ("", [], {}) else value


class _Lenient(BaseModel):
    """Keys are read the way Go's encoding/json reads them: any case, unknown ones ignored."""

    model_config = ConfigDict(populate_by_name=False, extra="allow", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _any_case(cls, data: Any) -> Any:
        keys = frozenset(f.alias or name for name, f in cls.model_fields.items())
        return _fold_keys(data, keys)


class PortMapping(_Lenient):
    host_port: int = Field(alias="hostPort", ge=1, le=65535)
    container_port: int = Field(alias="containerPort", ge=1, le=65535)
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"
    host_ip: str | None = Field(default=None, alias="hostIP")

    @field_validator("protocol", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        # Unset or empty is TCP, as the portmap plugin reads it.
        return (value.upper() or "TCP") if isinstance(value, str) else value

    @field_validator("host_ip")
    @classmethod
    def _host_ip(cls, value: str | None) -> str | None:
        return _check_ip(value, prefix=False) if value else value

    def runtime_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "hostPort": self.host_port,
            "containerPort": self.container_port,
            "protocol": self.protocol.lower(),
        }
        if self.host_ip:
            out["hostIP"] = self.host_ip
        return out


class Bandwidth(_Lenient):
    ingress_rate: int | None = Field(default=None, alias="ingressRate", ge=0)
    ingress_burst: int | None = Field(default=None, alias="ingressBurst", ge=0)
    egress_rate: int | None = Field(default=None, alias="egressRate", ge=0)
    egress_burst: int | None = Field(default=None, alias="egressBurst", ge=0)

    @model_validator(mode="after")
    def _burst_needs_rate(self) -> Bandwidth:
        if self.ingress_burst is not None and self.ingress_rate is None:
            raise ValueError("ingressBurst needs ingressRate")
        if self.egress_burst is not None and self.egress_rate is None:
            raise ValueError("egressBurst needs egressRate")
        return self

    def runtime_config(self) -> dict[str, Any]:
        fields = {"ingress_rate", "ingress_burst", "egress_rate", "egress_burst"}
        return self.model_dump(by_alias=True, exclude_none=True, include=fields)


class NetworkSelection(_Lenient):
    """One element of the networks annotation (NPWG §4.1.2 keys plus Multus's). Keys are
    matched by their annotation spelling ("default-route", not "default_route"), in any case;
    every other key is kept as an extra and reported by `ignored_keys`."""

    name: str
    namespace: str | None = None
    interface: str | None = None
    interface_request: str | None = Field(default=None, alias="interfaceRequest")
    ips: list[str] | None = None
    mac: str | None = None
    default_route: list[str] | None = Field(default=None, alias="default-route")
    cni_args: dict[str, Any] | None = Field(default=None, alias="cni-args")
    port_mappings: list[PortMapping] | None = Field(default=None, alias="portMappings")
    bandwidth: Bandwidth | None = None
    infiniband_guid: str | None = Field(default=None, alias="infiniband-guid")
    device_id: str | None = Field(default=None, alias="deviceID")
    ipam_claim_reference: str | None = Field(default=None, alias="ipam-claim-reference")

    @field_validator(
        "namespace",
        "interface",
        "interface_request",
        "ips",
        "mac",
        "port_mappings",
        "bandwidth",
        "infiniband_guid",
        "device_id",
        mode="before",
    )
    @classmethod
    def _empty(cls, value: Any) -> Any:
        # NPWG §4.1.2.1.1: a missing or empty namespace is the pod's; Multus reads every other
        # empty value as not given (an empty default-route list, though, means something).
        return _empty_is_absent(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_label(value, "network name", _NAME_MAX, dots=True)

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str | None) -> str | None:
        return _check_label(value, "namespace", _NAMESPACE_MAX) if value is not None else None

    @field_validator("interface", "interface_request")
    @classmethod
    def _ifname(cls, value: str | None) -> str | None:
        if value is not None and not cni.valid_ifname(value):
            raise ValueError(
                f"interface {value!r} is not a legal interface name (1-15 bytes, no '/', ':' "
                "or whitespace)"
            )
        return value

    @field_validator("ips")
    @classmethod
    def _ips(cls, value: list[str] | None) -> list[str] | None:
        for ip in value or []:
            _check_ip(ip)
        return value

    @field_validator("default_route")
    @classmethod
    def _gateways(cls, value: list[str] | None) -> list[str] | None:
        # Gateways are addresses: a /prefix would reach the route as a gateway nobody can use.
        for gw in value or []:
            _check_ip(gw, prefix=False)
        return value

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str | None) -> str | None:
        return (
            _hardware_address(value, 6, "mac", "MAC address such as 0a:58:0a:00:00:05")
            if value
            else None
        )

    @field_validator("infiniband_guid")
    @classmethod
    def _guid(cls, value: str | None) -> str | None:
        return (
            _hardware_address(value, 8, "infiniband-guid", "GUID such as c2:11:22:33:44:55:66:77")
            if value
            else None
        )

    @field_validator("bandwidth")
    @classmethod
    def _bandwidth(cls, value: Bandwidth | None) -> Bandwidth | None:
        return value if value is not None and value.runtime_config() else None

    @property
    def requested_ifname(self) -> str | None:
        return self.interface or self.interface_request

    @property
    def ignored_keys(self) -> tuple[str, ...]:
        """Keys Plexus does not read: unknown ones, vendor ones (`example.com/x`, which NPWG
        §4.1.2 allows and Plexus implements none of), and `ipam-claim-reference` (v1.3
        §4.1.2.1.11: an implementation without IPAMClaims ignores it)."""
        folded = {key.casefold() for key in _SPEC_KEYS}
        extra = [key for key in self.model_extra or {} if key.casefold() not in folded]
        return tuple(extra + (["ipam-claim-reference"] if self.ipam_claim_reference else []))

    @property
    def respelled_keys(self) -> dict[str, str]:
        """Known keys written in another case, each with the key it was read as."""
        folded = {key.casefold(): key for key in _SPEC_KEYS}
        extra = self.model_extra or {}
        return {key: folded[key.casefold()] for key in extra if key.casefold() in folded}

    def reference(self, pod_namespace: str) -> str:
        return f"{self.namespace or pod_namespace}/{self.name}"

    def gateway_families(self) -> set[int]:
        return {ipaddress.ip_address(gw).version for gw in self.default_route or []}


_SPEC_KEYS: Final = frozenset(f.alias or name for name, f in NetworkSelection.model_fields.items())


def parse_networks(value: str | None) -> list[NetworkSelection]:
    """Parse the networks annotation; raises InvalidConfig (code 7) naming the bad element."""
    if value is None or not value.strip():
        return []
    if any(c in value for c in '[{"'):
        return _parse_json(value)
    return [_parse_short(item.strip(), i) for i, item in enumerate(value.split(","))]


def _fail(where: str, problem: str) -> InvalidConfig:
    return InvalidConfig(f"pod annotation {NETWORKS_ANNOTATION}: {where}: {problem}")


def _parse_json(value: str) -> list[NetworkSelection]:
    try:
        data = jsontext.loads(value)  # bounded: the pod's author is not trusted
    except ValueError as exc:
        raise _fail("JSON form", f"not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise _fail("JSON form", "must be a list of objects")
    out = []
    for i, element in enumerate(data):
        if not isinstance(element, dict):
            raise _fail(f"element {i}", "must be an object with at least 'name'")
        try:
            out.append(NetworkSelection.model_validate(element))
        except ValidationError as exc:
            raise _fail(f"element {i} ({element.get('name', '?')})", _describe(exc)) from None
    return out


def _parse_short(item: str, index: int) -> NetworkSelection:
    """`[namespace/]name[@interface]`, each part trimmed as Multus trims it (`ns / net @ if0`);
    an empty namespace is the pod's and an empty interface asks for none (`net@`), as there."""
    where = f"item {index} ({item!r})"
    if not item:
        raise _fail(f"item {index}", "empty network name")
    parts = item.split("/")
    if len(parts) > 2:
        raise _fail(where, "more than one '/' (expected [namespace/]name[@interface])")
    name, *ifnames = parts[-1].split("@")
    if len(ifnames) > 1:
        raise _fail(where, "more than one '@' (expected [namespace/]name[@interface])")
    name = name.strip()
    if not name:
        raise _fail(where, "empty network name")
    try:
        _check_label(name, "network name", _NAME_MAX)
    except ValueError as exc:
        hint = "; the JSON form selects a NAD whose name has '.'" if "." in name else ""
        raise _fail(where, f"{exc}{hint}") from None
    fields = {
        "name": name,
        "namespace": parts[0].strip() if len(parts) == 2 else None,
        "interface": ifnames[0].strip() if ifnames else None,
    }
    try:
        return NetworkSelection.model_validate(fields)
    except ValidationError as exc:
        raise _fail(where, _describe(exc)) from None


def parse_default_network(value: str | None) -> tuple[str | None, str] | None:
    """`v1.multus-cni.io/default-network`: one `[ns/]name`; returns (namespace or None, name)."""
    if value is None or not value.strip():
        return None
    items = parse_networks(value)
    if len(items) != 1:
        raise InvalidConfig(
            f"pod annotation {DEFAULT_NETWORK_ANNOTATION} must name exactly one network, "
            f"got {len(items)}"
        )
    return items[0].namespace, items[0].name


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
