"""From a pod's requests to an ordered plan of attachments (parse, then resolve; no side effects).

The plan is: the cluster network as CNI_IFNAME (or the pod's `v1.multus-cni.io/default-network`
override), then `defaultNetworks` (unless the pod is in a system namespace), then every element
of `k8s.v1.cni.cncf.io/networks` in order. Unnamed secondaries are called `net<position>` as
Multus does, so `net-a, net-b@data0, net-c` gives net1, data0, net3. Validation follows NPWG
strictly: a capability argument (ips, mac, portMappings, bandwidth, infiniband-guid) fails the
attachment unless a plugin of that network declares the capability; interface names are unique;
at most one default-route per address family; namespace isolation when configured; at most
`maxAttachmentsPerPod` attachments, counted before any NAD is looked up; a NAD's host-local IPAM
confined to the node admin's data roots and resolv.conf files (`delegates.ipam.paths`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import structlog

from cnispec import confdir
from cnispec.annotations import (
    DEFAULT_NETWORK_ANNOTATION,
    NETWORKS_ANNOTATION,
    NetworkSelection,
    parse_default_network,
    parse_networks,
)
from cnispec.errors import (
    InvalidConfig,
    NetworkNotFound,
    NetworkNotPermitted,
    PlexusError,
    TryAgainLater,
)
from cnispec.identity import PodInfo
from cnispec.nad import NetworkAttachmentDefinition, network_config
from cnispec.netconf import NetworkConfigList, plugin_configs, with_plugin_key
from metaplugin.config import DaemonConfig
from metaplugin.nad_source import NadSource

log = structlog.get_logger(__name__)

# annotation attribute -> (capability a plugin must declare, how the annotation spells it)
_CAPABILITIES: Final = (
    ("ips", "ips", "ips"),
    ("mac", "mac", "mac"),
    ("port_mappings", "portMappings", "portMappings"),
    ("bandwidth", "bandwidth", "bandwidth"),
    ("infiniband_guid", "infinibandGUID", "infiniband-guid"),
)


@dataclass(frozen=True, slots=True)
class ResolvedNetwork:
    network: str  # "ns/name" for a NAD, the conf's own name for a file
    config: dict[str, Any]
    resource_name: str | None = None


@dataclass(frozen=True, slots=True)
class PlannedAttachment:
    network: str
    ifname: str
    is_default: bool
    config: dict[str, Any]
    capability_args: dict[str, Any] = field(default_factory=dict)
    default_route: tuple[str, ...] | None = None
    resource_name: str | None = None

    def with_config(
        self, config: dict[str, Any], *, capability_args: dict[str, Any]
    ) -> PlannedAttachment:
        return replace(self, config=config, capability_args=capability_args)


class Resolver:
    def __init__(self, *, config: DaemonConfig, nads: NadSource) -> None:
        self._cfg = config
        self._nads = nads
        self._ipam_paths = config.ipam_paths()

    def cluster_network(self) -> ResolvedNetwork:
        ref = self._cfg.cluster_network
        if ref is None:
            found = confdir.first(self._cfg.cni_conf_dir)
            if found is None:
                raise NetworkNotFound(
                    "clusterNetwork is not configured and "
                    f"{self._cfg.cni_conf_dir} holds no CNI config to use as the primary network",
                )
            return _validated(ResolvedNetwork(str(found[1].get("name", found[0].name)), found[1]))
        return self.resolve_reference(ref, what="clusterNetwork")

    def resolve_reference(self, ref: str, *, what: str) -> ResolvedNetwork:
        """A network named the way clusterNetwork/defaultNetworks name one."""
        if ref.startswith("/"):
            return _validated(_from_path(Path(ref), what))
        if "/" in ref:
            namespace, _, name = ref.partition("/")
            return self._from_nad(namespace, name, what=what)
        try:
            nad = self._nads.get(self._cfg.multus_namespace, ref)
        except TryAgainLater as exc:
            # The NAD cache has no such NAD and the API cannot be asked: a conf of that name in
            # the node's own conf dir serves (the cluster network must not need the API).
            found = confdir.find_by_name(self._cfg.cni_conf_dir, ref)
            if found is None:
                raise
            log.warning("network_from_conf_dir_api_unreachable", what=what, ref=ref,
                        conf=str(found[0]), error=exc.msg)  # fmt: skip
            return _validated(ResolvedNetwork(ref, found[1]))
        if nad is not None:
            return self._from_nad(self._cfg.multus_namespace, ref, what=what)
        found = confdir.find_by_name(self._cfg.cni_conf_dir, ref)
        if found is not None:
            return _validated(ResolvedNetwork(ref, found[1]))
        raise NetworkNotFound(
            f"{what} {ref!r}: no NetworkAttachmentDefinition {self._cfg.multus_namespace}/{ref} "
            f"and no CNI config named {ref!r} in {self._cfg.cni_conf_dir}",
        )

    def known_networks(self) -> Iterator[ResolvedNetwork]:
        """Every network Plexus can currently resolve: the cluster and default networks and
        every NAD (GC collects them all), resolved one at a time as the caller reaches it, from
        one snapshot of the NADs. One that does not resolve is skipped."""
        refs: list[tuple[str | None, str]] = [(self._cfg.cluster_network, "clusterNetwork")]
        refs += [(ref, "defaultNetworks entry") for ref in self._cfg.default_networks]
        for ref, what in refs:
            try:
                net = self.resolve_reference(ref, what=what) if ref else self.cluster_network()
            except PlexusError as exc:
                log.info("network_not_resolvable", network=ref, error=exc.msg)
                continue
            yield net
        for nad in self._nads.all():
            try:
                net = self._resolved(nad)
            except PlexusError as exc:
                log.info("network_not_resolvable", network=nad.key, error=exc.msg)
                continue
            yield net

    def plan(
        self, *, ifname: str, pod: PodInfo | None, runtime_config: Mapping[str, Any]
    ) -> list[PlannedAttachment]:
        annotations = pod.annotations if pod else {}
        selections = parse_networks(annotations.get(NETWORKS_ANNOTATION))
        self._check_count(pod, selections)
        _log_lenient_reads(selections, pod)
        primary = self._primary(pod, annotations.get(DEFAULT_NETWORK_ANNOTATION))
        plan = [
            PlannedAttachment(
                network=primary.network,
                ifname=ifname,
                is_default=True,
                config=primary.config,
                capability_args=dict(runtime_config),
                resource_name=primary.resource_name,
            )
        ]
        if pod is not None and pod.namespace not in self._cfg.system_namespaces:
            for ref in self._cfg.default_networks:
                net = self.resolve_reference(ref, what="defaultNetworks entry")
                plan.append(_secondary(net, f"net{len(plan)}"))
        for selection in selections:
            assert pod is not None  # selections only come from a pod's annotations
            net = self._selected(pod, selection)
            plan.append(self._with_selection(net, selection, len(plan)))
        _check_ifnames(plan, pod)
        _check_default_routes(selections, pod)
        return plan

    def _check_count(self, pod: PodInfo | None, selections: list[NetworkSelection]) -> None:
        """Refuse a pod that asks for more attachments than allowed, before any is resolved:
        a 6 KB annotation can name one network a thousand times."""
        defaults = 0
        if pod is not None and pod.namespace not in self._cfg.system_namespaces:
            defaults = len(self._cfg.default_networks)
        count, limit = 1 + defaults + len(selections), self._cfg.max_attachments_per_pod
        if count > limit:
            who = f"pod {pod.ref}" if pod else "the pod"
            raise InvalidConfig(
                f"{who} asks for {count} network attachments (the cluster network, {defaults} "
                f"defaultNetworks and {len(selections)} in {NETWORKS_ANNOTATION}); at most {limit} "
                "are allowed per pod (daemon config key maxAttachmentsPerPod): ask for fewer "
                "networks, or have the node admin raise the limit",
            )

    def _primary(self, pod: PodInfo | None, override: str | None) -> ResolvedNetwork:
        parsed = parse_default_network(override)
        if parsed is None or pod is None:
            return self.cluster_network()
        namespace, name = parsed
        namespace = namespace or self._cfg.multus_namespace
        if namespace not in (pod.namespace, self._cfg.multus_namespace):
            self._check_isolation(pod, namespace, name)
        return self._from_nad(namespace, name, what=f"pod {pod.ref} {DEFAULT_NETWORK_ANNOTATION}")

    def _selected(self, pod: PodInfo, selection: NetworkSelection) -> ResolvedNetwork:
        namespace = selection.namespace or pod.namespace
        self._check_isolation(pod, namespace, selection.name)
        return self._from_nad(
            namespace, selection.name, what=f"pod {pod.ref} {NETWORKS_ANNOTATION}"
        )

    def _check_isolation(self, pod: PodInfo, namespace: str, name: str) -> None:
        if not self._cfg.namespace_isolation or namespace == pod.namespace:
            return
        # As in Multus: with globalNamespaces unset, "default" is the one global namespace.
        global_namespaces = self._cfg.global_namespaces or ["default"]
        if namespace in global_namespaces:
            return
        allowed = ", ".join(dict.fromkeys([pod.namespace, *global_namespaces]))
        raise NetworkNotPermitted(
            f"namespace isolation: pod {pod.ref} may not use network {namespace}/{name}; it may "
            f"use networks of namespaces: {allowed}",
        )

    def _from_nad(self, namespace: str, name: str, *, what: str) -> ResolvedNetwork:
        nad = self._nads.get(namespace, name)
        if nad is None:
            raise NetworkNotFound(
                f"{what}: NetworkAttachmentDefinition {namespace}/{name} not found",
            )
        return self._resolved(nad)

    def _resolved(self, nad: NetworkAttachmentDefinition) -> ResolvedNetwork:
        net = ResolvedNetwork(
            nad.key, network_config(nad, self._cfg.cni_conf_dir), nad.resource_name
        )
        net = _validated(net)
        if nad.config.strip():  # the NAD author's; a conf in cniConfDir is the node admin's
            try:
                self._ipam_paths.check_config(net.config)
            except InvalidConfig as exc:
                raise exc.prefixed(f"network {net.network}") from None
        return net

    @staticmethod
    def _with_selection(
        net: ResolvedNetwork, selection: NetworkSelection, position: int
    ) -> PlannedAttachment:
        declared = NetworkConfigList.parse(net.config).declared_capabilities()
        capability_args: dict[str, Any] = {}
        for attr, capability, spelled in _CAPABILITIES:
            value = getattr(selection, attr)
            if value is None:
                continue
            if capability not in declared:
                raise InvalidConfig(
                    f"network {net.network}: the pod asks for '{spelled}' but no plugin of this "
                    f"network declares the capability '{capability}' (add "
                    f'"capabilities": {{"{capability}": true}} to the plugin that supports it)',
                )
            capability_args[capability] = _capability_value(value)
        config = copy.deepcopy(net.config)
        if selection.cni_args:
            _merge_cni_args(config, selection.cni_args)
        if selection.device_id:
            # As Multus does: the device goes into each plugin's config (sriov-cni reads
            # `deviceID`) and to plugins that declare the deviceID capability.
            config = with_plugin_key(config, "deviceID", selection.device_id)
            capability_args["deviceID"] = selection.device_id
        return PlannedAttachment(
            network=net.network,
            ifname=selection.requested_ifname or f"net{position}",
            is_default=False,
            config=config,
            capability_args=capability_args,
            default_route=tuple(selection.default_route)
            if selection.default_route is not None
            else None,
            resource_name=net.resource_name,
        )


def _log_lenient_reads(selections: list[NetworkSelection], pod: PodInfo | None) -> None:
    """One line per request for the keys read leniently, as Multus reads them: ignored ones
    (a typo shows here) and known ones spelled in another case."""
    elements = [
        {
            "network": sel.reference(pod.namespace if pod else ""),
            "ignored": list(sel.ignored_keys),
            "read_as": sel.respelled_keys,
        }
        for sel in selections
        if sel.ignored_keys or sel.respelled_keys
    ]
    if elements:
        log.warning("network_selection_keys_ignored", elements=elements)


def _secondary(net: ResolvedNetwork, ifname: str) -> PlannedAttachment:
    return PlannedAttachment(
        network=net.network,
        ifname=ifname,
        is_default=False,
        config=net.config,
        resource_name=net.resource_name,
    )


def _validated(net: ResolvedNetwork) -> ResolvedNetwork:
    try:
        NetworkConfigList.parse(net.config)
    except InvalidConfig as exc:
        raise InvalidConfig(f"network {net.network}: {exc.msg}") from None
    return net


def _from_path(path: Path, what: str) -> ResolvedNetwork:
    if path.is_dir():
        found = confdir.first(path)
        if found is None:
            raise NetworkNotFound(f"{what} {path}: directory holds no CNI config")
        path, config = found
    elif path.is_file():
        config = confdir.load(path)
    else:
        raise NetworkNotFound(f"{what} {path}: no such file or directory")
    return ResolvedNetwork(str(config.get("name") or path.stem), config)


def _capability_value(value: Any) -> Any:
    if isinstance(value, list):
        return [v.runtime_config() if hasattr(v, "runtime_config") else v for v in value]
    if hasattr(value, "runtime_config"):
        return value.runtime_config()
    return value


def _merge_cni_args(config: dict[str, Any], cni_args: Mapping[str, Any]) -> None:
    """NPWG §4.1.2.1.5: annotation cni-args go to `args.cni` and win over the NAD's own."""
    for plugin in plugin_configs(config):
        args = plugin.setdefault("args", {})
        if not isinstance(args, dict):
            raise InvalidConfig(f"network {config.get('name')}: 'args' must be an object")
        merged = dict(args.get("cni") or {})
        merged.update(cni_args)
        args["cni"] = merged


def _check_ifnames(plan: list[PlannedAttachment], pod: PodInfo | None) -> None:
    seen: dict[str, str] = {}
    for att in plan:
        if att.ifname in seen:
            who = f"pod {pod.ref}" if pod else "the pod"
            raise InvalidConfig(
                f"{who}: interface {att.ifname} is used by both {seen[att.ifname]} and "
                f"{att.network}; give one of them another name with '@ifname' or 'interface'",
            )
        seen[att.ifname] = att.network


def _check_default_routes(selections: list[NetworkSelection], pod: PodInfo | None) -> None:
    families: dict[int, str] = {}
    for sel in selections:
        for family in sel.gateway_families():
            if family in families:
                raise InvalidConfig(
                    f"pod {pod.ref if pod else ''}: default-route for IPv{family} is requested "
                    f"by both {families[family]} and {sel.name}; at most one per family",
                )
            families[family] = sel.name
        # A gateway list repeating a family is itself ambiguous (ECMP is not supported).
        gws = sel.default_route or []
        if len(gws) != len(sel.gateway_families()):
            raise InvalidConfig(
                f"network {sel.name}: default-route lists more than one gateway of a family",
            )
