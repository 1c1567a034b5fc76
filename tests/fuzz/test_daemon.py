"""Fuzzing through the real thing: a plexusd process in a test-made node namespace (the netns
tier's bed: Debian's bridge, macvlan and host-local as delegates, a `failer` plugin for
rollbacks), driven (1) by exec'ing the installed shim with fuzzed CNI_* variables (real bytes
in the environment, not UTF-8 ones included) and stdin, and (2) by raw bytes on its socket.

After each case: a failed ADD left no link in the pod, no host-local lease, no record and no
host-side veth; a good ADD is DELeted through the shim and that DEL leaves nothing; the daemon's
log gained no traceback; the daemon still answers.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import assume, event, given
from hypothesis import strategies as st

from metaplugin.client import get
from testbed.netns import Netns, is_root
from tests.fuzz import strategies as s
from tests.fuzz.conftest import budget
from tests.fuzz.tally import (
    HANG_SECONDS,
    Violation,
    case,
    check_answer,
    guard_machine_spool,
    machine_spool,
)
from tests.support.require import missing

pytestmark = pytest.mark.netns

# NOTE: the shim fails on JSON nested ~1,000 deep (a traceback; reported, see test_shim.py), so
# the stdin sent through it nests less; the daemon's own bound (64) is well inside that.
SHIM_SAFE_DEPTH = 900


class Node:
    """The netns bed with one pod namespace, and what a case must leave as it found it."""

    def __init__(self, bed: Any, pod: Netns) -> None:
        self.bed = bed
        self.pod = pod
        self.shim = Path(bed.daemon.config["cniBinDir"]) / "plexus"
        (plugin,) = bed.runtime.conflist["plugins"]
        self.base_config = {**plugin, "name": bed.runtime.conflist["name"]}
        self.cni_path = bed.runtime.cni_path
        self._log_seen = 0

    def run_shim(self, env: dict[str, str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
        # Real bytes: a value that is not UTF-8 reaches the shim as the runtime would pass it
        # (and no NUL: no environment can hold one).
        environ = {
            k.encode(): v.replace("\x00", "").encode("utf-8", "surrogatepass")
            for k, v in env.items()
        }
        before = machine_spool()
        try:
            done = subprocess.run(
                [str(self.shim)],
                input=stdin,
                env=environ,  # type: ignore[arg-type]
                capture_output=True,
                timeout=HANG_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise Violation("hang", f"the shim did not answer in {HANG_SECONDS:.0f} s") from None
        guard_machine_spool(before)
        return done

    def leftovers(self) -> list[str]:
        links = set(self.pod.links()) - {"lo"}
        return [
            *(f"pod link {n}" for n in sorted(links)),
            *(f"lease {r}" for r in self.bed.reservations()),
            *(f"record {r}" for r in self.bed.records()),
            *(f"node veth {v}" for v in self.bed.node_veths()),
        ]

    def clean(self) -> None:
        """After a counted leftover: the pod's links go, and the DELs the daemon still owes
        (GC of everything) run, so one finding is not counted again by every later case."""
        for name in set(self.pod.links()) - {"lo"}:
            self.pod.run("ip", "link", "del", name, check=False)
        for entry in self.bed.daemon.attachments():
            env = {**self.env("DEL"), "CNI_CONTAINERID": entry["containerID"]}
            env["CNI_IFNAME"] = entry["attachments"][0]["runtime_ifname"]
            self.run_shim(env, json.dumps({**self.base_config, "cniVersion": "1.0.0"}).encode())

    def env(self, command: str) -> dict[str, str]:
        return {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": "c1",
            "CNI_NETNS": self.pod.path,
            "CNI_IFNAME": "eth0",
            "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p",
            "CNI_PATH": self.cni_path,
        }

    def new_log_tracebacks(self) -> list[str]:
        log = self.bed.daemon.log.read_bytes()
        fresh, self._log_seen = log[self._log_seen :], len(log)
        return [
            line.decode("utf-8", "replace")[:600]
            for line in fresh.splitlines()
            if b"Traceback" in line or b"cni_request_crashed" in line
        ]

    def alive(self) -> None:
        try:
            ok = get(self.bed.daemon.socket, "/healthz")[0] == 200
        except OSError as exc:
            raise Violation("hang", f"plexusd stopped answering: {exc}") from None
        if not ok:
            raise Violation("contract", "plexusd's /healthz is not 200 any more")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    if not is_root():
        missing("the daemon-level fuzz targets need root (network namespaces)")
    from tests.netns.conftest import make_bed  # the netns tier's bed, as it is

    root = tmp_path_factory.mktemp("fuzz-daemon")

    def local(_node: Netns, nads: list[dict[str, Any]]) -> dict[str, Any]:
        (root / "nads").mkdir()
        (root / "nads" / "nads.yaml").write_text(yaml.safe_dump_all(nads))
        return {"localDir": str(root / "nads")}

    with make_bed(root, local) as bed:
        pod = bed.pod("fuzzpod")
        yield Node(bed, pod)


def _judge(
    node: Node, env: dict[str, str], stdin: bytes, *, rc: int, out: bytes, err: bytes = b""
) -> None:
    if b"Traceback" in err:
        raise Violation("traceback", err.decode("utf-8", "replace")[-800:])
    body = check_answer(rc == 0, out)
    code = body.get("code", rc) if isinstance(body, dict) else rc
    event(f"{env.get('CNI_COMMAND')!r:.10}: {code}")
    if rc == 0 and env.get("CNI_COMMAND") == "ADD":
        undo = node.run_shim({**env, "CNI_COMMAND": "DEL"}, stdin)
        check_answer(undo.returncode == 0, undo.stdout)
        if undo.returncode != 0:
            raise Violation("leftover", f"DEL after a good ADD failed: {undo.stdout[:300]!r}")
    crashes = node.new_log_tracebacks()
    if crashes:
        raise Violation("traceback", "plexusd logged: " + "\n".join(crashes))
    left = node.leftovers()
    if left:
        node.clean()
        raise Violation("leftover", f"{env.get('CNI_COMMAND')} (exit {rc}) left {left}")


def _env(node: Node) -> st.SearchStrategy[dict[str, str]]:
    return s.cni_env(CNI_NETNS=st.just(node.pod.path), CNI_PATH=st.just(node.cni_path))


@budget(ci=25, long=1_500)
@given(data=st.data())
def test_shim_and_daemon(node: Node, data: st.DataObject) -> None:
    env = data.draw(_env(node))
    config = s.configs(base=node.base_config)
    stdin = data.draw(s.stdin_texts(config, max_depth=SHIM_SAFE_DEPTH))
    stdin_bytes = stdin.encode("utf-8", "surrogatepass")  # bytes that are not UTF-8, too
    assume(s.stays_in_the_bed(stdin_bytes, node.base_config))
    with case("shim -> plexusd (netns, real plugins)"):
        done = node.run_shim(env, stdin_bytes)
        _judge(node, env, stdin_bytes, rc=done.returncode, out=done.stdout, err=done.stderr)


# --- raw bytes on the socket -----------------------------------------------------------------


@st.composite
def http_requests(draw: st.DrawFn, bodies: st.SearchStrategy[bytes]) -> tuple[bool, bytes]:
    """(framed, request): a well-framed POST /cni of a fuzzed body, or a request whose head is
    spoiled too (then only "no traceback, no hang, still serving" is asked of the answer)."""
    body = draw(bodies)
    head = [b"POST /cni HTTP/1.0", b"Content-Type: application/json"]
    length = len(body)
    if not s.rare(draw, 3):
        return True, b"\r\n".join([*head, b"Content-Length: %d" % length]) + b"\r\n\r\n" + body
    how = draw(st.integers(0, 4))
    if how == 0:
        length = draw(st.integers(0, length + 5))
    elif how == 1:
        head[0] = draw(st.sampled_from([b"GET /cni HTTP/1.0", b"POST /x HTTP/1.0", b"POST /cni"]))
    elif how == 2:
        head.append(draw(st.binary(max_size=40)))
    elif how == 3:
        return False, draw(st.binary(max_size=300))
    lines = [*head, b"Content-Length: %d" % length] if how != 4 else head
    return False, b"\r\n".join(lines) + b"\r\n\r\n" + body


def _exchange(path: str, request: bytes) -> bytes:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(HANG_SECONDS)
    try:
        sock.connect(path)
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)  # what was sent is all there is: no wait for more
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except TimeoutError:
        raise Violation("hang", f"no answer on the socket in {HANG_SECONDS:.0f} s") from None
    except (BrokenPipeError, ConnectionResetError):
        return b""  # the daemon closed on a request it would not read: allowed
    finally:
        sock.close()


@budget(ci=40, long=2_500)
@given(data=st.data())
def test_raw_bytes_on_the_socket(node: Node, data: st.DataObject) -> None:
    bodies = s.envelopes(_env(node), s.configs(base=node.base_config))
    framed, request = data.draw(http_requests(bodies))
    with case("raw bytes on plexusd's socket"):
        reply = _exchange(node.bed.daemon.socket, request)
        head, _, body = reply.partition(b"\r\n\r\n")
        if b"Traceback" in reply:
            raise Violation("traceback", reply.decode("utf-8", "replace")[:800])
        if framed:
            status = head.split(b" ", 2)[1] if head.startswith(b"HTTP/") else b""
            if not status.isdigit():
                raise Violation("contract", f"a framed request got no HTTP answer: {reply[:200]!r}")
            if status == b"200":
                envelope = json.loads(request.partition(b"\r\n\r\n")[2])
                if envelope["env"].get("CNI_COMMAND") == "ADD":  # the runtime's DEL follows
                    undo = {**envelope, "env": {**envelope["env"], "CNI_COMMAND": "DEL"}}
                    framed_undo = json.dumps(undo).encode()
                    head_undo = b"POST /cni HTTP/1.0\r\nContent-Length: %d\r\n\r\n"
                    answer = _exchange(
                        node.bed.daemon.socket, head_undo % len(framed_undo) + framed_undo
                    )
                    if not answer.startswith(b"HTTP/1.0 200"):
                        raise Violation(
                            "leftover", f"DEL after a good ADD failed: {answer[:300]!r}"
                        )
            check_answer(status == b"200", body)
        crashes = node.new_log_tracebacks()
        if crashes:
            raise Violation("traceback", "plexusd logged: " + "\n".join(crashes))
        node.alive()
        left = node.leftovers()
        if left:
            node.clean()
            raise Violation("leftover", f"a raw request left {left}")
