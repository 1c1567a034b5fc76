"""The durable VF ledger: one `VfRecord` per VF that is not plainly free, as
`<state_dir>/vfs/<pci>.json`, and the per-pool free index that makes reserve/release cost the
same for a pool of 64 VFs or of 4,096.

`sriov.agent.NodeAgent` is its only user (and so the only writer of VF state). Every change is
on disk (temp file, fsync, rename, directory fsync) before the call returns, so a crash leaves
the old or the new record. A free VF with nothing to remember has no file: 1,024 idle VFs cost
no files. A record that cannot be read turns its VF unhealthy (with the reason), never a crash.

Pool membership is not stored: the agent recomputes it from the pools file and the inventory
on start and calls `set_pool`; records keep their state when their VF leaves a pool (a held VF
is never forgotten).
"""

from __future__ import annotations

import heapq
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

import structlog
from pydantic import ValidationError

from cnispec.durable import atomic_write, durable_unlink
from cnispec.errors import DeviceUnavailable, IOFailure
from cnispec.identity import Holder
from sriov.records import VfRecord, VfState

log = structlog.get_logger(__name__)

HELD: Final = frozenset({VfState.RESERVED, VfState.ATTACHED, VfState.RELEASING})
# Everything a VF's record says about its last holder; going back to FREE forgets it all.
_CLEARED_ON_FREE: Final[dict[str, Any]] = {
    "pool": None,
    "holder": None,
    "host": None,
    "pf_before": None,
    "pf_applied": (),
    "pf_set": None,
    "reason": "",
}
_PCI: Final = re.compile(r"^[0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


class _FreeIndex:
    """The free members of one pool, lowest PCI address first: a heap of candidates checked
    against a set (entries that stopped being free are dropped lazily when they surface), so
    take/add cost O(log n) at worst, with at most one heap entry per VF."""

    def __init__(self) -> None:
        self._heap: list[str] = []
        self._queued: set[str] = set()
        self.free: set[str] = set()

    def add(self, pci: str) -> None:
        self.free.add(pci)
        if pci not in self._queued:
            self._queued.add(pci)
            heapq.heappush(self._heap, pci)

    def discard(self, pci: str) -> None:
        self.free.discard(pci)  # its heap entry goes when it reaches the top

    def take(self) -> str | None:
        while self._heap:
            pci = heapq.heappop(self._heap)
            self._queued.discard(pci)
            if pci in self.free:
                self.free.remove(pci)
                return pci
        return None


class Ledger:
    """Per-VF state records, durable, with compare-and-set transitions. Thread-safe: one lock
    around every read and write (a write is one small file, so holding it through the fsync
    is what keeps two reservations off one VF)."""

    def __init__(self, state_dir: Path) -> None:
        self._dir = Path(state_dir) / "vfs"
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._records: dict[str, VfRecord] = {}  # only records that are not plainly free
        self._by_holder: dict[tuple[str, str], str] = {}
        self._members: dict[str, set[str]] = {}  # pool -> PCI addresses set_pool gave
        self._pool_of: dict[str, str] = {}  # PCI -> its pool (a VF is in one pool at most)
        self._free: dict[str, _FreeIndex] = {}
        self._listeners: list[Callable[[], None]] = []
        for record in self._load():
            self._remember(record)

    # --- reading ---------------------------------------------------------------------------------

    def get(self, pci: str) -> VfRecord:
        """The VF's record; a FREE one when nothing is stored."""
        with self._lock:
            return self._get(pci)

    def records(self) -> list[VfRecord]:
        """Every stored record (free VFs without one are not listed), by PCI address."""
        with self._lock:
            return [self._records[pci] for pci in sorted(self._records)]

    def held_by(self, container_id: str, ifname: str) -> VfRecord | None:
        with self._lock:
            pci = self._by_holder.get((container_id, ifname))
            return None if pci is None else self._records[pci]

    def free_count(self, pool: str) -> int:
        with self._lock:
            index = self._free.get(pool)
            return 0 if index is None else len(index.free)

    # --- writing ---------------------------------------------------------------------------------

    def put(self, record: VfRecord) -> VfRecord:
        """Store `record` as given (durably), stamped with the time."""
        with self._lock:
            return self._store(record.model_copy(update={"updated": time.time()}))

    def transition(
        self, pci: str, *, expect: set[VfState] | frozenset[VfState], to: VfState, **changes: Any
    ) -> VfRecord:
        """Compare-and-set: move the VF to `to` (with `changes` to other fields) only when its
        state is in `expect`; DeviceUnavailable otherwise. Going to FREE forgets the holder,
        pool, host state, PF-side settings and reason (unless `changes` sets them)."""
        with self._lock:
            return self._transition(pci, expect=expect, to=to, changes=changes)

    def set_pool(self, pool: str, members: Iterable[str]) -> None:
        """`members` are the VFs of `pool` that may be given out (the agent passes the healthy,
        verified ones). A VF that leaves keeps its record and state; one held now joins the free
        index when it is freed."""
        with self._lock:
            self._set_pool(pool, set(members))

    def drop_pool(self, pool: str) -> None:
        """Forget a pool that left the pools file; its VFs' records stay as they are."""
        with self._lock:
            self._set_pool(pool, set())
            del self._members[pool], self._free[pool]

    def reserve(self, pool: str, holder: Holder) -> VfRecord:
        """FREE -> RESERVED for `holder`: the pool's free member with the lowest PCI address. A
        retried ADD (the same container ID and ifname) gets the VF it already holds."""
        with self._lock:
            held = self._held_by_attachment(pool, holder)
            if held is not None:
                return held
            index = self._free.get(pool)
            pci = index.take() if index is not None else None
            if pci is None or index is None:
                raise DeviceUnavailable(self._exhausted(pool))
            try:
                return self._transition(
                    pci,
                    expect={VfState.FREE},
                    to=VfState.RESERVED,
                    changes={"holder": holder, "pool": pool},
                )
            except BaseException:
                if self._get(pci).state is VfState.FREE:
                    index.add(pci)  # the write failed: it is still free
                raise

    # --- inside the lock --------------------------------------------------------------------------

    def _get(self, pci: str) -> VfRecord:
        return self._records.get(pci) or VfRecord(pci=pci)

    def _set_pool(self, pool: str, wanted: set[str]) -> None:
        for pci in self._members.get(pool, set()) - wanted:
            self._leave(pci)
        self._members[pool] = wanted
        index = self._free.setdefault(pool, _FreeIndex())
        for pci in wanted:
            if self._pool_of.get(pci, pool) != pool:
                self._leave(pci)  # it moved here from another pool
            self._pool_of[pci] = pool
            if self._get(pci).state is VfState.FREE:
                index.add(pci)

    def _transition(
        self, pci: str, *, expect: Iterable[VfState], to: VfState, changes: dict[str, Any]
    ) -> VfRecord:
        unknown = changes.keys() - VfRecord.model_fields.keys() | (
            {"pci", "state"} & changes.keys()
        )
        if unknown:
            raise TypeError(f"transition cannot set {sorted(unknown)}")
        current = self._get(pci)
        if current.state not in expect:
            wanted = "/".join(sorted(s.value for s in expect))
            raise DeviceUnavailable(f"{_describe(current)}, not {wanted}")
        fields = dict(current)
        if to is VfState.FREE:
            fields.update(_CLEARED_ON_FREE)
        fields.update(changes, state=to, updated=time.time())
        return self._store(VfRecord.model_validate(fields))

    def _store(self, record: VfRecord) -> VfRecord:
        """Write (or, for a plainly free VF, delete) the record durably, then update memory."""
        key = _holder_key(record)
        owner = self._by_holder.get(key) if key else None
        if key and owner is not None and owner != record.pci:
            raise DeviceUnavailable(
                f"attachment {key[0]}/{key[1]} already holds VF {owner}: "
                f"it cannot hold {record.pci} too"
            )
        path = self._path(record.pci)
        try:
            if _plainly_free(record):
                durable_unlink(path)
            else:
                atomic_write(path, record.model_dump_json().encode())
        except OSError as exc:
            raise IOFailure(f"cannot write VF record {path}: {exc.strerror}") from None
        self._forget(record.pci)
        self._remember(record)
        for fn in self._listeners:
            fn()
        return record

    def on_change(self, fn: Callable[[], None]) -> None:
        """`fn()` after every stored change of a record (reserve, attach, release, unhealthy).
        Called under the ledger's lock: it must only take note (set a flag), never block."""
        self._listeners.append(fn)

    def _remember(self, record: VfRecord) -> None:
        if not _plainly_free(record):
            self._records[record.pci] = record
        key = _holder_key(record)
        if key:
            self._by_holder[key] = record.pci
        pool = self._pool_of.get(record.pci)
        if pool is not None and record.state is VfState.FREE:
            self._free[pool].add(record.pci)

    def _forget(self, pci: str) -> None:
        old = self._records.pop(pci, None)
        key = _holder_key(old) if old else None
        if key and self._by_holder.get(key) == pci:
            del self._by_holder[key]
        pool = self._pool_of.get(pci)
        if pool is not None:
            self._free[pool].discard(pci)

    def _leave(self, pci: str) -> None:
        pool = self._pool_of.pop(pci, None)
        if pool is not None:
            self._members[pool].discard(pci)
            self._free[pool].discard(pci)

    def _held_by_attachment(self, pool: str, holder: Holder) -> VfRecord | None:
        pci = self._by_holder.get((holder.container_id, holder.ifname))
        if pci is None:
            return None
        record = self._records[pci]
        in_pool = pool in (record.pool, self._pool_of.get(pci))
        if in_pool and record.state in (VfState.RESERVED, VfState.ATTACHED):
            return record
        raise DeviceUnavailable(
            f"attachment {holder.container_id}/{holder.ifname} already holds {_describe(record)}"
        )

    def _exhausted(self, pool: str) -> str:
        # Only on the failure path, so a scan is fine here.
        members = self._members.get(pool)
        if members is None:
            return f"pool {pool} has no VF that can be given out (no healthy, verified VF)"
        mine = [r for r in self._records.values() if r.pci in members or r.pool == pool]
        held = sum(r.state in HELD for r in mine)
        sick = sum(r.state is VfState.UNHEALTHY for r in mine)
        return f"pool {pool} has no free VF ({held} in use, {sick} unhealthy)"

    def _path(self, pci: str) -> Path:
        if not _PCI.match(pci):
            raise ValueError(f"not a PCI address: {pci!r}")
        return self._dir / f"{pci}.json"

    # --- loading ----------------------------------------------------------------------------------

    def _load(self) -> list[VfRecord]:
        loaded = []
        for path in sorted(self._dir.iterdir()):
            if path.name.startswith("."):
                path.unlink(missing_ok=True)  # the temp file of a write a crash interrupted
            elif path.suffix == ".json" and _PCI.match(path.stem):
                loaded.append(self._read(path))
        return loaded

    def _read(self, path: Path) -> VfRecord:
        try:
            record = VfRecord.model_validate_json(path.read_bytes())
            if record.pci != path.stem:
                raise ValueError(f"the file holds the record of {record.pci}")
        except (OSError, ValidationError, ValueError) as exc:
            reason = f"its record {path} cannot be read ({str(exc)[:200]}); heal or remove it"
            log.error("vf_record_unreadable", path=str(path), error=str(exc)[:300])
            return VfRecord(pci=path.stem, state=VfState.UNHEALTHY, reason=reason)
        return record


def _holder_key(record: VfRecord) -> tuple[str, str] | None:
    if record.holder is None:
        return None
    return (record.holder.container_id, record.holder.ifname)


def _plainly_free(record: VfRecord) -> bool:
    return record.state is VfState.FREE and record.model_copy(update={"updated": 0.0}) == VfRecord(
        pci=record.pci
    )


def _describe(record: VfRecord) -> str:
    text = f"VF {record.pci} is {record.state.value}"
    holder = record.holder
    if holder is not None:
        pod = f"pod {holder.pod_namespace}/{holder.pod_name}, " if holder.pod_name else ""
        text += f" (held by {pod}container {holder.container_id}, {holder.ifname})"
    if record.reason:
        text += f": {record.reason}"
    return text
