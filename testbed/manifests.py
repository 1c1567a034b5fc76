"""Network configs and NAD manifests the test beds, the demo and the benchmarks share, and what
host-local leaves on disk (its reservations)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def nad(
    name: str,
    config: dict[str, Any] | None,
    namespace: str = "default",
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A NetworkAttachmentDefinition; `config` None gives one without spec.config."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations:
        meta["annotations"] = annotations
    doc: dict[str, Any] = {
        "apiVersion": "k8s.cni.cncf.io/v1",
        "kind": "NetworkAttachmentDefinition",
        "metadata": meta,
    }
    if config is not None:
        doc["spec"] = {"config": json.dumps({"name": name, **config})}
    return doc


def host_local(subnet: str, data_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "type": "host-local",
        "dataDir": str(data_dir),
        "ranges": [[{"subnet": subnet}]],
        **extra,
    }


def macvlan(master: str, subnet: str, data_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "type": "macvlan",
        "master": master,
        "mode": "bridge",
        "ipam": host_local(subnet, data_dir),
        **extra,
    }


def bridge_conflist(name: str, bridge: str, subnet: str, data_dir: Path) -> dict[str, Any]:
    """A cluster network: Debian's bridge (gateway, no masquerade) + host-local."""
    return {
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": False,
                "ipam": host_local(subnet, data_dir, routes=[{"dst": "0.0.0.0/0"}]),
            }
        ],
    }


def reservations(data_dir: Path) -> list[str]:
    """host-local's reservation files (one per leased address), none of its bookkeeping."""
    if not data_dir.exists():
        return []
    return sorted(
        str(p.relative_to(data_dir))
        for p in data_dir.rglob("*")
        if p.is_file() and p.name != "lock" and not p.name.startswith("last_reserved_ip")
    )
