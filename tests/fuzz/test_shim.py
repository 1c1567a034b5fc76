"""The shim executable on its own (no daemon listening): whatever the runtime hands it, it
answers with CNI error JSON (11 unreachable, 50 STATUS, 6/7 for a config it cannot use) or a
VERSION result, or spools a DEL into the configured spool directory, and writes nowhere else.

The inputs this tier first found the shim crashing on (deep JSON, a float overflow, paths the
kernel cannot take) are pinned below as reproducers (`KNOWN_SHIM_CRASHES`): each is now a CNI
error. The fuzzed space still stays below the nesting depth the strategies were written for.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, event, given
from hypothesis import strategies as st

from metaplugin.config import DaemonConfig
from metaplugin.install import install_shim
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

INTERPRETER = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else "python3"
SHIM_CODES = frozenset({6, 7, 11, 50})
# Below the depth at which the shim's own decoder overflows (see the xfails).
SHIM_SAFE_DEPTH = 900


class Shim:
    def __init__(self, root: Path) -> None:
        cfg = DaemonConfig.model_validate(
            {"cniBinDir": str(root / "bin"), "shimInterpreter": INTERPRETER, "stateDir": str(root)}
        )
        self.path = install_shim(cfg)
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


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shim]:
    yield Shim(tmp_path_factory.mktemp("fuzz-shim"))


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
