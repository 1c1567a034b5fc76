"""nftables through libnftables (the library `nft` itself is built on), inside a pod's netns.

`apply(netns, script)` runs an nft script there as ONE transaction: libnftables parses the whole
buffer and sends it to the kernel as a single netlink batch, so either every command in it takes
effect or none does (a table replaced this way is never seen half-made). `list_table_json(netns,
family, table)` reads a table back as nft's JSON (`nft -j list table ...`), `list_counters_json`
only its named counters; None when the table does not exist. Each call runs on a pooled worker
thread that has entered the namespace (`kernel.netns.run_in_netns`) and makes its own nft context
there: the context opens its netlink socket in the namespace the thread is in, so it must never
be made outside and reused (the rules would land in the node's own netns), and it is freed
before the worker goes home.
NOTE: ctypes rather than `nsenter --net=PATH nft -f -` per pod: measured here, a no-op script
costs ~0.25 ms through a context against ~7 ms through an exec'd nft (fork, exec, the library's
own start). A commit that changes something costs ~12 ms more either way: the kernel's wait (an
RCU grace period), which the policy engine overlaps by applying several pods at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import threading
from typing import Any, Final

from cnispec.errors import InternalError
from kernel.netns import run_in_netns

NFT_CTX_DEFAULT: Final = 0
NFT_CTX_OUTPUT_JSON: Final = 1 << 4
LIBRARY: Final = "libnftables.so.1"
_LISTING = threading.Lock()  # Debian: libnftables1 (pulled in by the nftables package)


class NftablesError(InternalError):
    """nft refused a script or a listing (its own message), or libnftables is missing."""


@functools.cache  # loading twice from two threads at once is harmless: dlopen refcounts
def _library() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("nftables") or LIBRARY)
    except OSError as exc:
        raise NftablesError(
            f"cannot load {LIBRARY} ({exc}); install the nftables package "
            "(libnftables1) on the node, or set policyEnforcement: false"
        ) from None
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_free.restype = None
    for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
        getattr(lib, name).restype = ctypes.c_int
    for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
        getattr(lib, name).restype = ctypes.c_char_p
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_ctx_output_set_flags.restype = None
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether libnftables can be loaded on this node."""
    try:
        _library()
    except NftablesError:
        return False
    return True


def run(script: str, *, json_output: bool = False) -> tuple[int, str, str]:
    """Run `script` in the calling thread's network namespace: (rc, output, error text). Only
    for a thread that is already where the rules belong (a netns worker, a test's own netns)."""
    lib = _library()
    ctx = lib.nft_ctx_new(NFT_CTX_DEFAULT)
    if not ctx:
        raise NftablesError("libnftables could not make a context (out of memory?)")
    try:
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        if json_output:
            lib.nft_ctx_output_set_flags(ctx, NFT_CTX_OUTPUT_JSON)
        rc = lib.nft_run_cmd_from_buffer(ctx, script.encode())
        out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
        err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
        return rc, out, err
    finally:
        lib.nft_ctx_free(ctx)


def _first_lines(text: str, limit: int = 12) -> str:
    # nft underlines the culprit with a line of ^ and ~: keep the messages and the script lines
    lines = [line.strip() for line in text.splitlines() if line.strip(" ^~\t")]
    more = f" (+{len(lines) - limit} more lines)" if len(lines) > limit else ""
    return "; ".join(lines[:limit]) + more


def apply(netns: str, script: str) -> None:
    """Run `script` (one transaction) in the network namespace at `netns`; NftablesError with
    nft's message when it refuses (nothing of the script then took effect)."""

    def work() -> None:
        rc, _out, err = run(script)
        if rc != 0:
            raise NftablesError(f"nft refused the rules in {netns}: {_first_lines(err)}")

    run_in_netns(netns, work)


def list_table_json(netns: str, family: str, table: str) -> dict[str, Any] | None:
    """`nft -j list table FAMILY TABLE` in the namespace at `netns`; None when no such table."""
    return _list_json(netns, f"list table {family} {table}", f"{family} {table}")


def list_counters_json(netns: str, family: str, table: str) -> dict[str, Any] | None:
    """`nft -j list counters table FAMILY TABLE`: only the table's named counters (no sets or
    rules to print: cheaper, whatever the table's size); None when no such table."""
    return _list_json(netns, f"list counters table {family} {table}", f"{family} {table}")


def _list_json(netns: str, command: str, what: str) -> dict[str, Any] | None:
    def work() -> dict[str, Any] | None:
        # NOTE: one listing at a time in the process: libnftables 1.0.6's JSON printer keeps
        # state in a static (strtok in set_dtype_json); two threads listing tables with sets
        # at once made it assert and abort the whole daemon. Applying needs no such lock.
        with _LISTING:
            rc, out, err = run(command, json_output=True)
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise NftablesError(f"nft cannot list {what} in {netns}: {_first_lines(err)}")
        try:
            listed = json.loads(out)
        except ValueError:
            raise NftablesError(f"nft listed {what} as invalid JSON") from None
        return listed if isinstance(listed, dict) else None

    return run_in_netns(netns, work)
