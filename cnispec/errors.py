"""Typed errors of Plexus, each carrying the CNI error code it maps to.

Every failure that reaches a runtime is one of these; `cnispec.cni.to_cni_error` is the single
place that turns an exception into the CNI error JSON. Codes below 100 are the CNI spec's; codes
from 100 up are Plexus's own and are documented in docs/errors.md (keep the two in step: a unit
test compares them).
"""

from __future__ import annotations

from typing import Any, ClassVar, Self


class PlexusError(Exception):
    """Root of every error Plexus raises on purpose.

    `msg` is for a human (what went wrong and what to do); `details` carries machine detail such as
    a delegate's own error JSON. Tracebacks never go into either. The code is the class's: to
    add context to an error, or fold several into one, keep its class (`with_msg`, `prefixed`).
    """

    cni_code: ClassVar[int] = 999

    def __init__(self, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.msg = msg
        self.details = details

    @property
    def code(self) -> int:
        return self.cni_code

    def with_msg(self, msg: str, details: str | None = None) -> Self:
        """The same error (class, so code) with another message, and details when given."""
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.args = (msg,)
        clone.msg = msg
        if details is not None:
            clone.details = details
        return clone

    def prefixed(self, context: str) -> Self:
        """The same error with `context: ` before its message (which network, which VF)."""
        return self.with_msg(f"{context}: {self.msg}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


# --- CNI spec codes ---------------------------------------------------------------------------


class IncompatibleVersion(PlexusError):
    cni_code = 1


class UnsupportedField(PlexusError):
    cni_code = 2


class UnknownContainer(PlexusError):
    cni_code = 3


class InvalidEnvironment(PlexusError):
    cni_code = 4


class IOFailure(PlexusError):
    cni_code = 5


class DecodeFailure(PlexusError):
    cni_code = 6


class InvalidConfig(PlexusError):
    cni_code = 7


class TryAgainLater(PlexusError):
    """Transient: the caller should retry (overload, API or daemon unavailable)."""

    cni_code = 11


class NotReady(PlexusError):
    """STATUS: Plexus cannot serve ADD yet."""

    cni_code = 50


# --- Plexus codes (>= 100), documented in docs/errors.md ----------------------------------------


class DelegateFailed(PlexusError):
    """A delegate plugin failed; `details` holds its own error JSON."""

    cni_code = 101


class NetworkNotFound(PlexusError):
    """A requested NetworkAttachmentDefinition or CNI config does not exist."""

    cni_code = 102


class NetworkNotPermitted(PlexusError):
    """Namespace isolation forbids the pod from using the requested network."""

    cni_code = 103


class PluginNotFound(PlexusError):
    """A delegate's `type` names no executable on the CNI path and no built-in."""

    cni_code = 104


class TeardownIncomplete(PlexusError):
    """DEL or GC could not remove every attachment; the rest stay recorded for a retry."""

    cni_code = 105


class PodNotFound(PlexusError):
    """Cluster mode: the pod named in CNI_ARGS is unknown to the API."""

    cni_code = 106


class AttachmentConflict(PlexusError):
    """ADD for a container that already has live attachments (DEL it first)."""

    cni_code = 107


class DelegateTimeout(PlexusError):
    """A delegate plugin did not answer in time and was killed."""

    cni_code = 108


class KernelUnsupported(PlexusError):
    """The running kernel lacks a feature a delegate needs (a link kind such as ipvlan)."""

    cni_code = 109


class CheckFailed(PlexusError):
    """CHECK found an interface, address, route or rule of the pod missing or different."""

    cni_code = 110


class DeviceUnavailable(PlexusError):
    """No VF can be given: the pool has no free, healthy VF, or the VF kubelet granted is held
    by another pod or is unhealthy."""

    cni_code = 111


class DeviceNotFound(PlexusError):
    """A `deviceID` (or a pool's `resourceName`) names no VF of this node's inventory."""

    cni_code = 112


class DeviceSettingUnsupported(PlexusError):
    """The PF's driver refused a VF setting the NAD asks for (vlan, trust, rates, ...)."""

    cni_code = 113


class InternalError(PlexusError):
    cni_code = 999


# Codes of our own, with the one-line meaning shown in docs/errors.md.
PLEXUS_CODES: dict[int, type[PlexusError]] = {
    cls.cni_code: cls
    for cls in (
        DelegateFailed,
        NetworkNotFound,
        NetworkNotPermitted,
        PluginNotFound,
        TeardownIncomplete,
        PodNotFound,
        AttachmentConflict,
        DelegateTimeout,
        KernelUnsupported,
        CheckFailed,
        DeviceUnavailable,
        DeviceNotFound,
        DeviceSettingUnsupported,
    )
}
