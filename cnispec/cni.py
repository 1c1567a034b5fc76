"""The CNI protocol: environment, versions, results, error codes. The only module that knows CNI.

Called by the daemon (to decode what the shim forwarded and to encode the answer) and by the
delegate runners (to build a delegate's environment and to read its result). Nothing here touches
the kernel beyond checking that CNI_NETNS names a network namespace, and nothing prints: callers
hand in the environment and stdin and get plain data back.

Versions: the runtime's own config must be 0.3.0 through 1.1.0 (a plugin may refuse a version,
and a pre-0.3.0 answer could not name the pod's interfaces); Plexus answers in the caller's
version. A delegate's network may also be 0.1.0 or 0.2.0, as Multus allows: it is run in that
version and its `ip4`/`ip6` result is read up. Results are held in one canonical shape (1.1.0)
and converted on the way in and out, the way libcni's converters do (0.1.0/0.2.0 carry one
`ip4` and one `ip6` block; 0.3.x/0.4.0 carry `ips[].version`; 1.1.0 adds interface `mtu`,
`socketPath`, `pciID` and route `mtu`, `advmss`, `priority`, `table`, `scope`).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cnispec import jsontext
from cnispec.errors import (
    DecodeFailure,
    IncompatibleVersion,
    InvalidConfig,
    InvalidEnvironment,
    PlexusError,
)

SUPPORTED_VERSIONS: Final = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION: Final = "1.1.0"
# Versions a delegate's network may speak: 0.1.0/0.2.0 results are read (converted up), and
# rendered only as a prevResult for the next plugin of such a network, never to the runtime.
PRE_030_VERSIONS: Final = ("0.1.0", "0.2.0")
KNOWN_VERSIONS: Final = (*PRE_030_VERSIONS, *SUPPORTED_VERSIONS)

ADD: Final = "ADD"
DEL: Final = "DEL"
CHECK: Final = "CHECK"
STATUS: Final = "STATUS"
VERSION: Final = "VERSION"
GC: Final = "GC"
COMMANDS: Final = (ADD, DEL, CHECK, STATUS, VERSION, GC)

ENV_COMMAND: Final = "CNI_COMMAND"
ENV_CONTAINERID: Final = "CNI_CONTAINERID"
ENV_NETNS: Final = "CNI_NETNS"
ENV_IFNAME: Final = "CNI_IFNAME"
ENV_ARGS: Final = "CNI_ARGS"
ENV_PATH: Final = "CNI_PATH"
CNI_ENV_KEYS: Final = (ENV_COMMAND, ENV_CONTAINERID, ENV_NETNS, ENV_IFNAME, ENV_ARGS, ENV_PATH)

# Keys the runtime puts into CNI_ARGS for Kubernetes pods.
ARG_POD_NAMESPACE: Final = "K8S_POD_NAMESPACE"
ARG_POD_NAME: Final = "K8S_POD_NAME"
ARG_POD_UID: Final = "K8S_POD_UID"
ARG_INFRA_CONTAINER_ID: Final = "K8S_POD_INFRA_CONTAINER_ID"

VALID_ATTACHMENTS_KEY: Final = "cni.dev/valid-attachments"
# libcni also injects this misspelled key (containernetworking/cni#1101); read both.
LEGACY_ATTACHMENTS_KEY: Final = "cni.dev/attachments"

_CONTAINER_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_NETWORK_NAME_RE: Final = _CONTAINER_ID_RE
# Runtimes use 64 hex digits. The store names a directory after the ID (NAME_MAX is 255 bytes,
# and its quarantine names add ~50 more): ADD and CHECK refuse anything longer than this.
MAX_CONTAINER_ID: Final = 128
IFNAMSIZ: Final = 16  # kernel limit including the trailing NUL
_NS_GET_NSTYPE: Final = 0xB703  # _IO(0xb7, 0x3), linux/nsfs.h
_CLONE_NEWNET: Final = 0x40000000


def version_key(version: str) -> tuple[int, ...]:
    """Order versions numerically; an unparsable version sorts first."""
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return (-1,)


def at_least(version: str, minimum: str) -> bool:
    return version_key(version) >= version_key(minimum)


def require_supported(version: str, *, what: str = "config") -> str:
    if version not in SUPPORTED_VERSIONS:
        raise IncompatibleVersion(
            f"{what} has cniVersion {version!r}; Plexus supports {', '.join(SUPPORTED_VERSIONS)}",
        )
    return version


def pick_version(wanted: str, supported: list[str] | tuple[str, ...]) -> str | None:
    """The version to speak to a delegate: `wanted` if it supports it, else the highest it
    supports that is not newer than `wanted` (a 1.0.0 plugin under a 1.1.0 network)."""
    if wanted in supported:
        return wanted
    older = [v for v in supported if version_key(v) <= version_key(wanted)]
    return max(older, key=version_key) if older else None


def valid_ifname(name: str) -> bool:
    """The kernel's dev_valid_name(): 1..15 bytes, not '.'/'..', no '/', ':' or whitespace;
    and, stricter, no NUL (the kernel would see a shorter name) and no leading '.': the
    attachment store names a record after the interface, and a dot file is a temp file there,
    so its DEL would never find it (the fuzz tier's finding: ADD of ".0" leaked on DEL)."""
    if not name or name.startswith(".") or "\0" in name:
        return False
    try:
        if len(name.encode()) >= IFNAMSIZ:
            return False
    except UnicodeEncodeError:  # a lone surrogate: not a name any kernel call can take
        return False
    return not any(c in "/:" or c.isspace() for c in name)


def valid_container_id(cid: str) -> bool:
    # fullmatch: with match(), `$` also matched before a final newline ("c1\n" was valid).
    return bool(_CONTAINER_ID_RE.fullmatch(cid))


def valid_network_name(name: str) -> bool:
    return bool(_NETWORK_NAME_RE.fullmatch(name))


def is_netns(path: str) -> bool:
    """True when `path` opens as a network namespace (nsfs, type CLONE_NEWNET)."""
    try:
        # NOTE: O_NONBLOCK: a path naming a FIFO would otherwise block open() for ever.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, _NS_GET_NSTYPE) == _CLONE_NEWNET
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL):
            return False
        raise
    finally:
        os.close(fd)


def parse_cni_args(raw: str) -> dict[str, str]:
    """CNI_ARGS as an unordered set of K=V pairs (containerd sends them in random order)."""
    out: dict[str, str] = {}
    for raw_item in raw.split(";"):
        item = raw_item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidEnvironment(
                f"CNI_ARGS item {item!r} is not of the form KEY=VALUE (CNI_ARGS={raw!r})",
            )
        out[key] = value
    return out


def format_cni_args(args: Mapping[str, str]) -> str:
    return ";".join(f"{k}={v}" for k, v in args.items())


@dataclass(frozen=True, slots=True)
class CniRequest:
    """One decoded CNI invocation, as the runtime made it."""

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: Mapping[str, str] = field(default_factory=dict)
    raw_args: str = ""
    path: tuple[str, ...] = ()
    config: Mapping[str, Any] = field(default_factory=dict)
    cni_version: str = LATEST_VERSION

    @property
    def pod_namespace(self) -> str:
        return self.args.get(ARG_POD_NAMESPACE, "")

    @property
    def pod_name(self) -> str:
        return self.args.get(ARG_POD_NAME, "")

    @property
    def pod_uid(self) -> str:
        return self.args.get(ARG_POD_UID, "")

    def env(self) -> dict[str, str]:
        """The CNI_* environment this request came with (for the spool and for logs)."""
        return {
            ENV_COMMAND: self.command,
            ENV_CONTAINERID: self.container_id,
            ENV_NETNS: self.netns,
            ENV_IFNAME: self.ifname,
            ENV_ARGS: self.raw_args,
            ENV_PATH: os.pathsep.join(self.path),
        }


def decode_config(stdin: bytes | str) -> dict[str, Any]:
    try:
        data = jsontext.loads(stdin or b"{}")
    except jsontext.JsonRefused as exc:
        raise DecodeFailure(f"network configuration on stdin is refused: {exc}") from None
    except ValueError as exc:  # also UnicodeDecodeError: bytes that are not UTF-8
        raise DecodeFailure(f"network configuration on stdin is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DecodeFailure("network configuration on stdin must be a JSON object")
    return data


def parse_request(
    environ: Mapping[str, str], stdin: bytes | str, *, check_netns: bool = True
) -> CniRequest:
    """Decode and validate one invocation; raises a PlexusError with the spec's code."""
    command = environ.get(ENV_COMMAND, "")
    if command not in COMMANDS:
        raise InvalidEnvironment(
            f"CNI_COMMAND={command!r} is not one of {', '.join(COMMANDS)}",
        )
    config = decode_config(stdin)
    version = config.get("cniVersion")
    if command == VERSION:
        return CniRequest(command=command, config=config, cni_version=str(version or ""))
    if not isinstance(version, str):
        raise IncompatibleVersion(
            f"network configuration has no cniVersion; Plexus supports "
            f"{', '.join(SUPPORTED_VERSIONS)}",
        )
    require_supported(version)
    _require_verb_version(command, version)
    _require_text(environ)
    raw_args = environ.get(ENV_ARGS, "")
    # Only ADD, DEL and CHECK concern a container (the spec gives GC and STATUS none): a GC
    # that named one took that container's hold in the daemon and then waited for the
    # exclusive hold behind itself, wedging every later ADD and DEL.
    attached = command in (ADD, DEL, CHECK)
    req = CniRequest(
        command=command,
        container_id=environ.get(ENV_CONTAINERID, "") if attached else "",
        netns=environ.get(ENV_NETNS, "") if attached else "",
        ifname=environ.get(ENV_IFNAME, "") if attached else "",
        args=parse_cni_args(raw_args),
        raw_args=raw_args,
        path=tuple(p for p in environ.get(ENV_PATH, "").split(os.pathsep) if p),
        config=config,
        cni_version=version,
    )
    _validate_env(req, check_netns=check_netns)
    return req


def _require_verb_version(command: str, version: str) -> None:
    minimum = {CHECK: "0.4.0", GC: "1.1.0", STATUS: "1.1.0"}.get(command)
    if minimum and not at_least(version, minimum):
        raise IncompatibleVersion(
            f"{command} needs cniVersion {minimum} or later; the config says {version}",
        )


def _require_text(environ: Mapping[str, str]) -> None:
    """Every CNI_* value is text without NUL. The Python shim forwards a byte that is not
    UTF-8 as a lone surrogate (os.environ's surrogateescape), which cannot be encoded again:
    it used to fail deep inside (a record write, after its directory existed) as a 999. A NUL
    cannot be in a real environment value and fails every path and netlink call."""
    for key in CNI_ENV_KEYS:
        value = environ.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise InvalidEnvironment(f"{key} must be a string, not {type(value).__name__}")
        if "\0" in value:
            raise InvalidEnvironment(f"{key}={value!r} holds a NUL byte")
        try:
            value.encode()
        except UnicodeEncodeError:
            raise InvalidEnvironment(
                f"{key}={value!r} is not valid UTF-8 (it holds bytes the runtime's environment "
                "could not decode)",
            ) from None


def _validate_env(req: CniRequest, *, check_netns: bool) -> None:
    if req.command not in (ADD, DEL, CHECK):
        return
    if not req.container_id:
        raise InvalidEnvironment("CNI_CONTAINERID is required for " + req.command)
    if not valid_container_id(req.container_id):
        raise InvalidEnvironment(
            f"CNI_CONTAINERID={req.container_id!r} must start with a letter or digit and contain "
            "only letters, digits, '_', '.' and '-'",
        )
    # DEL of a longer ID is a no-op (the store finds nothing): ADD never accepted one.
    if req.command != DEL and len(req.container_id) > MAX_CONTAINER_ID:
        raise InvalidEnvironment(
            f"CNI_CONTAINERID is {len(req.container_id)} characters long; Plexus takes at most "
            f"{MAX_CONTAINER_ID} (runtimes use 64)",
        )
    if not req.ifname:
        raise InvalidEnvironment("CNI_IFNAME is required for " + req.command)
    if "\ufffd" in req.ifname:
        raise InvalidEnvironment(
            f"CNI_IFNAME={req.ifname!r} is not valid UTF-8: U+FFFD stands for bytes a decoder "
            "could not read, so the name the runtime asked for is lost",
        )
    if not valid_ifname(req.ifname):
        raise InvalidEnvironment(
            f"CNI_IFNAME={req.ifname!r} is not a legal interface name: 1 to {IFNAMSIZ - 1} "
            "bytes, not starting with '.', without '/', ':', NUL or whitespace",
        )
    if req.command == DEL:
        return
    if not req.netns:
        raise InvalidEnvironment("CNI_NETNS is required for " + req.command)
    if check_netns and not is_netns(req.netns):
        raise InvalidEnvironment(
            f"CNI_NETNS={req.netns!r} is not a network namespace (missing, or not an nsfs file "
            "of type net)",
        )


# --- results ----------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)


class Interface(_Model):
    name: str
    mac: str | None = None
    mtu: int | None = None
    sandbox: str | None = None
    socket_path: str | None = Field(default=None, alias="socketPath")
    pci_id: str | None = Field(default=None, alias="pciID")


class IPConfig(_Model):
    address: str
    gateway: str | None = None
    interface: int | None = None

    @field_validator("address")
    @classmethod
    def _cidr(cls, value: str) -> str:
        ipaddress.ip_interface(value)  # ValueError -> a malformed result, rejected at the door
        return value

    @field_validator("gateway")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        if value:
            ipaddress.ip_address(value)
        return value

    @property
    def ip(self) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
        return ipaddress.ip_interface(self.address)


class Route(_Model):
    dst: str
    gw: str | None = None
    mtu: int | None = None
    advmss: int | None = None
    priority: int | None = None
    table: int | None = None
    scope: int | None = None


class DNS(_Model):
    nameservers: list[str] = Field(default_factory=list)
    domain: str | None = None
    search: list[str] = Field(default_factory=list)
    options: list[str] = Field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.nameservers or self.domain or self.search or self.options)


_V11_INTERFACE_KEYS: Final = ("mtu", "socketPath", "pciID")
_V11_ROUTE_KEYS: Final = ("mtu", "advmss", "priority", "table", "scope")


class Result(_Model):
    """A CNI result in the canonical (1.1.0) shape."""

    interfaces: list[Interface] = Field(default_factory=list)
    ips: list[IPConfig] = Field(default_factory=list)
    routes: list[Route] = Field(default_factory=list)
    dns: DNS = Field(default_factory=DNS)

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Result:
        """Read a result of any known version (0.1.0 .. 1.1.0)."""
        version = str(data.get("cniVersion", "0.1.0"))
        if version not in KNOWN_VERSIONS:
            raise IncompatibleVersion(f"result has unknown cniVersion {version!r}")
        body = dict(data)
        if not at_least(version, "0.3.0"):
            body = _upgrade_020(body)
        try:
            return cls.model_validate(body)
        except ValidationError as exc:
            raise DecodeFailure(f"malformed CNI result: {_first_error(exc)}") from None

    def to_wire(self, version: str) -> dict[str, Any]:
        """Render for a caller speaking `version` (0.1.0 .. 1.1.0; the runtime never asks for
        less than 0.3.0, a plugin of a 0.2.0 network gets its prevResult so)."""
        if version in PRE_030_VERSIONS:
            return _downgrade_020(self, version)
        require_supported(version, what="result")
        out: dict[str, Any] = {"cniVersion": version}
        v11 = at_least(version, "1.1.0")
        if self.interfaces:
            out["interfaces"] = [
                _strip(
                    i.model_dump(by_alias=True, exclude_none=True),
                    () if v11 else _V11_INTERFACE_KEYS,
                )
                for i in self.interfaces
            ]
        if self.ips:
            ips = [ip.model_dump(exclude_none=True) for ip in self.ips]
            if not at_least(version, "1.0.0"):
                for rendered, ip in zip(ips, self.ips, strict=True):
                    rendered["version"] = str(ip.ip.version)
            out["ips"] = ips
        if self.routes:
            out["routes"] = [
                _strip(r.model_dump(exclude_none=True), () if v11 else _V11_ROUTE_KEYS)
                for r in self.routes
            ]
        if not self.dns.is_empty():
            out["dns"] = self.dns.model_dump(exclude_none=True, exclude_defaults=True)
        else:
            out["dns"] = {}
        return out

    def sandbox_interfaces(self) -> list[tuple[int, Interface]]:
        return [(i, itf) for i, itf in enumerate(self.interfaces) if itf.sandbox]


def _strip(d: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    for key in keys:
        d.pop(key, None)
    return d


def _upgrade_020(body: dict[str, Any]) -> dict[str, Any]:
    """0.1.0/0.2.0 `ip4`/`ip6` blocks to `ips` + `routes` (libcni's 020 -> 040 converter):
    ip4 first, no interfaces and no interface index (a pre-0.3.0 result names none)."""
    ips: list[dict[str, Any]] = []
    routes: list[Any] = []
    for key in ("ip4", "ip6"):
        block = body.pop(key, None)
        if block is None:
            continue
        if not isinstance(block, dict) or not isinstance(block.get("ip"), str):
            raise DecodeFailure(f"malformed CNI {body.get('cniVersion')} result: {key} has no 'ip'")
        ips.append({"address": block["ip"], "gateway": block.get("gateway")})
        block_routes = block.get("routes") or []
        if not isinstance(block_routes, list):
            raise DecodeFailure(f"malformed CNI result: {key}.routes is not a list")
        routes.extend(block_routes)
    body["ips"] = ips
    body["routes"] = routes
    body.pop("interfaces", None)
    return body


def _downgrade_020(result: Result, version: str) -> dict[str, Any]:
    """A result as 0.1.0/0.2.0 (libcni's converter to 0.2.x): the first address of each family
    with its gateway, each route under the block of its family; such a result must hold an
    address."""
    blocks: dict[int, dict[str, Any]] = {}
    for ip in result.ips:
        block = blocks.setdefault(ip.ip.version, {"ip": ip.address})
        if ip.gateway and block["ip"] == ip.address:
            block["gateway"] = ip.gateway
    if not blocks:
        raise IncompatibleVersion(
            f"a result without an IP address cannot be given to a cniVersion {version} plugin",
        )
    for route in result.routes:
        family = ipaddress.ip_network(route.dst, strict=False).version
        if family in blocks:
            blocks[family].setdefault("routes", []).append(
                route.model_dump(include={"dst", "gw"}, exclude_none=True)
            )
    out: dict[str, Any] = {"cniVersion": version}
    out |= {f"ip{family}": block for family, block in sorted(blocks.items())}
    out["dns"] = result.dns.model_dump(exclude_none=True, exclude_defaults=True)
    return out


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {err['msg']}" if loc else str(err["msg"])


# --- errors -----------------------------------------------------------------------------------


def to_cni_error(exc: BaseException, version: str = LATEST_VERSION) -> dict[str, Any]:
    """The one mapping from an exception to the CNI error JSON (internal errors become 999)."""
    if isinstance(exc, PlexusError):
        body = exc.to_dict()
    else:
        body = {"code": 999, "msg": f"internal error in Plexus: {type(exc).__name__}: {exc}"}
    return {"cniVersion": version if version in KNOWN_VERSIONS else LATEST_VERSION, **body}


def version_result(requested: str) -> dict[str, Any]:
    return {
        "cniVersion": requested if requested in SUPPORTED_VERSIONS else LATEST_VERSION,
        "supportedVersions": list(SUPPORTED_VERSIONS),
    }


def require_object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidConfig(f"{what} must be a JSON object")
    return value
