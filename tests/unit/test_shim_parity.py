"""The compiled shim and the Python shim, byte for byte: the same inputs give the same exit
status, the same bytes on stdout, the same request bytes at the daemon and the same spool files
(but for the clock in their name and `spooledAt`). The protocol itself is judged in
test_shim_conformance.py; this pins down what the protocol leaves to the implementation (the
wording of the shim's own messages, JSON escapes, errno texts) so a runtime, a log search or an
alert cannot tell which shim a node runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.unit.test_shim_conformance import (
    BROKEN_ANSWERS,
    REPLIES,
    FakeDaemon,
    http_reply,
    install_compiled_shim,
    install_python_shim,
)

Env = dict[bytes, bytes]
BASE_ENV: Env = {
    b"CNI_CONTAINERID": b"c1",
    b"CNI_IFNAME": b"eth0",
    b"CNI_NETNS": b"/proc/self/ns/net",
    b"CNI_ARGS": b"K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p",
    b"CNI_PATH": b"/opt/cni/bin",
}


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: bytes
    requests: tuple[bytes, ...]
    spooled: tuple[tuple[str, bytes], ...]


@pytest.fixture(scope="module")
def shims(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity")
    return {
        "compiled": install_compiled_shim(root / "compiled"),
        "python": install_python_shim(root / "python"),
    }


def spool_state(spool: Path) -> tuple[tuple[str, bytes], ...]:
    """Every file under the spool, the clock taken out of names and contents."""
    if not spool.exists():
        return ()
    out = []
    for path in sorted(spool.rglob("*")):
        name = re.sub(r"^\d{19}-", "<ns>-", path.name)
        data = b"<dir>" if path.is_dir() else path.read_bytes()
        data = re.sub(rb'"spooledAt":\d+\.\d+\}$', b'"spooledAt":<s>}', data)
        out.append((name, data))
    return tuple(out)


def conf(root: Path, **extra: object) -> dict[str, object]:
    return {
        "cniVersion": "1.0.0",
        "name": "plexus",
        "type": "plexus",
        "socketPath": str(root / "run" / "plexus.sock"),
        "spoolDir": str(root / "spool"),
        **extra,
    }


Setup = Callable[[Path], FakeDaemon | None]


def run_once(
    shim: Path, root: Path, command: bytes, stdin: bytes, *, env: Env, setup: Setup | None
) -> Outcome:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    fake = setup(root) if setup else None
    try:
        done = subprocess.run(
            [str(shim)],
            input=stdin,
            env={**BASE_ENV, b"CNI_COMMAND": command, **env},  # type: ignore[dict-item]
            capture_output=True,
            timeout=30,
            check=False,
        )
    finally:
        if fake is not None:
            fake.stop()
    requests = tuple(r.head + b"\r\n\r\n" + r.body for r in fake.requests) if fake else ()
    return Outcome(done.returncode, done.stdout, requests, spool_state(root / "spool"))


def assert_same(
    shims: dict[str, Path],
    root: Path,
    command: bytes,
    stdin: Callable[[Path], bytes],
    *,
    env: Env | None = None,
    setup: Setup | None = None,
) -> Outcome:
    outcomes = {
        name: run_once(shim, root, command, stdin(root), env=env or {}, setup=setup)
        for name, shim in shims.items()
    }
    assert outcomes["compiled"] == outcomes["python"]
    return outcomes["compiled"]


def as_json(value: object) -> Callable[[Path], bytes]:
    return lambda root: json.dumps(value).encode()


def with_conf(**extra: object) -> Callable[[Path], bytes]:
    return lambda root: json.dumps(conf(root, **extra)).encode()


def with_raw(key: str, raw: str) -> Callable[[Path], bytes]:
    """conf() plus one key whose JSON text is given as is (escapes, NaN, huge numbers)."""
    return lambda root: json.dumps(conf(root))[:-1].encode() + f', "{key}": {raw}}}'.encode()


# --- VERSION and the config the shim cannot use ----------------------------------------------

VERSION_INPUTS = {
    "supported": as_json({"cniVersion": "0.4.0"}),
    "unknown": as_json({"cniVersion": "9.9.9"}),
    "absent": as_json({}),
    "empty-stdin": lambda root: b"",
    "a number": as_json({"cniVersion": 1.0}),
    "non-ascii": as_json({"cniVersion": "gr\u00fc\u00df \u2603 \U0001f600"}),
    "escapes": lambda root: rb'{"cniVersion": "q\"b\\s\/\b\f\n\r\t\u0001\u007f\u00e9"}',
    "lone surrogate": lambda root: rb'{"cniVersion": "\ud800x\udc00"}',
    "surrogate pair": lambda root: rb'{"cniVersion": "\ud83d\ude00"}',
    "duplicate key": lambda root: b'{"cniVersion": "0.3.1", "cniVersion": "1.1.0"}',
    "escaped key": lambda root: b'{"cni\\u0056ersion": "0.3.0"}',
    "not utf-8": lambda root: b'{"cniVersion": "caf\xe9\xff\xc3"}',
    "whitespace": lambda root: b' \t\r\n{"cniVersion":"1.1.0"}\n\n ',
    "brackets inside a string": lambda root: b'{"a": "' + b"[" * 600 + b'"}',
    "a huge integer": lambda root: b'{"a": -' + b"9" * 5000 + b'e5, "cniVersion": "1.1.0"}',
    # the compiled shim once crashed on a constant below the top level (found by the fuzz tier)
    "nested constants": lambda root: b'{"a": [NaN, -Infinity, {"b": Infinity}], "c": NaN}',
}


@pytest.mark.parametrize("case", list(VERSION_INPUTS))
def test_version(shims: dict[str, Path], tmp_path: Path, case: str) -> None:
    out = assert_same(shims, tmp_path / "r", b"VERSION", VERSION_INPUTS[case])
    assert out.returncode == 0 and out.stdout.endswith(b"}\n")


DEEP = 600
NOT_AN_OBJECT = {
    "invalid": lambda root: b"{nope",
    "extra data": lambda root: b"{} extra",
    "array": lambda root: b"[1]",
    "null": lambda root: b"null",
    "string": lambda root: b'"plexus"',
    "number": lambda root: b"-3.5e2",
    "boolean": lambda root: b"true",
    "NaN": lambda root: b"NaN",
    "blank": lambda root: b"   \n",
    "not utf-8": lambda root: b"\xff\xfe{}",
    "form feed": lambda root: b"\x0c{}",
    "control character in a string": lambda root: b'{"a": "x\x01y"}',
    "bad escape": lambda root: b'{"a": "\\x"}',
    "short unicode escape": lambda root: b'{"a": "\\u12"}',
    "trailing comma": lambda root: b'{"a": [1,]}',
    "leading zero": lambda root: b'{"a": 01}',
    "bare minus": lambda root: b'{"a": -}',
    "1.": lambda root: b'{"a": 1.}',
    "1e": lambda root: b'{"a": 1e}',
    "deep and valid": lambda root: b'{"a": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    "deeper than python can": lambda root: b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "deep, then invalid": lambda root: b'{"a": ' + b"[" * DEEP + b"nope",
    "invalid, then deep": lambda root: b'{"a": nope ' + b"[" * DEEP,
    "exactly 512 deep": lambda root: b"[" * 511 + b"{}" + b"]" * 511,
    "513 deep": lambda root: b"[" * 512 + b"{}" + b"]" * 512,
    "unterminated string": lambda root: b'{"a": "[[[',
    "larger than 4 MiB": lambda root: b'{"a": "' + b"x" * (4 * 1024 * 1024) + b'"}',
}


@pytest.mark.parametrize("command", [b"ADD", b"VERSION"])
@pytest.mark.parametrize("case", list(NOT_AN_OBJECT))
def test_stdin_that_is_not_a_json_object(
    shims: dict[str, Path], tmp_path: Path, case: str, command: bytes
) -> None:
    out = assert_same(shims, tmp_path / "r", command, NOT_AN_OBJECT[case])
    assert out.returncode == 1 and json.loads(out.stdout)["code"] == 6


BAD_SOCKET_PATHS = {
    "number": with_conf(socketPath=5),
    "zero": with_conf(socketPath=0),
    "false": with_conf(socketPath=False),
    "array": with_conf(socketPath=["/run/plexus/plexus.sock"]),
    "object": with_conf(socketPath={}),
    "NUL": with_conf(socketPath="/run/a\x00b"),
    "lone surrogate": with_raw("socketPath", '"/run/\\udcff\\u00e9"'),
    "quotes": with_conf(socketPath='/it\'s\x00"x"'),
    "one quote": with_conf(socketPath="/it's\x00"),
    "astral": with_conf(socketPath="/\U0001f600\x00\x7f\t"),
}


@pytest.mark.parametrize("case", list(BAD_SOCKET_PATHS))
def test_a_socket_path_the_shim_cannot_use(
    shims: dict[str, Path], tmp_path: Path, case: str
) -> None:
    out = assert_same(shims, tmp_path / "r", b"DEL", BAD_SOCKET_PATHS[case])
    assert out.returncode == 1 and json.loads(out.stdout)["code"] == 7
    assert out.spooled == ()


# --- the daemon down --------------------------------------------------------------------------


def _stale_socket(root: Path) -> None:
    (root / "run").mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
        gone.bind(str(root / "run" / "plexus.sock"))


def _blocker(name: str, root: Path) -> None:
    (root / name).write_text("a file where a directory should be")


UNREACHABLE: dict[str, tuple[Callable[[Path], bytes], Setup | None]] = {
    "no socket": (with_conf(), None),
    "stale socket": (with_conf(), _stale_socket),  # type: ignore[dict-item]
    "not a socket": (
        with_conf(),
        lambda root: (root / "run").mkdir() or (root / "run" / "plexus.sock").touch(),  # type: ignore[func-returns-value]
    ),
    "socket dir is a file": (with_conf(), lambda root: _blocker("run", root)),  # type: ignore[func-returns-value]
    "path too long": (
        lambda root: json.dumps(conf(root, socketPath="/" + "s" * 120)).encode(),
        None,
    ),
    "non-ascii socket path": (
        lambda root: json.dumps(conf(root, socketPath=str(root / "r\u00e9\u2603.sock"))).encode(),
        None,
    ),
    "default socket and spool": (as_json({"cniVersion": "1.0.0", "spoolDir": None}), None),
    "timeout": (
        with_conf(shimTimeout=0.3),
        lambda root: FakeDaemon(root / "run" / "plexus.sock", stall=True),
    ),
    "timeout as an integer": (
        with_conf(shimTimeout=1),
        lambda root: FakeDaemon(root / "run" / "plexus.sock", stall=True),
    ),
}
UNREACHABLE.update(
    {
        f"broken answer: {name}": (
            with_conf(),
            lambda root, answer=answer: FakeDaemon(root / "run" / "plexus.sock", answer),
        )
        for name, answer in BROKEN_ANSWERS.items()
        # A daemon that hangs up unread: EPIPE, ECONNRESET or a closed connection, whichever
        # the race gives (a different reason in the message, the same answer otherwise).
        if name != "hang-up"
    }
)


@pytest.mark.parametrize("command", [b"ADD", b"CHECK", b"GC", b"STATUS", b"BOGUS", b"DEL"])
@pytest.mark.parametrize("case", list(UNREACHABLE))
def test_an_unreachable_daemon(
    shims: dict[str, Path], tmp_path: Path, case: str, command: bytes
) -> None:
    if case == "default socket and spool" and (
        command == b"DEL" or os.path.exists("/run/plexus/plexus.sock")
    ):
        pytest.skip("would spool into this machine's /var/lib/plexus/spool or ask its plexusd")
    stdin, setup = UNREACHABLE[case]
    out = assert_same(shims, tmp_path / "r", command, stdin, setup=setup)
    if command == b"DEL":
        assert (out.returncode, out.stdout, len(out.spooled)) == (0, b"", 1), out
    else:
        assert out.returncode == 1 and b"plexusd is not reachable at " in out.stdout


SPOOL_PROBLEMS: dict[str, tuple[Callable[[Path], bytes], Callable[[Path], None] | None]] = {
    "relative": (with_conf(spoolDir="relative/spool"), None),
    "number": (with_conf(spoolDir=5), None),
    "boolean": (with_conf(spoolDir=True), None),
    "array": (with_conf(spoolDir=["/tmp"]), None),
    "NUL": (with_conf(spoolDir="/tmp/a\x00b"), None),
    "lone surrogate": (with_raw("spoolDir", '"/tmp/\\ud800"'), None),
    "a file in its place": (with_conf(), lambda root: _blocker("spool", root)),
    "a file as its parent": (
        lambda root: json.dumps(conf(root, spoolDir=str(root / "p" / "spool"))).encode(),
        lambda root: _blocker("p", root),
    ),
    "parents to create": (
        lambda root: json.dumps(conf(root, spoolDir=str(root / "a" / "b" / "spool/"))).encode(),
        None,
    ),
    "dots": (lambda root: json.dumps(conf(root, spoolDir=str(root / "spool/./"))).encode(), None),
}


@pytest.mark.parametrize("case", list(SPOOL_PROBLEMS))
def test_spooling_a_del(shims: dict[str, Path], tmp_path: Path, case: str) -> None:
    stdin, setup = SPOOL_PROBLEMS[case]
    root = tmp_path / "r"
    out = assert_same(shims, root, b"DEL", stdin, setup=setup)  # type: ignore[arg-type]
    if case in ("parents to create", "dots"):
        assert out.returncode == 0
    else:
        assert out.returncode == 1 and json.loads(out.stdout)["code"] in (7, 11)


ENVIRONMENTS: dict[str, Env] = {
    "not utf-8": {b"CNI_CONTAINERID": b"caf\xe9\xff\xed\xa0\x80-x", b"CNI_IFNAME": b"\xc3"},
    "unicode": {b"CNI_CONTAINERID": "k8s_\u00e9\U0001f600/web:0".encode(), b"CNI_ARGS": b""},
    "long": {b"CNI_CONTAINERID": b"c" * 100, b"CNI_IFNAME": b"i" * 20},
    "controls": {b"CNI_ARGS": b'a\tb\nc\x7f\x01"\\', b"CNI_PATH": b""},
    "others are not forwarded": {b"CNI_EXTRA": b"x", b"PATH": b"/bin", b"cni_ifname": b"y"},
}


@pytest.mark.parametrize("case", list(ENVIRONMENTS))
def test_the_environment_is_forwarded_and_spooled_alike(
    shims: dict[str, Path], tmp_path: Path, case: str
) -> None:
    env = ENVIRONMENTS[case]
    reply = http_reply(200, b"{}")
    sock = lambda root: FakeDaemon(root / "run" / "plexus.sock", reply)  # noqa: E731
    sent = assert_same(shims, tmp_path / "r", b"ADD", with_conf(), env=env, setup=sock)
    assert len(sent.requests) == 1
    spooled = assert_same(shims, tmp_path / "r", b"DEL", with_conf(), env=env)
    assert len(spooled.spooled) == 1


# --- the daemon's answers ---------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 400, 404, 503])
@pytest.mark.parametrize("reply", list(REPLIES))
def test_answers_are_relayed_alike(
    shims: dict[str, Path], tmp_path: Path, reply: str, status: int
) -> None:
    answer = http_reply(status, REPLIES[reply][0])
    sock = lambda root: FakeDaemon(root / "run" / "plexus.sock", answer)  # noqa: E731
    stdin = with_conf(note='gr\u00fc\u00df \u2603 \\ "')
    out = assert_same(shims, tmp_path / "r", b"ADD", stdin, setup=sock)
    assert out.stdout == REPLIES[reply][1]


ODD_ANSWERS = {
    "leading zeros": b"HTTP/1.0 0200 OK\r\nContent-Length: 2\r\n\r\n{}",
    "no reason": b"HTTP/1.0 200\r\nContent-Length: 2\r\n\r\n{}",
    "no content-length": b"HTTP/1.0 200 OK\r\n\r\n{}more",
    "two content-lengths": b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\ncontent-length : 2\r\n\r\n{}xyz",
    "content-length not a number": b"HTTP/1.0 200 OK\r\nContent-Length: 2x\r\n\r\n{}xyz",
    "huge content-length": b"HTTP/1.0 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n{}",
    "header without a colon": b"HTTP/1.0 400 Bad\r\nfoo\r\nContent-Length:2\r\n\r\n{}",
    "HTTP/ only": b"HTTP/ 200 x\r\n\r\n{}",
    "two spaces": b"HTTP/1.0  200 x\r\n\r\n{}",
}


@pytest.mark.parametrize("answer", list(ODD_ANSWERS))
@pytest.mark.parametrize("command", [b"ADD", b"DEL"])
def test_odd_answers_are_read_alike(
    shims: dict[str, Path], tmp_path: Path, answer: str, command: bytes
) -> None:
    sock = lambda root: FakeDaemon(root / "run" / "plexus.sock", ODD_ANSWERS[answer])  # noqa: E731
    assert_same(shims, tmp_path / "r", command, with_conf(), setup=sock)


def test_the_request_bytes_are_the_same(shims: dict[str, Path], tmp_path: Path) -> None:
    text = (
        '\n {  "type":"plexus", "cniVersion" : "1.0.0",\n'
        '  "n": 1.50, "big": 1' + "0" * 5000 + ', "dup": 1, "dup": 2, "e": [],\n'
        '  "note": "gr\u00fc\u00df \\u2603 \\"q\\" \\\\ \\/ \u2603 \U0001f600 \\ud800"\n}\n\n'
    )

    def stdin(root: Path) -> bytes:
        sock_path = json.dumps(str(root / "run" / "plexus.sock"))
        return text[:-4].encode() + f', "socketPath": {sock_path}}}\n\n'.encode()

    sock = lambda root: FakeDaemon(root / "run" / "plexus.sock", http_reply(200, b"{}"))  # noqa: E731
    out = assert_same(shims, tmp_path / "r", b"ADD", stdin, setup=sock)
    assert out.returncode == 0 and len(out.requests) == 1
    assert os.path.basename(str(tmp_path)) in out.requests[0].decode()
