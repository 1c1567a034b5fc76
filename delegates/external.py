"""Exec'd delegates: any CNI plugin binary on the CNI path, run exactly as the CNI spec says.

`Exec` is the seam tests replace (`FakeExec`); `RawExec` is the real one: it runs the binary with
only the CNI environment (plus PATH), feeds the config on stdin, enforces a deadline, retries
ETXTBSY (a plugin being copied into place while we exec it) and decodes the plugin's error JSON.
`ExecPlugin` adapts one binary to the `Plugin` interface and negotiates its version once per
binary (path, inode, size, mtime).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from cnispec import cni
from cnispec.cni import Result
from cnispec.errors import (
    DecodeFailure,
    DelegateFailed,
    DelegateTimeout,
    InvalidConfig,
    PluginNotFound,
)
from delegates.plugin import PluginRequest

DEFAULT_TIMEOUT: Final = 60.0
_SAFE_TYPE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_ETXTBSY_RETRIES: Final = 5
_BASE_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True, slots=True)
class ExecOutput:
    returncode: int
    stdout: bytes
    stderr: bytes


class Exec(Protocol):
    """How a plugin binary is found and run (libcni's invoke.Exec)."""

    def find_in_path(self, plugin_type: str, dirs: Sequence[str]) -> str: ...

    def run(
        self, path: str, env: Mapping[str, str], stdin: bytes, timeout: float
    ) -> ExecOutput: ...

    def decode_version(self, path: str, timeout: float) -> tuple[str, ...]:
        """The versions the plugin at `path` answers to VERSION."""
        ...

    def is_executable(self, path: str) -> bool: ...


def find_plugin(plugin_type: str, dirs: Sequence[str]) -> str:
    if not _SAFE_TYPE.match(plugin_type):
        raise InvalidConfig(f"plugin type {plugin_type!r} is not a plain file name")
    for d in dirs:
        candidate = os.path.join(d, plugin_type)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise PluginNotFound(
        f"no CNI plugin {plugin_type!r} in {os.pathsep.join(dirs) or '(empty CNI path)'}; "
        "install it there or add its directory to cniPath",
    )


class ChildTracker:
    """Remembers the delegate processes in flight (one file per process group under `root`),
    so that a daemon restarted after a crash can kill the ones its predecessor left running
    before it replays any DEL: an orphaned ADD must not finish after the DEL that undoes it."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = os.fspath(root)
        os.makedirs(self._root, mode=0o700, exist_ok=True)

    def started(self, pid: int) -> None:
        with open(os.path.join(self._root, str(pid)), "w") as f:
            f.write(_start_time(pid))

    def finished(self, pid: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self._root, str(pid)))

    def kill_orphans(self) -> list[int]:
        """Kill every recorded process group that is still the one recorded; returns them."""
        killed = []
        for name in os.listdir(self._root):
            path = os.path.join(self._root, name)
            with open(path) as f:
                recorded = f.read().strip()
            pid = int(name)
            if recorded and _start_time(pid) == recorded:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                    killed.append(pid)
            os.unlink(path)
        return killed


def _start_time(pid: int) -> str:
    """The process's start time (field 22 of /proc/PID/stat): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


class RawExec:
    """The real runner: subprocess with a clean environment and a hard deadline. Each plugin
    runs in its own process group, killed whole on timeout (a plugin's own children included).
    VERSION answers are cached per binary and re-asked when the file changes."""

    def __init__(self, *, tracker: ChildTracker | None = None) -> None:
        self._versions = _VersionCache()
        self._tracker = tracker

    def decode_version(self, path: str, timeout: float) -> tuple[str, ...]:
        key, cached = self._versions.get(path)
        if cached is not None:
            return cached
        versions = parse_version_output(
            self.run(path, {cni.ENV_COMMAND: cni.VERSION}, VERSION_STDIN, timeout)
        )
        self._versions.put(key, versions)
        return versions

    def find_in_path(self, plugin_type: str, dirs: Sequence[str]) -> str:
        return find_plugin(plugin_type, dirs)

    def is_executable(self, path: str) -> bool:
        return os.path.isfile(path) and os.access(path, os.X_OK)

    def run(self, path: str, env: Mapping[str, str], stdin: bytes, timeout: float) -> ExecOutput:
        proc = self._spawn(path, {"PATH": os.environ.get("PATH", _BASE_PATH), **env})
        if self._tracker is not None:
            self._tracker.started(proc.pid)
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise DelegateTimeout(
                f"CNI plugin {path} did not answer within {timeout:g}s and was killed",
            ) from None
        finally:
            if self._tracker is not None:
                self._tracker.finished(proc.pid)
        return ExecOutput(proc.returncode, out, err)

    @staticmethod
    def _spawn(path: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        for attempt in range(_ETXTBSY_RETRIES + 1):
            try:
                return subprocess.Popen(
                    [path],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=env,
                    cwd="/",
                    close_fds=True,
                    start_new_session=True,
                )
            except OSError as exc:
                # NOTE: ETXTBSY means the binary is being written (an installer copying it in);
                # it clears in milliseconds.
                if exc.errno == errno.ETXTBSY and attempt < _ETXTBSY_RETRIES:
                    time.sleep(0.05 * (attempt + 1))
                    continue
                raise DelegateFailed(f"cannot exec CNI plugin {path}: {exc.strerror}") from None
        raise AssertionError("unreachable")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill the plugin and everything it started; never wait on a pipe a survivor holds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        proc.communicate(timeout=2)
    except subprocess.TimeoutExpired:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        proc.wait(2)


VERSION_STDIN: Final = json.dumps({"cniVersion": cni.LATEST_VERSION}).encode()


def parse_version_output(out: ExecOutput) -> tuple[str, ...]:
    """A plugin's supportedVersions; one that cannot answer VERSION predates it (0.1.0)."""
    if out.returncode != 0:
        return ("0.1.0",)
    try:
        body = json.loads(out.stdout)
        return tuple(str(v) for v in body.get("supportedVersions", ["0.1.0"]))
    except (ValueError, AttributeError, TypeError):
        return ("0.1.0",)


def plugin_error(plugin_type: str, output: ExecOutput) -> DelegateFailed:
    """Decode a failed plugin's stdout error JSON (or fall back to its stderr)."""
    body: dict[str, Any] | None = None
    try:
        parsed = json.loads(output.stdout or b"null")
        if isinstance(parsed, dict) and "code" in parsed:
            body = parsed
    except ValueError:
        body = None
    if body is None:
        text = (output.stderr or output.stdout).decode(errors="replace").strip()
        body = {"code": 999, "msg": text or f"exited with status {output.returncode}"}
    msg = str(body.get("msg", ""))
    if body.get("details"):
        msg = f"{msg}; {body['details']}"
    return DelegateFailed(
        f"plugin {plugin_type} failed: {msg}",
        details=json.dumps(body, separators=(",", ":")),
    )


def plugin_env(command: str, req: PluginRequest) -> dict[str, str]:
    env = {cni.ENV_COMMAND: command, cni.ENV_PATH: os.pathsep.join(req.path)}
    if command in (cni.ADD, cni.DEL, cni.CHECK):
        env |= {
            cni.ENV_CONTAINERID: req.container_id,
            cni.ENV_NETNS: req.netns,
            cni.ENV_IFNAME: req.ifname,
            cni.ENV_ARGS: req.cni_args,
        }
    return env


class _VersionCache:
    """VERSION answers per binary, invalidated when the file changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, int, int, int], tuple[str, ...]] = {}

    def get(self, path: str) -> tuple[tuple[str, int, int, int], tuple[str, ...] | None]:
        st = os.stat(path)
        key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            return key, self._cache.get(key)

    def put(self, key: tuple[str, int, int, int], versions: tuple[str, ...]) -> None:
        with self._lock:
            self._cache[key] = versions


class ExecPlugin:
    """One external plugin binary behind the `Plugin` interface."""

    def __init__(
        self, plugin_type: str, path: str, *, exec_: Exec, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self._type = plugin_type
        self._path = path
        self._exec = exec_
        self._timeout = timeout

    @property
    def type(self) -> str:
        return self._type

    @property
    def path(self) -> str:
        return self._path

    def versions(self) -> tuple[str, ...]:
        return self._exec.decode_version(self._path, self._timeout)

    def prepare(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return dict(config)  # a binary gets its config as the network says it

    def _invoke(self, command: str, req: PluginRequest) -> bytes:
        out = self._exec.run(self._path, plugin_env(command, req), req.stdin(), self._timeout)
        if out.returncode != 0:
            raise plugin_error(self._type, out)
        return out.stdout

    def add(self, req: PluginRequest) -> Result:
        stdout = self._invoke(cni.ADD, req)
        try:
            body = json.loads(stdout)
        except ValueError:
            raise DecodeFailure(
                f"plugin {self._type} printed a result that is not JSON: {stdout[:200]!r}",
            ) from None
        if not isinstance(body, dict):
            raise DecodeFailure(f"plugin {self._type} printed a result that is not an object")
        body.setdefault("cniVersion", req.cni_version)
        return Result.from_wire(body)

    def delete(self, req: PluginRequest) -> None:
        self._invoke(cni.DEL, req)

    def check(self, req: PluginRequest, prev: Result) -> None:
        self._invoke(cni.CHECK, req)

    def gc(self, req: PluginRequest) -> None:
        self._invoke(cni.GC, req)

    def status(self, req: PluginRequest) -> None:
        self._invoke(cni.STATUS, req)
