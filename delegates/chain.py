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
from dataclasses import dataclass
from typing import Any

from delegates.external import ExecPlugin
from delegates.plugin import Plugin, PluginRequest
from delegates.registry import PluginRegistry
from metaplugin import cni
from metaplugin.cni import SUPPORTED_VERSIONS, Result
from metaplugin.errors import (
    DelegateFailed,
    IncompatibleVersion,
    InternalError,
    InvalidConfig,
    PlexusError,
)


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
class PreparedPlugin:
    """One plugin of a network, ready to run: its binary (empty for a built-in), the version
    negotiated with it, and its exact config (name, cniVersion and runtimeConfig injected,
    capabilities removed) without prevResult, which each call adds."""

    type: str
    path: str
    version: str
    config: Mapping[str, Any]

    def request(self, env: CallEnv, prev: Result | None = None) -> PluginRequest:
        body = dict(self.config)
        if prev is not None:
            body["prevResult"] = prev.to_wire(self.version)
        return PluginRequest(
            container_id=env.container_id,
            netns=env.netns,
            ifname=env.ifname,
            cni_args=env.cni_args,
            path=env.path,
            config=body,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "path": self.path,
            "version": self.version,
            "config": dict(self.config),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreparedPlugin:
        return cls(str(data["type"]), str(data["path"]), str(data["version"]), dict(data["config"]))


@dataclass(frozen=True, slots=True)
class PreparedNetwork:
    """A network config resolved to what will run: recorded before ADD, replayed by DEL."""

    name: str
    plugins: tuple[PreparedPlugin, ...]
    disable_check: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "disableCheck": self.disable_check,
            "plugins": [p.to_dict() for p in self.plugins],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreparedNetwork:
        return cls(
            name=str(data["name"]),
            plugins=tuple(PreparedPlugin.from_dict(p) for p in data["plugins"]),
            disable_check=bool(data.get("disableCheck", False)),
        )


@dataclass(frozen=True, slots=True)
class CallEnv:
    """The CNI environment of one attachment's calls."""

    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    cni_args: str = ""
    path: tuple[str, ...] = ()


class ChainRunner:
    def __init__(self, *, registry: PluginRegistry) -> None:
        self._registry = registry

    def prepare(
        self,
        config: Mapping[str, Any],
        capability_args: Mapping[str, Any],
        path: tuple[str, ...],
    ) -> PreparedNetwork:
        """Resolve every plugin, negotiate its version and derive its exact config, before
        anything runs (a missing binary or unusable version fails here, with nothing done)."""
        net = NetworkConfigList.parse(config)
        plugins = []
        for conf in net.plugins:
            plugin, version = self._negotiate(net, conf, path)
            body = dict(conf)
            body["name"] = net.name
            body["cniVersion"] = version
            body.pop("cniVersions", None)
            declared = body.pop("capabilities", None)
            if isinstance(declared, dict):
                runtime = {k: v for k, v in capability_args.items() if declared.get(k)}
                if runtime:
                    body["runtimeConfig"] = runtime
            binary = plugin.path if isinstance(plugin, ExecPlugin) else ""
            plugins.append(PreparedPlugin(plugin.type, binary, version, body))
        return PreparedNetwork(net.name, tuple(plugins), net.disable_check)

    def add(self, net: PreparedNetwork, env: CallEnv) -> Result:
        prev: Result | None = None
        for prepared in net.plugins:
            prev = self._plugin(prepared, env.path).add(prepared.request(env, prev))
        assert prev is not None  # a network has at least one plugin
        return prev

    def delete(self, net: PreparedNetwork, env: CallEnv, prev: Result | None) -> None:
        """Best effort: every plugin is tried (in reverse); failures are reported together."""
        failures: list[PlexusError] = []
        for prepared in reversed(net.plugins):
            carried = prev if cni.at_least(prepared.version, "0.4.0") else None
            try:
                self._plugin(prepared, env.path).delete(prepared.request(env, carried))
            except PlexusError as exc:
                failures.append(exc)
            except Exception as exc:  # noqa: BLE001 - the next plugin still gets its DEL
                failures.append(InternalError(f"plugin {prepared.type}: {exc!r}"))
        _raise_collected(net.name, "DEL", failures)

    def check(self, net: PreparedNetwork, env: CallEnv, prev: Result) -> None:
        if net.disable_check:
            return
        for prepared in net.plugins:
            if cni.at_least(prepared.version, "0.4.0"):
                self._plugin(prepared, env.path).check(prepared.request(env, prev), prev)

    def gc(
        self, config: Mapping[str, Any], valid: Sequence[Mapping[str, str]], path: tuple[str, ...]
    ) -> None:
        if NetworkConfigList.parse(config).disable_gc:
            return
        net = self.prepare(config, {}, path)
        failures: list[PlexusError] = []
        for prepared in net.plugins:
            if not cni.at_least(prepared.version, "1.1.0"):
                continue
            body = dict(prepared.config)
            body[cni.VALID_ATTACHMENTS_KEY] = list(valid)
            body[cni.LEGACY_ATTACHMENTS_KEY] = list(valid)
            try:
                self._plugin(prepared, path).gc(PluginRequest(path=path, config=body))
            except PlexusError as exc:
                failures.append(exc)
        _raise_collected(net.name, "GC", failures)

    def status(self, config: Mapping[str, Any], path: tuple[str, ...]) -> None:
        net = self.prepare(config, {}, path)
        for prepared in net.plugins:
            if cni.at_least(prepared.version, "1.1.0"):
                self._plugin(prepared, path).status(prepared.request(CallEnv(path=path)))

    def _plugin(self, prepared: PreparedPlugin, path: tuple[str, ...]) -> Plugin:
        return self._registry.recorded(prepared.type, prepared.path, path)

    def _negotiate(
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
