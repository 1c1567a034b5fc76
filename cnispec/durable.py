"""Durable writes: a file replaced so that a crash leaves the old or the new content, never a mix,
and the directory entry synced so the rename itself survives a power cut.

One helper for every store that must not lose state: attachment records (`metaplugin.store`),
the VF ledger (`sriov.ledger`), host-local's leases (`delegates.ipam._disk`) and the files the
node install writes (`metaplugin.install`). The shim, a single stdlib-only file, spells the
same recipe out for its spool.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600, sync_dir: bool = True) -> None:
    """Write `data` to `path` through a temp file beside it (fsync, rename). `sync_dir=False`
    leaves the directory fsync to the caller (one for a batch of files). The temp file is
    removed when anything fails, and its name is unique per thread, so concurrent writers of
    one directory never meet."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)  # the umask must not narrow it (a shim must be executable)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def durable_unlink(path: Path) -> bool:
    """Remove `path` and sync its directory; False when it was not there."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True
