"""CNI config files on disk: find one by its `name`, or take the first in a directory.

Used to resolve clusterNetwork / defaultNetworks given as a conf name or path, and NADs without
spec.config. Plexus's own generated conflist is never a candidate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from cnispec.errors import InvalidConfig

OWN_CONF: Final = "00-plexus.conflist"
_LIST_SUFFIX: Final = ".conflist"
_SINGLE_SUFFIXES: Final = (".conf", ".json")


def load(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = json.loads(p.read_bytes())
    except OSError as exc:
        raise InvalidConfig(f"cannot read CNI config {p}: {exc.strerror}") from None
    except ValueError as exc:
        raise InvalidConfig(f"CNI config {p} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidConfig(f"CNI config {p} must be a JSON object")
    return data


def candidates(directory: str | Path) -> list[Path]:
    """Conf files in load order: conflists first (NPWG §3.4.1), each group by file name."""
    d = Path(directory)
    try:
        files = [p for p in d.iterdir() if p.is_file() and p.name != OWN_CONF]
    except (FileNotFoundError, NotADirectoryError):
        return []
    lists = sorted(p for p in files if p.suffix == _LIST_SUFFIX)
    singles = sorted(p for p in files if p.suffix in _SINGLE_SUFFIXES)
    return lists + singles


def find_by_name(directory: str | Path, name: str) -> tuple[Path, dict[str, Any]] | None:
    for path in candidates(directory):
        try:
            config = load(path)
        except InvalidConfig:
            continue  # a broken neighbour must not hide the one we look for
        if config.get("name") == name:
            return path, config
    return None


def first(directory: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The conf a runtime would pick from `directory`: the first by file name."""
    d = Path(directory)
    try:
        files = sorted(
            p
            for p in d.iterdir()
            if p.is_file() and p.name != OWN_CONF and p.suffix in (_LIST_SUFFIX, *_SINGLE_SUFFIXES)
        )
    except (FileNotFoundError, NotADirectoryError):
        return None
    for path in files:
        return path, load(path)
    return None
