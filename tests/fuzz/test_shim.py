"""The shim executables on their own (no daemon listening), the compiled one and the Python
one: whatever the runtime hands them, they answer with CNI error JSON (11 unreachable, 50
STATUS, 6/7 for a config they cannot use) or a VERSION result, or spool a DEL into the
configured spool directory, and write nowhere else; and both answer every input with the same
bytes (`test_both_shims_answer_alike`).

The inputs this tier first found the shim crashing on (deep JSON, a float overflow, paths the
kernel cannot take) are pinned below as reproducers (`KNOWN_SHIM_CRASHES`): each is now a CNI
error.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, event, given
from hypothesis import strategies as st

from tests.fuzz import strategies as s
from tests.fuzz.conftest import budget
from tests.fuzz.tally import (
    HANG_SECONDS,
    Violation,
    case,
    check_error_body,
    guard_machine_spool,
    machine_spool,
)
from tests.unit.test_shim_conformance import SHIMS, install_compiled_shim, install_python_shim

SHIM_CODES = frozenset({6, 7, 11, 50})
# Both shims refuse JSON nested deeper than 512 levels (code 6) at any depth.
SHIM_SAFE_DEPTH = 5000


class Shim:
    def __init__(self, root: Path, install: Callable[[Path], Path]) -> None:
        self.path = install(root / "installed")
        self.cwd = root / "cwd"  # where a relative spool path would land
        self.cwd.mkdir()
        self.spool = root / "spool"
        self.base = {
            "type": "plexus",
            "socketPath": str(root / "nobody-listens.sock"),
            "spoolDir": str(self.spool),
        }

    def run(self, env: dict[str, str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
        environ = {
            k.encode(): v.replace("\x00", "").encode("utf-8", "surrogatepass")
            for k, v in env.items()
        }
        before = machine_spool()
        try:
            done = subprocess.run(
                [str(self.path)],
                input=stdin,
                env=environ,  # type: ignore[arg-type]
                cwd=self.cwd,
                capture_output=True,
                timeout=HANG_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise Violation("hang", "the shim did not answer") from None
        guard_machine_spool(before)
        return done

    def spooled(self) -> list[Path]:
        return sorted(self.spool.glob("*.json")) if self.spool.exists() else []

    def stray(self) -> list[str]:
        return sorted(str(p.relative_to(self.cwd)) for p in self.cwd.rglob("*"))


@pytest.fixture(scope="module", params=list(SHIMS))
def shim(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Shim]:
    yield Shim(tmp_path_factory.mktemp("fuzz-shim"), SHIMS[request.param])


def judge(shim: Shim, env: dict[str, str], done: subprocess.CompletedProcess[bytes]) -> None:
    if b"Traceback" in done.stderr or b"Traceback" in done.stdout:
        raise Violation("traceback", done.stderr.decode("utf-8", "replace")[-800:])
    if not done.stdout.strip():
        if done.returncode == 0 and env.get("CNI_COMMAND") == "DEL" and shim.spooled():
            for spooled in shim.spooled():
                spooled.unlink()
            return
        raise Violation("contract", f"exit {done.returncode} and nothing on stdout")
    try:
        body = json.loads(done.stdout)
    except ValueError:
        raise Violation("contract", f"stdout is not JSON: {done.stdout[:300]!r}") from None
    if done.returncode == 0:
        if env.get("CNI_COMMAND") != "VERSION" or "supportedVersions" not in body:
            raise Violation("contract", f"exit 0 with {body!r:.300}")
    else:
        check_error_body(body, allowed=SHIM_CODES)
    stray = shim.stray()
    if stray:
        raise Violation("leftover", f"the shim wrote outside its spool directory: {stray}")


@budget(ci=40, long=2_000)
@given(data=st.data())
def test_shim_without_a_daemon(shim: Shim, data: st.DataObject) -> None:
    env = data.draw(s.cni_env())
    config = s.configs(base=shim.base)
    stdin = data.draw(s.stdin_texts(config, max_depth=SHIM_SAFE_DEPTH)).encode(
        "utf-8", "surrogatepass"
    )
    assume(s.stays_in_the_bed(stdin, shim.base))
    with case("shim, daemon unreachable"):
        done = shim.run(env, stdin)
        event(f"{env.get('CNI_COMMAND')!r:.10}: exit {done.returncode}")
        judge(shim, env, done)


# --- inputs that once crashed the shim (each now a CNI error) ----------------------------------

DEL_ENV = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_PATH": "/x"}


def _conf(shim: Shim, **extra: Any) -> bytes:
    return json.dumps({**shim.base, "cniVersion": "1.0.0", **extra}).encode()


KNOWN_SHIM_CRASHES = {
    # _json's scanner raises RecursionError, which main() does not catch
    "stdin nested 1,000 deep": (
        "ADD",
        lambda sh: _conf(sh)[:-1] + b', "a": ' + b"[" * 1000 + b"]" * 1000 + b"}",
    ),
    "VERSION with stdin nested 1,000 deep": (
        "VERSION",
        lambda sh: b'{"a": ' + b"[" * 1000 + b"]" * 1000 + b"}",
    ),
    # float() of an integer past 1e308 raises OverflowError (only TypeError/ValueError caught)
    "shimTimeout an integer of 400 digits": (
        "ADD",
        lambda sh: _conf(sh)[:-1] + b', "shimTimeout": 1' + b"0" * 400 + b"}",
    ),
    # connect() encodes the path: a lone surrogate raises UnicodeEncodeError
    "socketPath with a lone surrogate": (
        "ADD",
        lambda sh: _conf(sh, socketPath="/run/\ud800.sock"),
    ),
    # os.makedirs() of the spool path: UnicodeEncodeError / ValueError
    "spoolDir with a lone surrogate": ("DEL", lambda sh: _conf(sh, spoolDir="/tmp/\ud800")),
    "spoolDir with a NUL": ("DEL", lambda sh: _conf(sh, spoolDir="/tmp/a\x00b")),
}


@pytest.mark.parametrize("name", list(KNOWN_SHIM_CRASHES))
def test_known_shim_crash(shim: Shim, name: str) -> None:
    command, stdin = KNOWN_SHIM_CRASHES[name]
    env = {**DEL_ENV, "CNI_COMMAND": command, "CNI_NETNS": "/proc/self/ns/net"}
    judge(shim, env, shim.run(env, stdin(shim)))


@pytest.mark.parametrize("spool_dir", [5, True, [1], "relative/spool"])
def test_known_shim_spools_a_del_to_a_relative_path(shim: Shim, spool_dir: object) -> None:
    # str(conf.get("spoolDir")) turns 5 into "5": the DEL lands in the runtime's cwd, where the
    # daemon never looks, and the shim reports it done. Expected: code 7, nothing written.
    done = shim.run(DEL_ENV, _conf(shim, spoolDir=spool_dir))
    try:
        assert done.returncode != 0 and json.loads(done.stdout)["code"] == 7, done.stdout
        assert shim.stray() == []
    finally:
        for p in sorted(shim.cwd.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()


# --- the two shims, byte for byte ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Shim, Shim]:
    """The compiled and the Python shim, sharing one socket path and one spool directory (so
    their messages name the same paths); the spool is emptied between the two runs."""
    root = tmp_path_factory.mktemp("fuzz-pair")
    compiled = Shim(root / "c", install_compiled_shim)
    python = Shim(root / "p", install_python_shim)
    python.cwd, python.spool, python.base = compiled.cwd, compiled.spool, compiled.base
    return compiled, python


def _spool_snapshot(shim: Shim) -> list[tuple[str, bytes]]:
    """The spool's files, the clock taken out of names and contents; then empties it."""
    out = []
    for path in sorted(shim.spool.rglob("*")) if shim.spool.exists() else []:
        data = b"" if path.is_dir() else path.read_bytes()
        out.append(
            (
                re.sub(r"^\d{19}-", "<ns>-", path.name),
                re.sub(rb'"spooledAt":\d+\.\d+\}$', b'"spooledAt":<s>}', data),
            )
        )
    if shim.spool.exists():
        shutil.rmtree(shim.spool)
    return out


@budget(ci=40, long=2_000)
@given(data=st.data())
def test_both_shims_answer_alike(pair: tuple[Shim, Shim], data: st.DataObject) -> None:
    compiled, python = pair
    env = data.draw(s.cni_env())
    stdin = data.draw(s.stdin_texts(s.configs(base=compiled.base), max_depth=5000)).encode(
        "utf-8", "surrogatepass"
    )
    assume(s.stays_in_the_bed(stdin, compiled.base))
    with case("compiled shim vs Python shim"):
        answers = []
        for shim in (compiled, python):
            done = shim.run(env, stdin)
            answers.append((done.returncode, done.stdout, _spool_snapshot(shim), shim.stray()))
        if answers[0] != answers[1]:
            raise Violation(
                "contract", f"compiled {answers[0]!r:.400} != python {answers[1]!r:.400}"
            )
