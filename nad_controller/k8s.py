"""The controller's one adaptor to the Kubernetes API (the only nad_controller module that
imports `kubernetes`, enforced by import-linter): configuration, the Lease calls the elector
makes, list+watch informers (`kubeapi.informer`) for VFPools, VFPoolNodeStates,
MulticastNodeStates, Nodes and NADs, and the VFPool and MulticastNodeState status and Event
writes. Objects cross this boundary as plain JSON dicts (`_preload_content=False`): the
controller reads the CRs through `cnispec`'s models, not the client's."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from kubernetes import client as kclient
from kubernetes import config as kconfig
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from cnispec import mcast_api
from cnispec import nad as nadmod
from cnispec import vfpool_api as v
from kubeapi.informer import REQUEST_TIMEOUT, Informer, name_key
from nad_controller.api import JSON, ApiFailure, Conflict, Gone, Handler, NotFound

log = structlog.get_logger(__name__)

POOL, STATE, NODE = "VFPool", "VFPoolNodeState", "Node"
MCAST = mcast_api.KIND
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

    def patch_multicast_status(self, name: str, changes: JSON) -> JSON:
        """Merge-patch a MulticastNodeState's `status.replicateTo` through the status
        subresource with `changes` (`nad_controller.multicast.status_patch`: the groups whose
        list changed, null for the ones and the domains gone): one join costs every other node
        a write, and on a big cluster each list is long, so only the change is sent."""
        return _call(
            lambda: self._custom.patch_cluster_custom_object_status(
                mcast_api.GROUP,
                mcast_api.VERSION,
                mcast_api.PLURAL,
                name,
                {"status": {"replicateTo": changes}},
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
        if kind == MCAST:
            return lambda **kw: self._custom.list_cluster_custom_object(
                mcast_api.GROUP, mcast_api.VERSION, mcast_api.PLURAL, **kw
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


def _as_dict(obj: Mapping[str, Any]) -> JSON:
    return dict(obj)


def _trim_node(obj: Mapping[str, Any]) -> JSON:
    """Nodes are kept as name, uid and labels: the status of a big cluster's Nodes (images,
    conditions) would be most of the controller's memory, and it reads none of it."""
    meta = obj.get("metadata") or {}
    kept = {k: meta[k] for k in ("name", "uid", "labels", "resourceVersion") if k in meta}
    return {"metadata": kept}


def _trim_nad(obj: Mapping[str, Any]) -> JSON:
    """NADs are kept as their identity and annotations (their resourceName), without the
    config."""
    meta = obj.get("metadata") or {}
    keys = ("name", "namespace", "uid", "annotations", "resourceVersion")
    return {"metadata": {k: meta[k] for k in keys if k in meta}}


def _key(obj: Mapping[str, Any]) -> str:
    """An object's cache key: its name, and `namespace/name` for a namespaced one (NADs)."""
    meta = obj.get("metadata") or {}
    name = name_key(obj)
    return f"{meta['namespace']}/{name}" if meta.get("namespace") else name


def _informer(kind: str, api: ClusterApi, on_change: Handler) -> Informer[JSON]:
    return Informer(
        kind,
        api.lister(kind),
        {NODE: _trim_node, NAD: _trim_nad}.get(kind, _as_dict),
        key=_key,
        on_change=lambda obj: on_change(kind, None if obj is None else dict(obj)),
    )


class Informers:
    """The informers the reconciler reads (`nad_controller.api.Cache`)."""

    def __init__(self, api: ClusterApi, on_change: Handler) -> None:
        kinds = (POOL, STATE, NODE, NAD, MCAST)
        self._by_kind = {k: _informer(k, api, on_change) for k in kinds}

    def start(self) -> None:
        for informer in self._by_kind.values():
            informer.start()

    def stop(self) -> None:
        for informer in self._by_kind.values():
            informer.stop()

    def wait_synced(self, timeout: float) -> bool:
        return all(i.synced.wait(timeout) for i in self._by_kind.values())

    def pools(self) -> list[JSON]:
        return self._by_kind[POOL].values()

    def states(self) -> list[JSON]:
        return self._by_kind[STATE].values()

    def nodes(self) -> list[JSON]:
        return self._by_kind[NODE].values()

    def nads(self) -> list[JSON]:
        return self._by_kind[NAD].values()

    def multicast_states(self) -> list[JSON]:
        return self._by_kind[MCAST].values()
