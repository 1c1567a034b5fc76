"""The shim <-> daemon protocol (docs/shim-protocol.md), judged from outside the shim.

Each test execs a shim *executable* the way a runtime does (the CNI_* environment, the config on
stdin) against a fake plexusd on a unix socket under tmp_path, or against the daemon's real
socket server with a stand-in handler, and asserts only what a runtime or the daemon can see:
the exit status, stdout, the bytes the daemon received and the files in the spool directory.
So the same tests judge any implementation of the shim.

The shims under test are `builtin_shims()`: the compiled static shim (shim/plexus-shim.c, built
by `make shim` for the session, skipped with the reason only where musl-gcc is missing) and the
Python shim, each installed as plexusd installs it, plus every executable named in the
environment variable PLEXUS_SHIM, colon-separated:

    PLEXUS_SHIM=/path/to/plexus-c .venv/bin/python -m pytest tests/unit/test_shim_conformance.py

test_shim_parity.py holds the two built-in shims to the same bytes on stdout. What is
particular to the Python shim (shebang, stdlib-only imports, its JSON helpers) is tested in
test_shim.py.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from cnispec import cni
from cnispec.errors import InvalidConfig
from metaplugin.config import DaemonConfig
from metaplugin.install import install_shim, place_shim, shim_text
from metaplugin.scheduler import Scheduler
from metaplugin.server import Api
from metaplugin.spool import SpoolReplayer
from metaplugin.transport import SocketServer
from tests.support.shim import compiled_shim

INTERPRETER = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable

ShimSource = Callable[[Path], Path]
"""Given a scratch directory, returns the shim executable to test."""


def _scratch_config(scratch: Path, **extra: str) -> DaemonConfig:
    return DaemonConfig.model_validate(
        {"cniBinDir": str(scratch / "bin"), "stateDir": str(scratch / "state"), **extra}
    )


def install_python_shim(scratch: Path) -> Path:
    """The Python shim exactly as plexusd installs it when no compiled shim was built: one
    file, `#!<python3> -IS`."""
    cfg = _scratch_config(scratch, shimInterpreter=INTERPRETER)
    return place_shim(cfg, shim_text(cfg.shim_interpreter).encode())


def install_compiled_shim(scratch: Path) -> Path:
    """The compiled shim, built by `make shim`, installed as plexusd installs it."""
    return install_shim(_scratch_config(scratch, shimBinary=str(compiled_shim())))


def builtin_shims() -> dict[str, ShimSource]:
    return {"compiled": install_compiled_shim, "python": install_python_shim}


def _named_executable(path: Path, _scratch: Path) -> Path:
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"PLEXUS_SHIM names {path}, which is not an executable file")
    return path


def shims_from_environment(value: str) -> dict[str, ShimSource]:
    """PLEXUS_SHIM: colon-separated shim executables, each tested like the built-in ones."""
    paths = [Path(p).absolute() for p in value.split(":") if p]
    return {str(p): partial(_named_executable, p) for p in paths}


SHIMS = {**builtin_shims(), **shims_from_environment(os.environ.get("PLEXUS_SHIM", ""))}


@pytest.fixture(params=list(SHIMS))
def shim(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    return SHIMS[request.param](tmp_path / "shim")


# --- running the shim as a runtime does -------------------------------------------------------

CNI_ENV = {
    "CNI_CONTAINERID": "c1",
    "CNI_IFNAME": "eth0",
    "CNI_NETNS": "/proc/self/ns/net",
    "CNI_ARGS": "",
    "CNI_PATH": "/opt/cni/bin",
}


def run(
    binary: Path, command: str, stdin: Mapping[str, Any] | str | bytes, **env: str | None
) -> subprocess.CompletedProcess[bytes]:
    """Exec the shim with CNI_COMMAND=command plus CNI_ENV, updated by `env` (None unsets)."""
    full_env = {"CNI_COMMAND": command, **CNI_ENV, "PYTHONPATH": "/should/not/matter", **env}
    if isinstance(stdin, Mapping):
        stdin = json.dumps(stdin)
    return subprocess.run(
        [str(binary)],
        input=stdin.encode() if isinstance(stdin, str) else stdin,
        capture_output=True,
        env={k: v for k, v in full_env.items() if v is not None},
        timeout=30,
        check=False,
    )


def conf(tmp_path: Path, **extra: object) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "plexus",
        "type": "plexus",
        "socketPath": str(tmp_path / "run" / "plexus.sock"),
        "spoolDir": str(tmp_path / "spool"),
        **extra,
    }


def spooled(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "spool").glob("*.json"))


# --- a fake plexusd ---------------------------------------------------------------------------


def http_reply(status: int, body: bytes, reason: bytes = b"X") -> bytes:
    head = b"HTTP/1.0 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    return head % (status, reason, len(body)) + body


@dataclass(frozen=True)
class Received:
    head: bytes  # the request line and the headers, without the blank line
    body: bytes

    def header(self, name: str) -> str | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.decode("utf-8", "replace").partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None

    @property
    def envelope(self) -> dict[str, Any]:
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value


def _read_request(conn: socket.socket) -> Received:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return Received(data, b"")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = Received(head, b"").header("Content-Length")
    while length is not None and length.isdigit() and len(body) < int(length):
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return Received(head, body)


class FakeDaemon:
    """Stands in for plexusd on the shim's socket.

    For each connection: read one whole request (unless `read=False`), record it, send `reply`
    (raw bytes, usually `http_reply(...)`; b"" sends nothing) unless `stall`, where it waits
    for `stop()` instead, then close. `accept=False` listens but never accepts (a hung daemon).
    """

    def __init__(
        self,
        path: Path,
        reply: bytes = b"",
        *,
        accept: bool = True,
        read: bool = True,
        stall: bool = False,
    ) -> None:
        self.requests: list[Received] = []
        self.errors: list[OSError] = []
        self.connections = 0
        self._reply, self._read, self._stall = reply, read, stall
        self._stop = threading.Event()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(8)
        self._sock.settimeout(0.02)
        self._thread = threading.Thread(target=self._serve, daemon=True) if accept else None
        if self._thread is not None:
            self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                if self._stop.is_set():
                    return  # stopped, and nothing left in the backlog
                continue
            self.connections += 1
            with conn:
                try:
                    self._answer(conn)
                except OSError as exc:  # the shim went away early; the test sees the rest
                    self.errors.append(exc)

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        if self._read:
            self.requests.append(_read_request(conn))
        if self._stall:
            self._stop.wait(30)
        elif self._reply:
            conn.sendall(self._reply)

    def stop(self) -> None:
        """Serve what is already queued, then stop; safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._sock.close()


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "plexus.sock"


@pytest.fixture
def daemon(sock_path: Path) -> Iterator[Callable[..., FakeDaemon]]:
    """Starts a FakeDaemon on the socket `conf()` names; stops it whatever the test did."""
    started: list[FakeDaemon] = []

    def start(reply: bytes = b"", **kwargs: bool) -> FakeDaemon:
        started.append(FakeDaemon(sock_path, reply, **kwargs))
        return started[-1]

    yield start
    for fake in started:
        fake.stop()


class StandInHandler:
    """What the real server calls for each CNI request; answers with `answer(req)`."""

    def __init__(self) -> None:
        self.requests: list[cni.CniRequest] = []
        self.answer: Callable[[cni.CniRequest], dict[str, Any] | None] = lambda req: None

    def __call__(self, req: cni.CniRequest) -> dict[str, Any] | None:
        self.requests.append(req)
        return self.answer(req)


@pytest.fixture
def real_server(sock_path: Path) -> Iterator[StandInHandler]:
    """The daemon's own socket server (metaplugin.server) with a stand-in request handler."""
    handler = StandInHandler()
    api = Api(
        handle=handler,
        orchestrator=None,  # type: ignore[arg-type]  # Api.cni does not use it
        scheduler=Scheduler(max_concurrent=2, max_queue=2),
        store=None,  # type: ignore[arg-type]
        ready=lambda: True,
    )
    server = SocketServer(str(sock_path), api)
    server.start()
    yield handler
    server.stop()


# --- VERSION ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", cni.SUPPORTED_VERSIONS)
def test_version_needs_no_daemon(shim: Path, tmp_path: Path, version: str) -> None:
    out = run(shim, "VERSION", {"cniVersion": version})
    assert out.returncode == 0
    assert json.loads(out.stdout) == cni.version_result(version)


def test_version_is_answered_without_asking_the_daemon(
    shim: Path, tmp_path: Path, daemon: Callable[..., FakeDaemon]
) -> None:
    fake = daemon(http_reply(200, b'{"cniVersion":"9.9.9","supportedVersions":[]}'))
    out = run(shim, "VERSION", conf(tmp_path, cniVersion="1.1.0"))
    fake.stop()
    assert out.returncode == 0
    assert out.stdout.endswith(b"\n")
    assert json.loads(out.stdout) == cni.version_result("1.1.0")
    assert fake.connections == 0


def test_version_without_a_config_version_answers_1_0_0(shim: Path) -> None:
    out = run(shim, "VERSION", b"")
    assert out.returncode == 0
    assert json.loads(out.stdout) == {
        "cniVersion": "1.0.0",
        "supportedVersions": list(cni.SUPPORTED_VERSIONS),
    }


# --- the request ------------------------------------------------------------------------------


def test_the_request_is_one_http_1_0_post_to_cni(
    shim: Path, tmp_path: Path, daemon: Callable[..., FakeDaemon]
) -> None:
    fake = daemon(http_reply(200, b"{}"))
    out = run(shim, "ADD", conf(tmp_path))
    assert out.returncode == 0
    (request,) = fake.requests
    assert request.head.split(b"\r\n")[0] == b"POST /cni HTTP/1.0"
    assert request.header("Content-Length") == str(len(request.body))
    assert request.header("Content-Type") == "application/json"
    assert set(request.envelope) == {"env", "config"}
    assert isinstance(request.envelope["config"], str)


def test_only_the_cni_variables_are_forwarded(
    shim: Path, tmp_path: Path, daemon: Callable[..., FakeDaemon]
) -> None:
    fake = daemon(http_reply(200, b"{}"))
    out = run(
        shim,
        "ADD",
        conf(tmp_path),
        CNI_ARGS="K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p",
        CNI_PATH="/opt/cni/bin:/usr/libexec/cni",
        CNI_EXTRA="not forwarded",
        cni_ifname="not forwarded either",
        PATH="/usr/bin:/bin",
        HOME="/root",
        KUBECONFIG="/etc/kubernetes/admin.conf",
        HTTP_PROXY="http://proxy:3128",
    )
    assert out.returncode == 0
    (request,) = fake.requests
    assert request.envelope["env"] == {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": "/proc/self/ns/net",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p",
        "CNI_PATH": "/opt/cni/bin:/usr/libexec/cni",
    }


def test_unset_cni_variables_are_left_out_and_empty_ones_kept(
    shim: Path, tmp_path: Path, daemon: Callable[..., FakeDaemon]
) -> None:
    fake = daemon(http_reply(200, b"{}"))
    out = run(shim, "DEL", conf(tmp_path), CNI_NETNS=None, CNI_PATH=None, CNI_ARGS="")
    assert out.returncode == 0
    (request,) = fake.requests
    assert request.envelope["env"] == {
        "CNI_COMMAND": "DEL",
        "CNI_CONTAINERID": "c1",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "",
    }


def test_the_config_is_the_exact_stdin_text(
    shim: Path, sock_path: Path, daemon: Callable[..., FakeDaemon]
) -> None:
    fake = daemon(http_reply(200, b"{}"))
    text = (
        '\n {  "type":"plexus", "cniVersion" : "1.0.0",\n'
        f'\t"socketPath": {json.dumps(str(sock_path))},\n'
        '  "n": 1.50, "dup": 1, "dup": 2, "e": [],\n'
        '  "note": "gr\u00fc\u00df \\u2603 \\"q\\" \\\\ \\/ \u2603"\n}\n\n'
    )
    out = run(shim, "ADD", text)
    assert out.returncode == 0
    (request,) = fake.requests
    assert request.envelope["config"] == text


def test_stdin_that_is_not_utf8_is_forwarded_with_replacement_characters(
    shim: Path, tmp_path: Path, daemon: Callable[..., FakeDaemon]
) -> None:
    fake = daemon(http_reply(200, b"{}"))
    raw = json.dumps(conf(tmp_path, note="X")).encode().replace(b'"X"', b'"caf\xff"')
    out = run(shim, "ADD", raw)
    assert out.returncode == 0
    (request,) = fake.requests
    assert request.envelope["config"] == raw.decode("utf-8", "replace")
    assert '"caf\ufffd"' in request.envelope["config"]


@pytest.mark.parametrize("command", ["ADD", "DEL", "VERSION"])
@pytest.mark.parametrize("stdin", [b"{nope", b"{} extra", b"[1]", b"null", b'"plexus"', b"3"])
def test_stdin_that_is_not_a_json_object_is_code_6(shim: Path, command: str, stdin: bytes) -> None:
    out = run(shim, command, stdin)
    assert out.returncode == 1
    err = json.loads(out.stdout)
    assert err["code"] == 6
    assert err["cniVersion"] == "1.0.0"
    assert set(err) == {"cniVersion", "code", "msg", "details"}


# --- the reply --------------------------------------------------------------------------------


def test_reply_is_relayed_byte_for_byte(
    shim: Path, tmp_path: Path, daemon: Callable[..., FakeDaemon]
) -> None:
    reply = b'{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"ips":[]}'
    fake = daemon(http_reply(200, reply))
    out = run(shim, "ADD", conf(tmp_path), CNI_ARGS="A=1")
    assert out.returncode == 0
    assert out.stdout == reply + b"\n"
    envelope = fake.requests[0].envelope
    assert envelope["env"]["CNI_ARGS"] == "A=1"
    assert json.loads(envelope["config"])["name"] == "plexus"


def test_error_reply_exits_1(shim: Path, tmp_path: Path, daemon: Callable[..., FakeDaemon]) -> None:
    daemon(http_reply(400, b'{"cniVersion":"1.0.0","code":7,"msg":"bad"}'))
    out = run(shim, "ADD", conf(tmp_path))
    assert out.returncode == 1 and json.loads(out.stdout)["msg"] == "bad"


# the reply body -> what the shim prints
REPLIES = {
    "no-newline": (b'{"cniVersion":"1.0.0"}', b'{"cniVersion":"1.0.0"}\n'),
    "newline": (b'{"cniVersion":"1.0.0"}\n', b'{"cniVersion":"1.0.0"}\n'),
    "two-newlines": (b'{"cniVersion":"1.0.0"}\n\n', b'{"cniVersion":"1.0.0"}\n\n'),
    "crlf": (
        b'{\r\n "code": 7 ,\r\n "msg": "x"\r\n}\r\n',
        b'{\r\n "code": 7 ,\r\n "msg": "x"\r\n}\r\n',
    ),
    "not-utf8": (b'{"msg":"caf\xc3\xa9 \xff\x00"}', b'{"msg":"caf\xc3\xa9 \xff\x00"}\n'),
    "large": (b"x" * 300_000, b"x" * 300_000 + b"\n"),
}


@pytest.mark.parametrize("reply", list(REPLIES))
@pytest.mark.parametrize("status", [200, 400])
def test_the_reply_body_is_printed_as_is_plus_a_missing_newline(
    shim: Path, tmp_path: Path, daemon: Callable[..., FakeDaemon], status: int, reply: str
) -> None:
    body, printed = REPLIES[reply]
    daemon(http_reply(status, body))
    out = run(shim, "ADD", conf(tmp_path))
    assert out.stdout == printed
    assert out.returncode == (0 if status == 200 else 1)


@pytest.mark.parametrize("command", ["DEL", "CHECK", "GC", "STATUS"])
def test_an_empty_200_reply_prints_nothing(
    shim: Path, tmp_path: Path, daemon: Callable[..., FakeDaemon], command: str
) -> None:
    daemon(http_reply(200, b""))
    out = run(shim, command, conf(tmp_path, cniVersion="1.1.0"))
    assert out.returncode == 0
    assert out.stdout == b""
    assert not (tmp_path / "spool").exists()


@pytest.mark.parametrize("status", [201, 204, 302, 404, 413, 500, 503])
def test_any_status_but_200_exits_1_and_is_not_spooled(
    shim: Path, tmp_path: Path, daemon: Callable[..., FakeDaemon], status: int
) -> None:
    body = b'{"error":"not for you"}'
    daemon(http_reply(status, body))
    out = run(shim, "DEL", conf(tmp_path))
    assert out.returncode == 1
    assert out.stdout == body + b"\n"
    assert not (tmp_path / "spool").exists()  # an answer, however bad, is not "unreachable"


# --- the daemon's real server -----------------------------------------------------------------


def test_the_daemons_server_understands_the_shim(
    shim: Path, tmp_path: Path, real_server: StandInHandler
) -> None:
    result = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": []}
    real_server.answer = lambda req: result
    c = conf(tmp_path, note="gr\u00fc\u00df")
    out = run(shim, "ADD", c, CNI_ARGS="K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p")
    assert out.returncode == 0
    assert json.loads(out.stdout) == result
    (req,) = real_server.requests
    assert (req.command, req.container_id, req.netns, req.ifname) == (
        "ADD",
        "c1",
        "/proc/self/ns/net",
        "eth0",
    )
    assert (req.pod_namespace, req.pod_name, req.path) == ("ns", "p", ("/opt/cni/bin",))
    assert dict(req.config) == c


def test_the_daemons_answers_reach_the_runtime(
    shim: Path, tmp_path: Path, real_server: StandInHandler
) -> None:
    real_server.answer = lambda req: None
    out = run(shim, "DEL", conf(tmp_path))
    assert out.returncode == 0 and out.stdout == b""

    def refuse(req: cni.CniRequest) -> None:
        raise InvalidConfig("no such network", "try net-a")

    real_server.answer = refuse
    out = run(shim, "ADD", conf(tmp_path, cniVersion="0.4.0"))
    assert out.returncode == 1
    assert json.loads(out.stdout) == {
        "cniVersion": "0.4.0",
        "code": 7,
        "msg": "no such network",
        "details": "try net-a",
    }
    out = run(shim, "ADD", conf(tmp_path), CNI_IFNAME="x" * 20)  # refused by the daemon itself
    assert out.returncode == 1 and json.loads(out.stdout)["code"] == 4
    assert len(real_server.requests) == 2
    assert not (tmp_path / "spool").exists()


def test_the_daemons_refusals_are_cni_errors_too(
    tmp_path: Path, real_server: StandInHandler
) -> None:
    """What the daemon answers a request that is not one it takes: still CNI error JSON, so a
    shim that relays it gives the runtime an error it can read."""
    sock = str(tmp_path / "run" / "plexus.sock")
    for head in (
        b"POST /other HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}",
        b"POST /cni HTTP/1.0\r\nContent-Length: two\r\n\r\n{}",
        b"POST /cni HTTP/1.0\r\n\r\n",
        b"POST /cni HTTP/1.0\r\nContent-Length: 99999999\r\n\r\n{}",
    ):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(sock)
            client.sendall(head)
            reply = b""
            while chunk := client.recv(65536):
                reply += chunk
        status, _, body = reply.partition(b"\r\n\r\n")
        assert status.split(b" ")[1] in (b"404", b"413"), reply
        error = json.loads(body)
        assert error["code"] == 6 and error["msg"], error
    assert real_server.requests == []


# --- an unreachable daemon --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "code"), [("ADD", 11), ("CHECK", 11), ("GC", 11), ("STATUS", 50)]
)
def test_unreachable_daemon_is_a_clear_error(
    shim: Path, tmp_path: Path, command: str, code: int
) -> None:
    out = run(shim, command, conf(tmp_path))
    assert out.returncode == 1
    err = json.loads(out.stdout)
    assert err["code"] == code
    assert "plexusd is not reachable" in err["msg"]
    assert not (tmp_path / "spool").exists()


@pytest.mark.parametrize("version", ["0.4.0", "1.1.0"])
def test_the_shims_own_errors_are_one_line_of_cni_error_json(
    shim: Path, tmp_path: Path, version: str
) -> None:
    out = run(shim, "ADD", conf(tmp_path, cniVersion=version))
    assert out.returncode == 1
    assert out.stdout.endswith(b"\n") and out.stdout.count(b"\n") == 1
    err = json.loads(out.stdout)
    assert set(err) == {"cniVersion", "code", "msg", "details"}
    assert err["cniVersion"] == version
    assert err["msg"].startswith(f"plexusd is not reachable at {tmp_path / 'run' / 'plexus.sock'}")
    assert isinstance(err["details"], str) and err["details"]


def _stale_socket(path: Path) -> None:
    path.parent.mkdir(parents=True)
    gone = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with gone:
        gone.bind(str(path))
        gone.listen(1)  # the file stays after close: a crashed daemon's leftover


def _not_a_socket(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")


UNREACHABLE: dict[str, Callable[[Path, Callable[..., FakeDaemon]], object]] = {
    "no-directory": lambda path, daemon: None,
    "no-socket": lambda path, daemon: path.parent.mkdir(parents=True),
    "stale-socket": lambda path, daemon: _stale_socket(path),
    "not-a-socket": lambda path, daemon: _not_a_socket(path),
    "closed-unread": lambda path, daemon: daemon(read=False),  # accepts, hangs up at once
}


@pytest.mark.parametrize("how", list(UNREACHABLE))
def test_every_kind_of_unreachable(
    shim: Path, tmp_path: Path, sock_path: Path, daemon: Callable[..., FakeDaemon], how: str
) -> None:
    UNREACHABLE[how](sock_path, daemon)
    add = run(shim, "ADD", conf(tmp_path))
    assert add.returncode == 1 and json.loads(add.stdout)["code"] == 11
    status = run(shim, "STATUS", conf(tmp_path, cniVersion="1.1.0"))
    assert status.returncode == 1 and json.loads(status.stdout)["code"] == 50
    delete = run(shim, "DEL", conf(tmp_path))
    assert delete.returncode == 0 and delete.stdout == b""
    assert len(spooled(tmp_path)) == 1


BROKEN_ANSWERS = {
    "hang-up": b"",
    "header-cut": b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Len",
    "no-status-code": b"HTTP/1.0 OK\r\n\r\n{}",
    "not-http": b"plexusd is restarting\n",
    "not-http-with-a-status": b"garbage 200 x\r\n\r\n{}",
    # The daemon died while it answered: 8 of the 100 bytes it announced.
    "body-cut": b'HTTP/1.0 200 OK\r\nContent-Length: 100\r\n\r\n{"cniVer',
}


@pytest.mark.parametrize("answer", list(BROKEN_ANSWERS))
def test_a_broken_answer_counts_as_unreachable(
    shim: Path, tmp_path: Path, daemon: Callable[..., FakeDaemon], answer: str
) -> None:
    fake = daemon(BROKEN_ANSWERS[answer])
    add = run(shim, "ADD", conf(tmp_path))
    assert add.returncode == 1 and json.loads(add.stdout)["code"] == 11
    delete = run(shim, "DEL", conf(tmp_path))
    assert delete.returncode == 0 and delete.stdout == b""
    assert len(spooled(tmp_path)) == 1
    assert [r.envelope["env"]["CNI_COMMAND"] for r in fake.requests] == ["ADD", "DEL"]


def test_bytes_beyond_the_content_length_are_not_the_reply(
    shim: Path, tmp_path: Path, daemon: Callable[..., FakeDaemon]
) -> None:
    daemon(b'HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}{"not":"this"}')
    out = run(shim, "ADD", conf(tmp_path))
    assert out.returncode == 0 and out.stdout == b"{}\n"


@pytest.mark.parametrize("timeout", ["Infinity", "NaN", "-1", "1e300"])
def test_a_timeout_the_shim_cannot_use_falls_back_to_a_real_deadline(
    shim: Path, tmp_path: Path, daemon: Callable[..., FakeDaemon], timeout: str
) -> None:
    fake = daemon(http_reply(200, b"{}"))
    text = json.dumps(conf(tmp_path)).replace('"type"', f'"shimTimeout": {timeout}, "type"')
    out = run(shim, "ADD", text)
    assert out.returncode == 0 and out.stdout == b"{}\n", out.stderr
    assert len(fake.requests) == 1


@pytest.mark.parametrize("command", ["ADD", "DEL"])
def test_a_socket_path_that_is_not_a_string_is_code_7(
    shim: Path, tmp_path: Path, command: str
) -> None:
    out = run(shim, command, conf(tmp_path, socketPath=["/run/plexus/plexus.sock"]))
    assert out.returncode == 1
    err = json.loads(out.stdout)
    assert err["code"] == 7 and "socketPath" in err["msg"]
    assert not (tmp_path / "spool").exists()


def test_daemon_dying_mid_del_spools_it(
    shim: Path, tmp_path: Path, daemon: Callable[..., FakeDaemon]
) -> None:
    daemon()  # reads the request, closes without an answer
    out = run(shim, "DEL", conf(tmp_path))
    assert out.returncode == 0
    assert len(list((tmp_path / "spool").glob("*.json"))) == 1


def test_daemon_dying_mid_add_is_try_again(
    shim: Path, tmp_path: Path, daemon: Callable[..., FakeDaemon]
) -> None:
    daemon()
    out = run(shim, "ADD", conf(tmp_path))
    assert out.returncode == 1 and json.loads(out.stdout)["code"] == 11


def test_shim_deadline(shim: Path, tmp_path: Path, daemon: Callable[..., FakeDaemon]) -> None:
    daemon(accept=False)  # the connection waits in the backlog; nobody ever answers
    started = time.monotonic()
    out = run(shim, "ADD", conf(tmp_path, shimTimeout=0.5))
    elapsed = time.monotonic() - started
    assert out.returncode == 1 and json.loads(out.stdout)["code"] == 11
    assert 0.45 <= elapsed < 10


def test_deadline_on_a_del_spools_it(
    shim: Path, tmp_path: Path, daemon: Callable[..., FakeDaemon]
) -> None:
    fake = daemon(stall=True)  # reads the whole request, then never answers
    started = time.monotonic()
    out = run(shim, "DEL", conf(tmp_path, shimTimeout=0.5))
    elapsed = time.monotonic() - started
    assert out.returncode == 0 and out.stdout == b""
    assert 0.45 <= elapsed < 10
    assert len(fake.requests) == 1
    (entry,) = spooled(tmp_path)
    assert json.loads(entry.read_bytes())["env"] == fake.requests[0].envelope["env"]


# --- the spool --------------------------------------------------------------------------------


def test_del_is_spooled_when_the_daemon_is_down(shim: Path, tmp_path: Path) -> None:
    c = conf(tmp_path)
    out = run(shim, "DEL", c, CNI_CONTAINERID="abc", CNI_IFNAME="eth0", CNI_ARGS="K8S_POD_NAME=p")
    assert out.returncode == 0 and out.stdout == b""
    (entry,) = (tmp_path / "spool").glob("*.json")
    data = json.loads(entry.read_text())
    assert data["env"]["CNI_COMMAND"] == "DEL"
    assert data["env"]["CNI_CONTAINERID"] == "abc"
    assert data["env"]["CNI_ARGS"] == "K8S_POD_NAME=p"
    assert json.loads(data["config"]) == c
    assert "PYTHONPATH" not in data["env"]  # only CNI_* is forwarded


def test_the_spool_file_has_the_documented_name_and_content(shim: Path, tmp_path: Path) -> None:
    text = json.dumps(conf(tmp_path), indent=1) + "\n"
    before = time.time_ns()
    out = run(
        shim,
        "DEL",
        text,
        CNI_CONTAINERID="k8s_pod/web-0:abc.123 x",
        CNI_IFNAME="net1",
        CNI_ARGS="K8S_POD_NAME=p",
        CNI_EXTRA="not forwarded",
    )
    after = time.time_ns()
    assert out.returncode == 0 and out.stdout == b""
    spool = tmp_path / "spool"
    (entry,) = spool.iterdir()  # nothing else: no temporary file left behind
    stamp, _, rest = entry.name.partition("-")
    assert stamp.isdigit() and before <= int(stamp) <= after
    assert rest == "k8s_pod_web-0_abc.123_x-net1.json"
    data = json.loads(entry.read_bytes())
    assert set(data) == {"env", "config", "spooledAt"}
    assert data["env"] == {
        "CNI_COMMAND": "DEL",
        "CNI_CONTAINERID": "k8s_pod/web-0:abc.123 x",
        "CNI_NETNS": "/proc/self/ns/net",
        "CNI_IFNAME": "net1",
        "CNI_ARGS": "K8S_POD_NAME=p",
        "CNI_PATH": "/opt/cni/bin",
    }
    assert data["config"] == text
    assert isinstance(data["spooledAt"], float)
    assert before / 1e9 - 0.001 <= data["spooledAt"] <= after / 1e9 + 0.001
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert stat.S_IMODE(spool.stat().st_mode) == 0o700


def test_the_spool_file_name_is_cut_to_80_and_15_characters(shim: Path, tmp_path: Path) -> None:
    out = run(shim, "DEL", conf(tmp_path), CNI_CONTAINERID="c" * 100, CNI_IFNAME="i" * 20)
    assert out.returncode == 0
    (entry,) = spooled(tmp_path)
    assert entry.name.partition("-")[2] == "c" * 80 + "-" + "i" * 15 + ".json"
    env = json.loads(entry.read_bytes())["env"]
    assert (env["CNI_CONTAINERID"], env["CNI_IFNAME"]) == ("c" * 100, "i" * 20)  # kept whole


def test_spool_file_names_sort_in_the_order_the_dels_came(shim: Path, tmp_path: Path) -> None:
    for cid in ("zz-first", "aa-second", "mm-third"):
        assert run(shim, "DEL", conf(tmp_path), CNI_CONTAINERID=cid).returncode == 0
    ids = [json.loads(p.read_bytes())["env"]["CNI_CONTAINERID"] for p in spooled(tmp_path)]
    assert ids == ["zz-first", "aa-second", "mm-third"]


def test_unwritable_spool_fails_the_del_loudly(shim: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "spool"
    blocker.write_text("a file where the directory should be")
    out = run(shim, "DEL", conf(tmp_path))
    assert out.returncode == 1
    assert json.loads(out.stdout)["code"] == 11


class RecordingOrchestrator:
    def __init__(self) -> None:
        self.deleted: list[tuple[cni.CniRequest, float]] = []

    def delete_spooled(self, req: cni.CniRequest, spooled_at: float, *, last: bool = False) -> None:
        self.deleted.append((req, spooled_at))


def test_the_daemon_replays_what_the_shim_spooled(shim: Path, tmp_path: Path) -> None:
    c = conf(tmp_path)
    before = time.time()
    for cid in ("first", "second"):
        out = run(
            shim, "DEL", c, CNI_CONTAINERID=cid, CNI_ARGS="K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p"
        )
        assert out.returncode == 0
    orchestrator = RecordingOrchestrator()
    replayer = SpoolReplayer(
        str(tmp_path / "spool"),
        orchestrator=orchestrator,  # type: ignore[arg-type]
        scheduler=Scheduler(max_concurrent=1, max_queue=0),
    )
    assert replayer.replay() == 0
    assert [req.container_id for req, _ in orchestrator.deleted] == ["first", "second"]
    req, spooled_at = orchestrator.deleted[0]
    assert (req.command, req.ifname, req.netns) == ("DEL", "eth0", "/proc/self/ns/net")
    assert (req.pod_namespace, req.pod_name) == ("ns", "p")
    assert dict(req.config) == c
    assert before - 0.001 <= spooled_at <= time.time()
    assert list((tmp_path / "spool").iterdir()) == []  # all replayed; nothing went to bad/
