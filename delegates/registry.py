"""Which `Plugin` serves a config's `type`: a built-in delegate if one is registered, else the
binary of that name on the CNI path."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from delegates.external import DEFAULT_TIMEOUT, Exec, ExecPlugin, RawExec
from delegates.plugin import Plugin


class PluginRegistry:
    def __init__(
        self,
        *,
        builtins: Mapping[str, Plugin] | None = None,
        exec_: Exec | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._builtins = dict(builtins or {})
        self._exec = exec_ or RawExec()
        self._timeout = timeout

    @property
    def builtin_types(self) -> frozenset[str]:
        return frozenset(self._builtins)

    def resolve(self, plugin_type: str, path: Sequence[str]) -> Plugin:
        builtin = self._builtins.get(plugin_type)
        if builtin is not None:
            return builtin
        binary = self._exec.find_in_path(plugin_type, path)
        return ExecPlugin(plugin_type, binary, exec_=self._exec, timeout=self._timeout)

    def recorded(self, plugin_type: str, binary: str, path: Sequence[str]) -> Plugin:
        """The plugin a record names: the same binary if it is still there (DEL must run what
        ADD ran), else whatever now serves the type (the binary moved with an upgrade)."""
        if not binary:
            return self.resolve(plugin_type, path)
        if self._exec.is_executable(binary):
            return ExecPlugin(plugin_type, binary, exec_=self._exec, timeout=self._timeout)
        return self.resolve(plugin_type, path)
