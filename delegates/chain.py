"""Run one network config (a single plugin config or a conflist) the way libcni does.

ADD runs the plugins in order, each getting the previous result as prevResult; DEL runs them in
reverse with the recorded result; CHECK in order; GC and STATUS on every plugin that speaks 1.1.0.
Each plugin gets `name`, its negotiated `cniVersion`, and a `runtimeConfig` holding only the
capability arguments it declares. Version negotiation is per plugin: a 1.0.0-only reference plugin
under a 1.1.0 network is spoken to in 1.0.0 and its result converted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from cnispec import cni, failpoints
from cnispec.cni import KNOWN_VERSIONS, SUPPORTED_VERSIONS, Result
from cnispec.errors import DelegateFailed, IncompatibleVersion, InternalError, PlexusError
from cnispec.netconf import NetworkConfigList, PreparedNetwork, PreparedPlugin
from delegates.external import ExecPlugin
from delegates.plugin import Plugin, PluginRequest
from delegates.registry import PluginRegistry


@dataclass(frozen=True, slots=True)
class CallEnv:
    """The CNI environment of one attachment's calls."""

    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    cni_args: str = ""
    path: tuple[str, ...] = ()


def plugin_request(
    prepared: PreparedPlugin, env: CallEnv, prev: Result | None = None
) -> PluginRequest:
    """The request of one call: the prepared config plus prevResult in the plugin's version."""
    body = dict(prepared.config)
    if prev is not None:
        body["prevResult"] = prev.to_wire(prepared.version)
    return PluginRequest(
        container_id=env.container_id,
        netns=env.netns,
        ifname=env.ifname,
        cni_args=env.cni_args,
        path=env.path,
        config=body,
    )


# Told of every plugin call: (type, exec'd or built-in, verb, seconds). plexusd's metrics.
CallObserver = Callable[[str, bool, str, float], None]


class ChainRunner:
    def __init__(self, *, registry: PluginRegistry, observe: CallObserver | None = None) -> None:
        self._registry = registry
        self._observe = observe

    @contextmanager
    def _timed(self, prepared: PreparedPlugin, verb: str) -> Iterator[None]:
        if self._observe is None:
            yield
            return
        started = time.monotonic()
        try:
            yield
        finally:
            self._observe(prepared.type, bool(prepared.path), verb, time.monotonic() - started)

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
            plugins.append(
                PreparedPlugin(
                    type=plugin.type, path=binary, version=version, config=plugin.prepare(body)
                )
            )
        return PreparedNetwork(
            name=net.name,
            plugins=tuple(plugins),
            disable_check=net.disable_check,
            disable_gc=net.disable_gc,
        )

    def add(self, net: PreparedNetwork, env: CallEnv) -> Result:
        prev: Result | None = None
        for prepared in net.plugins:
            failpoints.hit("chain_add_before")
            with self._timed(prepared, cni.ADD):
                prev = self._plugin(prepared, env.path).add(plugin_request(prepared, env, prev))
            failpoints.hit("chain_add_after")
        assert prev is not None  # a network has at least one plugin
        return prev

    def delete(self, net: PreparedNetwork, env: CallEnv, prev: Result | None) -> None:
        """Best effort: every plugin is tried (in reverse); failures are reported together."""
        failures: list[PlexusError] = []
        for prepared in reversed(net.plugins):
            carried = prev if cni.at_least(prepared.version, "0.4.0") else None
            try:
                failpoints.hit("chain_del_before")
                with self._timed(prepared, cni.DEL):
                    self._plugin(prepared, env.path).delete(plugin_request(prepared, env, carried))
                failpoints.hit("chain_del_after")
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
                with self._timed(prepared, cni.CHECK):
                    plugin = self._plugin(prepared, env.path)
                    plugin.check(plugin_request(prepared, env, prev), prev)

    def gc(
        self, net: PreparedNetwork, valid: Sequence[Mapping[str, str]], path: tuple[str, ...]
    ) -> None:
        """GC on every plugin of `net` that speaks 1.1.0, told which attachments are valid.
        Best effort, as DEL: one plugin's failure never keeps the next from collecting."""
        if net.disable_gc:
            return
        failures: list[PlexusError] = []
        for prepared in net.without_runtime_config().plugins:
            if not cni.at_least(prepared.version, "1.1.0"):
                continue
            body = dict(prepared.config)
            body[cni.VALID_ATTACHMENTS_KEY] = list(valid)
            body[cni.LEGACY_ATTACHMENTS_KEY] = list(valid)
            try:
                failpoints.hit("chain_gc_before")
                with self._timed(prepared, cni.GC):
                    self._plugin(prepared, path).gc(PluginRequest(path=path, config=body))
                failpoints.hit("chain_gc_after")
            except PlexusError as exc:
                failures.append(exc)
            except Exception as exc:  # noqa: BLE001 - the next plugin still collects
                failures.append(InternalError(f"plugin {prepared.type}: {exc!r}"))
        _raise_collected(net.name, "GC", failures)

    def status(self, config: Mapping[str, Any], path: tuple[str, ...]) -> None:
        net = self.prepare(config, {}, path)
        for prepared in net.plugins:
            if cni.at_least(prepared.version, "1.1.0"):
                self._plugin(prepared, path).status(plugin_request(prepared, CallEnv(path=path)))

    def _plugin(self, prepared: PreparedPlugin, path: tuple[str, ...]) -> Plugin:
        return self._registry.recorded(prepared.type, prepared.path, path)

    def _negotiate(
        self, net: NetworkConfigList, conf: Mapping[str, Any], path: tuple[str, ...]
    ) -> tuple[Plugin, str]:
        plugin = self._registry.resolve(str(conf["type"]), path)
        # A 0.3.0+ network is never spoken to below 0.3.0: the plugins after this one, and the
        # runtime, expect a result that names interfaces, which a 0.2.0 result cannot.
        legacy = not cni.at_least(net.version, "0.3.0")
        usable = KNOWN_VERSIONS if legacy else SUPPORTED_VERSIONS
        spoken = [v for v in plugin.versions() if v in usable]
        version = cni.pick_version(net.version, spoken)
        if version is None:
            raise IncompatibleVersion(
                f"network {net.name}: plugin {plugin.type} speaks "
                f"{', '.join(plugin.versions()) or 'no version'}, none of them usable for a "
                f"{net.version} network (it needs one from {usable[0]} to {net.version})",
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
