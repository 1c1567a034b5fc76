#!/usr/bin/python3 -IS
"""plexus: the CNI plugin binary the runtime execs. Standard library only, by design.

It forwards the CNI_* environment and stdin to plexusd over its unix socket as one HTTP request
and prints the daemon's reply as is. It imports nothing of Plexus (it is installed as a single
file) and nothing heavy, so it starts in milliseconds. When the daemon cannot be reached:
ADD/CHECK/GC answer CNI code 11, STATUS code 50, and DEL is written to a durable spool directory
and reported as done: the daemon replays the spool before it serves anything else, so the DEL
is late but never lost.
"""

# NOTE: `import json` and `import socket` cost ~11 ms of a ~22 ms exec here (they pull in re,
# enum and selectors); their C cores, part of every CPython, do all the shim needs (measured with
# bench/shim_cost.py; `-X importtime` shows the split).
import _json
import _socket as socket
import os
import sys
import time

SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]  # = cnispec.cni
CNI_KEYS = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")
DEFAULT_SOCKET = "/run/plexus/plexus.sock"
DEFAULT_SPOOL = "/var/lib/plexus/spool"
DEFAULT_TIMEOUT = 120.0
MAX_TIMEOUT = 86400.0
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50


class Unreachable(Exception):
    """The daemon could not be reached, or went away before it answered."""


class _Decoding:  # the attributes _json's scanner reads from a json.JSONDecoder
    strict, object_hook, object_pairs_hook = True, None, None
    parse_float, parse_int, parse_constant = float, int, float


def loads(text: str) -> object:
    start = len(text) - len(text.lstrip())
    try:
        value, end = _json.make_scanner(_Decoding())(text, start)  # type: ignore[arg-type]
        if not text[end:].strip():
            return value
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except (StopIteration, SystemError, ValueError):
        # NOTE: on malformed input the C scanner wants json.decoder already imported (it raises
        # SystemError otherwise); only this error path pays for the full module.
        pass
    import json

    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def dumps(value: object) -> str:
    if isinstance(value, str):
        return _json.encode_basestring_ascii(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{dumps(str(k))}:{dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value)  # int or float


def emit(body: dict[str, object]) -> None:
    sys.stdout.write(dumps(body) + "\n")
    sys.stdout.flush()


def fail(version: str, code: int, msg: str, details: str = "") -> int:
    emit({"cniVersion": version, "code": code, "msg": msg, "details": details})
    return 1


def connect(sock: socket.socket, sock_path: str, deadline: float) -> None:
    """Connect before the deadline. Only a missing socket or nobody listening is "down": a full
    listen backlog (EAGAIN, a burst of pods) is a busy daemon, so wait for room."""
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            sock.connect(sock_path)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise Unreachable("its listen queue stayed full until the deadline") from None
            time.sleep(0.005)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
            raise Unreachable(exc.strerror or str(exc)) from None


def request(sock_path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
    """POST /cni over the unix socket; returns (status, reply body). Raises Unreachable."""
    deadline = time.monotonic() + timeout
    head = "POST /cni HTTP/1.0\r\nHost: plexusd\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connect(sock, sock_path, deadline)
        sock.sendall(head.encode() + body)
        chunks = []
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except TimeoutError:
        raise Unreachable(f"no answer within {timeout:g} s") from None
    except OSError as exc:  # reset, permission denied, ...
        raise Unreachable(exc.strerror or str(exc)) from None
    finally:
        sock.close()
    reply = b"".join(chunks)
    header, sep, payload = reply.partition(b"\r\n\r\n")
    lines = header.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise Unreachable("the connection closed before a complete answer")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            length = int(value)
            if len(payload) < length:  # the daemon died while it answered
                raise Unreachable("the connection closed before a complete answer")
            payload = payload[:length]
    return int(parts[1]), payload


def is_path(value: object) -> bool:
    """A string the kernel can take as a path: no NUL, and UTF-8 (no lone surrogate)."""
    if not isinstance(value, str) or not value or "\0" in value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def safe(text: str, limit: int) -> str:
    """ASCII letters, digits, '-', '_' and '.' only: nothing else reaches a file name."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in text)[:limit]


def spool(spool_dir: str, env: dict[str, str], stdin: str) -> None:
    """Durably record a DEL for the daemon to replay (temp file + fsync + rename)."""
    os.makedirs(spool_dir, mode=0o700, exist_ok=True)
    cid, ifname = safe(env.get("CNI_CONTAINERID", ""), 80), safe(env.get("CNI_IFNAME", ""), 15)
    name = f"{time.time_ns()}-{cid}-{ifname}.json"
    entry = {"env": env, "config": stdin, "spooledAt": time.time()}
    tmp = os.path.join(spool_dir, "." + name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.write(fd, dumps(entry).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(spool_dir, name))
    except BaseException:
        os.unlink(tmp)  # a half-written entry must not linger (the daemon skips dot-files)
        raise
    dfd = os.open(spool_dir, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def unreachable(
    command: str,
    conf: dict[str, object],
    *,
    version: str,
    env: dict[str, str],
    stdin: str,
    why: str,
) -> int:
    """The daemon is down: spool a DEL (success), refuse everything else with a clear code."""
    if command == "DEL":
        spool_dir = conf.get("spoolDir") or DEFAULT_SPOOL
        if not is_path(spool_dir) or not str(spool_dir).startswith("/"):
            # A relative or non-string path would spool where the daemon never looks.
            return fail(
                version, INVALID_CONFIG, f"{why}; spoolDir must be an absolute path: {spool_dir!a}"
            )
        try:
            spool(str(spool_dir), env, stdin)
        except OSError as err:
            return fail(
                version, TRY_AGAIN_LATER, f"{why}; spooling the DEL failed too: {err.strerror}"
            )
        return 0
    if command == "STATUS":
        return fail(version, NOT_AVAILABLE, why)
    return fail(
        version,
        TRY_AGAIN_LATER,
        why + "; retry once the plexusd pod is running",
        "check the plexusd DaemonSet pod on this node and its logs",
    )


def main() -> int:
    env = {k: os.environ[k] for k in CNI_KEYS if k in os.environ}
    command = env.get("CNI_COMMAND", "")
    stdin = sys.stdin.buffer.read().decode("utf-8", "replace")
    try:
        conf = loads(stdin or "{}")
    except ValueError as exc:
        conf = exc
    if not isinstance(conf, dict):
        # Without a config there is no socketPath to forward to: answer here.
        return fail(
            "1.0.0", DECODE_FAILURE, f"network configuration on stdin is not a JSON object: {conf}"
        )
    version = conf.get("cniVersion")
    if not isinstance(version, str):
        version = "1.0.0"
    if command == "VERSION":
        emit({"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS})
        return 0
    sock_path = conf.get("socketPath") or DEFAULT_SOCKET
    if not is_path(sock_path):
        return fail(version, INVALID_CONFIG, f"socketPath must be a path string, not {sock_path!a}")
    try:
        timeout = float(conf.get("shimTimeout") or DEFAULT_TIMEOUT)
    except (TypeError, ValueError, OverflowError):  # 400 digits overflow a float
        timeout = DEFAULT_TIMEOUT
    if not 0 < timeout <= MAX_TIMEOUT:  # NaN, infinite or negative: the deadline must hold
        timeout = DEFAULT_TIMEOUT
    body = dumps({"env": env, "config": stdin}).encode()
    try:
        status, reply = request(sock_path, body, timeout)
    except Unreachable as exc:
        why = f"plexusd is not reachable at {sock_path} ({exc})"
        return unreachable(command, conf, version=version, env=env, stdin=stdin, why=why)
    if reply:
        sys.stdout.buffer.write(reply if reply.endswith(b"\n") else reply + b"\n")
        sys.stdout.flush()
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
