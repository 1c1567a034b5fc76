"""`k8s.v1.cni.cncf.io/network-status` (NPWG v1.3 §5) and where it goes.

`network_status()` builds the annotation value from attachment records: one entry per
attachment, in attachment order (cluster network, defaultNetworks, the annotation's), taken from
the first sandbox interface of its result (the one named like the attachment when there is one),
`default: true` on the cluster network only. A result with no sandbox interface, as every
pre-0.3.0 result (`ip4`/`ip6`, no interfaces list), gives the addresses that name no interface
and the interface the plugin was told to make (CNI_IFNAME), and no `mac` (§5.3). Keys are the
spec's only: no `gateway` or `mtu` as Multus's NAD client adds (docs/annotations.md). A `StatusSink`
publishes it: to the pod through the API in cluster mode (`metaplugin.k8s`), nowhere in local
mode, where `plexusctl` reads the same JSON from the daemon.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any, Final, Protocol

from cnispec.cni import Interface, Result
from cnispec.errors import PlexusError
from cnispec.identity import PodInfo
from metaplugin.store import Attachment

DEVICE_INFO_VERSION: Final = "1.1.0"


def _pick_interface(result: Result, ifname: str) -> tuple[int, Interface] | None:
    sandbox = result.sandbox_interfaces()
    for index, itf in sandbox:
        if itf.name == ifname:
            return index, itf
    return sandbox[0] if sandbox else None


DeviceInfo = Callable[[str], dict[str, str]]


def _pci_only(pci: str) -> dict[str, str]:
    return {"pci-address": pci}


def entry(record: Attachment, device_info: DeviceInfo = _pci_only) -> dict[str, Any]:
    out: dict[str, Any] = {"name": record.network, "interface": record.ifname}
    if record.result is not None:
        out |= _from_result(record.result, record.ifname, device_info)
    out["default"] = record.is_default
    if record.default_route:
        out["default-route"] = list(record.default_route)
    return out


def _from_result(result: Result, ifname: str, device_info: DeviceInfo) -> dict[str, Any]:
    """§5.3 keys a result gives: the picked sandbox interface's name, mac and device, the
    addresses on it (else those that name no interface: all of a pre-0.3.0 result's), dns."""
    out: dict[str, Any] = {}
    picked = _pick_interface(result, ifname)
    index = picked[0] if picked else None
    ips = [ip for ip in result.ips if ip.interface == index]
    if not ips:
        ips = [ip for ip in result.ips if ip.interface is None]
    if ips:
        out["ips"] = [str(ipaddress.ip_interface(ip.address).ip) for ip in ips]
    if picked:
        out["interface"] = picked[1].name  # with or without a mac (§5.3: mac needs interface)
        if picked[1].mac:
            out["mac"] = picked[1].mac
        if picked[1].pci_id:
            out["device-info"] = {
                "type": "pci",
                "version": DEVICE_INFO_VERSION,
                "pci": device_info(picked[1].pci_id),
            }
    if not result.dns.is_empty():
        out["dns"] = result.dns.model_dump(exclude_none=True, exclude_defaults=True)
    return out


def network_status(
    records: Iterable[Attachment], device_info: DeviceInfo = _pci_only
) -> list[dict[str, Any]]:
    return [entry(r, device_info) for r in records if r.state == "added"]


def added_interface_message(record: Attachment) -> str:
    ips = [ip.address for ip in record.result.ips] if record.result else []
    return f"Add {record.ifname} [{', '.join(ips)}] from {record.network}"


class StatusSink(Protocol):
    """Where network-status and pod events go."""

    def attached(self, pod: PodInfo, status: list[dict[str, Any]], messages: list[str]) -> None: ...

    def network_not_found(self, pod: PodInfo, message: str) -> None: ...

    def teardown_abandoned(self, pod: PodInfo, message: str) -> None:
        """A DEL that cannot succeed was given up (a Warning Event on the pod): `message` says
        which attachment, why, what Plexus released itself and where its record is kept."""
        ...

    def add_failed(self, pod: PodInfo, error: PlexusError) -> None:
        """An ADD failed (a Warning Event on the pod: the CNI code, the network, the message).
        Queued: the CNI answer never waits for the API."""
        ...


class NullSink:
    """Local mode: nothing to publish; plexusctl reads status from the daemon."""

    def attached(self, pod: PodInfo, status: list[dict[str, Any]], messages: list[str]) -> None:
        return None

    def network_not_found(self, pod: PodInfo, message: str) -> None:
        return None

    def teardown_abandoned(self, pod: PodInfo, message: str) -> None:
        return None  # the daemon's log line (`teardown_abandoned`) says it all

    def add_failed(self, pod: PodInfo, error: PlexusError) -> None:
        return None  # the runtime has the CNI error itself
