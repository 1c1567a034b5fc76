"""No request, client or peer may wedge plexusd (issue: GC deadlock, watchdog, liveness, bounded
connections/bodies/time, a burst against the listen backlog, FIFO netns, YAML alias bombs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cnispec import cni
from cnispec.errors import InvalidConfig
from cnispec.nad import parse_manifests
from metaplugin.client import get
from metaplugin.scheduler import Scheduler
from metaplugin.server import Api
from metaplugin.transport import ConnectionLimits, SocketServer
from tests.support.world import World, nad_manifest, simple_net

pytestmark = pytest.mark.unit

SHIM = Path(__file__).resolve().parents[2] / "metaplugin" / "shim.py"
POD_ARGS = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p"


def conf(**extra: Any) -> dict[str, Any]:
    return {
        "cniVersion": "1.1.0",
        "name": "plexus",
        "type": "plexus",
        "runtimeConfig": {
            "io.kubernetes.cri.pod-annotations": {"k8s.v1.cni.cncf.io/networks": "net-a"}
        },
        **extra,
    }


def env(command: str, cid: str = "c1", **extra: str) -> dict[str, str]:
    out = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0"}
    if command in ("ADD", "CHECK"):
        out["CNI_NETNS"] = "/proc/self/ns/net"
    out["CNI_ARGS"] = POD_ARGS
    return {**out, **extra}


def post_raw(sock: str, payload: bytes, timeout: float = 20.0) -> tuple[int, dict[str, Any]]:
    """POST /cni the way the shim does; fails (instead of hanging) after `timeout`."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(sock)
        head = f"POST /cni HTTP/1.0\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        s.sendall(head + payload)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    finally:
        s.close()
    header, _, body = data.partition(b"\r\n\r\n")
    return int(header.split(b" ")[1]), json.loads(body) if body else {}


def read_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def post(sock: str, env_: dict[str, str], config: dict[str, Any], **kw: Any) -> Any:
    return post_raw(sock, json.dumps({"env": env_, "config": json.dumps(config)}).encode(), **kw)


class Served:
    def __init__(self, tmp_path: Path, *, request_timeout: float = 30.0, **limits: Any) -> None:
        self.world = World(tmp_path)
        self.world.add_nads(nad_manifest("net-a", simple_net("net-a")))
        self.scheduler = Scheduler(max_concurrent=4, max_queue=8)
        self.world.collector._lock_container = self.scheduler.container
        self.world.collector._exclusive = self.scheduler.exclusive
        self.block: Callable[[cni.CniRequest], None] = lambda req: None
        self.api = Api(
            handle=self.handle,
            orchestrator=self.world.orchestrator,
            scheduler=self.scheduler,
            store=self.world.store,
            ready=lambda: True,
            request_timeout=request_timeout,
        )
        self.sock = self.world.config.socket_path
        self.server = SocketServer(self.sock, self.api, ConnectionLimits(**limits))
        self.server.start()

    def handle(self, req: cni.CniRequest) -> dict[str, Any] | None:
        self.block(req)
        if req.command == cni.GC:
            self.world.collector.gc(req)
            return None
        return self.world.orchestrator.handle(req)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    yield s
    s.server.stop()


def gc_config(*cids: str) -> dict[str, Any]:
    valid = [{"containerID": c, "ifname": "eth0"} for c in cids]
    return conf(**{"cni.dev/valid-attachments": valid})


# --- item 1: GC with CNI_CONTAINERID ------------------------------------------------------------


def test_gc_that_names_a_live_container_completes_and_the_daemon_keeps_serving(
    served: Served,
) -> None:
    assert post(served.sock, env("ADD", "c1"), conf())[0] == 200
    # A runtime may send CNI_CONTAINERID on GC: on main this took the container's lock, then
    # waited for the exclusive gate it held itself, and every later request hung behind it.
    status, body = post(served.sock, env("GC", "c1"), gc_config("c1"), timeout=15)
    assert status == 200, body
    status, body = post(served.sock, env("GC", "gone"), gc_config("c1"), timeout=15)
    assert status == 200, body
    assert post(served.sock, env("ADD", "c2"), conf(), timeout=15)[0] == 200
    assert post(served.sock, env("DEL", "c1"), conf(), timeout=15)[0] == 200
    assert served.world.store.load("c2")  # GC left the live containers alone
    assert get(served.sock, "/healthz")[0] == 200


# --- watchdog, bounded waits, liveness ----------------------------------------------------------


def test_a_request_past_its_deadline_answers_11_and_liveness_fails_until_it_ends(
    tmp_path: Path,
) -> None:
    served = Served(tmp_path, request_timeout=0.5)
    release = threading.Event()
    served.block = lambda req: release.wait(30) if req.container_id == "stuck" else None
    try:
        started = time.monotonic()
        status, body = post(served.sock, env("ADD", "stuck"), conf())
        assert time.monotonic() - started < 5
        assert status == 400 and body["code"] == 11, body
        assert "did not finish ADD within" in body["msg"]
        # Another container is not held up; the same container waits its turn, bounded.
        assert post(served.sock, env("ADD", "other"), conf())[0] == 200
        status, body = post(served.sock, env("DEL", "stuck"), conf())
        assert status == 400 and body["code"] == 11
        assert "another operation on container stuck" in body["msg"]
        time.sleep(1.1)  # past twice the deadline: requests have stopped completing
        code, text = get(served.sock, "/healthz")
        assert code == 503 and b"ADD for container stuck" in text
        assert get(served.sock, "/readyz")[0] == 503
        status, body = post(served.sock, {"CNI_COMMAND": "STATUS"}, conf())
        assert status == 400 and body["code"] == 50 and "not completing" in body["msg"]
        release.set()
        deadline = time.monotonic() + 10
        while get(served.sock, "/healthz")[0] != 200:
            assert time.monotonic() < deadline, "liveness did not recover"
            time.sleep(0.05)
        assert post(served.sock, env("DEL", "stuck"), conf())[0] == 200
        metrics = get(served.sock, "/metrics")[1].decode()
        count = "plexus_cni_request_duration_seconds_count"
        assert f'{count}{{outcome="deadline",verb="ADD"}} 1.0' in metrics
    finally:
        release.set()
        served.server.stop()


def test_a_request_in_flight_costs_one_thread_not_two(tmp_path: Path) -> None:
    # A burst of 110 pods held 220 threads (each request's own plus a pool thread waiting for
    # its answer); the answer is now awaited on the event loop.
    served = Served(tmp_path)
    release = threading.Event()
    served.block = lambda req: release.wait(30)
    answers: list[int] = []
    clients = [
        threading.Thread(
            target=lambda c=f"c{i}": answers.append(post(served.sock, env("ADD", c), conf())[0])
        )
        for i in range(6)
    ]
    try:
        before = threading.active_count()
        for client in clients:
            client.start()
        deadline = time.monotonic() + 10
        while served.api.watchdog.in_flight() < 6:
            assert time.monotonic() < deadline, "the requests did not start"
            time.sleep(0.01)
        waiting = [t.name for t in threading.enumerate() if t.name.startswith("plexusd-answer")]
        assert waiting == []
        assert threading.active_count() - before <= 6 + 6  # the clients, and one per request
    finally:
        release.set()
        for client in clients:
            client.join(20)
        served.server.stop()
    assert answers == [200] * 6


def test_gc_waiting_for_busy_containers_gives_up_at_its_deadline(tmp_path: Path) -> None:
    served = Served(tmp_path, request_timeout=0.5)
    release = threading.Event()
    served.block = lambda req: release.wait(30) if req.container_id == "busy" else None
    try:
        worker = threading.Thread(target=post, args=(served.sock, env("ADD", "busy"), conf()))
        worker.start()
        time.sleep(0.2)
        status, body = post(served.sock, {"CNI_COMMAND": "GC"}, gc_config("busy"))
        assert status == 400 and body["code"] == 11, body
        release.set()
        worker.join(10)
        # The waiting GC gave the gate back: container work runs again.
        assert post(served.sock, env("ADD", "next"), conf())[0] == 200
    finally:
        release.set()
        served.server.stop()


# --- item 8: connections, time and bodies --------------------------------------------------------


def test_idle_and_trickling_clients_never_delay_a_request(tmp_path: Path) -> None:
    served = Served(tmp_path, max_connections=40, read_deadline=1.0)
    held = []
    try:
        threads_before = threading.active_count()
        for _ in range(30):  # clients that connect and never send a request
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(served.sock)
            held.append(s)
        time.sleep(0.3)
        assert threading.active_count() <= threads_before  # they cost no thread
        started = time.monotonic()
        assert post(served.sock, env("ADD", "c1"), conf())[0] == 200
        assert time.monotonic() - started < 0.9  # not even one read deadline
        # Past the bound, a connection is answered code 11 at once.
        for _ in range(10):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(served.sock)
            held.append(s)
        extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        extra.settimeout(5)
        extra.connect(served.sock)
        refused = read_all(extra)
        extra.close()
        assert refused.startswith(b"HTTP/1.0 503") and b'"code": 11' in refused
        # A client sending one byte at a time is cut at the read deadline.
        for s in held:
            s.close()
        held.clear()
        trickler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        trickler.connect(served.sock)
        trickler.settimeout(5)
        started = time.monotonic()
        cut = False
        for byte in b"POST /cni HTTP/1.0\r\nContent-Length: 10\r\n\r\n0123456789":
            try:
                trickler.send(bytes([byte]))
            except OSError:
                cut = True
                break
            time.sleep(0.1)
        if not cut:
            cut = trickler.recv(100) == b""
        assert cut and time.monotonic() - started < 3
        trickler.close()
        assert post(served.sock, env("ADD", "c2"), conf())[0] == 200
    finally:
        for s in held:
            s.close()
        served.server.stop()


def padded(cid: str, size: int) -> bytes:
    payload = json.dumps({"env": env("ADD", cid), "config": json.dumps(conf())}).encode()
    assert len(payload) <= size
    return payload + b" " * (size - len(payload))


def test_bodies_are_admitted_before_they_are_read(tmp_path: Path) -> None:
    served = Served(tmp_path, max_body=1000, body_budget=1500, small_body=100, read_deadline=1.0)
    release = threading.Event()
    served.block = lambda req: release.wait(30) if req.container_id == "slow" else None
    try:
        # Over the per-request limit: refused on the headers alone.
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(served.sock)
        s.sendall(b"POST /cni HTTP/1.0\r\nContent-Length: 5000\r\n\r\n")
        answer = read_all(s)
        s.close()
        assert b" 413 " in answer.split(b"\r\n")[0] and b'"code": 6' in answer
        # A request at work holds its body's bytes; a body that would exceed the budget waits,
        # unread, for its own read deadline, then gets code 11.
        first = threading.Thread(target=post_raw, args=(served.sock, padded("slow", 1000)))
        first.start()
        time.sleep(0.3)
        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        second.settimeout(5)
        second.connect(served.sock)
        second.sendall(b"POST /cni HTTP/1.0\r\nContent-Length: 900\r\n\r\n")
        answer = read_all(second)
        second.close()
        assert b'"code": 11' in answer and b"waited its whole read deadline" in answer
        # When the request holding the budget ends, a waiting one is read and served.
        third = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        third.settimeout(5)
        third.connect(served.sock)
        third.sendall(b"POST /cni HTTP/1.0\r\nContent-Length: 900\r\n\r\n")
        time.sleep(0.2)
        release.set()
        third.sendall(padded("c3", 900))
        answer = read_all(third)
        third.close()
        assert answer.startswith(b"HTTP/1.0 200"), answer
        first.join(10)
    finally:
        release.set()
        served.server.stop()


def test_a_client_that_goes_away_mid_body_leaves_no_traceback(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    served = Served(tmp_path)
    try:
        for head in (
            b'POST /cni HTTP/1.0\r\nContent-Length: 100\r\n\r\n{"env"',
            b"POST /cni HTTP/1.0\r\nContent-Length: \xd9\xa3\r\n\r\n",
            b"POST /cni HTTP/1.0\r\nContent-Length: -1\r\n\r\n",
            b"GET /v1/attachments HTTP/1.0\r\n\r\n",
        ):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(served.sock)
            s.sendall(head)
            s.close()  # without reading the answer
        time.sleep(0.5)
        assert post(served.sock, env("ADD", "c1"), conf())[0] == 200
    finally:
        served.server.stop()
    assert "Traceback" not in capfd.readouterr().err


def test_a_fifo_as_cni_netns_is_refused_without_blocking(tmp_path: Path, served: Served) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    status, body = post(served.sock, env("ADD", "c1", CNI_NETNS=str(fifo)), conf(), timeout=10)
    assert status == 400 and body["code"] == 4 and "not a network namespace" in body["msg"]
    assert not served.world.store.load("c1")


def test_a_yaml_alias_bomb_in_a_nad_file_is_refused_cheaply() -> None:
    levels = ['    a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdef", "bcdefg", strict=True):
        levels.append(f"    {name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    bomb = (
        "apiVersion: k8s.cni.cncf.io/v1\nkind: NetworkAttachmentDefinition\n"
        "metadata:\n  name: x\n  annotations:\n" + "\n".join(levels) + "\nspec: {config: '{}'}\n"
    )
    with pytest.raises(InvalidConfig, match=r"expands to .* YAML nodes through aliases"):
        parse_manifests(bomb, "bomb.yaml")
    with pytest.raises(InvalidConfig, match="nested too deeply"):
        parse_manifests("a: " + "[" * 5000, "deep.yaml")
    # Anchors within reason still work (some people write manifests with them).
    ok = parse_manifests(
        "apiVersion: k8s.cni.cncf.io/v1\nkind: NetworkAttachmentDefinition\n"
        "metadata: {name: n, annotations: &ann {k: v}}\nspec: {config: '{}'}\n",
        "ok.yaml",
    )
    assert ok[0].annotations == {"k": "v"}


# --- item 4: a burst against a full listen backlog -------------------------------------------


def test_the_shim_waits_for_room_in_a_full_backlog_instead_of_calling_the_daemon_down(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "busy.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    fillers = []
    for _ in range(8):  # fill the backlog until connect() says EAGAIN
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            break
        fillers.append(s)
    else:
        pytest.fail("the backlog never filled")

    def serve_late() -> None:
        time.sleep(0.7)  # the shim meanwhile finds the backlog full
        for s in fillers:
            s.close()  # their accepted ends read EOF at once
        for _ in range(len(fillers) + 1):
            conn, _ = listener.accept()
            conn.settimeout(5)
            try:
                data = conn.recv(65536)
                if data.startswith(b"POST"):
                    body = b'{"cniVersion":"1.1.0","interfaces":[],"ips":[]}'
                    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
                    conn.sendall(body)
                    return
            finally:
                conn.close()

    server = threading.Thread(target=serve_late)
    server.start()
    try:
        out = subprocess.run(
            [sys.executable, "-IS", str(SHIM)],
            input=json.dumps({"cniVersion": "1.1.0", "socketPath": path, "shimTimeout": 10}),
            env={**env("ADD"), "CNI_NETNS": "/proc/self/ns/net"},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        server.join(10)
        listener.close()
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["cniVersion"] == "1.1.0"


def test_a_nad_file_with_a_control_character_is_invalid_config() -> None:
    # Found by the fuzz tier: PyYAML checks the stream when its loader is made.
    with pytest.raises(InvalidConfig, match="not valid YAML"):
        parse_manifests("\x1f", "ctl.yaml")


def test_a_nad_file_that_is_not_utf8_is_set_aside_not_fatal(tmp_path: Path) -> None:
    # Found by the fuzz tier: one such file made every NAD lookup answer 999.
    world = World(tmp_path)
    world.add_nads(nad_manifest("net-a", simple_net("net-a")))
    (world.nad_dir / "broken.yaml").write_bytes(b"metadata: {name: \xff}\n")
    assert world.nads.get("default", "net-a") is not None
    assert any("not UTF-8" in e for e in world.nads.errors())
