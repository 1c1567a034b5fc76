"""A tiny OCI image from Debian's busybox-static, built by hand (no registry, no umoci): one
layer holding /bin/busybox and its applets, tagged `busybox` (sh) and `pause` (sleep forever),
written as an OCI layout tarball that `ctr image import` takes."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any

BUSYBOX = Path("/bin/busybox")
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def _add(
    tar: tarfile.TarFile,
    name: str,
    *,
    data: bytes | None = None,
    mode: int = 0o644,
    link: str | None = None,
    directory: bool = False,
) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uid = info.gid = 0
    if directory:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
    elif link is not None:
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, link, 0o777
        tar.addfile(info)
    else:
        assert data is not None
        info.size, info.mode = len(data), mode
        tar.addfile(info, io.BytesIO(data))


def _layer() -> bytes:
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "var", "var/run"):
            _add(tar, d, directory=True)
        _add(tar, "bin/busybox", data=BUSYBOX.read_bytes(), mode=0o755)
        for applet in applets:
            if applet != "busybox":
                _add(tar, f"bin/{applet}", link="busybox")
        _add(tar, "etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n")
        _add(tar, "etc/group", data=b"root:x:0:\n")
    return raw.getvalue()


def _blob(blobs: dict[str, bytes], data: bytes) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"digest": digest, "size": len(data)}


def build_image(target: Path) -> Path:
    """Write the OCI layout tarball with tags `busybox` and `pause` to `target`."""
    blobs: dict[str, bytes] = {}
    layer = _layer()
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    layer_ref = {"mediaType": LAYER, **_blob(blobs, gzip.compress(layer, mtime=0))}
    manifests = []
    for tag, process in (
        ("busybox", {"Cmd": ["/bin/sh"]}),
        ("pause", {"Entrypoint": ["/bin/sleep"], "Cmd": ["2147483647"]}),
    ):
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/bin:/sbin"], **process},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
        config_ref = {"mediaType": CONFIG, **_blob(blobs, json.dumps(config).encode())}
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": config_ref,
            "layers": [layer_ref],
        }
        manifests.append(
            {
                "mediaType": MANIFEST,
                **_blob(blobs, json.dumps(manifest).encode()),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        )
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }
    with tarfile.open(target, "w") as tar:
        _add(tar, "oci-layout", data=json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        _add(tar, "index.json", data=json.dumps(index).encode())
        _add(tar, "blobs", directory=True)
        _add(tar, "blobs/sha256", directory=True)
        for digest, data in blobs.items():
            _add(tar, f"blobs/sha256/{digest.split(':', 1)[1]}", data=data)
    return target
