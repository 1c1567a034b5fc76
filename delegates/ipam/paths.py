"""Where a network config may make host-local write and read on this node.

plexusd runs IPAM as root on behalf of whoever wrote the NetworkAttachmentDefinition, so the two
paths a host-local config names are confined: `ipam.dataDir` must resolve (after `..` and every
symlink) inside one of the node admin's data roots, where GC will only ever remove address-named
files; `ipam.resolvConf` must be one of the node admin's resolv.conf files (or lie under one of
their directories), since its DNS lines are copied into the result and from there into the pod's
network-status. A relative path is refused rather than read relative to plexusd's working
directory, which means nothing to the NAD's author.

The same checks run at resolution, for every host-local IPAM of a NAD's `spec.config` (also the
ones the exec'd reference plugins run), and again inside the in-process allocator for every call.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cnispec.errors import InvalidConfig, IOFailure

DEFAULT_DATA_DIR: Final = "/var/lib/cni/networks"
# What a node's resolvers usually are: the libc one and systemd-resolved's full list (the file
# kubelet's --resolv-conf names on systemd hosts).
DEFAULT_RESOLV_CONFS: Final = ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf")
# A resolv.conf is a few hundred bytes; glibc reads at most 6 search domains and 3 nameservers.
RESOLV_CONF_MAX_BYTES: Final = 64 * 1024
# The daemon config keys that widen what is allowed, named in every refusal.
DATA_ROOTS_KEY: Final = "hostLocalDataRoots"
RESOLV_CONFS_KEY: Final = "resolvConfPaths"
HOST_LOCAL: Final = "host-local"


@dataclass(frozen=True, slots=True)
class IpamPaths:
    """The node admin's data roots and resolv.conf allow-list (absolute paths)."""

    data_roots: tuple[str, ...] = (DEFAULT_DATA_DIR,)
    resolv_confs: tuple[str, ...] = DEFAULT_RESOLV_CONFS

    def lease_dir(self, data_dir: object, network: str) -> Path:
        """`<dataDir>/<network>` with symlinks resolved, if it lies inside a data root."""
        base = self._data_dir(data_dir)
        lease_dir = Path(os.path.realpath(base / network))
        if not any(lease_dir.is_relative_to(root) for root in self._real_roots()):
            # Only a symlink the node's root made can do this (the name has no '/' or '..').
            raise InvalidConfig(
                f"host-local lease directory {base / network} resolves to {lease_dir}, outside "
                f"{self._roots_text()}; remove the symlink or point ipam.dataDir elsewhere"
            )
        return lease_dir

    def resolv_conf(self, value: object) -> Path:
        """The file `ipam.resolvConf` names, symlinks resolved, if the allow-list has it."""
        if not isinstance(value, str):
            raise InvalidConfig("ipam.resolvConf must be a path string")
        real = Path(os.path.realpath(value)) if os.path.isabs(value) else None
        if real is None or not any(real.is_relative_to(a) for a in self._real_resolv_confs()):
            raise InvalidConfig(
                f"ipam.resolvConf {value!r} is not a file host-local may read on this node (it is "
                "read as root and its DNS settings go into the result); allowed are "
                f"{', '.join(self.resolv_confs) or 'none'}: name one of them, or ask the node "
                f"admin to add the file to the daemon config key {RESOLV_CONFS_KEY}"
            )
        return real

    def check_config(self, config: Mapping[str, Any]) -> None:
        """Every host-local IPAM of a network config (one plugin or a conflist) stays inside;
        nothing is created or read. Other IPAM types are not host-local's keys: left alone."""
        plugins = config.get("plugins")
        for plugin in plugins if isinstance(plugins, list) else [config]:
            ipam = plugin.get("ipam") if isinstance(plugin, Mapping) else None
            if not isinstance(ipam, Mapping) or ipam.get("type") != HOST_LOCAL:
                continue
            if ipam.get("dataDir"):
                self._data_dir(ipam["dataDir"])
            if ipam.get("resolvConf"):
                self.resolv_conf(ipam["resolvConf"])

    def _data_dir(self, value: object) -> Path:
        if not isinstance(value, str):
            raise InvalidConfig("ipam.dataDir must be a path string")
        if not os.path.isabs(value):
            raise InvalidConfig(
                f"ipam.dataDir {value!r} is not an absolute path; use a directory under "
                f"{self._roots_text()}"
            )
        real = Path(os.path.realpath(value))
        if not any(real.is_relative_to(root) for root in self._real_roots()):
            raise InvalidConfig(
                f"ipam.dataDir {value!r} resolves to {real}, outside {self._roots_text()}; "
                "put it under one of them, or ask the node admin to add its directory to the "
                f"daemon config key {DATA_ROOTS_KEY}"
            )
        return real

    def _real_roots(self) -> list[Path]:
        # Resolved on every call: a root may be a symlink (/var/run -> /run) made after start.
        return [Path(os.path.realpath(root)) for root in self.data_roots]

    def _real_resolv_confs(self) -> list[Path]:
        return [Path(os.path.realpath(path)) for path in self.resolv_confs]

    def _roots_text(self) -> str:
        roots = ", ".join(self.data_roots) or "none"
        return f"the directories host-local may use on this node ({roots})"


def read_bounded(path: Path, *, limit: int = RESOLV_CONF_MAX_BYTES) -> str:
    """A small regular file's text. Opened non-blocking so a FIFO cannot hold the caller; a
    device or anything larger than `limit` is refused rather than read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise IOFailure(f"host-local: cannot read ipam.resolvConf {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidConfig(f"ipam.resolvConf {path} is not a regular file")
        data = _read_up_to(fd, limit + 1)
    except OSError as exc:
        raise IOFailure(f"host-local: cannot read ipam.resolvConf {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise InvalidConfig(f"ipam.resolvConf {path} is larger than {limit // 1024} KiB")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise InvalidConfig(f"ipam.resolvConf {path} is not UTF-8 text") from None


def _read_up_to(fd: int, size: int) -> bytes:
    chunks: list[bytes] = []
    left = size
    while left > 0:
        chunk = os.read(fd, left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
