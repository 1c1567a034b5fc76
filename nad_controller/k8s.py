"""The controller's one adaptor to the Kubernetes API (the only nad_controller module that
imports `kubernetes`, enforced by import-linter): configuration, the Lease calls the elector
makes, list+watch informers for VFPools, VFPoolNodeStates and Nodes, and the VFPool status and
Event writes. Objects cross this boundary as plain JSON dicts (`_preload_content=False`): the
controller reads the CRs through `cnispec.vfpool_api`'s models, not the client's."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

import structlog
from kubernetes import client as kclient
from kubernetes import config as kconfig
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines
from urllib3.exceptions import HTTPError

from cnispec import nad as nadmod
from cnispec import vfpool_api as v
from nad_controller.api import JSON, ApiFailure, Conflict, Gone, Handler, NotFound

log = structlog.get_logger(__name__)

WATCH_TIMEOUT: Final = 300
REQUEST_TIMEOUT: Final = (5.0, 15.0)
POOL, STATE, NODE = "VFPool", "VFPoolNodeState", "Node"
NAD = "NetworkAttachmentDefinition"


class ConfigError(Exception):
    """No API to talk to."""


def connect(kubeconfig: str | None) -> kclient.ApiClient:
    """In-cluster config in a pod, else the kubeconfig (flag, $KUBECONFIG, ~/.kube/config)."""
    configuration = kclient.Configuration()
    if kubeconfig:
        kconfig.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        kconfig.load_incluster_config(client_configuration=configuration)
    else:
        try:
            kconfig.load_kube_config(client_configuration=configuration)
        except (kconfig.ConfigException, OSError) as exc:
            raise ConfigError(
                f"no Kubernetes API configured: pass --kubeconfig or run in a pod ({exc})"
            ) from exc
    return kclient.ApiClient(configuration)


def _translate(exc: Exception) -> ApiFailure:
    if isinstance(exc, ApiException):
        status = exc.status or 0
        try:
            message = json.loads(exc.body or "{}").get("message") or exc.reason
        except (ValueError, AttributeError):
            message = exc.reason
        kind = {404: NotFound, 409: Conflict, 410: Gone}.get(status, ApiFailure)
        return kind(f"Kubernetes API {status}: {message}")
    return ApiFailure(f"Kubernetes API unreachable: {exc}")


def _call(fn: Callable[[], Any]) -> JSON:
    """One request; its JSON body, or the ApiFailure subclass that says what went wrong."""
    try:
        resp = fn()
        data = json.loads(resp.data)
    except (ApiException, HTTPError, OSError, ValueError) as exc:
        raise _translate(exc) from None
    if not isinstance(data, dict):
        raise ApiFailure("API answered with something other than an object")
    return data


class ClusterApi:
    """`LeaseApi` and `StatusWriter` (nad_controller.api) over one ApiClient."""

    def __init__(self, api: kclient.ApiClient) -> None:
        self.api = api
        self._leases = kclient.CoordinationV1Api(api)
        self._core = kclient.CoreV1Api(api)
        self._custom = kclient.CustomObjectsApi(api)

    # Leases (the elector)

    def get_lease(self, namespace: str, name: str) -> JSON | None:
        try:
            return _call(lambda: self._leases.read_namespaced_lease(name, namespace, **_raw()))
        except NotFound:
            return None

    def create_lease(self, namespace: str, body: JSON) -> JSON:
        return _call(lambda: self._leases.create_namespaced_lease(namespace, _any(body), **_raw()))

    def replace_lease(self, namespace: str, name: str, body: JSON) -> JSON:
        return _call(
            lambda: self._leases.replace_namespaced_lease(name, namespace, _any(body), **_raw())
        )

    # VFPool status and Events (the reconciler)

    def patch_pool_status(self, name: str, status: JSON) -> JSON:
        """Merge-patch `status` through the status subresource: every key the controller owns
        is written whole (lists replace), so the result is exactly `status`."""
        return _call(
            lambda: self._custom.patch_cluster_custom_object_status(
                v.GROUP,
                v.VERSION,
                v.POOL_PLURAL,
                name,
                {"status": status},
                _content_type="application/merge-patch+json",
                **_raw(),
            )
        )

    def create_event(self, namespace: str, body: JSON) -> JSON:
        return _call(lambda: self._core.create_namespaced_event(namespace, _any(body), **_raw()))

    def patch_event(self, namespace: str, name: str, patch: JSON) -> JSON:
        return _call(
            lambda: self._core.patch_namespaced_event(
                name,
                namespace,
                patch,
                _content_type="application/merge-patch+json",
                **_raw(),
            )
        )

    # informers

    def lister(self, kind: str) -> Callable[..., Any]:
        if kind == NODE:
            return self._core.list_node
        if kind == NAD:
            return lambda **kw: self._custom.list_cluster_custom_object(
                nadmod.GROUP, nadmod.VERSION, nadmod.PLURAL, **kw
            )
        plural = v.POOL_PLURAL if kind == POOL else v.STATE_PLURAL
        return lambda **kw: self._custom.list_cluster_custom_object(
            v.GROUP, v.VERSION, plural, **kw
        )


def _any(body: JSON) -> Any:
    """A dict where the client's typed signature names its model: it sends dicts as they are
    (we keep JSON end to end, no model round trip that would drop unknown fields)."""
    return body


def _raw() -> dict[str, Any]:
    return {"_preload_content": False, "_request_timeout": REQUEST_TIMEOUT}


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


def _key(obj: Mapping[str, Any]) -> str:
    """An object's cache key: its name, and `namespace/name` for a namespaced one (NADs)."""
    namespace = (obj.get("metadata") or {}).get("namespace")
    return f"{namespace}/{_name(obj)}" if namespace else _name(obj)


class Informer:
    """A list+watch cache of one cluster-scoped resource, keyed by name. Lists, then watches
    from the list's resourceVersion (with bookmarks); a 410 lists again. `on_change(kind, obj)`
    runs on the informer's thread for every change, and with obj None after every (re)list:
    consumers are level-triggered and read the cache, so a missed event costs nothing."""

    def __init__(self, kind: str, list_fn: Callable[..., Any], on_change: Handler) -> None:
        self.kind = kind
        self._list = list_fn
        self._on_change = on_change
        self._items: dict[str, JSON] = {}
        self._rv: str | None = None
        self._lock = threading.Lock()
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._response: Any = None
        self._thread = threading.Thread(target=self._run, name=f"informer-{kind}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        resp = self._response
        if resp is not None:
            # NOTE: closing the response would block on the reader's buffer lock; shutting the
            # socket down makes the blocked read return at once.
            sock = getattr(getattr(resp, "connection", None), "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)

    def _trim(self, obj: JSON) -> JSON:
        """Nodes are kept as name, uid and labels: the status of a big cluster's Nodes (images,
        conditions) would be most of the controller's memory, and it reads none of it. NADs are
        kept as their identity and annotations (their resourceName), without the config."""
        if self.kind not in (NODE, NAD):
            return obj
        meta = obj.get("metadata") or {}
        keys: tuple[str, ...] = ("name", "uid", "labels", "resourceVersion")
        if self.kind == NAD:
            keys = ("name", "namespace", "uid", "annotations", "resourceVersion")
        return {"metadata": {k: meta[k] for k in keys if k in meta}}

    def items(self) -> list[JSON]:
        with self._lock:
            return list(self._items.values())

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                if self._rv is None:
                    self._relist()
                self._watch()
                backoff = 0.5
            except Gone:
                log.info("watch_expired_relisting", resource=self.kind)
                self._rv = None
            except Exception as exc:  # noqa: BLE001 - an informer must outlive any failure
                if self._stop.is_set():
                    return  # stop() closed the stream under us
                log.warning("watch_failed", resource=self.kind, error=str(exc)[:200])
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _relist(self) -> None:
        data = _call(lambda: self._list(**_raw()))
        items = {_key(o): self._trim(o) for o in data.get("items") or []}
        with self._lock:
            self._items = items
            self._rv = str(data["metadata"]["resourceVersion"])
        self.synced.set()
        log.info("informer_listed", resource=self.kind, count=len(items), rv=self._rv)
        self._on_change(self.kind, None)

    def _watch(self) -> None:
        try:
            resp = self._list(
                watch=True,
                resource_version=self._rv,
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_TIMEOUT,
                _preload_content=False,
                _request_timeout=(REQUEST_TIMEOUT[0], WATCH_TIMEOUT + 30),
            )
        except ApiException as exc:
            raise _translate(exc) from None
        self._response = resp
        try:
            for line in _lines(resp):
                if self._stop.is_set():
                    return
                self._apply(json.loads(line))
        finally:
            self._response = None
            with contextlib.suppress(Exception):
                resp.release_conn()

    def _apply(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone(obj.get("message", "watch expired"))
            raise ApiFailure(f"watch error: {obj.get('message', obj)}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        with self._lock:
            if kind in ("ADDED", "MODIFIED"):
                self._items[_key(obj)] = self._trim(obj)
            elif kind == "DELETED":
                self._items.pop(_key(obj), None)
            if rv:
                self._rv = str(rv)
        if kind != "BOOKMARK":
            self._on_change(self.kind, obj)


def _lines(resp: Any) -> Iterator[str]:
    for line in iter_resp_lines(resp):
        if line:
            yield line if isinstance(line, str) else line.decode()


class Informers:
    """The informers the reconciler reads (`nad_controller.api.Cache`)."""

    def __init__(self, api: ClusterApi, on_change: Handler) -> None:
        kinds = (POOL, STATE, NODE, NAD)
        self._by_kind = {k: Informer(k, api.lister(k), on_change) for k in kinds}

    def start(self) -> None:
        for informer in self._by_kind.values():
            informer.start()

    def stop(self) -> None:
        for informer in self._by_kind.values():
            informer.stop()

    def wait_synced(self, timeout: float) -> bool:
        return all(i.synced.wait(timeout) for i in self._by_kind.values())

    def pools(self) -> list[JSON]:
        return self._by_kind[POOL].items()

    def states(self) -> list[JSON]:
        return self._by_kind[STATE].items()

    def nodes(self) -> list[JSON]:
        return self._by_kind[NODE].items()

    def nads(self) -> list[JSON]:
        return self._by_kind[NAD].items()
