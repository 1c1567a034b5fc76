"""The daemon's one adaptor to the Kubernetes API (the only metaplugin module that imports
`kubernetes`).

It keeps two watch-fed caches — every NetworkAttachmentDefinition, and the pods of this node
(`spec.nodeName=<node>`, trimmed to identity and annotations) — and publishes network-status and
pod Events from a background worker so the CNI path never waits on the API. ApiException statuses
are translated here, once: 404 → "not there", 409 → retry, anything else → TryAgainLater.

The caches are `kubeapi.informer.Informer`s (list, watch with bookmarks, relist on 410).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import structlog
from kubernetes import client as kclient
from kubernetes import config as kconfig
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from cnispec import nad as nadmod
from cnispec.annotations import NETWORK_STATUS_ANNOTATION
from cnispec.errors import InvalidConfig, PlexusError, TryAgainLater
from cnispec.eventlimit import Bump, Create, EventLimiter
from cnispec.identity import PodInfo
from cnispec.nad import NetworkAttachmentDefinition
from delegates.fabric import Peer
from kubeapi.informer import REQUEST_TIMEOUT, Informer, namespaced_key
from metaplugin.config import DaemonConfig
from metaplugin.nad_source import StoredNad

log = structlog.get_logger(__name__)

CACHE_WAIT: Final = 2.0
STATUS_RETRIES: Final = 5
EVENT_COMPONENT: Final = "plexus"
EVENT_MESSAGE_MAX: Final = 1024


def _api_error(exc: Exception) -> TryAgainLater:
    if isinstance(exc, ApiException):
        return TryAgainLater(f"Kubernetes API error {exc.status} {exc.reason}")
    return TryAgainLater(f"Kubernetes API unreachable: {exc}")


def _json(resp: Any) -> dict[str, Any]:
    """The body of a `_preload_content=False` call (raw JSON: no model round trip)."""
    data = json.loads(resp.data)
    if not isinstance(data, dict):
        raise ValueError("API answered with something other than an object")
    return data


def _get_or_none(call: Callable[[], Any]) -> dict[str, Any] | None:
    """One live GET on the CNI path: the object, None when it does not exist (404), and
    TryAgainLater (code 11) when the API cannot answer."""
    try:
        return _json(call())
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise _api_error(exc) from None
    except (HTTPError, OSError) as exc:
        raise _api_error(exc) from None


def _pod_info(obj: Mapping[str, Any]) -> PodInfo:
    meta = obj.get("metadata") or {}
    return PodInfo(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        annotations={str(k): str(v) for k, v in (meta.get("annotations") or {}).items()},
    )


def _peer(obj: Mapping[str, Any]) -> Peer:
    spec = obj.get("spec") or {}
    cidrs = spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    addresses = (obj.get("status") or {}).get("addresses") or []
    internal = [
        str(a["address"]) for a in addresses if a.get("type") == "InternalIP" and a.get("address")
    ]
    return Peer(
        name=str((obj.get("metadata") or {}).get("name", "")),
        addresses=tuple(internal),
        pod_cidrs=tuple(str(c) for c in cidrs),
    )


def _nad(obj: Mapping[str, Any]) -> StoredNad | None:
    """A NAD as cached, compact; None for one that is not valid (kept out of the cache, where
    it would fail every list: a lookup of it asks the API, and answers why it is invalid)."""
    try:
        return StoredNad.of(NetworkAttachmentDefinition.from_object(obj))
    except InvalidConfig as exc:
        log.warning("nad_invalid", nad=namespaced_key(obj), error=exc.msg)
        return None


class ApiNadSource:
    """Lookups are answered from the watch-fed cache, a dict hit; the API is asked only for a
    NAD the cache does not hold (created a moment ago)."""

    def __init__(self, informer: Informer[StoredNad], custom: kclient.CustomObjectsApi) -> None:
        self._informer = informer
        self._custom = custom

    def get(self, namespace: str, name: str) -> NetworkAttachmentDefinition | None:
        found = self._informer.get(f"{namespace}/{name}")
        if found is not None:
            return found.model()
        # A NAD created a moment ago may not have reached the watch yet: ask once.
        obj = _get_or_none(
            lambda: self._custom.get_namespaced_custom_object(
                nadmod.GROUP,
                nadmod.VERSION,
                namespace,
                nadmod.PLURAL,
                name,
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            )
        )
        return NetworkAttachmentDefinition.from_object(obj) if obj is not None else None

    def all(self) -> Iterator[NetworkAttachmentDefinition]:
        return (nad.model() for nad in self._informer.values())

    def synced(self) -> bool:
        return self._informer.synced.is_set()


class ApiPodSource:
    def __init__(self, informer: Informer[PodInfo], core: kclient.CoreV1Api) -> None:
        self._informer = informer
        self._core = core

    def get(self, namespace: str, name: str, uid: str) -> PodInfo | None:
        def matches(pod: PodInfo) -> bool:
            return not uid or pod.uid == uid

        found = self._informer.wait_for(f"{namespace}/{name}", matches, CACHE_WAIT)
        if found is not None:
            return found
        obj = _get_or_none(
            lambda: self._core.read_namespaced_pod(
                name, namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            )
        )
        pod = _pod_info(obj) if obj is not None else None
        return pod if pod is not None and matches(pod) else None


@dataclass(frozen=True, slots=True)
class _StatusJob:
    pod: PodInfo
    status: list[dict[str, Any]] | None = None
    event: tuple[str, str, str] | None = None  # (type, reason, message)


class ApiStatusSink:
    """Publishes network-status and Events from a worker thread, never on the CNI path."""

    def __init__(
        self,
        core: kclient.CoreV1Api,
        node: str,
        *,
        capacity: int = 1024,
        limiter: EventLimiter | None = None,
    ) -> None:
        self._core = core
        self._node = node
        # Used only by the worker thread: no lock.
        self.limiter = limiter or EventLimiter()
        self._jobs: queue.Queue[_StatusJob | None] = queue.Queue(maxsize=capacity)
        self._thread = threading.Thread(target=self._run, name="status-publisher", daemon=True)
        self._thread.start()

    def attached(self, pod: PodInfo, status: list[dict[str, Any]], messages: list[str]) -> None:
        self._put(_StatusJob(pod, status=status))
        for message in messages:
            self._put(_StatusJob(pod, event=("Normal", "AddedInterface", message)))

    def network_not_found(self, pod: PodInfo, message: str) -> None:
        self._put(_StatusJob(pod, event=("Warning", "NoNetworkFound", message)))

    def teardown_abandoned(self, pod: PodInfo, message: str) -> None:
        self._put(_StatusJob(pod, event=("Warning", "TeardownAbandoned", message)))

    def add_failed(self, pod: PodInfo, error: PlexusError) -> None:
        self._put(_StatusJob(pod, event=("Warning", "AddFailed", add_failed_message(error))))

    def _put(self, job: _StatusJob) -> None:
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            log.error("status_queue_full_dropped", pod=job.pod.ref)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued job was tried (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._jobs.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._jobs.unfinished_tasks

    def stop(self) -> None:
        # A daemon thread: it dies with the process; shutdown must not wait on the API.
        with contextlib.suppress(queue.Full):
            self._jobs.put_nowait(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if job.status is not None:
                    self._patch_status(job.pod, job.status)
                if job.event is not None:
                    self._event(job.pod, *job.event)
            except Exception:
                log.exception("status_publish_crashed")
            finally:
                self._jobs.task_done()

    def _patch_status(self, pod: PodInfo, status: list[dict[str, Any]]) -> None:
        value = json.dumps(status)
        for attempt in range(STATUS_RETRIES):
            try:
                current = _json(
                    self._core.read_namespaced_pod(
                        pod.name,
                        pod.namespace,
                        _preload_content=False,
                        _request_timeout=REQUEST_TIMEOUT,
                    )
                )
                meta = current["metadata"]
                if pod.uid and meta.get("uid") != pod.uid:
                    log.info("network_status_pod_replaced", pod=pod.ref)
                    return
                body = {
                    "metadata": {
                        "uid": meta.get("uid"),
                        "resourceVersion": meta["resourceVersion"],
                        "annotations": {NETWORK_STATUS_ANNOTATION: value},
                    }
                }
                self._core.patch_namespaced_pod_status(
                    pod.name,
                    pod.namespace,
                    body,
                    _content_type="application/merge-patch+json",
                    _request_timeout=REQUEST_TIMEOUT,
                )
                log.info("network_status_published", pod=pod.ref)
                return
            except ApiException as exc:
                if exc.status == 404:
                    log.info("network_status_pod_gone", pod=pod.ref)
                    return
                if exc.status != 409:
                    log.warning("network_status_patch_failed", pod=pod.ref, status=exc.status)
                    time.sleep(min(0.2 * 2**attempt, 2.0))
            except (HTTPError, OSError) as exc:
                log.warning("network_status_patch_failed", pod=pod.ref, error=str(exc)[:200])
                time.sleep(min(0.2 * 2**attempt, 2.0))
        log.error("network_status_not_published", pod=pod.ref, attempts=STATUS_RETRIES)

    def _event(self, pod: PodInfo, kind: str, reason: str, message: str) -> None:
        """One Event, through the limiter: a repeat within its window bumps the Event already
        written (count, lastTimestamp), and a pod past its budget gets nothing."""
        message = _event_message(message)
        obj = pod.uid or pod.ref
        decision = self.limiter.decide(obj, kind, reason, message)
        now = datetime.now(UTC)
        try:
            if isinstance(decision, Bump):
                try:
                    self._core.patch_namespaced_event(
                        decision.name,
                        pod.namespace,
                        {"count": decision.count, "lastTimestamp": now.isoformat()},
                        _content_type="application/merge-patch+json",
                        _request_timeout=REQUEST_TIMEOUT,
                    )
                    return
                except ApiException as exc:
                    if exc.status != 404:
                        raise
                    # The Event expired (its TTL) while the pod kept failing: a new one.
                    self.limiter.forget(obj, kind, reason, message)
            elif not isinstance(decision, Create):
                if decision.report:
                    log.warning(
                        "pod_events_rate_limited",
                        pod=pod.ref,
                        reason=reason,
                        window=self.limiter.window,
                        dropped_total=self.limiter.dropped,
                    )
                return
            self._create_event(pod, kind, reason, message, now)
        except (ApiException, HTTPError, OSError) as exc:
            log.warning("pod_event_failed", pod=pod.ref, reason=reason, error=str(exc)[:200])

    def _create_event(
        self, pod: PodInfo, kind: str, reason: str, message: str, now: datetime
    ) -> None:
        obj = pod.uid or pod.ref
        body = kclient.CoreV1Event(
            metadata=kclient.V1ObjectMeta(generate_name=f"{pod.name}.", namespace=pod.namespace),
            involved_object=kclient.V1ObjectReference(
                api_version="v1",
                kind="Pod",
                namespace=pod.namespace,
                name=pod.name,
                uid=pod.uid or None,
            ),
            type=kind,
            reason=reason,
            message=message,
            source=kclient.V1EventSource(component=EVENT_COMPONENT, host=self._node),
            reporting_component=EVENT_COMPONENT,
            reporting_instance=self._node,
            first_timestamp=now,
            last_timestamp=now,
            count=self.limiter.count(obj, kind, reason, message),
        )
        made = _json(
            self._core.create_namespaced_event(
                pod.namespace, body, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            )
        )
        name = str((made.get("metadata") or {}).get("name", ""))
        if name:
            self.limiter.created(obj, kind, reason, message, name)


def add_failed_message(error: PlexusError) -> str:
    """The AddFailed Event's note: the CNI code and its name first (what `kubectl get events`
    shows of it), then the message, which names the network and interface that failed."""
    return f"CNI error {error.code} {type(error).__name__}: {error.msg}"


def _event_message(message: str) -> str:
    # Kubernetes documents 1 kB as the most an Event's note should hold (events.k8s.io
    # refuses more); the daemon's log line has the whole message.
    return (
        message if len(message) <= EVENT_MESSAGE_MAX else message[: EVENT_MESSAGE_MAX - 3] + "..."
    )


class Cluster:
    """The API-backed sources the daemon uses in cluster mode."""

    def __init__(self, api: kclient.ApiClient, node: str) -> None:
        self.api = api  # shared with metaplugin.k8s_pools (VFPools, the node's state object)
        core = kclient.CoreV1Api(api)
        custom = kclient.CustomObjectsApi(api)
        self._nad_informer: Informer[StoredNad] = Informer(
            "network-attachment-definitions",
            lambda **kw: custom.list_cluster_custom_object(
                nadmod.GROUP, nadmod.VERSION, nadmod.PLURAL, **kw
            ),
            _nad,
        )
        self._pod_informer: Informer[PodInfo] = Informer(
            "pods",
            lambda **kw: core.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={node}", **kw
            ),
            _pod_info,
        )
        # Nodes feed the routed fabric (peers and this node's podCIDRs); trimmed on arrival.
        self._node_informer: Informer[Peer] = Informer("nodes", core.list_node, _peer)
        self._node = node
        self.nads = ApiNadSource(self._nad_informer, custom)
        self.pods = ApiPodSource(self._pod_informer, core)
        self.sink = ApiStatusSink(core, node)
        self.synced = threading.Event()

    def peers(self) -> list[Peer] | None:
        """The fabric's nodes; None until the first list of nodes arrived (an empty list would
        tell the fabric that every peer is gone)."""
        if not self._node_informer.synced.is_set():
            return None
        return [p for p in self._node_informer.values() if p.addresses and p.pod_cidrs]

    def own_pod_cidrs(self, timeout: float = 0.0) -> list[str] | None:
        """This node's spec.podCIDRs, waiting up to `timeout` for the first list of nodes; None
        while they are unknown (not listed yet, or not assigned yet)."""
        if not self._node_informer.synced.wait(timeout):
            return None
        me = self._node_informer.get(f"/{self._node}")
        return list(me.pod_cidrs) if me and me.pod_cidrs else None

    @classmethod
    def connect(cls, cfg: DaemonConfig) -> Cluster:
        configuration = kclient.Configuration()
        if cfg.kubeconfig:
            kconfig.load_kube_config(config_file=cfg.kubeconfig, client_configuration=configuration)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            kconfig.load_incluster_config(client_configuration=configuration)
        else:
            raise InvalidConfig(
                "no Kubernetes API configured: set kubeconfig, run in a pod, or use local "
                "mode (--local DIR) on a machine without a cluster",
            )
        cluster = cls(kclient.ApiClient(configuration), cfg.node_name)
        cluster.start()
        return cluster

    def start(self) -> None:
        self._nad_informer.start()
        self._pod_informer.start()
        self._node_informer.start()

        def mark_synced() -> None:
            self._nad_informer.synced.wait()
            self._pod_informer.synced.wait()
            self.synced.set()

        threading.Thread(target=mark_synced, name="informer-sync", daemon=True).start()

    def stop(self) -> None:
        self._nad_informer.stop()
        self._pod_informer.stop()
        self._node_informer.stop()
        self.sink.stop()
