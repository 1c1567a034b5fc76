"""The one delegate interface: a CNI plugin Plexus can run, in-process or as an external binary.

The chain runner (`delegates.chain`) derives each plugin's request exactly as libcni would
(name, cniVersion, runtimeConfig, prevResult injected) and calls these methods. A built-in
delegate implements `Plugin` directly (usually by subclassing `BuiltinPlugin`); any other `type`
is served by `delegates.external.ExecPlugin`. `prepare` is the one moment a plugin may complete
its config from what only the node knows (the routed primary's IPAM from the node's pod
subnets): what it returns is recorded with the attachment, so DEL, CHECK and GC replay it and
never consult live state.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from cnispec.cni import SUPPORTED_VERSIONS, Result


@dataclass(frozen=True, slots=True)
class PluginRequest:
    """One plugin invocation: the CNI environment plus the derived config for this plugin."""

    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    cni_args: str = ""
    path: tuple[str, ...] = ()
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def cni_version(self) -> str:
        return str(self.config.get("cniVersion", ""))

    @property
    def network_name(self) -> str:
        return str(self.config.get("name", ""))

    @property
    def runtime_config(self) -> Mapping[str, Any]:
        rc = self.config.get("runtimeConfig")
        return rc if isinstance(rc, Mapping) else {}

    def stdin(self) -> bytes:
        return json.dumps(self.config, separators=(",", ":")).encode()


class Plugin(Protocol):
    """What the chain runner needs from a plugin. DEL must be idempotent."""

    @property
    def type(self) -> str: ...

    def versions(self) -> tuple[str, ...]:
        """CNI versions this plugin speaks (an exec'd plugin answers VERSION)."""
        ...

    def prepare(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The exact config every later call of this attachment gets, decided before ADD."""
        ...

    def add(self, req: PluginRequest) -> Result: ...

    def delete(self, req: PluginRequest) -> None: ...

    def check(self, req: PluginRequest, prev: Result) -> None: ...

    def gc(self, req: PluginRequest) -> None: ...

    def status(self, req: PluginRequest) -> None: ...


class BuiltinPlugin:
    """Base for in-process delegates: they speak every version Plexus speaks and, unless they
    keep state outside the pod's netns, have nothing to collect or report."""

    type = "builtin"

    def versions(self) -> tuple[str, ...]:
        return SUPPORTED_VERSIONS

    def prepare(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return dict(config)

    def gc(self, req: PluginRequest) -> None:
        return None

    def status(self, req: PluginRequest) -> None:
        return None
