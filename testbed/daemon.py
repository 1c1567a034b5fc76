"""A real plexusd process for tests, running in a test-made "node" namespace with every path
under a temp dir, plus a tiny client for its unix socket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from metaplugin.client import get

PLEXUSD = str(Path(sys.executable).with_name("plexusd"))
METRICS_PORT = 9465


class DaemonProcess:
    def __init__(
        self,
        root: Path,
        config: dict[str, Any],
        *,
        netns: str | None = None,
        launcher: list[str] | None = None,
    ) -> None:
        self.root = root
        # How to enter the daemon's namespaces: `ip netns exec NS`, or nsenter for containerd's.
        self.launcher = launcher or (["ip", "netns", "exec", netns] if netns else [])
        self.config = {
            "stateDir": str(root / "state"),
            "runDir": str(root / "run"),
            "cniBinDir": str(root / "bin"),
            "cniConfDir": str(root / "net.d"),
            "cniPath": ["/usr/lib/cni"],
            "shimInterpreter": "/usr/bin/python3"
            if Path("/usr/bin/python3").exists()
            else sys.executable,
            "logFormat": "json",
            "logLevel": "debug",
            # Test beds keep host-local leases in their own temp dirs, wherever those are.
            "hostLocalDataRoots": [tempfile.gettempdir()],
            # In its own namespace, metrics on that namespace's loopback; in the host's, none
            # (a test never opens a port on the host).
            "metricsAddress": f"127.0.0.1:{METRICS_PORT}" if netns or launcher else "",
            **config,
        }
        root.mkdir(parents=True, exist_ok=True)
        self.config_file = root / "plexusd.yaml"
        self.config_file.write_text(yaml.safe_dump(self.config))
        self.log = root / "plexusd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        return str(Path(self.config["runDir"]) / "plexus.sock")

    @property
    def conf_file(self) -> Path:
        return Path(self.config["cniConfDir"]) / "00-plexus.conflist"

    def start(
        self,
        *,
        wait_conf: bool = True,
        timeout: float = 20.0,
        env: dict[str, str] | None = None,
    ) -> DaemonProcess:
        """Start plexusd; `env` adds variables (e.g. PLEXUS_FAILPOINTS) to this run only."""
        argv = [*self.launcher, PLEXUSD, "--config", str(self.config_file)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=log,
                start_new_session=True,
                env={**os.environ, **env} if env else None,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"plexusd exited with {self.proc.returncode}:\n{self.logs()}")
            if self.ready() and (not wait_conf or self.conf_file.exists()):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"plexusd not ready after {timeout}s:\n{self.logs()}")

    def ready(self) -> bool:
        try:
            return get(self.socket, "/readyz")[0] == 200
        except OSError:
            return False

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.logs().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == name:
                out.append(entry)
        return out

    def attachments(self) -> list[dict[str, Any]]:
        status, body = get(self.socket, "/v1/attachments")
        assert status == 200
        data: list[dict[str, Any]] = json.loads(body)
        return data
