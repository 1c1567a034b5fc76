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
MAX_STDIN = 4 * 1024 * 1024  # the daemon refuses far smaller bodies; a bound keeps the spool sane
MAX_REPLY = 16 * 1024 * 1024  # a result JSON is a few KiB
MAX_DEPTH = 512  # deeper JSON is refused (code 6) at the same depth by both shims
JSON_SPACE = " \t\n\r"
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50


class Unreachable(Exception):
    """The daemon could not be reached, or went away before it answered."""


class _Decoding:  # the attributes _json's scanner reads from a json.JSONDecoder
    strict, object_hook, object_pairs_hook = True, None, None
    # Every number is read as a float: the shim only compares shimTimeout, and an integer of
    # more than 4,300 digits would otherwise be an error (Python's int conversion limit).
    parse_float, parse_int, parse_constant = float, float, float


_scan = _json.make_scanner(_Decoding())  # type: ignore[arg-type]


class NotAnObject(ValueError):
    """Stdin is not a JSON object; the message says what it is instead."""


def loads(text: str) -> object:
    """Parse the config as the compiled shim does (shim/plexus-shim.c): JSON whitespace around
    one value, at most MAX_DEPTH levels of arrays and objects; raises NotAnObject otherwise."""
    start = len(text) - len(text.lstrip(JSON_SPACE))
    try:
        value, end = _scan(text, start)
    except RecursionError:  # Python's own limit (~1,000 levels) is past MAX_DEPTH
        raise NotAnObject(f"it nests deeper than {MAX_DEPTH} levels") from None
    except (StopIteration, SystemError, ValueError):
        end = _error_position(text, start)
    else:
        if not text[end:].strip(JSON_SPACE):
            if _deeper_than(text, len(text)):
                raise NotAnObject(f"it nests deeper than {MAX_DEPTH} levels")
            return value
    # Invalid JSON; but nesting past MAX_DEPTH before the error is what a parser reading left
    # to right (the compiled shim) meets first.
    if _deeper_than(text, end):
        raise NotAnObject(f"it nests deeper than {MAX_DEPTH} levels")
    raise NotAnObject("it is not valid JSON")


def _error_position(text: str, start: int) -> int:
    """Where the scanner gives up on invalid JSON. Only this error path pays for json.decoder,
    which the C scanner needs imported to raise its errors (SystemError otherwise)."""
    import json.decoder

    try:
        _, end = _scan(text, start)
    except StopIteration as exc:
        return int(exc.value)
    except json.decoder.JSONDecodeError as exc:
        return exc.pos
    except (RecursionError, ValueError):
        return len(text)
    return end  # parsed, with extra data after the value


def _deeper_than(text: str, end: int) -> bool:
    """Whether text[:end] opens more than MAX_DEPTH arrays and objects at once (outside
    strings). Counting first keeps the common case to two C-level scans."""
    if text.count("[", 0, end) + text.count("{", 0, end) <= MAX_DEPTH:
        return False
    depth, in_string, escaped = 0, False, False
    for c in text[:end]:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif c in "]}":
            depth -= 1
    return False


def kind(value: object) -> str:
    """The JSON type of a parsed value, for a message."""
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float):
        return "a number"
    return "an array" if isinstance(value, list) else "an object"


def describe(value: object) -> str:
    """A config value for a message: ascii() of a string (it shows the NUL or lone surrogate
    that makes it unusable), else its JSON type."""
    return ascii(value) if isinstance(value, str) else kind(value)


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
        chunks, received = [], 0
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            received += len(chunk)
            if received > MAX_REPLY:
                raise Unreachable(f"its answer was larger than {MAX_REPLY} bytes")
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
        spool_dir = conf.get("spoolDir")
        if spool_dir is None or spool_dir == "":
            spool_dir = DEFAULT_SPOOL
        if not is_path(spool_dir) or not str(spool_dir).startswith("/"):
            # A relative or non-string path would spool where the daemon never looks.
            return fail(
                version,
                INVALID_CONFIG,
                f"{why}; spoolDir must be an absolute path, not {describe(spool_dir)}",
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
    raw = sys.stdin.buffer.read(MAX_STDIN + 1)
    if len(raw) > MAX_STDIN:
        return fail(
            "1.0.0",
            DECODE_FAILURE,
            f"network configuration on stdin is larger than {MAX_STDIN} bytes",
        )
    stdin = raw.decode("utf-8", "replace")
    try:
        conf = loads(stdin or "{}")
        if not isinstance(conf, dict):
            raise NotAnObject(f"it is {kind(conf)}")
    except NotAnObject as exc:
        # Without a config there is no socketPath to forward to: answer here.
        return fail(
            "1.0.0", DECODE_FAILURE, f"network configuration on stdin is not a JSON object: {exc}"
        )
    version = conf.get("cniVersion")
    if not isinstance(version, str):
        version = "1.0.0"
    if command == "VERSION":
        emit({"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS})
        return 0
    sock_path = conf.get("socketPath")
    if sock_path is None or sock_path == "":
        sock_path = DEFAULT_SOCKET
    if not is_path(sock_path):
        return fail(
            version, INVALID_CONFIG, f"socketPath must be a path string, not {describe(sock_path)}"
        )
    timeout = conf.get("shimTimeout")
    # A deadline is always in force: one the shim cannot use (not a number, NaN, infinite, out
    # of (0, MAX_TIMEOUT]) falls back to the default.
    if not (isinstance(timeout, float) and 0 < timeout <= MAX_TIMEOUT):
        timeout = DEFAULT_TIMEOUT
    body = dumps({"env": env, "config": stdin}).encode()
    try:
        status, reply = request(str(sock_path), body, timeout)
    except Unreachable as exc:
        why = f"plexusd is not reachable at {sock_path} ({exc})"
        return unreachable(command, conf, version=version, env=env, stdin=stdin, why=why)
    if reply:
        sys.stdout.buffer.write(reply if reply.endswith(b"\n") else reply + b"\n")
        sys.stdout.flush()
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
