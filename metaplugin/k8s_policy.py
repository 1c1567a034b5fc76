"""Cluster mode's policy source: watch-fed caches (`kubeapi.informer`) of networking.k8s.io/v1
NetworkPolicies, k8s.cni.cncf.io/v1beta1 MultiNetworkPolicies, Namespaces and every Pod of the
cluster (peers live on every node).

Memory: each cache keeps the compiler's small models (`netpolicy.model`), never the API's
objects (a pod's raw object is ~10 KB; its `Pod` model a few hundred bytes). An object that does
not convert is kept out of its cache, logged, and listed by `errors()` until it is fixed or
deleted; a pod whose network-status annotation is unreadable still counts with its labels and
podIPs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

import structlog
from kubernetes import client as kclient

from cnispec.annotations import NETWORK_STATUS_ANNOTATION
from cnispec.errors import InvalidConfig
from kubeapi.informer import JSON, Informer, name_key, namespaced_key
from metaplugin.policy_source import Callbacks, PolicyInputs
from netpolicy.manifests import (
    MULTI_NETWORK_POLICY,
    NAMESPACE,
    NETWORK_POLICY,
    POD,
    describe,
    namespace_from_object,
    pod_from_object,
    policy_from_object,
)
from netpolicy.model import Namespace, Pod, Policy

log = structlog.get_logger(__name__)

# The only version multi-networkpolicy serves (deploy/crds/multi-networkpolicies.yaml).
MNP_GROUP: Final = "k8s.cni.cncf.io"
MNP_VERSION: Final = "v1beta1"
MNP_PLURAL: Final = "multi-networkpolicies"

V = TypeVar("V")


class ClusterPolicySource:
    def __init__(self, api: kclient.ApiClient) -> None:
        networking = kclient.NetworkingV1Api(api)
        custom = kclient.CustomObjectsApi(api)
        core = kclient.CoreV1Api(api)
        self._callbacks = Callbacks()
        self._lock = threading.Lock()
        self._snapshot: PolicyInputs | None = None
        self._errors: dict[str, str] = {}  # "resource key" -> why it is not cached

        self._netpols: Informer[Policy] = self._informer(
            "networkpolicies",
            networking.list_network_policy_for_all_namespaces,
            _typed(NETWORK_POLICY, policy_from_object),
        )
        self._mnps: Informer[Policy] = self._informer(
            "multi-networkpolicies",
            lambda **kw: custom.list_cluster_custom_object(
                MNP_GROUP, MNP_VERSION, MNP_PLURAL, **kw
            ),
            _typed(MULTI_NETWORK_POLICY, policy_from_object),
        )
        self._namespaces: Informer[Namespace] = self._informer(
            "namespaces",
            core.list_namespace,
            _typed(NAMESPACE, namespace_from_object),
            key=name_key,
        )
        self._pods: Informer[Pod] = self._informer(
            "pods", core.list_pod_for_all_namespaces, _typed(POD, _pod)
        )
        self._informers: tuple[Informer[Any], ...] = (
            self._netpols,
            self._mnps,
            self._namespaces,
            self._pods,
        )

    @classmethod
    def start(cls, api: kclient.ApiClient) -> ClusterPolicySource:
        source = cls(api)
        for informer in source._informers:
            informer.start()
        return source

    def _informer(
        self,
        name: str,
        list_fn: Callable[..., Any],
        convert: Callable[[JSON], V],
        *,
        key: Callable[[JSON], str] = namespaced_key,
    ) -> Informer[V]:
        # What the last conversion found, for the on_change that follows it on the informer's
        # thread: the object it refused, or the one whose model did not move.
        last = {"refused": "", "same": ""}

        def checked(obj: JSON) -> V | None:
            where = f"{name} {key(obj)}"
            try:
                item = convert(obj)
            except InvalidConfig as exc:
                last["refused"] = where
                with self._lock:
                    known = self._errors.get(where)
                    self._errors[where] = exc.msg
                if known != exc.msg:
                    log.warning("policy_object_invalid", resource=name, error=exc.msg)
                return None
            # Most pod updates (conditions, container statuses, heartbeats of other nodes'
            # pods) leave labels, addresses and ports as they were: nothing to recompute.
            last["same"] = where if informer.get(key(obj)) == item else ""
            with self._lock:
                self._errors.pop(where, None)
            return item

        def changed(obj: JSON | None) -> None:
            where = f"{name} {key(obj)}" if obj is not None else ""
            refused, same = last["refused"], last["same"]
            last["refused"] = last["same"] = ""
            if obj is not None and same == where and informer.get(key(obj)) is not None:
                return
            with self._lock:
                if obj is not None and refused != where and informer.get(key(obj)) is None:
                    self._errors.pop(where, None)  # deleted: its error goes with it
                self._snapshot = None
            if self.synced():
                self._callbacks.fire()

        informer: Informer[V] = Informer(name, list_fn, checked, key=key, on_change=changed)
        return informer

    # --- PolicySource ---------------------------------------------------------------------------

    def snapshot(self) -> PolicyInputs:
        with self._lock:
            if self._snapshot is not None:
                return self._snapshot
        built = PolicyInputs(
            policies=tuple(self._netpols.values()) + tuple(self._mnps.values()),
            namespaces={ns.name: ns for ns in self._namespaces.values()},
            pods=tuple(self._pods.values()),
        )
        with self._lock:
            self._snapshot = built
        return built

    def on_change(self, callback: Callable[[], None]) -> None:
        self._callbacks.add(callback)

    def pod_labels(self, namespace: str, name: str, container_id: str) -> dict[str, str] | None:
        pod = self._pods.get(f"{namespace}/{name}")
        return dict(pod.labels) if pod is not None else None

    def synced(self) -> bool:
        return all(i.synced.is_set() for i in self._informers)

    def errors(self) -> list[str]:
        """The API objects that did not convert (a MultiNetworkPolicy without policy-for, ...)."""
        with self._lock:
            return sorted(self._errors.values())

    def close(self) -> None:
        for informer in self._informers:
            informer.stop()


def _typed(what: tuple[str, str], convert: Callable[[JSON], V]) -> Callable[[JSON], V]:
    """The API lists built-in objects without apiVersion and kind (watch events have them):
    the converters check both, so the informer's kind is filled in where it is missing."""
    api_version, kind = what

    def typed(obj: JSON) -> V:
        if obj.get("kind") and obj.get("apiVersion"):
            return convert(obj)
        return convert({**obj, "apiVersion": api_version, "kind": kind})

    return typed


def _pod(obj: JSON) -> Pod:
    """A pod; one whose network-status cannot be read still counts with its labels, named ports
    and podIPs (its secondaries are unknown until the annotation is fixed)."""
    try:
        return pod_from_object(obj)
    except InvalidConfig as exc:
        meta = obj.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        if not isinstance(annotations, Mapping) or NETWORK_STATUS_ANNOTATION not in annotations:
            raise
        log.warning("pod_network_status_unreadable", pod=describe(obj), error=exc.msg)
        rest = {k: v for k, v in annotations.items() if k != NETWORK_STATUS_ANNOTATION}
        return pod_from_object({**obj, "metadata": {**meta, "annotations": rest}})
