"""CNI network configurations: what a network config says (`NetworkConfigList`, one plugin or a
conflist normalised to list form) and what it resolves to before anything runs
(`PreparedNetwork`: each plugin's binary, negotiated version and exact config).

Parsing here is pure: no binary is looked up and no kernel is asked. `delegates.chain` prepares
and runs networks; the orchestrator records a `PreparedNetwork` with every attachment so DEL,
CHECK and GC replay exactly what ADD ran; the resolver, `plexusctl validate` and the cluster
controller read configs with the same parser.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cnispec import cni
from cnispec.cni import KNOWN_VERSIONS
from cnispec.errors import IncompatibleVersion, InvalidConfig


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

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(str(p["type"]) for p in self.plugins)

    def declared_capabilities(self) -> frozenset[str]:
        caps: set[str] = set()
        for plugin in self.plugins:
            declared = plugin.get("capabilities")
            if isinstance(declared, dict):
                caps.update(k for k, v in declared.items() if v)
        return frozenset(caps)


def _network_version(name: str, config: Mapping[str, Any]) -> str:
    """The version the network runs in. A delegate's network may be 0.1.0 or 0.2.0 (Multus runs
    those too); only the runtime's own config must be 0.3.0 or later (`cni.parse_request`)."""
    versions = config.get("cniVersions")
    if isinstance(versions, list) and versions:
        ours = [v for v in versions if v in KNOWN_VERSIONS]
        if not ours:
            raise IncompatibleVersion(
                f"network {name}: none of cniVersions {versions} is supported by Plexus",
            )
        return str(max(ours, key=cni.version_key))
    version = config.get("cniVersion")
    if version is None or version == "":
        # A config without one is 0.1.0 to libcni and skel, so Multus runs such a NAD as 0.1.0.
        return "0.1.0"
    if not isinstance(version, str):
        raise InvalidConfig(f"network {name}: cniVersion must be a string, not {version!r}")
    if version not in KNOWN_VERSIONS:
        raise IncompatibleVersion(
            f"network {name} has cniVersion {version}; Plexus runs {', '.join(KNOWN_VERSIONS)}",
        )
    return version


def plugin_configs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The plugin objects of a raw config, in place: `plugins` of a conflist, else the config."""
    plugins = config.get("plugins")
    if isinstance(plugins, list):
        return [p for p in plugins if isinstance(p, dict)]
    return [config]


def with_plugin_key(config: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of `config` with `key` set in every plugin (Multus puts a pod's deviceID there)."""
    out = copy.deepcopy(dict(config))
    for plugin in plugin_configs(out):
        plugin[key] = value
    return out


def has_plugin_key(config: dict[str, Any], key: str) -> bool:
    return any(plugin.get(key) for plugin in plugin_configs(config))


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True)


class PreparedPlugin(_Model):
    """One plugin of a network, ready to run: its binary (empty for a built-in), the version
    negotiated with it, and its exact config (name, cniVersion and runtimeConfig injected,
    capabilities removed, anything a built-in derives at ADD filled in) without prevResult,
    which each call adds."""

    type: str
    path: str
    version: str
    config: dict[str, Any]


class PreparedNetwork(_Model):
    """A network config resolved to what will run: recorded before ADD, replayed by DEL."""

    name: str
    plugins: tuple[PreparedPlugin, ...]
    disable_check: bool = Field(default=False, alias="disableCheck")
    disable_gc: bool = Field(default=False, alias="disableGC")

    @property
    def builtin_only(self) -> bool:
        """Every plugin runs in-process (none names a binary)."""
        return all(not plugin.path for plugin in self.plugins)

    def without_runtime_config(self) -> PreparedNetwork:
        """The network as GC sees it: no plugin carries one pod's capability arguments."""
        plugins = tuple(
            p.model_copy(
                update={"config": {k: v for k, v in p.config.items() if k != "runtimeConfig"}}
            )
            for p in self.plugins
        )
        return self.model_copy(update={"plugins": plugins})
