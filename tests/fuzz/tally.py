"""The fuzz tier's property and its score card.

The property (issue 10, item 7): whatever comes in, the answer is a CNI result or a CNI error
JSON `{"code": N, "msg": ...}` with N documented in docs/errors.md; never a traceback (an
exception that is not a PlexusError, code 999, "internal error" or "Traceback" in the answer),
never a hang, and a failed ADD leaves nothing behind. Each target counts its cases and how
they broke the property; tests/fuzz/conftest.py prints the table at the end of the run.
"""

from __future__ import annotations

import json
import re
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

from cnispec.errors import PlexusError

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTED_CODES = frozenset(
    int(code)
    for code in re.findall(r"^\| (\d+) \|", (ROOT / "docs" / "errors.md").read_text(), re.M)
)
# A call that has not returned after this long is hung: every case here answers in
# milliseconds (a delegate's real work included); this is a bound, not a timing.
HANG_SECONDS = 30.0

Kind = Literal["traceback", "hang", "leftover", "contract"]
T = TypeVar("T")


class Violation(AssertionError):
    def __init__(self, kind: Kind, message: str) -> None:
        super().__init__(f"[{kind}] {message}")
        self.kind = kind


@dataclass
class Tally:
    tried: int = 0
    failures: int = 0
    tracebacks: int = 0
    hangs: int = 0
    leftovers: int = 0


TALLIES: dict[str, Tally] = {}
COLUMNS = [f.name for f in fields(Tally)]


@contextmanager
def case(target: str) -> Iterator[None]:
    """One fuzzed input of `target`: counted, and its violation (if any) classified."""
    tally = TALLIES.setdefault(target, Tally())
    tally.tried += 1
    try:
        yield
    except Violation as exc:
        tally.failures += 1
        if exc.kind == "traceback":
            tally.tracebacks += 1
        elif exc.kind == "hang":
            tally.hangs += 1
        elif exc.kind == "leftover":
            tally.leftovers += 1
        raise


# --- the machine's own paths ---------------------------------------------------------------------

MACHINE_SPOOL = Path("/var/lib/plexus/spool")  # the shim's default spoolDir
_MACHINE_STATE_EXISTED = MACHINE_SPOOL.parent.exists()


def machine_spool() -> set[Path] | None:
    """What the machine's spool holds (None: no such directory)."""
    return set(MACHINE_SPOOL.iterdir()) if MACHINE_SPOOL.is_dir() else None


def guard_machine_spool(before: set[Path] | None) -> None:
    """A case that reached the shim's default spool directory (a harness slip: its config
    lost the test's spoolDir) is a failure, and what it wrote there is taken back."""
    now = machine_spool()
    if now is None or now == before:
        return
    for path in now - (before or set()):
        path.unlink(missing_ok=True)
    if before is None:  # the shim made the directory (and perhaps its parent): they go too
        made = [MACHINE_SPOOL] + ([] if _MACHINE_STATE_EXISTED else [MACHINE_SPOOL.parent])
        for directory in made:
            try:
                directory.rmdir()
            except OSError:
                break
    raise Violation("leftover", f"the case spooled into the machine's {MACHINE_SPOOL}")


# --- bounded calls ------------------------------------------------------------------------------

_pool: list[ThreadPoolExecutor] = []


def bounded(fn: Callable[[], T], seconds: float = HANG_SECONDS) -> T:
    """Run `fn` on a worker thread; one that does not return in time is a hang."""
    if not _pool:
        _pool.append(ThreadPoolExecutor(1, thread_name_prefix="fuzz-case"))
    future = _pool[0].submit(fn)
    try:
        return future.result(timeout=seconds)
    except FutureTimeout:
        _pool.pop().shutdown(wait=False)  # the stuck worker is abandoned, a new one follows
        raise Violation("hang", f"no answer after {seconds:.0f} s") from None


def expect_cni_outcome(fn: Callable[[], T], *, allowed: frozenset[int] | None = None) -> T | None:
    """`fn` returns, or raises a PlexusError whose code is documented (and in `allowed`);
    anything else is a traceback the runtime would have got as 999."""
    try:
        return bounded(fn)
    except Violation:
        raise
    except PlexusError as exc:
        check_error_body(exc.to_dict(), allowed=allowed)
        return None
    except Exception as exc:
        raise Violation(
            "traceback", "".join(traceback.format_exception(exc, limit=-6)).strip()
        ) from None


# --- answers on the wire ----------------------------------------------------------------------


def check_error_body(body: Any, *, allowed: frozenset[int] | None = None) -> None:
    if not isinstance(body, dict) or not isinstance(body.get("code"), int):
        raise Violation("contract", f"an error answer without an integer code: {body!r:.300}")
    code, msg = body["code"], body.get("msg")
    text = json.dumps(body)
    if code == 999 or "Traceback" in text or "internal error" in str(msg):
        raise Violation("traceback", f"code {code}: {msg!r:.600}")
    if code not in DOCUMENTED_CODES:
        raise Violation("contract", f"code {code} is not in docs/errors.md: {msg!r:.300}")
    if allowed is not None and code not in allowed:
        raise Violation("contract", f"code {code} is not expected here: {msg!r:.300}")
    if not isinstance(msg, str) or not msg:
        raise Violation("contract", f"code {code} without a message")


def check_answer(ok: bool, reply: bytes) -> Any:
    """A plexusd answer (the shim prints it as is): on success empty or a JSON object without
    `code`; on failure a CNI error. Returns the decoded body (None when empty)."""
    if b"Traceback" in reply:
        raise Violation("traceback", reply.decode("utf-8", "replace")[:800])
    if not reply.strip():
        if ok:
            return None
        raise Violation("contract", "a failure with an empty answer")
    try:
        body = json.loads(reply)
    except ValueError:
        raise Violation("contract", f"the answer is not JSON: {reply[:300]!r}") from None
    if ok:
        if not isinstance(body, dict) or "code" in body:
            raise Violation("contract", f"a success whose answer is not a result: {body!r:.300}")
        return body
    check_error_body(body)
    return body


def render_table() -> list[str]:
    if not TALLIES:
        return []
    rows = [["target", *(c.replace("tried", "cases tried") for c in COLUMNS)]]
    total = Tally()
    for target, tally in sorted(TALLIES.items()):
        rows.append([target, *(f"{getattr(tally, c):,}" for c in COLUMNS)])
        for c in COLUMNS:
            setattr(total, c, getattr(total, c) + getattr(tally, c))
    rows.append(["total", *(f"{getattr(total, c):,}" for c in COLUMNS)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    lines.append(
        f"{total.tried:,} fuzzed inputs -> {total.tracebacks} tracebacks, {total.hangs} hangs, "
        f"{total.leftovers} leftovers ({total.failures} failing cases in all)"
    )
    return lines
