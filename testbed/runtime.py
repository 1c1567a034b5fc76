"""A minimal CNI runtime, driving Plexus exactly as libcni does: it reads the generated
conflist, injects name/cniVersion/runtimeConfig (declared capabilities only), caches the ADD
result and sends it as prevResult on CHECK and DEL, and execs the plugin with the CNI_*
environment. Containerd-level behaviour (double DEL, random CNI_ARGS order) is up to the test."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str

    @property
    def body(self) -> Any:
        return json.loads(self.stdout) if self.stdout.strip() else None

    def ok(self) -> Any:
        assert self.returncode == 0, f"plugin failed: {self.stdout} {self.stderr}"
        return self.body


class CniRuntime:
    def __init__(self, conf_file: Path, bin_dir: Path, *, cni_path: str | None = None) -> None:
        self.conflist = json.loads(conf_file.read_text())
        self.bin_dir = bin_dir
        self.cni_path = cni_path or str(bin_dir)
        self.cache: dict[tuple[str, str], dict[str, Any]] = {}

    def _stdin(
        self,
        version: str | None,
        capability_args: dict[str, Any],
        prev: dict[str, Any] | None,
        extra: dict[str, Any] | None,
    ) -> dict[str, Any]:
        (plugin,) = self.conflist["plugins"]
        conf = dict(plugin)
        conf["name"] = self.conflist["name"]
        conf["cniVersion"] = version or self.conflist["cniVersion"]
        declared = conf.get("capabilities", {})
        rc = {k: v for k, v in capability_args.items() if declared.get(k)}
        if rc:
            conf["runtimeConfig"] = rc
        if prev is not None:
            conf["prevResult"] = prev
        conf.update(extra or {})
        return conf

    def invoke(
        self,
        command: str,
        cid: str = "",
        *,
        netns: str = "",
        ifname: str = "eth0",
        args: str = "",
        capability_args: dict[str, Any] | None = None,
        prev: dict[str, Any] | None = None,
        version: str | None = None,
        extra: dict[str, Any] | None = None,
        raw_stdin: bytes | None = None,
    ) -> Outcome:
        env = {"CNI_COMMAND": command, "CNI_PATH": self.cni_path}
        if command in ("ADD", "DEL", "CHECK"):
            env |= {
                "CNI_CONTAINERID": cid,
                "CNI_NETNS": netns,
                "CNI_IFNAME": ifname,
                "CNI_ARGS": args,
            }
        stdin = (
            raw_stdin
            if raw_stdin is not None
            else json.dumps(self._stdin(version, capability_args or {}, prev, extra)).encode()
        )
        proc = subprocess.run(
            [str(self.bin_dir / "plexus")],
            input=stdin,
            capture_output=True,
            env=env,
            timeout=120,
            check=False,
        )
        return Outcome(proc.returncode, proc.stdout.decode(), proc.stderr.decode())

    def add(
        self,
        cid: str,
        netns: str,
        *,
        annotations: dict[str, str] | None = None,
        pod: tuple[str, str] = ("default", "pod"),
        uid: str = "",
        **kw: Any,
    ) -> Outcome:
        caps = dict(kw.pop("capability_args", {}) or {})
        if annotations is not None:
            caps["io.kubernetes.cri.pod-annotations"] = annotations
        args = (
            f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod[0]};K8S_POD_NAME={pod[1]};"
            f"K8S_POD_INFRA_CONTAINER_ID={cid};K8S_POD_UID={uid or 'uid-' + cid}"
        )
        out = self.invoke("ADD", cid, netns=netns, args=args, capability_args=caps, **kw)
        if out.returncode == 0:
            self.cache[(cid, kw.get("ifname", "eth0"))] = out.body
        return out

    def check(self, cid: str, netns: str, **kw: Any) -> Outcome:
        return self.invoke("CHECK", cid, netns=netns, prev=self.cache.get((cid, "eth0")), **kw)

    def delete(self, cid: str, netns: str = "", *, with_prev: bool = True, **kw: Any) -> Outcome:
        prev = self.cache.get((cid, "eth0")) if with_prev else None
        out = self.invoke("DEL", cid, netns=netns, prev=prev, **kw)
        if out.returncode == 0:
            self.cache.pop((cid, "eth0"), None)
        return out
