"""A fake `Exec` for orchestrator and chain tests: plugins are Python objects that keep the
attachments they "created", so a test can check that nothing leaked without any kernel."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cnispec.errors import PluginNotFound
from delegates.external import VERSION_STDIN, ExecOutput, parse_version_output


@dataclass
class Call:
    plugin: str
    command: str
    env: dict[str, str]
    config: dict[str, Any]


@dataclass
class FakePlugin:
    """ADD creates (container, ifname) with the next address of `subnet`; DEL removes it."""

    name: str
    subnet: str = "10.9.0"
    versions: tuple[str, ...] = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
    fail: set[str] = field(default_factory=set)  # commands that fail
    fail_code: int = 7
    live: dict[tuple[str, str], str] = field(default_factory=dict)
    next_host: int = 2

    def respond(self, command: str, env: Mapping[str, str], config: dict[str, Any]) -> ExecOutput:
        version = config.get("cniVersion", "1.0.0")
        if command == "VERSION":
            body = {"cniVersion": version, "supportedVersions": list(self.versions)}
            return ExecOutput(0, json.dumps(body).encode(), b"")
        if command in self.fail:
            err = {
                "cniVersion": version,
                "code": self.fail_code,
                "msg": f"{self.name} says no",
                "details": f"{command} refused",
            }
            return ExecOutput(1, json.dumps(err).encode(), b"some stderr")
        key = (env.get("CNI_CONTAINERID", ""), env.get("CNI_IFNAME", ""))
        if command == "ADD":
            if "prevResult" in config:  # a chained plugin: passes the result on
                self.live[key] = "chained"
                return ExecOutput(0, json.dumps(config["prevResult"]).encode(), b"")
            address = f"{self.subnet}.{self.next_host}/24"
            self.next_host = self.next_host + 1 if self.next_host < 250 else 2
            self.live[key] = address
            result: dict[str, Any] = {
                "cniVersion": version,
                "interfaces": [
                    {
                        "name": key[1],
                        "mac": "0a:58:00:00:00:01",
                        "sandbox": env.get("CNI_NETNS", ""),
                    }
                ],
                "ips": [{"address": address, "gateway": f"{self.subnet}.1", "interface": 0}],
                "routes": [{"dst": "0.0.0.0/0", "gw": f"{self.subnet}.1"}],
            }
            if version.startswith("0."):
                result["ips"][0]["version"] = "4"
            return ExecOutput(0, json.dumps(result).encode(), b"")
        if command == "DEL":
            self.live.pop(key, None)
        if command == "CHECK" and key not in self.live:
            err = {"code": 999, "msg": f"{key[1]} missing"}
            return ExecOutput(1, json.dumps(err).encode(), b"")
        return ExecOutput(0, b"", b"")


class FakeExec:
    def __init__(self, *plugins: FakePlugin) -> None:
        self.plugins = {p.name: p for p in plugins}
        self.calls: list[Call] = []

    def find_in_path(self, plugin_type: str, dirs: Sequence[str]) -> str:
        if plugin_type not in self.plugins:
            raise PluginNotFound(f"no CNI plugin {plugin_type!r} (fake)")
        return f"/fake/{plugin_type}"

    def is_executable(self, path: str) -> bool:
        return path.startswith("/fake/") and path.rsplit("/", 1)[-1] in self.plugins

    def run(self, path: str, env: Mapping[str, str], stdin: bytes, timeout: float) -> ExecOutput:
        name = path.rsplit("/", 1)[-1]
        config = json.loads(stdin)
        self.calls.append(Call(name, env["CNI_COMMAND"], dict(env), config))
        return self.plugins[name].respond(env["CNI_COMMAND"], env, config)

    def decode_version(self, path: str, timeout: float) -> tuple[str, ...]:
        return parse_version_output(self.run(path, {"CNI_COMMAND": "VERSION"}, VERSION_STDIN, 1))

    def commands(self, command: str | None = None) -> list[tuple[str, str, str]]:
        """(plugin, command, ifname) of every non-VERSION call, in order."""
        return [
            (c.plugin, c.command, c.env.get("CNI_IFNAME", ""))
            for c in self.calls
            if c.command != "VERSION" and (command is None or c.command == command)
        ]

    def live(self) -> dict[str, dict[tuple[str, str], str]]:
        return {name: dict(p.live) for name, p in self.plugins.items() if p.live}
