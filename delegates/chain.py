"""Run one network config (a single plugin config or a conflist) the way libcni does.

ADD runs the plugins in order, each getting the previous result as prevResult; DEL runs them in
reverse with the recorded result; CHECK in order; GC and STATUS on every plugin that speaks 1.1.0.
Each plugin gets `name`, its negotiated `cniVersion`, and a `runtimeConfig` holding only the
capability arguments it declares. Version negotiation is per plugin: a 1.0.0-only reference plugin
under a 1.1.0 network is spoken to in 1.0.0 and its result converted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from delegates.plugin import Plugin, PluginRequest
from delegates.registry import PluginRegistry
from metaplugin import cni
from metaplugin.cni import SUPPORTED_VERSIONS, Result
from metaplugin.errors import DelegateFailed, IncompatibleVersion, InvalidConfig, PlexusError


@dataclass(frozen=True, slots=True)
class NetworkConfigList:
    """A network config normalised to list form."""

    name: str
    version: str
    plugins: tuple[Mapping[str, Any], ...]
    disable_check: bool = False
    disable_gc: bool = False

    @classmethod
    def parse(cls, config: Mapping[str, Any]) -> NetworkConfigList:
        name = config.get("name")
        if not isinstance(name, str) or not cni.valid_network_name(name):
            raise InvalidConfig(
                f"network config name {name!r} is missing or not of the form "
                "[A-Za-z0-9][A-Za-z0-9_.-]*",
            )
        version = _network_version(name, config)
        if "plugins" in config:
            plugins = config["plugins"]
            if not isinstance(plugins, list) or not plugins:
                raise InvalidConfig(f"network {name}: 'plugins' must be a non-empty list")
        elif "type" in config:
            plugins = [config]
        else:
            raise InvalidConfig(f"network {name}: config has neither 'type' nor 'plugins'")
        for i, plugin in enumerate(plugins):
            if not isinstance(plugin, dict) or not isinstance(plugin.get("type"), str):
                raise InvalidConfig(f"network {name}: plugin {i} has no string 'type'")
        return cls(
            name=name,
            version=version,
            plugins=tuple(plugins),
            disable_check=bool(config.get("disableCheck", False)),
            disable_gc=bool(config.get("disableGC", False)),
        )

    def declared_capabilities(self) -> frozenset[str]:
        caps: set[str] = set()
        for plugin in self.plugins:
            declared = plugin.get("capabilities")
            if isinstance(declared, dict):
                caps.update(k for k, v in declared.items() if v)
        return frozenset(caps)


def _network_version(name: str, config: Mapping[str, Any]) -> str:
    versions = config.get("cniVersions")
    if isinstance(versions, list) and versions:
        ours = [v for v in versions if v in SUPPORTED_VERSIONS]
        if not ours:
            raise IncompatibleVersion(
                f"network {name}: none of cniVersions {versions} is supported by Plexus",
            )
        return str(max(ours, key=cni.version_key))
    version = config.get("cniVersion")
    if not isinstance(version, str):
        raise InvalidConfig(f"network {name}: cniVersion is missing")
    if version not in SUPPORTED_VERSIONS:
        raise IncompatibleVersion(
            f"network {name} has cniVersion {version}; Plexus runs {', '.join(SUPPORTED_VERSIONS)}",
        )
    return version


@dataclass(frozen=True, slots=True)
class NetworkInvocation:
    """Everything needed to run one network for one container."""

    config: Mapping[str, Any]
    container_id: str
    netns: str
    ifname: str
    cni_args: str = ""
    capability_args: Mapping[str, Any] = field(default_factory=dict)
    path: tuple[str, ...] = ()


class ChainRunner:
    def __init__(self, *, registry: PluginRegistry) -> None:
        self._registry = registry

    def add(self, inv: NetworkInvocation) -> Result:
        net = NetworkConfigList.parse(inv.config)
        prev: Result | None = None
        for conf in net.plugins:
            plugin, version = self._plugin(net, conf, inv.path)
            prev = plugin.add(self._request(inv, net, conf, version, prev))
        assert prev is not None  # parse() guarantees at least one plugin
        return prev

    def delete(self, inv: NetworkInvocation, prev: Result | None) -> None:
        """Best effort: every plugin is tried (in reverse); failures are reported together."""
        net = NetworkConfigList.parse(inv.config)
        failures: list[PlexusError] = []
        for conf in reversed(net.plugins):
            try:
                plugin, version = self._plugin(net, conf, inv.path)
                carried = prev if prev is not None and cni.at_least(version, "0.4.0") else None
                plugin.delete(self._request(inv, net, conf, version, carried))
            except PlexusError as exc:
                failures.append(exc)
        _raise_collected(net.name, "DEL", failures)

    def check(self, inv: NetworkInvocation, prev: Result) -> None:
        net = NetworkConfigList.parse(inv.config)
        if net.disable_check:
            return
        for conf in net.plugins:
            plugin, version = self._plugin(net, conf, inv.path)
            if cni.at_least(version, "0.4.0"):
                plugin.check(self._request(inv, net, conf, version, prev), prev)

    def gc(
        self, config: Mapping[str, Any], valid: Sequence[Mapping[str, str]], path: tuple[str, ...]
    ) -> None:
        net = NetworkConfigList.parse(config)
        if net.disable_gc:
            return
        failures: list[PlexusError] = []
        inv = NetworkInvocation(config=config, container_id="", netns="", ifname="", path=path)
        for conf in net.plugins:
            try:
                plugin, version = self._plugin(net, conf, path)
                if cni.at_least(version, "1.1.0"):
                    req = self._request(inv, net, conf, version, None)
                    body = dict(req.config)
                    body[cni.VALID_ATTACHMENTS_KEY] = list(valid)
                    body[cni.LEGACY_ATTACHMENTS_KEY] = list(valid)
                    plugin.gc(PluginRequest(path=path, config=body))
            except PlexusError as exc:
                failures.append(exc)
        _raise_collected(net.name, "GC", failures)

    def status(self, config: Mapping[str, Any], path: tuple[str, ...]) -> None:
        net = NetworkConfigList.parse(config)
        inv = NetworkInvocation(config=config, container_id="", netns="", ifname="", path=path)
        for conf in net.plugins:
            plugin, version = self._plugin(net, conf, path)
            if cni.at_least(version, "1.1.0"):
                plugin.status(self._request(inv, net, conf, version, None))

    def _plugin(
        self, net: NetworkConfigList, conf: Mapping[str, Any], path: tuple[str, ...]
    ) -> tuple[Plugin, str]:
        plugin = self._registry.resolve(str(conf["type"]), path)
        spoken = [v for v in plugin.versions() if v in SUPPORTED_VERSIONS]
        version = cni.pick_version(net.version, spoken)
        if version is None:
            raise IncompatibleVersion(
                f"network {net.name}: plugin {plugin.type} speaks "
                f"{', '.join(plugin.versions()) or 'no version'}, none of them usable for a "
                f"{net.version} network (Plexus needs 0.3.0 or later)",
            )
        return plugin, version

    @staticmethod
    def _request(
        inv: NetworkInvocation,
        net: NetworkConfigList,
        conf: Mapping[str, Any],
        version: str,
        prev: Result | None,
    ) -> PluginRequest:
        body = dict(conf)
        body["name"] = net.name
        body["cniVersion"] = version
        body.pop("cniVersions", None)
        declared = body.pop("capabilities", None)
        if isinstance(declared, dict):
            runtime = {k: v for k, v in inv.capability_args.items() if declared.get(k)}
            if runtime:
                body["runtimeConfig"] = runtime
        if prev is not None:
            body["prevResult"] = prev.to_wire(version)
        return PluginRequest(
            container_id=inv.container_id,
            netns=inv.netns,
            ifname=inv.ifname,
            cni_args=inv.cni_args,
            path=inv.path,
            config=body,
        )


def _raise_collected(network: str, verb: str, failures: list[PlexusError]) -> None:
    if not failures:
        return
    if len(failures) == 1:
        raise failures[0]
    raise DelegateFailed(
        f"network {network}: {verb} failed in {len(failures)} plugins: "
        + "; ".join(f.msg for f in failures),
        details=json.dumps([f.to_dict() for f in failures], separators=(",", ":")),
    )
