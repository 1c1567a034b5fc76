"""The daemon socket's transport: HTTP/1.0 over a unix socket, one request per connection.

One asyncio event loop reads every connection, so a client costs a file descriptor and its
buffered bytes, never a thread, until its request is complete; only complete requests reach
`Api` (a CNI request then runs on a thread of its own, see `metaplugin.watchdog`, and its
answer is awaited on the loop, so a request in flight costs one thread, not two). A thread per
connection, as before, let 200 slow clients hold 204 threads, and one byte every 10 s kept a
thread for ever. The bounds (`ConnectionLimits`):
- a request must be in whole within `read_deadline` seconds of the accept, however it trickles;
- at most `max_connections` connections at once (capped below the file-descriptor limit); the
  next is answered code 11 at once and closed;
- a body larger than `max_body` is refused (413) on its headers; bodies are admitted (the
  scheduler's count, then, above 64 KiB, a byte budget for large bodies) before a byte of them
  is read, and one that would exceed the budget waits, within its own read deadline, for others
  to be done (eight concurrent 3.9 MB bodies took the daemon from 63 to 371 MiB);
- an answer the client does not read within `write_timeout` is dropped.
Requests are never delayed by other clients' slowness: a stalled client delays no one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

import structlog

from cnispec import cni
from cnispec.errors import DecodeFailure, PlexusError, TryAgainLater

if TYPE_CHECKING:
    from metaplugin.server import Api

log = structlog.get_logger(__name__)

MAX_BODY: Final = 1024 * 1024  # a conflist with the pod's annotations (256 KiB at most) fits
MAX_HEAD: Final = 16 * 1024
LISTEN_BACKLOG: Final = 1024  # a burst of pods connects many shims at once (5 made them fail)


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 512
    max_body: int = MAX_BODY
    body_budget: int = 4 * MAX_BODY
    # Bodies up to this size are outside the budget (their memory is bounded by the connection
    # bound): a shim's request (a few KiB) never waits behind someone else's megabyte.
    small_body: int = 64 * 1024
    read_deadline: float = 10.0
    write_timeout: float = 10.0

    def connections_allowed(self) -> int:
        # Every connection is a file descriptor: stay well inside the process's limit.
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return self.max_connections
        return max(min(self.max_connections, soft - 128), 16)


class _Refusal(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status, self.body = status, body


def cni_error_body(exc: PlexusError) -> bytes:
    return json.dumps(cni.to_cni_error(exc)).encode()


def _head(raw: bytes) -> tuple[str, str, dict[str, str]]:
    """Request line and headers of an HTTP/1.x request head (ending in a blank line)."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _Refusal(400, cni_error_body(DecodeFailure("not an HTTP/1.x request line")))
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return parts[0], parts[1], headers


class _Budget:
    """Bytes of request bodies being read or worked on, bounded; only the loop thread uses it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed = asyncio.Condition()

    async def take(self, n: int) -> None:
        async with self._freed:
            await self._freed.wait_for(lambda: self.used + n <= self.limit)
            self.used += n

    async def give(self, n: int) -> None:
        async with self._freed:
            self.used -= n
            self._freed.notify_all()


class SocketServer:
    def __init__(self, socket_path: str, app: Api, limits: ConnectionLimits | None = None) -> None:
        self._path = socket_path
        self._app = app
        self._limits = limits or ConnectionLimits()
        self._allowed = self._limits.connections_allowed()
        prepare_socket_dir(str(Path(socket_path).parent))
        _remove_stale_socket(socket_path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600: no window where others could connect
        try:
            self._sock.bind(socket_path)
        finally:
            os.umask(old)
        os.chmod(socket_path, 0o600)
        self._sock.listen(LISTEN_BACKLOG)
        self._loop = asyncio.new_event_loop()
        # Waits for CNI answers (each bounded by its request's deadline) and serves the views.
        self._waiters = ThreadPoolExecutor(max_workers=32, thread_name_prefix="plexusd-answer")
        self._open = 0
        self._started: set[asyncio.Task[None] | None] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None

    def start(self) -> None:
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._budget = _Budget(self._limits.body_budget)
            self._server = self._loop.run_until_complete(
                asyncio.start_unix_server(self._client, sock=self._sock, limit=MAX_HEAD)
            )
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="plexusd-server", daemon=True)
        self._thread.start()
        started.wait(10)

    def stop(self) -> None:
        if self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if not self._loop.is_running():
            # The loop is ours again: close the server and let every connection end on it.
            self._loop.run_until_complete(self._close_connections())
            self._loop.close()
        self._sock.close()
        self._waiters.shutdown(wait=False, cancel_futures=True)
        Path(self._path).unlink(missing_ok=True)

    async def _close_connections(self) -> None:
        if self._server is not None:
            self._server.close()
        # Only a connection's task that has started may be cancelled: it closes its socket on
        # the way out. One not yet started (or still being accepted by asyncio) would never
        # run its cleanup if cancelled; it starts, sees `_stopping` and closes at once.
        self._stopping = True
        for _ in range(20):
            await asyncio.sleep(0)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if not tasks:
                break
            for task in tasks:
                if task in self._started:
                    task.cancel()
            await asyncio.wait(tasks, timeout=0.25)
        await asyncio.sleep(0)  # the transports' close callbacks run

    @property
    def open_connections(self) -> int:
        return self._open

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        task = asyncio.current_task()
        self._started.add(task)
        try:
            if self._stopping:
                return
            status, body, ctype = await self._serve(reader)
            if status:
                await self._write(writer, status, body, ctype)
        except (ConnectionError, TimeoutError) as exc:
            log.info("client_went_away", error=f"{type(exc).__name__}: {exc}")
        except Exception:  # the loop must outlive any one connection
            log.exception("connection_failed")
        finally:
            self._open -= 1
            self._started.discard(task)
            writer.close()
            with contextlib.suppress(Exception):  # its peer may be gone already
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader) -> tuple[int, bytes, str]:
        """(status, body, content type) to answer, or status 0: nothing to answer."""
        if self._open > self._allowed:
            log.warning("connection_refused_full", limit=self._allowed)
            why = f"plexusd is serving {self._allowed} connections already; retry"
            return 503, cni_error_body(TryAgainLater(why)), "application/json"
        loop = asyncio.get_running_loop()
        read_by = loop.time() + self._limits.read_deadline
        admitted = ExitStack()
        try:
            async with asyncio.timeout_at(read_by):
                method, target, body = await self._read(reader, admitted, read_by)
        except _Refusal as refusal:
            admitted.close()
            return refusal.status, refusal.body, "application/json"
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            admitted.close()
            log.info("client_went_away", error=type(exc).__name__)
            return 0, b"", ""
        except BaseException:
            admitted.close()
            raise
        if method == "POST":
            return (*await self._cni(body, admitted), "application/json")
        return await loop.run_in_executor(self._waiters, self._app.view, target)

    async def _cni(self, body: bytes, admitted: ExitStack) -> tuple[int, bytes]:
        """Start the request (decoded here when it is a shim's few KiB, on a pool thread when
        larger), then wait for its answer on this loop, until its deadline: no thread waits."""
        loop = asyncio.get_running_loop()
        if len(body) <= self._limits.small_body:
            started = self._app.start(body, admitted)
        else:
            started = await loop.run_in_executor(self._waiters, self._app.start, body, admitted)
        if isinstance(started, tuple):
            return started
        done: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not done.done():
                done.set_result(None)

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(settle)

        started.when_done(wake)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done, max(started.deadline - time.monotonic(), 0.0))
        return self._app.finish(started)

    async def _read(
        self, reader: asyncio.StreamReader, admitted: ExitStack, read_by: float
    ) -> tuple[str, str, bytes]:
        method, target, headers = _head(await reader.readuntil(b"\r\n\r\n"))
        if method == "GET":
            return method, target, b""
        if method != "POST" or urlsplit(target).path != "/cni":
            why = f"plexusd serves POST /cni and GET views, not {method} {target[:100]}"
            raise _Refusal(404, cni_error_body(DecodeFailure(why)))
        length = headers.get("content-length", "")
        limit = self._limits.max_body
        if not (length.isascii() and length.isdigit()) or not 0 < int(length) <= limit:
            why = (
                f"a request needs a Content-Length from 1 to {limit} bytes, not "
                f"{length[:20] or 'none'} (a network config that large is not one plexusd takes)"
            )
            raise _Refusal(413, cni_error_body(DecodeFailure(why)))
        n = int(length)
        try:
            admitted.enter_context(self._app.scheduler.admission())
        except TryAgainLater as exc:
            raise _Refusal(400, cni_error_body(exc)) from None
        if n <= self._limits.small_body:  # what shims send: never queued behind big bodies
            return method, target, await reader.readexactly(n)
        loop = asyncio.get_running_loop()
        try:
            # Its own deadline, just inside the read deadline, so the refusal can say why.
            await asyncio.wait_for(self._budget.take(n), max(read_by - loop.time() - 0.05, 0))
        except TimeoutError:
            why = (
                f"plexusd is reading {self._budget.used} bytes of other requests; a {n}-byte "
                "request waited its whole read deadline: the runtime should retry"
            )
            raise _Refusal(400, cni_error_body(TryAgainLater(why))) from None
        admitted.callback(lambda: asyncio.run_coroutine_threadsafe(self._budget.give(n), loop))
        return method, target, await reader.readexactly(n)

    async def _write(
        self, writer: asyncio.StreamWriter, status: int, body: bytes, ctype: str
    ) -> None:
        head = (
            f"HTTP/1.0 {status} {HTTPStatus(status).phrase}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        async with asyncio.timeout(self._limits.write_timeout):
            await writer.drain()


def prepare_socket_dir(run_dir: str) -> None:
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


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
