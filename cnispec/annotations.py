"""Pod annotations Plexus reads: `k8s.v1.cni.cncf.io/networks` and
`v1.multus-cni.io/default-network`.

Both forms of the networks annotation are parsed (NPWG v1.3 §4 plus Multus's extensions): the
short form `net`, `ns/net`, `ns/net@ifname` as a comma list, and the JSON list form. Validation
is strict: anything malformed fails the pod with a message naming the element and the key.
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

_DNS1123_LABEL: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_MAC: Final = re.compile(r"^[0-9A-Fa-f]{2}([:-])[0-9A-Fa-f]{2}(\1[0-9A-Fa-f]{2}){4}$")
_IB_GUID: Final = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){7}$")


def _check_label(value: str, what: str) -> str:
    if len(value) > 63 or not _DNS1123_LABEL.match(value):
        raise ValueError(
            f"{what} {value!r} is not a DNS-1123 label (lower-case letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters)"
        )
    return value


def _check_ip(value: str) -> str:
    try:
        if "/" in value:
            ipaddress.ip_interface(value)
        else:
            ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4/IPv6 address (with optional /prefix)") from None
    return value


class PortMapping(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True)

    host_port: int = Field(alias="hostPort", ge=1, le=65535)
    container_port: int = Field(alias="containerPort", ge=1, le=65535)
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"
    host_ip: str | None = Field(default=None, alias="hostIP")

    @field_validator("protocol", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("host_ip")
    @classmethod
    def _host_ip(cls, value: str | None) -> str | None:
        return _check_ip(value) if value else value

    def runtime_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "hostPort": self.host_port,
            "containerPort": self.container_port,
            "protocol": self.protocol.lower(),
        }
        if self.host_ip:
            out["hostIP"] = self.host_ip
        return out


class Bandwidth(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True)

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
        return self.model_dump(by_alias=True, exclude_none=True)


class NetworkSelection(BaseModel):
    """One element of the networks annotation (NPWG §4.1.2 keys plus Multus's)."""

    # Keys are matched by their annotation spelling only ("default-route", not "default_route").
    model_config = ConfigDict(populate_by_name=False, extra="allow", frozen=True)

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

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_label(value, "network name")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str | None) -> str | None:
        return _check_label(value, "namespace") if value is not None else None

    @field_validator("interface", "interface_request")
    @classmethod
    def _ifname(cls, value: str | None) -> str | None:
        if value is not None and not cni.valid_ifname(value):
            raise ValueError(
                f"interface {value!r} is not a legal interface name (1-15 bytes, no '/', ':' "
                "or whitespace)"
            )
        return value

    @field_validator("ips", "default_route")
    @classmethod
    def _ip_list(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            for ip in value:
                _check_ip(ip)
        return value

    @field_validator("mac")
    @classmethod
    def _mac(cls, value: str | None) -> str | None:
        if value is not None and not _MAC.match(value):
            raise ValueError(f"mac {value!r} is not a 6-byte MAC address such as 0a:58:0a:00:00:05")
        return value

    @field_validator("infiniband_guid")
    @classmethod
    def _guid(cls, value: str | None) -> str | None:
        if value is not None and not _IB_GUID.match(value):
            raise ValueError(f"infiniband-guid {value!r} is not an 8-byte GUID (xx:xx:..:xx)")
        return value

    @model_validator(mode="after")
    def _keys(self) -> NetworkSelection:
        # NPWG §4.1.2: keys without a period are reserved; vendor keys must be reverse-DNS.
        unknown = [k for k in (self.model_extra or {}) if "." not in k]
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))}")
        if self.ips and self.ipam_claim_reference:
            raise ValueError(
                "ips and ipam-claim-reference cannot be combined (NPWG v1.3 §4.1.2.1.11)"
            )
        return self

    @property
    def requested_ifname(self) -> str | None:
        return self.interface or self.interface_request

    def reference(self, pod_namespace: str) -> str:
        return f"{self.namespace or pod_namespace}/{self.name}"

    def gateway_families(self) -> set[int]:
        return {ipaddress.ip_interface(gw).version for gw in self.default_route or []}


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
    if not item:
        raise _fail(f"item {index}", "empty network name")
    ref, _, ifname = item.partition("@")
    namespace, _, name = ref.rpartition("/")
    fields: dict[str, Any] = {"name": name}
    if "/" in namespace:
        raise _fail(f"item {index} ({item!r})", "expected [namespace/]name[@interface]")
    if namespace:
        fields["namespace"] = namespace
    if ifname:
        fields["interface"] = ifname
    elif item.endswith("@"):
        raise _fail(f"item {index} ({item!r})", "empty interface name after '@'")
    try:
        return NetworkSelection.model_validate(fields)
    except ValidationError as exc:
        raise _fail(f"item {index} ({item!r})", _describe(exc)) from None


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
