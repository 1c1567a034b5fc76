"""The one HTTP server shape plexusd and the controller use: a thread per connection, a cap on
connections at accept, and a socket timeout, so no client — a stuck scraper, a flood of idle
connections, a slow TLS handshake — can hold more than its own thread or wedge its process.

`BoundedHTTPServer` is the base (the controller's admission webhook adds TLS to it);
`MetricsServer` serves GET /metrics from a render function on its own thread, for plexusd's
registry and the controller's alike.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = structlog.get_logger(__name__)


def parse_address(address: str) -> tuple[str, int]:
    """ ":9465" -> ("", 9465) (every address), "127.0.0.1:9465", "[::1]:9465"."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"address {address!r} is not [host]:port")
    return host.strip("[]"), int(port)


class BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` at once: more are hung up on at
    accept, not given threads. IPv6 when the host is an IPv6 address."""

    daemon_threads = True  # a slow client's thread never keeps the process from exiting

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        max_connections: int,
    ) -> None:
        self.connections = threading.BoundedSemaphore(max_connections)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.connections.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client gone mid-request or a failed handshake: a debug line, no traceback on stderr.
        log.debug("http_connection_failed", client=str(client_address), exc_info=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _MetricsHandler(BaseHTTPRequestHandler):
    server: _MetricsHttpServer
    timeout = 5.0  # a client that sends nothing ties up its own thread for 5 s, nothing else

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404)
            return
        body = self.server.render()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every 15 s is not worth a log line


class _MetricsHttpServer(BoundedHTTPServer):
    def __init__(self, address: tuple[str, int], render: Callable[[], bytes]) -> None:
        self.render = render
        super().__init__(address, _MetricsHandler, max_connections=8)  # scrapers at once


class MetricsServer:
    """GET /metrics on TCP, on threads of its own: a slow or stuck scraper holds only its own
    connection thread, never a CNI request, a reconcile or the unix socket. `address` is
    [host]:port; the socket is bound here, so a port in use fails at construction (OSError)."""

    def __init__(self, address: str, render: Callable[[], bytes]) -> None:
        host, port = parse_address(address)
        self._server = _MetricsHttpServer((host, port), render)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def port(self) -> int:
        return self._server.port

    def start(self) -> None:
        self._thread.start()
        log.info("metrics_serving", address=self._server.server_address[:2])

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
