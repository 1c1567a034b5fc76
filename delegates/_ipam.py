"""IPAM for the built-in delegates: `host-local` and `static` run in-process; any other IPAM
type is exec'd exactly as a reference plugin would exec it (same CNI environment, the delegating
plugin's whole config on stdin)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

from cnispec import cni
from cnispec.cni import Result
from cnispec.errors import DecodeFailure, InvalidConfig
from delegates.external import Exec, plugin_env, plugin_error
from delegates.ipam import HostLocalIpam, IpamPaths, StaticIpam
from delegates.plugin import PluginRequest


class _InProcess(Protocol):
    def add(self, req: PluginRequest) -> Result: ...

    def delete(self, req: PluginRequest) -> None: ...

    def check(self, req: PluginRequest) -> None: ...

    def gc(self, req: PluginRequest) -> None: ...


class Ipam:
    def __init__(
        self,
        *,
        exec_: Exec,
        timeout: float,
        data_dir: str = "/var/lib/cni/networks",
        paths: IpamPaths | None = None,
    ) -> None:
        self._exec = exec_
        self._timeout = timeout
        self.data_dir = data_dir  # host-local's, when a config names no dataDir
        self._builtin: dict[str, _InProcess] = {
            "host-local": HostLocalIpam(default_data_dir=data_dir, paths=paths),
            "static": StaticIpam(),
        }

    def add(self, req: PluginRequest) -> Result:
        builtin = self._builtin.get(self._type(req))
        if builtin is not None:
            return builtin.add(req)
        out = self._run(cni.ADD, req)
        try:
            body = json.loads(out)
        except ValueError:
            raise DecodeFailure(f"IPAM plugin {self._type(req)} printed no JSON result") from None
        body.setdefault("cniVersion", req.cni_version)
        return Result.from_wire(body)

    def delete(self, req: PluginRequest) -> None:
        builtin = self._builtin.get(self._type(req))
        if builtin is not None:
            builtin.delete(req)
        else:
            self._run(cni.DEL, req)

    def check(self, req: PluginRequest) -> None:
        builtin = self._builtin.get(self._type(req))
        if builtin is not None:
            builtin.check(req)
        elif cni.at_least(req.cni_version, "0.4.0"):
            self._run(cni.CHECK, req)

    def gc(self, req: PluginRequest) -> None:
        builtin = self._builtin.get(self._type(req))
        if builtin is not None:
            builtin.gc(req)
        elif cni.at_least(req.cni_version, "1.1.0"):
            self._run(cni.GC, req)

    @staticmethod
    def configured(config: Mapping[str, Any]) -> bool:
        return isinstance(config.get("ipam"), dict) and bool(config["ipam"].get("type"))

    @staticmethod
    def _type(req: PluginRequest) -> str:
        ipam = req.config.get("ipam")
        if not isinstance(ipam, dict) or not isinstance(ipam.get("type"), str):
            raise InvalidConfig(f"network {req.network_name}: 'ipam' needs a string 'type'")
        return str(ipam["type"])

    def _run(self, command: str, req: PluginRequest) -> bytes:
        binary = self._exec.find_in_path(self._type(req), req.path)
        out = self._exec.run(binary, plugin_env(command, req), req.stdin(), self._timeout)
        if out.returncode != 0:
            raise plugin_error(self._type(req), out)
        return out.stdout
