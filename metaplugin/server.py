"""The daemon's unix-socket HTTP server: what the shim, probes and plexusctl talk to.

Endpoints: `POST /cni` (one CNI request: `{"env": {CNI_*}, "config": "<stdin>"}`; the reply body
is exactly what the shim prints, status 200 for success and 400 for a CNI error), `GET /healthz`,
`GET /readyz`, `GET /metrics`, and read-only views for plexusctl (`/v1/attachments`,
`/v1/network-status?namespace=&name=`). The socket lives in a 0700 directory with mode 0600.
A connection that opens and closes without a request (a probe) is harmless.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import structlog

from cnispec import cni, jsontext
from cnispec.errors import DecodeFailure, PlexusError
from kernel.netns import current_netns_inode
from metaplugin.orchestrator import Orchestrator
from metaplugin.scheduler import Scheduler
from metaplugin.store import AttachmentStore

log = structlog.get_logger(__name__)
MAX_BODY = 4 * 1024 * 1024


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str]] = Counter()
        self.seconds: dict[str, float] = {}

    def observe(self, command: str, outcome: str, seconds: float) -> None:
        with self._lock:
            self.requests[(command, outcome)] += 1
            self.seconds[command] = self.seconds.get(command, 0.0) + seconds

    def render(self, scheduler: Scheduler) -> str:
        lines = [
            "# TYPE plexus_cni_requests_total counter",
            *(
                f'plexus_cni_requests_total{{command="{c}",outcome="{o}"}} {n}'
                for (c, o), n in sorted(self.requests.items())
            ),
            "# TYPE plexus_cni_request_seconds_total counter",
            *(
                f'plexus_cni_request_seconds_total{{command="{c}"}} {s:.6f}'
                for c, s in sorted(self.seconds.items())
            ),
            "# TYPE plexus_requests_admitted gauge",
            f"plexus_requests_admitted {scheduler.admitted}",
        ]
        return "\n".join(lines) + "\n"


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False
    # A node starting a burst of pods connects many shims at once. With socketserver's default
    # backlog of 5 the kernel refuses the rest (EAGAIN): each such ADD answered 11 and each DEL
    # spooled for no reason. Admission (maxConcurrent, maxQueue) is the scheduler's job.
    request_queue_size = 1024
    app: Api


class SriovView(Protocol):
    """What `plexusctl pools` / `plexusctl vfs` read (sriov.node.SriovNode)."""

    def pools(self) -> list[dict[str, Any]]: ...

    def vfs(self) -> list[dict[str, Any]]: ...


class Api:
    """Request handling, independent of the transport (tests call `cni()` directly)."""

    def __init__(
        self,
        *,
        handle: Callable[[cni.CniRequest], dict[str, Any] | None],
        orchestrator: Orchestrator,
        scheduler: Scheduler,
        store: AttachmentStore,
        ready: Callable[[], bool],
        sriov: SriovView | None = None,
    ) -> None:
        self.handle = handle
        self.orchestrator = orchestrator
        self.scheduler = scheduler
        self.store = store
        self.ready = ready
        self.sriov = sriov
        self.metrics = Metrics()
        self._netns_inode = current_netns_inode()

    def cni(self, body: bytes) -> tuple[int, bytes]:
        started = time.monotonic()
        command, version, outcome = "?", cni.LATEST_VERSION, "error"
        try:
            env, stdin = _decode_envelope(body)
            command = env.get(cni.ENV_COMMAND, "?")
            version = _peek_version(stdin)
            req = cni.parse_request(env, stdin)
            structlog.contextvars.bind_contextvars(
                command=req.command,
                container_id=req.container_id or None,
                namespace=req.pod_namespace or None,
                pod=req.pod_name or None,
                ifname=req.ifname or None,
            )
            with self.scheduler.slot(req.container_id):
                reply = self.handle(req)
            outcome = "ok"
            return 200, json.dumps(reply).encode() if reply is not None else b""
        except PlexusError as exc:
            log.warning("cni_request_failed", code=exc.code, error=exc.msg)
            return 400, json.dumps(cni.to_cni_error(exc, version)).encode()
        except Exception as exc:
            log.exception("cni_request_crashed")
            return 400, json.dumps(cni.to_cni_error(exc, version)).encode()
        finally:
            elapsed = time.monotonic() - started
            self.metrics.observe(command, outcome, elapsed)
            log.info("cni_request_done", outcome=outcome, ms=round(elapsed * 1000, 2))
            structlog.contextvars.clear_contextvars()
            self._assert_netns()

    def _assert_netns(self) -> None:
        # NOTE: a request thread that changed namespace would poison the daemon; stop loudly.
        if current_netns_inode() != self._netns_inode:
            log.critical("daemon_netns_changed")
            os._exit(70)

    def attachments(self) -> list[dict[str, Any]]:
        out = []
        for loaded in self.store.all():
            out.append(
                {
                    "containerID": loaded.container_id,
                    "attachments": [r.view() for r in loaded.records],
                    "quarantined": list(loaded.quarantined),
                }
            )
        return out


def _cni_error(msg: str) -> bytes:
    return json.dumps(cni.to_cni_error(DecodeFailure(msg))).encode()


def _decode_envelope(body: bytes) -> tuple[dict[str, str], str]:
    try:
        envelope = jsontext.loads(body, surrogates=True)  # env: parse_request judges them
        env = {str(k): str(v) for k, v in envelope["env"].items()}
        config = envelope.get("config", "")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DecodeFailure("malformed request from the shim (expected {env, config})") from None
    if not isinstance(config, str):
        raise DecodeFailure("malformed request from the shim: config must be a string")
    return env, config


def _peek_version(stdin: str) -> str:
    try:
        version = jsontext.loads(stdin).get("cniVersion")
    except (ValueError, AttributeError):
        return cni.LATEST_VERSION
    return (
        version
        if isinstance(version, str) and version in cni.KNOWN_VERSIONS
        else (cni.LATEST_VERSION)
    )


class _Handler(BaseHTTPRequestHandler):
    server: _UnixHTTPServer
    protocol_version = "HTTP/1.0"  # one request per connection, as the shim expects
    timeout = 30  # a client that connects and stalls must not pin a thread forever

    def log_message(self, format: str, *args: Any) -> None:
        return None  # requests are logged once, with context, by Api

    def address_string(self) -> str:
        return "unix"

    def _reply(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        # A shim relays whatever comes back: even a refusal here is CNI error JSON.
        if urlsplit(self.path).path != "/cni":
            self._reply(404, _cni_error(f"plexusd serves POST /cni, not POST {self.path}"))
            return
        length = self.headers.get("Content-Length") or ""
        if not length.isdigit() or not 0 < int(length) <= MAX_BODY:
            self._reply(
                413,
                _cni_error(
                    f"a request needs a Content-Length from 1 to {MAX_BODY} bytes, not "
                    f"{length or 'none'} (a network config that large is not one plexusd takes)"
                ),
            )
            return
        status, body = self.server.app.cni(self.rfile.read(int(length)))
        self._reply(status, body)

    def do_GET(self) -> None:
        app = self.server.app
        url = urlsplit(self.path)
        if url.path == "/healthz":
            self._reply(200, b"ok\n", "text/plain")
        elif url.path == "/readyz":
            ok = app.ready()
            self._reply(200 if ok else 503, b"ready\n" if ok else b"not ready\n", "text/plain")
        elif url.path == "/metrics":
            self._reply(200, app.metrics.render(app.scheduler).encode(), "text/plain")
        elif url.path == "/v1/attachments":
            self._reply(200, json.dumps(app.attachments()).encode())
        elif url.path == "/v1/quarantine":
            self._reply(200, json.dumps(app.store.quarantined()).encode())
        elif url.path in ("/v1/pools", "/v1/vfs"):
            if app.sriov is None:
                self._reply(404, b'{"error":"SR-IOV is off: the daemon config sets no vfPools"}')
            else:
                rows = app.sriov.pools() if url.path == "/v1/pools" else app.sriov.vfs()
                self._reply(200, json.dumps(rows).encode())
        elif url.path == "/v1/network-status":
            query = parse_qs(url.query)
            status = app.orchestrator.pod_network_status(
                query.get("namespace", ["default"])[0], query.get("name", [""])[0]
            )
            if status is None:
                self._reply(404, b'{"error":"no attachments recorded for that pod"}')
            else:
                self._reply(200, json.dumps(status).encode())
        else:
            self._reply(404, b'{"error":"not found"}')


def prepare_socket_dir(run_dir: str) -> None:
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


class SocketServer:
    def __init__(self, socket_path: str, app: Api) -> None:
        self._path = socket_path
        prepare_socket_dir(str(Path(socket_path).parent))
        _remove_stale_socket(socket_path)
        old = os.umask(0o177)  # the socket is born 0600: no window where others could connect
        try:
            self._server = _UnixHTTPServer(socket_path, _Handler)
        finally:
            os.umask(old)
        os.chmod(socket_path, 0o600)
        self._server.app = app
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="plexusd-server", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        Path(self._path).unlink(missing_ok=True)


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise PlexusError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a leftover from a crashed daemon
        return
    finally:
        probe.close()
    raise PlexusError(f"another daemon is serving {path}")
