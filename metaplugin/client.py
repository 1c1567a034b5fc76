"""A client for the daemon's unix-socket HTTP API (the GET endpoints): what plexusctl, the test
bed and the demo use to read /readyz, /v1/attachments, /v1/network-status and the rest. The
shim speaks the protocol by hand instead (docs/shim-protocol.md): it must stay one stdlib file
that imports next to nothing."""

from __future__ import annotations

import http.client
import socket


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("plexusd", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def get(socket_path: str, url: str, *, timeout: float = 10.0) -> tuple[int, bytes]:
    """GET `url` from the daemon at `socket_path`: (status, body). OSError when unreachable."""
    conn = UnixHTTPConnection(socket_path, timeout)
    try:
        conn.request("GET", url)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
