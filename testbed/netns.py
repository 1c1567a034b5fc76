"""Network namespaces a test makes and always removes, and what a user would look at in them.

Names carry a prefix unique to this test run (`RUN_PREFIX`) so parallel runs and leftovers of a
crashed run never collide with each other or with the machine's own namespaces.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RUN_PREFIX = f"px{secrets.token_hex(2)}"
NETNS_DIR = Path("/run/netns")


def sh(
    *argv: str, check: bool = True, netns: str | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=60)


class Netns:
    def __init__(self, role: str) -> None:
        self.name = f"{RUN_PREFIX}-{role}"
        sh("ip", "netns", "add", self.name)
        sh("ip", "-n", self.name, "link", "set", "lo", "up")

    @property
    def path(self) -> str:
        return str(NETNS_DIR / self.name)

    def exists(self) -> bool:
        return Path(self.path).exists()

    def delete(self) -> None:
        if self.exists():
            sh("ip", "netns", "del", self.name, check=False)

    def ip(self, *args: str) -> Any:
        out = sh("ip", "-n", self.name, "-j", "-d", *args).stdout
        return json.loads(out) if out.strip() else []

    def links(self) -> dict[str, dict[str, Any]]:
        return {link["ifname"]: link for link in self.ip("link", "show")}

    def addresses(self, ifname: str) -> list[str]:
        out = []
        for link in self.ip("addr", "show", "dev", ifname):
            for a in link.get("addr_info", []):
                if a.get("scope") == "global":
                    out.append(f"{a['local']}/{a['prefixlen']}")
        return out

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(*argv, netns=self.name, check=check)


@contextmanager
def namespaces() -> Iterator[list[Netns]]:
    """Collects every Netns a test makes and deletes them all at the end, even on failure."""
    made: list[Netns] = []
    try:
        yield made
    finally:
        for ns in reversed(made):
            ns.delete()


def leftover_namespaces() -> list[str]:
    return sorted(p.name for p in NETNS_DIR.glob(f"{RUN_PREFIX}-*")) if NETNS_DIR.exists() else []


def is_root() -> bool:
    return os.geteuid() == 0
