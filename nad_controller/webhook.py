"""The validating admission webhook: HTTPS, `admission.k8s.io/v1` AdmissionReview at `/validate`,
`/healthz` for probes.

    plexus-controller webhook --tls-cert-file CERT --tls-private-key-file KEY --port PORT
    python -m nad_controller.webhook --self-signed --no-api --port 9443

What it checks is `cnispec.validation` (docs/validation.md). Without an API connection
(`--no-api`, or no kubeconfig and not in a cluster) it still checks everything a NAD or an
annotation says by itself; with one it also checks references (NADs, VFPools, namespace
labels). Certificates come from files, reloaded when they change, or are generated
(`--self-signed`, or when no files are given) with the CA patched into the
ValidatingWebhookConfiguration.

Bounded: a request body over `--max-body-bytes` is refused (413) unread, a connection that does
not send its request within `--request-timeout` is closed, at most `--max-concurrent` requests
are worked on at once (more get 503 and the API server applies the failurePolicy).
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Final

import structlog

from cnispec import jsontext
from cnispec.httpserve import BoundedHTTPServer
from cnispec.validation import Lookups
from nad_controller import certs
from nad_controller.metrics import ControllerMetrics
from nad_controller.validate import BadReview, review

log = structlog.get_logger(__name__)

DEFAULT_PORT: Final = 9443
SERVICE: Final = "plexus-controller"
NAMESPACE: Final = "plexus-system"
WEBHOOK_CONFIG: Final = "plexus-validation"
# An AdmissionReview carries the object and, on UPDATE, the old one: etcd's 1.5 MiB limit per
# object, twice, in JSON, plus the review's own fields.
MAX_BODY: Final = 4 * 1024 * 1024


def add_arguments(parser: argparse.ArgumentParser, *, kubeconfig: bool = True) -> None:
    """The webhook's flags; `kubeconfig=False` where the parser already has `--kubeconfig`
    (`plexus-controller run`, whose webhook shares the reconciler's API connection settings)."""
    parser.add_argument("--tls-cert-file", help="serving certificate (PEM; e.g. tls.crt)")
    parser.add_argument("--tls-private-key-file", help="its private key (PEM; e.g. tls.key)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--bind-address", default="0.0.0.0")
    parser.add_argument(
        "--self-signed",
        action="store_true",
        help="generate a CA and serving certificate (also when no cert files are given) and "
        "patch the CA into the ValidatingWebhookConfiguration",
    )
    parser.add_argument("--cert-dir", help="where --self-signed writes tls.crt/tls.key/ca.crt")
    parser.add_argument("--service-name", default=SERVICE)
    parser.add_argument("--service-namespace", default=NAMESPACE)
    parser.add_argument("--webhook-config-name", default=WEBHOOK_CONFIG)
    if kubeconfig:
        parser.add_argument("--kubeconfig", help="default: in-cluster, else $KUBECONFIG")
    parser.add_argument(
        "--no-api", action="store_true", help="never contact the API: check what needs none"
    )
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY)
    parser.add_argument("--request-timeout", type=float, default=10.0)
    parser.add_argument("--max-concurrent", type=int, default=32)


class WebhookServer(BoundedHTTPServer):
    """One thread per connection; TLS set up in that thread (a slow handshake holds up no one),
    with the certificate source's current context."""

    request_queue_size = 64

    def __init__(
        self,
        address: tuple[str, int],
        *,
        context: Callable[[], ssl.SSLContext],
        lookups: Lookups | None,
        max_body: int = MAX_BODY,
        timeout: float = 10.0,
        max_concurrent: int = 32,
        metrics: ControllerMetrics | None = None,
    ) -> None:
        self.context = context
        self.metrics = metrics
        self.lookups = lookups
        self.max_body = max_body
        self.timeout = timeout
        self.slots = threading.BoundedSemaphore(max_concurrent)
        # Connections (each a thread until it is served or times out): a flood of idle ones
        # is turned away at accept instead of growing threads without bound.
        super().__init__(address, _Handler, max_connections=max_concurrent * 4)

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = self.socket.accept()
        return self.context().wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        ), addr


class _Handler(BaseHTTPRequestHandler):
    server: WebhookServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.timeout)  # the handshake and every read
        self.connection.do_handshake()

    def handle(self) -> None:
        try:
            super().handle()
        except (OSError, ssl.SSLError) as exc:  # a client that left, stalled or spoke no TLS
            log.debug("webhook connection dropped", error=str(exc))
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are logged with structure below

    def do_GET(self) -> None:
        if self.path in ("/healthz", "/readyz"):
            self._send(200, b"ok\n", "text/plain")
        else:
            self._send(404, b"not found\n", "text/plain")

    def do_POST(self) -> None:
        if self.path.split("?")[0] != "/validate":
            self._refuse(404, "the webhook serves POST /validate")
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._refuse(411, "Content-Length is required")
            return
        if int(length) > self.server.max_body:
            self._refuse(413, f"body over {self.server.max_body} bytes")
            return
        if not self.server.slots.acquire(blocking=False):
            self._refuse(503, "too many admission reviews at once")
            return
        try:
            self._review(self.rfile.read(int(length)))
        finally:
            self.server.slots.release()

    def _review(self, raw: bytes) -> None:
        started, kind = time.monotonic(), None
        try:
            body = jsontext.loads(raw)
            kind = _reviewed_kind(body)
            answer = review(body, self.server.lookups)
        except BadReview as exc:
            self._refuse(400, str(exc))
            self._count(kind, "error", started)
            return
        except ValueError as exc:
            self._refuse(400, f"body is not JSON: {exc}")
            self._count(kind, "error", started)
            return
        response = answer["response"]
        log.info(
            "admission review",
            uid=response["uid"],
            allowed=response["allowed"],
            message=response.get("status", {}).get("message"),
            warnings=len(response.get("warnings", [])),
        )
        self._send(200, json.dumps(answer).encode(), "application/json")
        self._count(kind, "allowed" if response["allowed"] else "denied", started)

    def _count(self, kind: object, decision: str, started: float) -> None:
        if self.server.metrics is not None:
            self.server.metrics.observe_admission(kind, decision, time.monotonic() - started)

    def _refuse(self, code: int, message: str) -> None:
        self.close_connection = True
        self._send(code, json.dumps({"error": message}).encode(), "application/json")

    def _send(self, code: int, data: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


def _reviewed_kind(body: Any) -> object:
    """The reviewed object's kind (for /metrics; an unknown kind becomes "other" there)."""
    request = body.get("request") if isinstance(body, dict) else None
    kind = request.get("kind") if isinstance(request, dict) else None
    return kind.get("kind") if isinstance(kind, dict) else None


def _certificates(args: argparse.Namespace, api: Any | None) -> certs.CertSource:
    given = args.tls_cert_file and args.tls_private_key_file
    if given and not args.self_signed and Path(args.tls_cert_file).exists():
        return certs.CertSource(args.tls_cert_file, args.tls_private_key_file)
    names = certs.service_names(args.service_name, args.service_namespace)
    generated = certs.generate(names, ips=("127.0.0.1",))
    directory = Path(args.cert_dir or tempfile.mkdtemp(prefix="plexus-webhook-"))
    cert, key = certs.write_pair(directory, generated)
    log.info("webhook certificate generated", dir=str(directory), names=names)
    if api is not None:
        from nad_controller import k8s_lookups

        try:
            count = k8s_lookups.patch_ca_bundle(api, args.webhook_config_name, generated.ca_pem)
            log.info("CA bundle patched", webhook_config=args.webhook_config_name, webhooks=count)
        except Exception as exc:  # noqa: BLE001 - any failure: serve anyway, say why
            log.warning(
                "CA bundle not patched: the API server will not trust this webhook",
                webhook_config=args.webhook_config_name,
                error=str(exc),
            )
    return certs.CertSource(str(cert), str(key))


def build(args: argparse.Namespace, metrics: ControllerMetrics | None = None) -> WebhookServer:
    """The server for `args`, bound (port 0 picks one), not yet serving."""
    api = None
    lookups: Lookups | None = None
    if not args.no_api:
        from nad_controller import k8s_lookups

        api = k8s_lookups.connect(args.kubeconfig)
        lookups = k8s_lookups.ApiLookups(api) if api is not None else None
    source = _certificates(args, api)
    return WebhookServer(
        (args.bind_address, args.port),
        context=source.context,
        lookups=lookups,
        max_body=args.max_body_bytes,
        timeout=args.request_timeout,
        max_concurrent=args.max_concurrent,
        metrics=metrics,
    )


def serve(args: argparse.Namespace, metrics: ControllerMetrics | None = None) -> int:
    server = build(args, metrics)
    log.info("webhook serving", port=server.port, api=server.lookups is not None)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plexus-controller webhook", description=__doc__)
    add_arguments(parser)
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
