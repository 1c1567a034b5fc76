"""Replaying DELs the shim spooled while the daemon was unreachable.

The shim writes one file per DEL (`<ns timestamp>-<container>-<ifname>.json` holding
`{"env", "config", "spooledAt"}`, atomically). The daemon replays them in order on start, before
it serves anything, and retries the ones that fail on a timer, so a DEL is never lost. A file
that cannot be decoded is moved to `<spool>/bad/` and logged, never silently dropped.

The runtime took a spooled DEL for done, so it will not send it again: retrying for ever would
only repeat a DEL that cannot succeed (a pod stuck in the store, its leases held). A failed
replay adds one to `attempts` in the file (rewritten atomically, so a restart keeps the count);
the `MAX_ATTEMPTS`th replay is the DEL's last: what still fails is given up
(`Orchestrator._abandon`), and a DEL that fails even so (the store cannot be read) is moved to
`<spool>/bad/` and logged (`spooled_del_given_up`): its records stay for GC or a later DEL.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any, Final

import structlog

from cnispec import cni, failpoints
from cnispec.durable import atomic_write
from metaplugin.orchestrator import Orchestrator
from metaplugin.scheduler import Scheduler

log = structlog.get_logger(__name__)

# Replays of one spooled DEL, the last of which gives up what still fails: ten minutes at the
# 30 s retry interval (and one more at each restart), for a failure that can pass (a plugin's
# API down, the node under load) to pass.
MAX_ATTEMPTS: Final = 20


class SpoolReplayer:
    def __init__(
        self,
        spool_dir: str,
        *,
        orchestrator: Orchestrator,
        scheduler: Scheduler,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        self._dir = Path(spool_dir)
        self._max_attempts = max_attempts
        self._orchestrator = orchestrator
        self._scheduler = scheduler
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.replayed = 0  # spooled DELs done since start (for /metrics)

    def pending(self) -> list[Path]:
        try:
            return sorted(p for p in self._dir.iterdir() if p.suffix == ".json" and p.is_file())
        except FileNotFoundError:
            return []

    def replay(self) -> int:
        """Replay every spooled DEL; returns how many are still pending (failed ones)."""
        remaining = 0
        for path in self.pending():
            if not self._replay_one(path):
                remaining += 1
        return remaining

    def _replay_one(self, path: Path) -> bool:
        try:
            data = json.loads(path.read_bytes())
            req = cni.parse_request(data["env"], data["config"], check_netns=False)
            if req.command != cni.DEL:
                raise ValueError(f"spooled command is {req.command}, only DEL is spooled")
            spooled_at = float(data.get("spooledAt") or 0.0)
            attempts = int(data.get("attempts") or 0)
        except FileNotFoundError:
            return True
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with it, keep it aside
            self._set_aside(path)
            log.error("spool_file_unreadable", spool_file=path.name, error=repr(exc)[:300])
            return True
        bound = log.bind(container_id=req.container_id, ifname=req.ifname, spool_file=path.name)
        last = attempts + 1 >= self._max_attempts
        try:
            with self._scheduler.container(req.container_id):
                failpoints.hit("spool_replay_before")
                self._orchestrator.delete_spooled(req, spooled_at, last=last)
        except Exception as exc:  # noqa: BLE001 - stays pending; the timer retries it
            error = getattr(exc, "msg", repr(exc))
            if last:
                self._set_aside(path)
                bound.error("spooled_del_given_up", error=error, attempts=attempts + 1)
                return True
            bound.warning("spooled_del_failed", error=error, attempts=attempts + 1)
            self._count_attempt(path, data, attempts + 1)
            return False
        failpoints.hit("spool_unlink_before")
        path.unlink(missing_ok=True)
        failpoints.hit("spool_unlinked")
        self.replayed += 1  # NOTE: replays run one at a time (start, then the retry thread)
        bound.info("spooled_del_replayed")
        return True

    def _count_attempt(self, path: Path, data: dict[str, Any], attempts: int) -> None:
        try:
            atomic_write(path, json.dumps({**data, "attempts": attempts}).encode())
        except OSError as exc:  # the count restarts; the DEL itself is still pending
            log.warning("spool_attempt_not_counted", spool_file=path.name, error=str(exc))

    def _set_aside(self, path: Path) -> None:
        bad = self._dir / "bad"
        bad.mkdir(exist_ok=True, mode=0o700)
        try:
            shutil.move(str(path), bad / path.name)
        except OSError as exc:
            log.error("spool_file_not_moved", spool_file=path.name, error=str(exc))

    def start_retries(self, interval: float = 30.0) -> None:
        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    if self.pending():
                        self.replay()
                except Exception:  # the retry timer must outlive any one bad pass
                    log.exception("spool_retry_failed")

        self._thread = threading.Thread(target=loop, name="spool-retry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
