"""The VF pool's spec as the node admin writes it: which VFs a pool takes (`Selectors`), what it
gives them (`PoolSpec`), the pools file (`PoolsFile`) and the device-plugin names derived from a
pool. Ground floor because both sides read it: the node agent (`sriov.pools` matches it against the
inventory) and the cluster controller (`nad_controller`, VFPool objects and admission checks).
Pure: no sysfs, no kernel, no API. Validators raise `invalid()` so that the pools file's errors
carry `file:line` (see `cnispec.yamllines`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from cnispec.yamllines import invalid

DeviceType = Literal["netdevice", "vfio-pci"]
SelectorLinkType = Literal["ether", "infiniband"]

MAX_VF_INDEX: Final = 65535  # NumVFs is a 16-bit field of the SR-IOV capability
_HEX_ID = re.compile(r"^[0-9a-f]{4}$")
_PCI = re.compile(r"^(?:([0-9a-f]{4,8}):)?([0-9a-f]{2}):([0-1][0-9a-f])\.([0-7])$")
_DNS_LABEL = re.compile(r"^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$")
_RESOURCE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")
_LINK_TYPES: Final[dict[str, SelectorLinkType]] = {
    "ether": "ether",
    "eth": "ether",
    "ethernet": "ether",
    "infiniband": "infiniband",
    "ib": "infiniband",
}


# --- selector values ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PfRef:
    """A PF named in `pfNames` (by netdev) or `rootDevices` (by PCI address), and which of its
    VFs (0-based indexes, inclusive ranges) the entry covers; `ranges` None means all."""

    key: str
    ranges: tuple[tuple[int, int], ...] | None = None

    def covers(self, index: int) -> bool:
        return self.ranges is None or any(lo <= index <= hi for lo, hi in self.ranges)

    def __str__(self) -> str:
        if self.ranges is None:
            return self.key
        return self.key + "#" + ",".join(f"{a}-{b}" if a != b else str(a) for a, b in self.ranges)


def parse_ranges(text: str, entry: str) -> tuple[tuple[int, int], ...]:
    """ "0-3,6" -> ((0, 3), (6, 6)). `entry` is the whole selector, for the messages."""
    ranges: list[tuple[int, int]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            raise invalid(f"{entry!r} has an empty VF range (write e.g. name#0-3,6)")
        if part.startswith("-") or "--" in part:
            raise invalid(f"{entry!r} has a negative VF index: VF indexes start at 0")
        bounds = part.split("-")
        if len(bounds) > 2 or not all(b.isascii() and b.isdigit() for b in bounds):
            raise invalid(f"{entry!r}: {part!r} is not a VF index or range (digits, 'a-b')")
        lo, hi = int(bounds[0]), int(bounds[-1])
        if lo > hi:
            raise invalid(f"{entry!r} has a range that runs backwards")
        if hi > MAX_VF_INDEX:
            raise invalid(f"{entry!r}: VF index {hi} is beyond {MAX_VF_INDEX}")
        ranges.append((lo, hi))
    return tuple(ranges)


def _split_ref(value: object, what: str) -> tuple[str, tuple[tuple[int, int], ...] | None]:
    if not isinstance(value, str):
        raise invalid(f"{value!r} is not a {what} (write it as a string)")
    key, sep, ranges = value.strip().partition("#")
    return key, parse_ranges(ranges, value) if sep else None


def _pf_name(value: object) -> PfRef:
    name, ranges = _split_ref(value, "PF name")
    if not 0 < len(name) <= 15 or "/" in name or any(c.isspace() for c in name):
        raise invalid(f"{value!r}: {name!r} is not a netdev name (1-15 characters, no / or space)")
    return PfRef(name, ranges)


def normalize_pci(text: str) -> str | None:
    """'0000:3B:00.0' -> '0000:3b:00.0', '3b:00.0' -> '0000:3b:00.0'; None when not an address."""
    match = _PCI.match(text.strip().lower())
    if match is None:
        return None
    domain, bus, dev, fn = match.groups()
    return f"{domain or '0000'}:{bus}:{dev}.{fn}"


def _root_device(value: object) -> PfRef:
    address, ranges = _split_ref(value, "PCI address")
    pci = normalize_pci(address)
    if pci is None:
        raise invalid(f"{value!r}: {address!r} is not a PCI address like 0000:3b:00.0")
    return PfRef(pci, ranges)


def _hex_id(value: object) -> str:
    # An unquoted 8086 reaches us as an int; the loader keeps 0x8086 a string.
    text = str(value) if isinstance(value, str | int) and not isinstance(value, bool) else ""
    text = text.strip().lower().removeprefix("0x")
    if not _HEX_ID.match(text):
        raise invalid(f'{value!r} is not a PCI id: 4 hex digits, like "8086" or "0x8086"')
    return text


def _driver(value: object) -> str:
    if not isinstance(value, str) or not value or "/" in value or any(c.isspace() for c in value):
        raise invalid(f"{value!r} is not a driver name (as in /sys/bus/pci/drivers/)")
    return value


def _link_type(value: object) -> SelectorLinkType:
    found = _LINK_TYPES.get(value.strip().lower()) if isinstance(value, str) else None
    if found is None:
        raise invalid(f"{value!r} is not a link type: use ether (eth) or infiniband (ib)")
    return found


def _non_empty(entries: tuple[Any, ...]) -> tuple[Any, ...]:
    if not entries:
        raise invalid("an empty list matches nothing: list at least one entry, or leave it out")
    return entries


_HexIds = Annotated[tuple[Annotated[str, PlainValidator(_hex_id)], ...], AfterValidator(_non_empty)]
_Drivers = Annotated[
    tuple[Annotated[str, PlainValidator(_driver)], ...], AfterValidator(_non_empty)
]
_LinkTypes = Annotated[
    tuple[Annotated[str, PlainValidator(_link_type)], ...], AfterValidator(_non_empty)
]
_PfNames = Annotated[
    tuple[Annotated[PfRef, PlainValidator(_pf_name), PlainSerializer(str)], ...],
    AfterValidator(_non_empty),
]
_RootDevices = Annotated[
    tuple[Annotated[PfRef, PlainValidator(_root_device), PlainSerializer(str)], ...],
    AfterValidator(_non_empty),
]


# --- models -------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True
    )


class Selectors(_Model):
    """Which VFs a pool takes: every field given must match (AND), any entry of a field may
    (OR). VF ranges in pfNames/rootDevices are 0-based VF indexes (the N of virtfnN)."""

    # None: the field does not select; an empty list would match nothing, so it is refused.
    vendors: _HexIds | None = None
    devices: _HexIds | None = None
    drivers: _Drivers | None = None
    pf_names: _PfNames | None = None
    root_devices: _RootDevices | None = None
    link_types: _LinkTypes | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> Selectors:
        if all(getattr(self, name) is None for name in type(self).model_fields):
            raise invalid(
                "empty selectors match no VF: give at least one of vendors, devices, drivers, "
                "pfNames, rootDevices, linkTypes"
            )
        return self

    @property
    def picks_pfs(self) -> bool:
        # Only a PF named by address or name may have sriov_numvfs written: a vendor alone
        # would also pick the node's uplink, and a numVfs write resets a PF (its link drops).
        return bool(self.pf_names or self.root_devices)


class PoolSpec(_Model):
    resource_name: str
    selectors: Selectors
    device_type: DeviceType = "netdevice"
    num_vfs: int | None = Field(default=None, ge=0, le=MAX_VF_INDEX + 1)
    mtu: int | None = Field(default=None, ge=68, le=9702)

    @field_validator("resource_name")
    @classmethod
    def _resource_name(cls, value: str) -> str:
        problem = resource_name_problem(value)
        if problem:
            raise invalid(f"{value!r} {problem}")
        return value

    @model_validator(mode="after")
    def _num_vfs_needs_pfs(self) -> PoolSpec:
        if self.num_vfs is not None and not self.selectors.picks_pfs:
            raise invalid(
                "numVfs needs rootDevices or pfNames in the selectors, to say which PFs get "
                "that many VFs (writing sriov_numvfs resets a PF, so never by vendor alone)",
                at=("numVfs",),
            )
        return self


def resource_name_problem(value: str) -> str:
    """What is wrong with a device-plugin resource name ('' when nothing): kubelet takes
    `<DNS subdomain>/<name>`."""
    prefix, sep, name = value.partition("/")
    if not sep:
        return "is not a resource name like plexus.dev/intel_vf (prefix/name)"
    labels = prefix.split(".")
    if len(prefix) > 253 or not all(_DNS_LABEL.match(x) for x in labels):
        return f"has prefix {prefix!r}: it must be a lowercase DNS subdomain like plexus.dev"
    # kubelet refuses these for extended resources (IsExtendedResourceName): native
    # kubernetes.io names, and "requests." which quota reserves.
    if prefix == "kubernetes.io" or prefix.endswith(".kubernetes.io"):
        return f"has prefix {prefix!r}: kubernetes.io names are kubelet's own, not a device's"
    if value.startswith("requests."):
        return "starts with 'requests.', which Kubernetes reserves for quota"
    if not _RESOURCE.match(name):
        return f"has name {name!r}: 1-63 of A-Z a-z 0-9 _ . -, starting and ending alphanumeric"
    return ""


class PoolsFile(_Model):
    pools: tuple[PoolSpec, ...]

    @model_validator(mode="after")
    def _unique_names(self) -> PoolsFile:
        first: dict[str, int] = {}
        envs: dict[str, int] = {}
        for i, pool in enumerate(self.pools):
            seen = first.setdefault(pool.resource_name, i)
            if seen != i:
                raise invalid(
                    f"{pool.resource_name!r} is already the resourceName of pools[{seen}]: "
                    "resourceNames must be unique",
                    at=("pools", i, "resourceName"),
                )
            env = env_name(pool.resource_name)
            seen = envs.setdefault(env, i)
            if seen != i:
                raise invalid(
                    f"{pool.resource_name!r} and pools[{seen}]'s resourceName "
                    f"{self.pools[seen].resource_name!r} give pods the same variable {env}: "
                    "rename one",
                    at=("pools", i, "resourceName"),
                )
        return self

    def pool(self, resource_name: str) -> PoolSpec | None:
        return next((p for p in self.pools if p.resource_name == resource_name), None)


def env_name(resource_name: str) -> str:
    """The environment variable kubelet sets with a pod's device IDs of this resource, named as
    the SR-IOV device plugin names it: plexus.dev/intel_vf -> PCIDEVICE_PLEXUS_DEV_INTEL_VF."""
    return "PCIDEVICE_" + re.sub(r"[./-]", "_", resource_name).upper()
