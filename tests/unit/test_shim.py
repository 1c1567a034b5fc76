"""The shim as a runtime execs it: the installed single file, under `python3 -IS`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cnispec import cni
from metaplugin import shim
from metaplugin.config import DaemonConfig
from metaplugin.install import install_shim

INTERPRETER = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    cfg = DaemonConfig.model_validate(
        {
            "cniBinDir": str(tmp_path / "bin"),
            "shimInterpreter": INTERPRETER,
            "stateDir": str(tmp_path / "state"),
        }
    )
    return install_shim(cfg)


def run(binary: Path, command: str, conf: dict, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c1",
        "CNI_IFNAME": "eth0",
        "CNI_NETNS": "/proc/self/ns/net",
        "CNI_ARGS": "",
        "CNI_PATH": "/opt/cni/bin",
        "PYTHONPATH": "/should/not/matter",
        **env,
    }
    return subprocess.run(
        [str(binary)],
        input=json.dumps(conf),
        capture_output=True,
        text=True,
        env=full_env,
        timeout=30,
        check=False,
    )


def conf(tmp_path: Path, **extra: object) -> dict:
    return {
        "cniVersion": "1.0.0",
        "name": "plexus",
        "type": "plexus",
        "socketPath": str(tmp_path / "run" / "plexus.sock"),
        "spoolDir": str(tmp_path / "spool"),
        **extra,
    }


def test_installed_shim_has_an_isolated_single_argument_shebang(installed: Path) -> None:
    first = installed.read_text().splitlines()[0]
    assert first == f"#!{INTERPRETER} -IS"
    assert installed.stat().st_mode & 0o777 == 0o755


def test_shim_imports_only_the_standard_library() -> None:
    """Run the module under -I -S with sys.modules watched: nothing outside the stdlib."""
    code = (
        "import sys, runpy; sys.argv=['plexus'];\n"
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('s', {str(Path(shim.__file__))!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "bad = [n for n in sys.modules if n.split('.')[0] in "
        "('pydantic','pyroute2','kubernetes','structlog','yaml','metaplugin','delegates')]\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [INTERPRETER, "-I", "-S", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert out.stdout.strip() == "[]"


def test_constants_match_the_protocol_module() -> None:
    assert tuple(shim.SUPPORTED_VERSIONS) == cni.SUPPORTED_VERSIONS
    assert shim.CNI_KEYS == cni.CNI_ENV_KEYS
    assert DaemonConfig().socket_path == shim.DEFAULT_SOCKET
    assert DaemonConfig().spool_path == shim.DEFAULT_SPOOL


def test_version_needs_no_daemon(installed: Path, tmp_path: Path) -> None:
    out = run(installed, "VERSION", {"cniVersion": "0.4.0"})
    assert out.returncode == 0
    assert json.loads(out.stdout) == cni.version_result("0.4.0")


@pytest.mark.parametrize(
    ("command", "code"), [("ADD", 11), ("CHECK", 11), ("GC", 11), ("STATUS", 50)]
)
def test_unreachable_daemon_is_a_clear_error(
    installed: Path, tmp_path: Path, command: str, code: int
) -> None:
    out = run(installed, command, conf(tmp_path))
    assert out.returncode == 1
    err = json.loads(out.stdout)
    assert err["code"] == code
    assert "plexusd is not reachable" in err["msg"]
    assert not (tmp_path / "spool").exists()


def test_del_is_spooled_when_the_daemon_is_down(installed: Path, tmp_path: Path) -> None:
    c = conf(tmp_path)
    out = run(
        installed, "DEL", c, CNI_CONTAINERID="abc", CNI_IFNAME="eth0", CNI_ARGS="K8S_POD_NAME=p"
    )
    assert out.returncode == 0 and out.stdout == ""
    (entry,) = (tmp_path / "spool").glob("*.json")
    data = json.loads(entry.read_text())
    assert data["env"]["CNI_COMMAND"] == "DEL"
    assert data["env"]["CNI_CONTAINERID"] == "abc"
    assert data["env"]["CNI_ARGS"] == "K8S_POD_NAME=p"
    assert json.loads(data["config"]) == c
    assert "PYTHONPATH" not in data["env"]  # only CNI_* is forwarded


def test_unwritable_spool_fails_the_del_loudly(installed: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "spool"
    blocker.write_text("a file where the directory should be")
    out = run(installed, "DEL", conf(tmp_path))
    assert out.returncode == 1
    assert json.loads(out.stdout)["code"] == 11


class FakeDaemon:
    """Answers one POST /cni with a canned reply, then can close without answering."""

    def __init__(self, path: Path, status: int, body: bytes, *, hang_up: bool = False) -> None:
        self.received: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.thread = threading.Thread(
            target=self._serve, args=(status, body, hang_up), daemon=True
        )
        self.thread.start()

    def _serve(self, status: int, body: bytes, hang_up: bool) -> None:
        conn, _ = self.sock.accept()
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(
            next(
                line.split(b":")[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
        )
        while len(rest) < length:
            rest += conn.recv(65536)
        self.received.append(rest)
        if not hang_up:
            conn.sendall(
                b"HTTP/1.0 %d X\r\nContent-Length: %d\r\n\r\n" % (status, len(body)) + body
            )
        conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def daemon_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "run" / "plexus.sock"


def test_reply_is_relayed_byte_for_byte(installed: Path, tmp_path: Path, daemon_path: Path) -> None:
    reply = b'{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"ips":[]}'
    fake = FakeDaemon(daemon_path, 200, reply)
    out = run(installed, "ADD", conf(tmp_path), CNI_ARGS="A=1")
    fake.close()
    assert out.returncode == 0
    assert out.stdout == reply.decode() + "\n"
    envelope = json.loads(fake.received[0])
    assert envelope["env"]["CNI_ARGS"] == "A=1"
    assert json.loads(envelope["config"])["name"] == "plexus"


def test_error_reply_exits_1(installed: Path, tmp_path: Path, daemon_path: Path) -> None:
    err = b'{"cniVersion":"1.0.0","code":7,"msg":"bad"}'
    fake = FakeDaemon(daemon_path, 400, err)
    out = run(installed, "ADD", conf(tmp_path))
    fake.close()
    assert out.returncode == 1 and json.loads(out.stdout)["msg"] == "bad"


def test_daemon_dying_mid_del_spools_it(installed: Path, tmp_path: Path, daemon_path: Path) -> None:
    fake = FakeDaemon(daemon_path, 200, b"", hang_up=True)
    out = run(installed, "DEL", conf(tmp_path))
    fake.close()
    assert out.returncode == 0
    assert len(list((tmp_path / "spool").glob("*.json"))) == 1


def test_daemon_dying_mid_add_is_try_again(
    installed: Path, tmp_path: Path, daemon_path: Path
) -> None:
    fake = FakeDaemon(daemon_path, 200, b"", hang_up=True)
    out = run(installed, "ADD", conf(tmp_path))
    fake.close()
    assert out.returncode == 1 and json.loads(out.stdout)["code"] == 11


def test_shim_deadline(installed: Path, tmp_path: Path, daemon_path: Path) -> None:
    daemon_path.parent.mkdir(parents=True, exist_ok=True)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(daemon_path))
    silent.listen(1)  # accepts (backlog) but never answers
    try:
        out = run(installed, "ADD", conf(tmp_path, shimTimeout=0.5))
    finally:
        silent.close()
    assert out.returncode == 1 and json.loads(out.stdout)["code"] == 11


@pytest.mark.parametrize(
    "value",
    [
        {
            "cniVersion": "1.0.0",
            "socketPath": "/run/p.sock",
            "shimTimeout": 2.5,
            "n": 0,
            "t": True,
            "f": False,
            "z": None,
            "list": [1, "two", {"three": [3.25]}],
        },
        {"unicode": 'gr\u00fc\u00df \u2603 "quoted" back\\slash\nnewline\ttab'},
        [],
        "plain",
    ],
)
def test_the_shims_json_matches_the_json_module(value: object) -> None:
    assert json.loads(shim.dumps(value)) == value
    assert shim.loads(json.dumps(value)) == value
    assert shim.loads("  \n" + json.dumps(value, indent=2) + "\n ") == value


@pytest.mark.parametrize("text", ["{nope", "", "{} extra", '{"a": }', "[1,]"])
def test_the_shims_json_rejects_what_json_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        shim.loads(text)
