"""What the daemon's unix socket serves to the shim, probes and plexusctl (the transport, HTTP/1.0
over the socket with its bounds, is `metaplugin.transport`).

Endpoints: `POST /cni` (one CNI request: `{"env": {CNI_*}, "config": "<stdin>"}`; the reply body
is exactly what the shim prints, status 200 for success and 400 for a CNI error), `GET /healthz`,
`GET /readyz`, `GET /metrics`, and read-only views for plexusctl (`/v1/attachments`,
`/v1/network-status?namespace=&name=`, `/v1/policy?namespace=&name=`). The socket lives in a
0700 directory with mode 0600.
A connection that opens and closes without a request (a probe) is harmless.
"""

from __future__ import annotations

import contextvars
import json
import os
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any, Protocol
from urllib.parse import SplitResult, parse_qs, urlsplit

import structlog
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from cnispec import cni, jsontext
from cnispec.cni import CniRequest
from cnispec.errors import DecodeFailure, NotReady, PlexusError, TryAgainLater
from kernel import rtnl
from kernel.netns import current_netns_inode
from metaplugin import multicast_view
from metaplugin.metrics import DaemonMetrics, LiveSources
from metaplugin.orchestrator import Orchestrator
from metaplugin.scheduler import Scheduler, request_deadline
from metaplugin.store import AttachmentStore
from metaplugin.watchdog import Job, Watchdog

log = structlog.get_logger(__name__)
JSON = "application/json"
CONTAINER_VERBS = frozenset({cni.ADD, cni.DEL, cni.CHECK})
DEFAULT_REQUEST_TIMEOUT = 115.0  # = request_timeout_for(the default shimTimeout, 120 s)


class SriovView(Protocol):
    """What `plexusctl pools` / `plexusctl vfs` read (sriov.node.SriovNode)."""

    def pools(self) -> list[dict[str, Any]]: ...

    def vfs(self) -> list[dict[str, Any]]: ...


class PolicyView(Protocol):
    """What `plexusctl policy POD` reads (metaplugin.policy_engine.PolicyEngine)."""

    def pod_view(self, namespace: str, name: str) -> dict[str, Any] | None: ...


class Api:
    """Request handling, independent of the transport (tests call `cni()` directly)."""

    def __init__(
        self,
        *,
        handle: Callable[[cni.CniRequest], dict[str, Any] | None],
        orchestrator: Orchestrator,
        scheduler: Scheduler,
        store: AttachmentStore,
        ready: Callable[[], bool],
        sriov: SriovView | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        metrics: DaemonMetrics | None = None,
        policy: PolicyView | None = None,
        fabric_multicast: multicast_view.FabricReplication | None = None,
        overlay_listed: bool = False,
    ) -> None:
        self.handle = handle
        self.overlay_listed = overlay_listed
        self.fabric_multicast = fabric_multicast
        self.policy = policy
        self.orchestrator = orchestrator
        self.scheduler = scheduler
        self.store = store
        self.ready = ready
        self.sriov = sriov
        self.request_timeout = request_timeout
        if metrics is None:
            metrics = DaemonMetrics()
            metrics.watch(LiveSources(admitted=lambda: scheduler.admitted))
        self.metrics = metrics
        self.watchdog = Watchdog()
        self._netns_inode = current_netns_inode()

    def cni(self, body: bytes, admitted: ExitStack | None = None) -> tuple[int, bytes]:
        """One CNI request: the answer by its deadline, code 11 if the work takes longer.

        `admitted` is the admission the transport took before reading the body; whoever runs
        the work releases it when the work really ends (the thread, or this call on a refusal).
        This waits on the calling thread; the transport uses `start` and `finish` instead and
        waits on its event loop.
        """
        started = self.start(body, admitted)
        if isinstance(started, tuple):
            return started
        started.done.wait(max(started.deadline - time.monotonic(), 0.0))
        return self.finish(started)

    def start(self, body: bytes, admitted: ExitStack | None = None) -> tuple[int, bytes] | Job:
        """Decode the request and start its work on a thread of its own: the running `Job`,
        or the answer at once when the request is refused."""
        started = time.monotonic()
        admission = admitted if admitted is not None else self._admit()
        if admission is None:
            return 400, self._saturated()
        version, command = cni.LATEST_VERSION, "?"
        try:
            env, stdin = _decode_envelope(body)
            version, command = _peek_version(stdin), env.get(cni.ENV_COMMAND, "?")[:16]
            req = cni.parse_request(env, stdin)
        except Exception as exc:  # noqa: BLE001 - every refusal is a CNI error JSON
            admission.close()
            return self._refused(command, version, exc, started)
        job = Job(
            req.command, req.container_id, self._timeout(req), started=started, version=version
        )
        context = contextvars.copy_context()
        worker = threading.Thread(
            target=context.run,
            args=(self._run, req, job, version, admission),
            name=f"cni-{req.command.lower()}",
            daemon=True,
        )
        worker.start()
        return job

    def finish(self, job: Job) -> tuple[int, bytes]:
        """The answer of a started request once it is done or its deadline has passed."""
        if job.done.is_set() and job.answer is not None:
            return job.answer
        job.overdue = True
        if job.done.is_set() and job.answer is not None:  # it finished just now after all
            return job.answer
        self.metrics.observe_request(job.command, "deadline", time.monotonic() - job.started)
        log.error(
            "request_deadline_exceeded",
            command=job.command,
            container_id=job.container_id or None,
            deadline_s=job.timeout,
        )
        err = TryAgainLater(
            f"plexusd did not finish {job.command} within {job.timeout:.0f} s; the work goes "
            "on in the background and the runtime should retry",
        )
        return 400, self._error_json(job.command, err, job.version)

    def _admit(self) -> ExitStack | None:
        stack = ExitStack()
        try:
            stack.enter_context(self.scheduler.admission())
        except TryAgainLater:
            return None
        return stack

    def _saturated(self) -> bytes:
        self.metrics.observe_request("?", "saturated", 0.0)
        return self._error_json(
            "?",
            TryAgainLater(
                f"plexusd is saturated ({self.scheduler.admitted} requests in progress or "
                "queued); the runtime should retry"
            ),
            cni.LATEST_VERSION,
        )

    def _error_json(
        self, command: str, exc: BaseException, version: str, *, count: bool = True
    ) -> bytes:
        """The CNI error JSON of a failed request, counted by its code."""
        error = cni.to_cni_error(exc, version)
        if count:
            self.metrics.observe_error(command, error.get("code"))
        return json.dumps(error).encode()

    def _timeout(self, req: CniRequest) -> float:
        # The shim gives up after its shimTimeout (read from the same config): answer before.
        timeout = self.request_timeout
        shim = req.config.get("shimTimeout")
        if isinstance(shim, int | float) and not isinstance(shim, bool) and 0 < shim < 86400:
            timeout = min(timeout, request_timeout_for(float(shim)))
        return timeout

    def _refused(
        self, command: str, version: str, exc: BaseException, started: float
    ) -> tuple[int, bytes]:
        if isinstance(exc, PlexusError):
            log.warning("cni_request_refused", command=command, code=exc.code, error=exc.msg)
        else:
            log.exception("cni_request_crashed", command=command)
        self.metrics.observe_request(command, "error", time.monotonic() - started)
        return 400, self._error_json(command, exc, version)

    def _run(self, req: CniRequest, job: Job, version: str, admission: ExitStack) -> None:
        # Waits give up a little before the answer is due, so the answer can say what held it.
        request_deadline.set(job.deadline - min(1.0, job.timeout * 0.1))
        structlog.contextvars.bind_contextvars(
            command=req.command,
            container_id=req.container_id or None,
            namespace=req.pod_namespace or None,
            pod=req.pod_name or None,
            ifname=req.ifname or None,
        )
        outcome = "error"
        try:
            with admission, self.watchdog.track(job):
                try:
                    job.answer = self._answer(req)
                    outcome = "ok"
                except PlexusError as exc:
                    log.warning("cni_request_failed", code=exc.code, error=exc.msg)
                    # overdue: the runtime got (and the metrics counted) code 11 instead
                    job.answer = (
                        400,
                        self._error_json(req.command, exc, version, count=not job.overdue),
                    )
                except Exception as exc:
                    log.exception("cni_request_crashed")
                    job.answer = (
                        400,
                        self._error_json(req.command, exc, version, count=not job.overdue),
                    )
        finally:
            try:
                elapsed = time.monotonic() - job.started
                if not job.overdue:
                    self.metrics.observe_request(req.command, outcome, elapsed)
                log.info("cni_request_done", outcome=outcome, ms=round(elapsed * 1000, 2))
                self._assert_netns()
            finally:
                job.complete()  # last: the request is logged and counted before it is answered

    def _answer(self, req: CniRequest) -> tuple[int, bytes]:
        if req.command == cni.STATUS and (why := self.watchdog.stuck()):
            raise NotReady(f"plexusd is not completing requests: {why}")
        # NOTE: only the verbs that work on one container take its lock. GC and STATUS may carry
        # CNI_CONTAINERID too (the spec does not forbid it); GC taking that lock and then the
        # exclusive gate waited on itself and wedged every later request.
        locked = req.container_id if req.command in CONTAINER_VERBS else ""
        with self.scheduler.worker(locked), rtnl.session():
            reply = self.handle(req)
        return 200, json.dumps(reply).encode() if reply is not None else b""

    def health(self, *, ready: bool) -> tuple[int, str]:
        """/healthz (alive: requests still complete) or /readyz (alive, synced and serving)."""
        stuck = self.watchdog.stuck()
        if stuck:
            return 503, f"not completing requests: {stuck}\n"
        if ready and not self.ready():
            return 503, "not ready\n"
        return 200, "ready\n" if ready else "ok\n"

    def _assert_netns(self) -> None:
        # NOTE: a request thread that changed namespace would poison the daemon; stop loudly.
        if current_netns_inode() != self._netns_inode:
            log.critical("daemon_netns_changed")
            os._exit(70)

    def view(self, target: str) -> tuple[int, bytes, str]:
        """A GET endpoint: (status, body, content type)."""
        url = urlsplit(target)
        if url.path in ("/healthz", "/readyz"):
            code, text = self.health(ready=url.path == "/readyz")
            return code, text.encode(), "text/plain"
        if url.path == "/metrics":
            return 200, self.metrics.render(), CONTENT_TYPE_LATEST
        if url.path == "/v1/policy":
            return self._policy_view(url.query)
        return self._rows_view(url)

    def _rows_view(self, url: SplitResult) -> tuple[int, bytes, str]:
        """The JSON views of the daemon's state (plexusctl)."""
        rows: Any
        if url.path == "/v1/attachments":
            rows = self.attachments()
        elif url.path == "/v1/quarantine":
            rows = self.store.quarantined()
        elif url.path in ("/v1/pools", "/v1/vfs"):
            if self.sriov is None:
                return 404, b'{"error":"SR-IOV is off: the daemon config sets no vfPools"}', JSON
            rows = self.sriov.pools() if url.path == "/v1/pools" else self.sriov.vfs()
        elif url.path == "/v1/multicast":
            rows = multicast_view.view(
                (r for c in self.store.all() for r in c.records),
                fabric=self.fabric_multicast,
                overlay_listed=self.overlay_listed,
            )
        elif url.path == "/v1/network-status":
            query = parse_qs(url.query)
            rows = self.orchestrator.pod_network_status(
                query.get("namespace", ["default"])[0], query.get("name", [""])[0]
            )
            if rows is None:
                return 404, b'{"error":"no attachments recorded for that pod"}', JSON
        else:
            return 404, b'{"error":"not found"}', JSON
        return 200, json.dumps(rows).encode(), JSON

    def _policy_view(self, query_text: str) -> tuple[int, bytes, str]:
        if self.policy is None:
            return 404, b'{"error":"policy enforcement is off (policyEnforcement)"}', JSON
        query = parse_qs(query_text)
        view = self.policy.pod_view(
            query.get("namespace", ["default"])[0], query.get("name", [""])[0]
        )
        if view is None:
            return 404, b'{"error":"no policy state for that pod on this node"}', JSON
        return 200, json.dumps(view).encode(), JSON

    def attachments(self) -> list[dict[str, Any]]:
        out = []
        for loaded in self.store.all():
            out.append(
                {
                    "containerID": loaded.container_id,
                    "attachments": [r.view() for r in loaded.records],
                    "quarantined": list(loaded.quarantined),
                }
            )
        return out


def request_timeout_for(shim_timeout: float) -> float:
    """The daemon's deadline for a request: the shim's, less a margin to deliver the answer."""
    return max(shim_timeout - min(5.0, shim_timeout * 0.1), shim_timeout * 0.5)


def _decode_envelope(body: bytes) -> tuple[dict[str, str], str]:
    try:
        envelope = jsontext.loads(body, surrogates=True)  # env: parse_request judges them
        env = {str(k): str(v) for k, v in envelope["env"].items()}
        config = envelope.get("config", "")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DecodeFailure("malformed request from the shim (expected {env, config})") from None
    if not isinstance(config, str):
        raise DecodeFailure("malformed request from the shim: config must be a string")
    return env, config


def _peek_version(stdin: str) -> str:
    try:
        version = jsontext.loads(stdin).get("cniVersion")
    except (ValueError, AttributeError):
        return cni.LATEST_VERSION
    return (
        version
        if isinstance(version, str) and version in cni.KNOWN_VERSIONS
        else (cni.LATEST_VERSION)
    )
