"""The node install step: put the shim into the CNI bin dir and Plexus's conflist into the CNI
conf dir, as the DaemonSet's plexusd does at start.

The shim installed is the compiled static one (shim/plexus-shim.c, `make shim`), which needs
nothing on the node: it is shipped inside this package as `metaplugin/bin/plexus` (package
data), or named by the daemon config's `shimBinary`. Only when there is no compiled shim at all
(a development checkout without musl-gcc) is the Python shim installed instead, with a warning:
it needs `shimInterpreter` (python3) on the node.

The shim is copied to a temp file in the same directory and renamed over the old one, so a
runtime exec'ing it never sees a half-written file ("text file busy" cannot happen: the old inode
stays intact for whoever runs it). The conflist is renamed into place too, then its same bytes
are written over it once more, because containerd 1.6 ignores a conf that appears only through
rename (containerd#11715) and reloads on a write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Final

import structlog

from cnispec.durable import atomic_write
from cnispec.errors import InvalidConfig
from metaplugin.config import NETWORK_NAME, DaemonConfig

log = structlog.get_logger(__name__)

SHIM_NAME: Final = "plexus"
SHIM_SOURCE: Final = Path(__file__).with_name("shim.py")
# Built by `make shim` (the Makefile's `shim` target) and carried as package data.
COMPILED_SHIM: Final = Path(__file__).with_name("bin") / SHIM_NAME
CONF_VERSION: Final = "1.0.0"  # containerd 1.6's libcni rejects 1.1.0 results
CONF_VERSIONS: Final = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"]
CAPABILITIES: Final = {
    "io.kubernetes.cri.pod-annotations": True,
    "portMappings": True,
    "bandwidth": True,
    "ips": True,
    "mac": True,
    "deviceID": True,
}


def shim_text(interpreter: str) -> str:
    lines = SHIM_SOURCE.read_text().splitlines(keepends=True)
    # One shebang argument only: "-I -S" as two would reach python as the single option "-I -S".
    shebang = f"#!{interpreter} -IS\n"
    if lines and lines[0].startswith("#!"):
        lines[0] = shebang
    else:
        lines.insert(0, shebang)
    return "".join(lines)


class ShimMissing(InvalidConfig):
    """The configured compiled shim is not there: plexusd stops with this message
    (`plexusd_failed`), since installing nothing beats installing a shim the node cannot run."""


def compiled_shim(cfg: DaemonConfig) -> Path | None:
    """The compiled shim to install: `shimBinary` when set (it must exist), else the one in
    the package, else None (no compiled shim was built)."""
    if cfg.shim_binary:
        path = Path(cfg.shim_binary)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ShimMissing(
                f"shimBinary {path} is not an executable file",
                "build it with `make shim`, or leave shimBinary out to install the packaged shim",
            )
        return path
    return COMPILED_SHIM if COMPILED_SHIM.is_file() else None


def shim_bytes(cfg: DaemonConfig) -> bytes:
    binary = compiled_shim(cfg)
    if binary is not None:
        return binary.read_bytes()
    log.warning(
        "shim_python_fallback",
        reason=f"no compiled shim at {COMPILED_SHIM} (run `make shim`); installing the Python "
        f"shim, which needs {cfg.shim_interpreter} on the node",
    )
    return shim_text(cfg.shim_interpreter).encode()


def install_shim(cfg: DaemonConfig) -> Path:
    """Put the shim into the CNI bin dir: a temp file beside it, fsync, rename. A runtime
    exec'ing the old shim keeps its inode (never "text file busy"), and one exec'ing the new
    name sees the whole file or the old one, never half of it."""
    return place_shim(cfg, shim_bytes(cfg))


def place_shim(cfg: DaemonConfig, data: bytes) -> Path:
    bin_dir = Path(cfg.cni_bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    target = bin_dir / SHIM_NAME
    if target.is_file() and target.read_bytes() == data and os.access(target, os.X_OK):
        return target
    atomic_write(target, data, mode=0o755)
    return target


def conflist(cfg: DaemonConfig, extra_capabilities: frozenset[str] = frozenset()) -> dict[str, Any]:
    return {
        "cniVersion": CONF_VERSION,
        "cniVersions": CONF_VERSIONS,
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": SHIM_NAME,
                "socketPath": cfg.socket_path,
                "spoolDir": cfg.spool_path,
                "shimTimeout": cfg.shim_timeout,
                "capabilities": {**CAPABILITIES, **dict.fromkeys(sorted(extra_capabilities), True)},
            }
        ],
    }


def write_conf(cfg: DaemonConfig, extra_capabilities: frozenset[str] = frozenset()) -> bool:
    """Write 00-plexus.conflist atomically; returns False when it was already up to date."""
    path = Path(cfg.conf_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(conflist(cfg, extra_capabilities), indent=2) + "\n").encode()
    if path.is_file() and path.read_bytes() == data:
        return False
    # Renamed into place, so no reader (a runtime, a test) ever sees an empty or partial file;
    # then the same bytes are written over it in place, without truncating, because a rename
    # raises only CREATE, which containerd 1.6 ignores (containerd#11715), and a write raises
    # WRITE, which it reloads on.
    atomic_write(path, data, mode=0o644)
    with open(path, "r+b") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def _marker(cfg: DaemonConfig) -> Path:
    return Path(cfg.state_dir) / "uninstalled"


def uninstall(cfg: DaemonConfig) -> None:
    """Remove the conflist so the runtime stops sending new pods to Plexus, and leave a marker
    so a running plexusd does not write it again. The shim stays: pods that still run must be
    able to DEL (spooled until a daemon replays them)."""
    _marker(cfg).parent.mkdir(parents=True, exist_ok=True)
    _marker(cfg).touch()
    remove_conf(cfg)


def uninstalled(cfg: DaemonConfig) -> bool:
    return _marker(cfg).exists()


def clear_uninstalled(cfg: DaemonConfig) -> None:
    _marker(cfg).unlink(missing_ok=True)


def remove_conf(cfg: DaemonConfig) -> bool:
    path = Path(cfg.conf_file)
    if not path.exists():
        return False
    path.unlink()
    return True
