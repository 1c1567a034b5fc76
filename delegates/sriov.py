"""`plexus-sriov`: a VF of the node's SR-IOV NICs as a pod interface, with sriov-cni's config
keys (deviceID, vlan, vlanQoS, vlanProto, mac, spoofchk, trust, link_state, min_tx_rate,
max_tx_rate, ipam), so switching a NAD is changing its `type`.

Every VF state change goes through the node agent (`sriov.owner.VfOwner`), which records what
to put back before ADD changes anything. ADD changes only the PF-side settings the NAD sets,
moves the VF netdev into the pod (`sriov.netdev`), configures it and lets the kernel announce
it; DEL and the audit share `sriov.release.release_vf`, which puts everything back. vfio-pci
VFs have no netdev: only their PF-side settings are applied, and the orchestrator reports them
in network-status `device-info`. Built by `delegates.builtins`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import Any

import structlog

from cnispec import failpoints
from cnispec.builtin_conf import SriovConf as _SriovKeys
from cnispec.cni import Interface, Result
from cnispec.errors import CheckFailed, DeviceUnavailable, InvalidConfig, PlexusError
from cnispec.identity import Holder
from delegates import _multicast
from delegates._common import best_effort, parse
from delegates._garp import announce_on_up
from delegates._iface import check as check_iface
from delegates._iface import configure, result_for
from delegates._ipam import Ipam
from delegates.plugin import BuiltinPlugin, PluginRequest
from kernel.netlink import Netlink
from sriov import vfconfig
from sriov.netdev import alias_host_name, move_into_pod, put_back, vf_alias
from sriov.owner import Placement, VfOwner
from sriov.records import HostState, VfSettings
from sriov.release import release_attachment

log = structlog.get_logger(__name__)


class SriovConf(_SriovKeys):
    """sriov-cni's keys (`cnispec.builtin_conf.SriovConf`) and the PF-side settings they set."""

    def pf_side(self, mac: str | None) -> VfSettings:
        """The PF-side settings this NAD sets (None: left as the VF has it)."""
        return VfSettings(
            mac=mac,
            vlan=self.vlan,
            qos=self.vlan_qos,
            vlan_proto=self.vlan_proto,
            spoofchk=None if self.spoofchk is None else self.spoofchk == "on",
            # A multicast VF must be trusted: PF drivers filter multicast for untrusted VFs.
            trust=(True if self.multicast else None) if self.trust is None else self.trust == "on",
            link_state=self.link_state,
            min_tx_rate=self.min_tx_rate,
            max_tx_rate=self.max_tx_rate,
        )

    def wanted_mac(self, runtime_config: Mapping[str, Any]) -> str | None:
        mac = runtime_config.get("mac") or self.mac  # the pod's request wins
        return str(mac).lower() if mac else None


def read_pf_side(placement: Placement, *, needed: bool) -> VfSettings:
    """The VF's PF-side settings now; empty when the PF has no netdev and the NAD sets none."""
    if placement.pf.netdev is None:
        if needed:
            raise DeviceUnavailable(
                f"VF {placement.vf.pci}: its PF {placement.pf.pci} has no netdev in the node's "
                "namespace, so its VF settings cannot be changed; bind the PF to its network "
                "driver or remove the VF settings from the NAD"
            )
        return VfSettings()
    return vfconfig.read_vf(placement.pf.netdev, placement.vf.index)


class Sriov(BuiltinPlugin):
    type = "plexus-sriov"

    def __init__(self, *, ipam: Ipam, owner: VfOwner | None) -> None:
        self._ipam = ipam
        self._owner = owner

    def _vf_owner(self) -> VfOwner:
        if self._owner is None:
            raise InvalidConfig(
                "plexus-sriov needs this node's VF pools: set `vfPools` in the daemon config"
            )
        return self._owner

    def add(self, req: PluginRequest) -> Result:
        conf = parse(SriovConf, req)
        if not conf.device_id:
            raise InvalidConfig(
                f"network {req.network_name}: plexus-sriov needs a VF: annotate the NAD with "
                "k8s.v1.cni.cncf.io/resourceName (a VF pool's name) so Plexus picks one, or set "
                "deviceID to a VF's PCI address"
            )
        placement = self._vf_owner().lookup(conf.device_id)
        with ExitStack() as undo:
            attach = _Attach(
                self._vf_owner(),
                placement,
                Holder.from_cni_args(req.container_id, req.ifname, req.netns, req.cni_args),
                undo,
            )
            if placement.device_type == "vfio-pci" or placement.vf.is_vfio:
                attach.pf_side(conf.pf_side(conf.wanted_mac(req.runtime_config)), host=None)
                iface = Interface(name=req.ifname, sandbox=req.netns, pci_id=placement.vf.pci)
                result = Result(interfaces=[iface])
            else:
                result = attach.netdev(conf, req, self._ipam)
            attach.done()
            undo.pop_all()
        return result

    def delete(self, req: PluginRequest) -> None:
        steps: list[Callable[[], None]] = []
        owner = self._owner
        rec = owner.held_by(req.container_id, req.ifname) if owner else None
        if owner is not None and rec is not None and rec.holder is not None:
            pci, holder = rec.pci, rec.holder
            steps.append(lambda: release_attachment(owner, pci, holder))
        if Ipam.configured(req.config):
            steps.append(lambda: self._ipam.delete(req))
        best_effort(req, *steps)

    def check(self, req: PluginRequest, prev: Result) -> None:
        conf = parse(SriovConf, req)
        owner = self._vf_owner()
        rec = owner.held_by(req.container_id, req.ifname)
        if rec is None:
            raise CheckFailed(f"no VF is recorded for {req.ifname} of this container")
        placement = owner.lookup(rec.pci)
        if rec.host is not None:
            with Netlink.open(req.netns) as pod:
                link = check_iface(pod, req.ifname, "", prev)
            if alias_host_name(link.alias, rec.pci) is None:
                raise CheckFailed(
                    f"interface {req.ifname} is not VF {rec.pci} (alias {link.alias!r})"
                )
        wanted = conf.pf_side(conf.wanted_mac(req.runtime_config))
        self._check_pf_side(placement, wanted, rec.pf_applied)
        if Ipam.configured(req.config):
            self._ipam.check(req)

    @staticmethod
    def _check_pf_side(placement: Placement, wanted: VfSettings, applied: tuple[str, ...]) -> None:
        # The MAC is PF-side only where the driver takes one (see _Attach.pf_side).
        fields = [f for f in wanted.model_dump(exclude_none=True) if f != "mac" or f in applied]
        if not fields:
            return
        now = read_pf_side(placement, needed=True)
        differ = [
            f"{f} is {getattr(now, f)!r}, the NAD sets {getattr(wanted, f)!r}"
            for f in vfconfig.differences(wanted, now, fields)
        ]
        if differ:
            raise CheckFailed(
                f"VF {placement.vf.pci} PF-side settings differ: " + "; ".join(differ)
            )


class _Attach:
    """One ADD of a VF: the claim, then each change with its undo registered right after it
    succeeds (house rule 9). `broken` says why the VF could not be put back, if it could not."""

    def __init__(self, owner: VfOwner, placement: Placement, holder: Holder, undo: ExitStack):
        self.owner, self.placement, self.holder, self.undo = owner, placement, holder, undo
        self.pci = placement.vf.pci
        self.broken: list[str] = []
        owner.claim(self.pci, holder)
        undo.callback(_abandon, owner, self.pci, holder, self.broken)

    def pf_side(self, wanted: VfSettings, *, host: HostState | None) -> None:
        """Record what to put back (durably, before any change), then apply what the NAD sets."""
        placement = self.placement
        before = read_pf_side(placement, needed=bool(wanted.model_dump(exclude_none=True)))
        if before.mac is None:
            # The driver reports no PF-side MAC for its VFs (so sets none): the MAC only goes
            # on the netdev. Where it does, both are set, or spoofchk would drop the pod's frames.
            wanted = wanted.model_copy(update={"mac": None})
        fields = tuple(wanted.model_dump(exclude_none=True))
        self.owner.prepare(
            self.pci, self.holder, host=host, pf_before=before, pf_applied=fields, pf_set=wanted
        )
        if fields and placement.pf.netdev is not None:
            pf, index = placement.pf.netdev, placement.vf.index
            applied = vfconfig.apply(pf, index, wanted, before)
            self.undo.callback(self._restore_pf_side, before, applied)

    def _restore_pf_side(self, before: VfSettings, applied: tuple[str, ...]) -> None:
        """Undo of the PF-side settings. When it fails the VF must not go back to the pool with
        the NAD's VLAN or trust still on: `_abandon` marks it unhealthy, the audit retries."""
        assert self.placement.pf.netdev is not None
        pf, index = self.placement.pf.netdev, self.placement.vf.index
        try:
            vfconfig.restore(pf, index, before, applied)
        except PlexusError as exc:
            log.error("sriov_rollback_step_failed", step=f"VF {self.pci} PF-side", error=exc.msg)
            self.broken.append(f"its PF-side settings could not be put back: {exc.msg}")

    def netdev(self, conf: SriovConf, req: PluginRequest, ipam: Ipam) -> Result:
        vf = self.placement.vf
        if vf.netdev is None:
            raise DeviceUnavailable(
                f"VF {vf.pci} has no netdev in the node's namespace (driver "
                f"{vf.driver or 'none'}); bind it to its network driver or use a vfio-pci pool"
            )
        mac = conf.wanted_mac(req.runtime_config)
        with Netlink.open() as node:
            link = node.require(vf.netdev)
            host = HostState(
                name=link.name,
                mac=link.mac or None,
                mtu=link.mtu or None,
                alias=link.alias or None,
                up=link.up,
            )
            self.pf_side(conf.pf_side(mac), host=host)
            node.modify(link.index, alias=vf_alias(vf.pci, host.name), what=f"VF {host.name}")
        self.undo.callback(_put_back, vf.pci, self.holder, host, self.broken)
        move_into_pod(host.name, req.ifname, req.netns)
        failpoints.hit("sriov_vf_moved")
        addresses = Result()
        if Ipam.configured(req.config):
            addresses = ipam.add(req)
            self.undo.callback(_quietly, "IPAM", ipam.delete, req)
        with Netlink.open(req.netns) as pod:
            moved = pod.require(req.ifname)
            pod.modify(moved.index, mac=mac, mtu=self.placement.mtu, what=f"VF {req.ifname}")
            announce_on_up(req.netns, req.ifname, ipv6=True)
            configure(pod, moved, addresses)
            if conf.multicast:
                # The VF's own filter passes only joined groups' MACs on some drivers; the PF
                # lets a trusted VF receive every group instead.
                pod.set_allmulti(moved.index)
                _multicast.enable(pod, moved, req, conf, addresses)
            final = pod.require(req.ifname)
        result = result_for(final, req.netns, addresses)
        pod_iface = result.interfaces[-1].model_copy(update={"pci_id": vf.pci})
        return result.model_copy(update={"interfaces": [*result.interfaces[:-1], pod_iface]})

    def done(self) -> None:
        self.owner.attached(self.pci, self.holder)


def _put_back(pci: str, holder: Holder, host: HostState, broken: list[str]) -> None:
    """Undo of the move: the VF back in the node under its host name, wherever it got to."""
    try:
        missing = put_back(pci, holder.netns, host)
    except PlexusError as exc:
        missing = f"putting it back failed: {exc.msg}"
        log.error("sriov_rollback_step_failed", step=f"VF {pci} netdev", error=exc.msg)
    if missing is not None:
        broken.append(missing)


def _abandon(owner: VfOwner, pci: str, holder: Holder, broken: list[str]) -> None:
    """Last undo of a failed ADD: the VF back to the pool, or out of circulation when it could
    not be put back (marked unhealthy with the reason, never lost track of)."""
    if owner.release_begin(pci, holder) is None:
        return
    if broken:
        owner.mark_unhealthy(pci, "; ".join(broken))
    else:
        owner.release_done(pci)


def _quietly(what: str, fn: Callable[..., Any], *args: Any) -> None:
    """An undo step that must not hide the error that started the rollback."""
    try:
        fn(*args)
    except PlexusError as exc:
        log.error("sriov_rollback_step_failed", step=what, error=exc.msg)
