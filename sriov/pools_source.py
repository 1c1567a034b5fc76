"""Where the node's VF pools come from. `PoolsSource` is what the node agent reads them through:
`PoolsFileSource` is the admin's pools file (`vfPools`: local mode, or cluster mode when the
daemon config chooses it); in cluster mode the VFPool objects selecting this node are the other
source behind the same calls (`metaplugin.k8s_pools.VFPoolSource`, which also wakes the agent
with `NodeAgent.wake()` when they change).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from cnispec.vfpools import PoolsFile
from sriov.pools import load_pools


class PoolsSource(Protocol):
    def load(self) -> PoolsFile:
        """The pools as they are now; PlexusError (naming what is wrong) when they cannot be
        read, in which case the pools already in force stay."""
        ...

    def changed(self) -> bool:
        """True once after the pools changed since the last `load` or `changed` (the agent
        polls this every second)."""
        ...

    def describe(self) -> str:
        """Where the pools come from, for logs."""
        ...


class PoolsFileSource:
    """The pools file, re-read when its inode, mtime or size changes (an editor's rename, a
    ConfigMap's symlink swap and an in-place write all show)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None

    def load(self) -> PoolsFile:
        self._stamp = _stamp(self.path)
        return load_pools(self.path)

    def changed(self) -> bool:
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return True

    def describe(self) -> str:
        return str(self.path)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)
