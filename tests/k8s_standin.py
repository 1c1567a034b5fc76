"""In-process stand-in for the Kubernetes API server, for Plexus tests.

No kube-apiserver can run on the test machines, so code that talks to the API (metaplugin,
nad_controller, ...) is tested with the real ``kubernetes`` Python client pointed at this
server. It speaks HTTP/1.1 + JSON on 127.0.0.1 (ephemeral port) and serves Pods (with the
``status`` subresource), Events, Nodes, NetworkAttachmentDefinitions
(``k8s.cni.cncf.io/v1``), NetworkPolicies (``networking.k8s.io/v1``), MultiNetworkPolicies
(``k8s.cni.cncf.io/v1beta1``, a second version of the NADs' group), Leases
(``coordination.k8s.io/v1``), CustomResourceDefinitions (``apiextensions.k8s.io/v1``) and Plexus's VFPools,
VFPoolNodeStates and MulticastNodeStates (``plexus.dev/v1alpha1``, cluster-scoped, ``status`` subresource), following the real server's semantics where tests can observe them:
one global resourceVersion, list/watch with field and label selectors, chunked watch streams
that replay retained history and answer a compacted resourceVersion with an ``ERROR`` event
(410 Expired), merge / strategic-merge / JSON patches with resourceVersion and UID
preconditions, 409 on conflicts, finalizers, and ``Status`` bodies for every error. Custom
resources and Leases refuse an update without resourceVersion (422), like their strategies; a
custom resource's create drops ``status`` and its ``/status`` writes change only ``status``;
``metadata.generation`` moves on spec changes only; deleting an owner deletes the dependents
whose ``ownerReferences`` all point at deleted objects (background propagation).

Typical use::

    with ApiStandin() as api:
        client = kubernetes.client.ApiClient(kubernetes.client.Configuration(host=api.url))
        api.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                    "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]}})

Test helpers (``create``/``update``/``delete``) write straight to storage, like seeding etcd:
unlike a POST they keep the given ``status``. Errors can be injected with ``fail_next`` and
watches cut with ``close_watches``. Stdlib only, so any test can import it.

Validating admission webhooks are called (``Admission``: ValidatingWebhookConfigurations'
rules, namespace/object selectors, failurePolicy, timeoutSeconds, caBundle, denial and warning
formats). Known differences from kube-apiserver: no authn/authz, mutating admission, built-in
admission plugins, defaulting or schema validation; webhooks see the object computed from the
state before the write (a concurrent write in between is not re-admitted), are never sent
DELETE or CONNECT, get no ``options`` and matchPolicy is always Exact (no equivalent-version
conversion); matchConditions and reinvocation are not supported; Namespaces are stored but
have no lifecycle (no Terminating, deleting one leaves its objects); DELETE of a pod is immediate (no graceful termination unless it has finalizers);
server-side apply (``application/apply-patch+yaml``), ``sendInitialEvents``,
``resourceVersionMatch`` and protobuf are not supported; a watch from a future
resourceVersion does not wait; paged lists continue from current state, not a snapshot;
strategic merge knows only a few list merge keys and ignores ``$retainKeys``. The custom
resources come from a fixed table: CustomResourceDefinitions are stored and, with
``require_crds``, switch serving of a table entry on and off (their schemas are not applied,
and a CRD for a kind not in the table serves nothing). The
garbage collector runs synchronously right after an owner's deletion (the real one follows
within moments); ``Foreground`` propagation is treated as ``Background`` and
``blockOwnerDeletion`` is ignored; ``Orphan`` removes the owner's references at once.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import http.client
import json
import os
import queue
import random
import re
import select
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

JSON = dict[str, Any]

_POD_FIELDS = (
    "spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
    "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName",
)  # fmt: skip
_EVENT_FIELDS = (
    *(f"involvedObject.{f}" for f in ("kind", "namespace", "name", "uid", "apiVersion")),
    "involvedObject.resourceVersion", "involvedObject.fieldPath",
    "reason", "reportingComponent", "source", "type",
)  # fmt: skip


_BUILTIN_GROUPS = frozenset(
    {
        "", "coordination.k8s.io", "apiextensions.k8s.io", "admissionregistration.k8s.io",
        "networking.k8s.io",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Resource:
    """One served resource type."""

    kind: str
    plural: str
    group: str
    version: str
    namespaced: bool = True
    has_status: bool = False
    fields: tuple[str, ...] = ()
    generation: bool = False  # a built-in whose strategy keeps metadata.generation (CRs all do)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def custom(self) -> bool:
        """Served from a CRD (no strategic merge, generation on every object, typed list items)."""
        return self.group not in _BUILTIN_GROUPS

    @property
    def qualified(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def details(self, name: str, uid: str | None = None) -> JSON:
        found = {"name": name, "group": self.group, "kind": self.plural, "uid": uid}
        return {k: v for k, v in found.items() if v}


RESOURCES = (
    Resource("Pod", "pods", "", "v1", has_status=True, fields=_POD_FIELDS),
    Resource("Event", "events", "", "v1", fields=_EVENT_FIELDS),
    Resource("Node", "nodes", "", "v1", False, True, ("spec.unschedulable",)),
    Resource(
        "NetworkAttachmentDefinition", "network-attachment-definitions", "k8s.cni.cncf.io", "v1"
    ),
    Resource("Lease", "leases", "coordination.k8s.io", "v1"),
    Resource("CustomResourceDefinition", "customresourcedefinitions", "apiextensions.k8s.io", "v1",
             False, True),
    Resource("VFPool", "vfpools", "plexus.dev", "v1alpha1", False, True),
    Resource("VFPoolNodeState", "vfpoolnodestates", "plexus.dev", "v1alpha1", False, True),
    Resource("MulticastNodeState", "multicastnodestates", "plexus.dev", "v1alpha1", False, True),
    # network policy (issue 14): the built-in, and the CRD multi-networkpolicy serves (v1beta1)
    Resource("NetworkPolicy", "networkpolicies", "networking.k8s.io", "v1", generation=True),
    Resource("MultiNetworkPolicy", "multi-networkpolicies", "k8s.cni.cncf.io", "v1beta1"),
    # admission (see "admission webhooks" below)
    Resource("Namespace", "namespaces", "", "v1", False),
    Resource(
        "ValidatingWebhookConfiguration", "validatingwebhookconfigurations",
        "admissionregistration.k8s.io", "v1", False,
    ),
)  # fmt: skip
_BY_KIND = {r.kind: r for r in RESOURCES}
_REASONS = {
    400: "BadRequest", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
    409: "Conflict", 410: "Expired", 415: "UnsupportedMediaType", 422: "Invalid",
    429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout",
}  # fmt: skip
# Strategic-merge list keys (path without list indices -> merge key); "" merges primitive lists.
_MERGE_KEYS = {
    ("metadata", "finalizers"): "",
    ("metadata", "ownerReferences"): "uid",
    ("spec", "containers"): "name",
    ("spec", "initContainers"): "name",
    ("spec", "volumes"): "name",
    ("spec", "containers", "env"): "name",
    ("spec", "containers", "ports"): "containerPort",
    ("spec", "containers", "volumeMounts"): "mountPath",
    ("status", "conditions"): "type",
    ("status", "podIPs"): "ip",
    ("status", "addresses"): "type",
}
_MERGE = "application/merge-patch+json"
_STRATEGIC = "application/strategic-merge-patch+json"
_JSON_PATCH = "application/json-patch+json"
_END, _ABORT = "end", "abort"
_SYSTEM_FIELDS = (
    "uid", "creationTimestamp", "generation", "deletionTimestamp", "deletionGracePeriodSeconds",
)  # fmt: skip


class ApiError(Exception):
    """An API failure; ``status`` is the ``Status`` body the server answers with."""

    def __init__(self, code: int, message: str, reason: str = "", details: JSON | None = None):
        super().__init__(message)
        self.code = code
        self.status: JSON = {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason or _REASONS.get(code, "Unknown"), "code": code,
        }  # fmt: skip
        if details:
            self.status["details"] = details


def _not_found(res: Resource, name: str) -> ApiError:
    return ApiError(404, f'{res.qualified} "{name}" not found', details=res.details(name))


def _conflict(res: Resource, name: str, why: str) -> ApiError:
    msg = f'Operation cannot be fulfilled on {res.qualified} "{name}": {why}'
    return ApiError(409, msg, details=res.details(name))


def _stale(res: Resource, name: str) -> ApiError:
    why = "the object has been modified; please apply your changes to the latest version"
    why += " and try again"
    return _conflict(res, name, why)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def resource_for(kind: str) -> Resource:
    """The served resource for ``kind`` (e.g. ``"Pod"``); ValueError if not served."""
    if kind not in _BY_KIND:
        raise ValueError(f"kind {kind!r} is not served by the stand-in")
    return _BY_KIND[kind]


# ---------------------------------------------------------------- selectors and patches


def _field_value(obj: JSON, path: str) -> str:
    value: Any = obj
    for part in ("source.component" if path == "source" else path).split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


def parse_field_selector(res: Resource, text: str) -> Callable[[JSON], bool]:
    """Field selector (``a=b,c!=d``) limited to the fields the real server indexes."""
    terms = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        m = re.fullmatch(r"([^=!]+)(==|=|!=)(.*)", term)
        if not m:
            raise ApiError(400, f"invalid selector: '{text}'; can't understand '{term}'")
        key, op, want = m.group(1).strip(), m.group(2), m.group(3).strip()
        allowed = ("metadata.name", "metadata.namespace") if res.namespaced else ("metadata.name",)
        if key not in allowed + res.fields:
            raise ApiError(400, f'field label not supported: "{key}"')
        terms.append((key, op == "!=", want))
    return lambda obj: all((_field_value(obj, k) == w) != neg for k, neg, w in terms)


_LABEL_TERM = re.compile(
    r"\s*(!?)\s*([\w./-]+)\s*(?:(==|=|!=)\s*([\w.-]*)|\s(in|notin)\s*\(([^)]*)\))?\s*(?:,|$)"
)


def parse_label_selector(text: str) -> Callable[[JSON], bool]:
    """Label selector: ``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``, ``a in (x)``, ``a notin (x)``."""
    terms: list[tuple[str, str, set[str]]] = []  # (key, "in" | "notin" | "exists" | "!", values)
    pos, text = 0, text.strip()
    while pos < len(text):
        m = _LABEL_TERM.match(text, pos)
        if not m or m.end() == pos:
            raise ApiError(400, f"unable to parse requirement: {text[pos:]!r}")
        pos = m.end()
        bang, key, op, value, setop, values = m.groups()
        if op:
            terms.append((key, "notin" if op == "!=" else "in", {value}))
        elif setop:
            terms.append((key, setop, {v.strip() for v in values.split(",")}))
        else:
            terms.append((key, "!" if bang else "exists", set()))

    def matches(obj: JSON) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        for key, op, values in terms:
            present = key in labels and (op in ("exists", "!") or labels[key] in values)
            if present != (op in ("in", "exists")):
                return False
        return True

    return matches


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any, path: tuple[str, ...] = ()) -> Any:
    """Strategic merge patch: maps merge, known keyed lists merge, other lists replace."""
    if not isinstance(patch, dict) or not isinstance(target, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    result = dict(target)
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        sub = (*path, key)
        if value is None or (isinstance(value, dict) and value.get("$patch") == "delete"):
            result.pop(key, None)
        elif isinstance(value, list) and sub in _MERGE_KEYS and isinstance(result.get(key), list):
            result[key] = _merge_list(result[key], value, _MERGE_KEYS[sub], sub)
        else:
            result[key] = strategic_merge_patch(result.get(key), value, sub)
    return result


def _merge_list(old: list[Any], patch: list[Any], key: str, path: tuple[str, ...]) -> list[Any]:
    if not key:
        return old + [v for v in patch if v not in old]
    merged = copy.deepcopy(old)
    for item in patch:
        idx = next((i for i, o in enumerate(merged) if o.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            merged = [o for o in merged if o.get(key) != item.get(key)]
        elif idx is None:
            merged.append(strategic_merge_patch({}, item, path))
        else:
            merged[idx] = strategic_merge_patch(merged[idx], item, path)
    return merged


def _pointer(path: str) -> list[str]:
    if path and not path.startswith("/"):
        raise ValueError(f"JSON pointer must start with '/': {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def _walk(doc: Any, parts: list[str]) -> tuple[Any, str]:
    for part in parts[:-1]:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc, parts[-1]


def _json_patch_op(doc: Any, op: JSON) -> Any:
    kind, parts = op["op"], _pointer(op["path"])
    if not parts:
        return copy.deepcopy(op["value"]) if kind in ("add", "replace") else doc
    if kind in ("move", "copy"):
        source, key = _walk(doc, _pointer(op["from"]))
        value = source[int(key) if isinstance(source, list) else key]
        if kind == "move":
            doc = _json_patch_op(doc, {"op": "remove", "path": op["from"]})
        return _json_patch_op(doc, {"op": "add", "path": op["path"], "value": value})
    parent, key = _walk(doc, parts)
    slot: Any = key
    if isinstance(parent, list):
        slot = len(parent) if key == "-" else int(key)
    if kind == "test" and parent[slot] != op["value"]:
        raise ValueError(f"testing value {op['path']} failed")
    if kind == "add" and isinstance(parent, list):
        parent.insert(slot, copy.deepcopy(op["value"]))
    elif kind in ("add", "replace"):
        if kind == "replace":
            _ = parent[slot]  # KeyError/IndexError: nothing to replace
        parent[slot] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del parent[slot]
    elif kind != "test":
        raise ValueError(f"unexpected op {kind!r}")
    return doc


def json_patch(doc: JSON, ops: list[JSON]) -> JSON:
    """RFC 6902 JSON patch (add, remove, replace, test, move, copy)."""
    result = copy.deepcopy(doc)
    for op in ops:
        try:
            result = _json_patch_op(result, op)
        except (KeyError, IndexError, TypeError) as exc:
            raise ValueError(f"{op.get('op')} operation does not apply: {exc}") from exc
    return result


def apply_patch(res: Resource, obj: JSON, content_type: str, patch: Any) -> JSON:
    """Apply a PATCH body of ``content_type`` to ``obj`` as the real server would."""
    media = content_type.split(";", maxsplit=1)[0].strip().lower()
    if media not in (_MERGE, _JSON_PATCH) and (media != _STRATEGIC or res.custom):
        accepted = f"{_JSON_PATCH}, {_MERGE}" + ("" if res.custom else f", {_STRATEGIC}")
        msg = "the body of the request was in an unknown format - accepted media types include: "
        raise ApiError(415, msg + accepted)
    if media == _JSON_PATCH:
        if not isinstance(patch, list):
            raise ApiError(
                400, "json: cannot unmarshal object into Go value of type jsonpatch.Patch"
            )
        try:
            result: Any = json_patch(obj, patch)
        except ValueError as exc:
            raise ApiError(422, str(exc)) from exc
    elif not isinstance(patch, dict):
        raise ApiError(400, "the body of the patch must be a JSON object")
    else:
        result = (merge_patch if media == _MERGE else strategic_merge_patch)(obj, patch)
    if not isinstance(result, dict) or not isinstance(result.get("metadata"), dict):
        raise ApiError(422, "patched object is not a valid object")
    return result


# ---------------------------------------------------------------- store and watches


@dataclass
class _Change:
    rv: int
    type: str
    obj: JSON
    prev: JSON | None


class _Watcher:
    """One open watch: its filter and the queue of events still to send."""

    def __init__(self, res: Resource, namespace: str | None, match: Callable[[JSON], bool]):
        self.res, self.namespace, self.match = res, namespace, match
        self.queue: queue.Queue[JSON | str] = queue.Queue()
        self.progress = 0  # resourceVersion the queued events bring the client up to

    def matches(self, obj: JSON | None) -> bool:
        if obj is None or obj["kind"] != self.res.kind:
            return False
        if self.namespace is not None and obj["metadata"].get("namespace") != self.namespace:
            return False
        return self.match(obj)

    def offer(self, change: _Change) -> None:
        """Queue ``change`` as seen through this watch's selectors (as the watch cache does)."""
        self.progress = change.rv
        now, before = self.matches(change.obj), self.matches(change.prev)
        if change.type == "MODIFIED" and now != before:
            kind = "ADDED" if now else "DELETED"
            obj = change.obj if now else _with_rv(change.prev or {}, change.rv)
            self.queue.put({"type": kind, "object": copy.deepcopy(obj)})
        elif now:
            self.queue.put({"type": change.type, "object": copy.deepcopy(change.obj)})


def _with_rv(obj: JSON, rv: int) -> JSON:
    obj = copy.deepcopy(obj)
    obj["metadata"]["resourceVersion"] = str(rv)
    return obj


def _normalized(obj: JSON) -> JSON:
    """Wire form: kind, apiVersion, metadata first; empty metadata fields omitted (omitempty)."""
    meta = {k: v for k, v in obj["metadata"].items() if v not in (None, {}, [])}
    rest = {k: v for k, v in obj.items() if k not in ("kind", "apiVersion", "metadata")}
    return {"kind": obj["kind"], "apiVersion": obj["apiVersion"], "metadata": meta, **rest}


def _without_rv(obj: JSON) -> JSON:
    return {**obj, "metadata": {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}}


class ObjectStore:
    """Thread-safe object storage, global resourceVersion, event history and open watches."""

    def __init__(self, history_limit: int | None = None, require_crds: bool = False) -> None:
        self.require_crds = require_crds
        self._lock = threading.RLock()
        self._objects: dict[tuple[str, str, str], JSON] = {}
        self._history: list[_Change] = []
        self._history_limit = history_limit
        self._compacted = 0
        self._rv = 0
        self._watchers: set[_Watcher] = set()

    @property
    def resource_version(self) -> int:
        return self._rv

    def get(self, res: Resource, namespace: str | None, name: str) -> JSON:
        with self._lock:
            found = self._objects.get((res.kind, namespace or "", name))
            if found is None:
                raise _not_found(res, name)
            return copy.deepcopy(found)

    def select(
        self, res: Resource, namespace: str | None, match: Callable[[JSON], bool]
    ) -> list[JSON]:
        """Matching objects of ``res`` in key order (namespace, name), as etcd returns them."""
        with self._lock:
            keys = sorted(k for k in self._objects if k[0] == res.kind)
            objs = (self._objects[k] for k in keys if namespace is None or k[1] == namespace)
            return [copy.deepcopy(o) for o in objs if match(o)]

    def create(self, res: Resource, obj: JSON) -> JSON:
        meta = obj["metadata"]
        with self._lock:
            key = (res.kind, meta.get("namespace", ""), meta["name"])
            if key in self._objects:
                msg = f'{res.qualified} "{meta["name"]}" already exists'
                raise ApiError(409, msg, "AlreadyExists", res.details(meta["name"]))
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now())
            if res.custom or res.generation:
                meta["generation"] = 1
            return self._commit(key, "ADDED", obj, None)

    def snapshot(
        self, res: Resource, namespace: str | None, match: Callable[[JSON], bool]
    ) -> tuple[list[JSON], int]:
        """``select`` plus the resourceVersion it was read at."""
        with self._lock:
            return self.select(res, namespace, match), self._rv

    def update(
        self,
        res: Resource,
        namespace: str | None,
        name: str,
        change: Callable[[JSON], JSON],
        raw: bool = False,
    ) -> JSON:
        """Atomically replace the object by ``change(current)``; a no-op write changes nothing.
        System metadata is kept, except that a ``raw`` (storage-level) write may set the
        deletion fields."""
        with self._lock:
            key = (res.kind, namespace or "", name)
            old = self._objects.get(key)
            if old is None:
                raise _not_found(res, name)
            new = change(copy.deepcopy(old))
            meta = new["metadata"]
            kept = _SYSTEM_FIELDS[:3] if raw else _SYSTEM_FIELDS
            for field in ("name", "namespace", *kept):
                meta.pop(field, None)
                if field in old["metadata"]:
                    meta[field] = old["metadata"][field]
            new.update(kind=old["kind"], apiVersion=old["apiVersion"])
            if _without_rv(_normalized(new)) == _without_rv(old):
                return copy.deepcopy(old)
            if (res.custom or res.generation) and _spec_changed(old, new):
                meta["generation"] = old["metadata"].get("generation", 0) + 1
            finalizing = meta.get("deletionTimestamp") and old["metadata"].get("finalizers")
            if finalizing and not meta.get("finalizers"):
                return self._commit(key, "DELETED", new, old)
            return self._commit(key, "MODIFIED", new, old)

    def delete(
        self,
        res: Resource,
        namespace: str | None,
        name: str,
        check: Callable[[JSON], None] | None = None,
        force: bool = False,
        *,
        orphan: bool = False,
    ) -> tuple[JSON, bool]:
        """Delete (returns the last state and True), or, while finalizers remain and not
        ``force``, only set deletionTimestamp (returns the object and False)."""
        with self._lock:
            key = (res.kind, namespace or "", name)
            old = self._objects.get(key)
            if old is None:
                raise _not_found(res, name)
            if check is not None:
                check(old)
            if old["metadata"].get("finalizers") and not force:
                if old["metadata"].get("deletionTimestamp"):
                    return copy.deepcopy(old), False
                new = copy.deepcopy(old)
                new["metadata"].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0)
                return self._commit(key, "MODIFIED", new, old), False
            gone = self._commit(key, "DELETED", copy.deepcopy(old), old)
            self._collect_garbage(old["metadata"]["uid"], orphan)
            if res.kind == "CustomResourceDefinition":
                self._drop_custom_resources(old)
            return gone, True

    # -- CRD-driven serving ---------------------------------------------------------- i12-ctl

    def served(self, res: Resource) -> bool:
        """Whether ``res`` is served now: always, unless ``require_crds`` and ``res`` is a
        custom resource without a CustomResourceDefinition that serves it (group, plural,
        scope and a served version matching the stand-in's table)."""
        if not (self.require_crds and res.custom):
            return True
        with self._lock:
            return self._crd_for(res) is not None

    def _crd_for(self, res: Resource) -> JSON | None:
        scope = "Namespaced" if res.namespaced else "Cluster"
        for (kind, _, _), crd in self._objects.items():
            spec = crd.get("spec") or {}
            if kind != "CustomResourceDefinition" or spec.get("group") != res.group:
                continue
            names = spec.get("names") or {}
            versions = spec.get("versions") or []
            if (
                names.get("plural") == res.plural
                and spec.get("scope") == scope
                and any(v.get("name") == res.version and v.get("served") for v in versions)
            ):
                return crd
        return None

    def _drop_custom_resources(self, crd: JSON) -> None:
        """Deleting a CRD deletes every object of its kind, as the API server does."""
        spec = crd.get("spec") or {}
        plural = (spec.get("names") or {}).get("plural")
        for res in RESOURCES:
            if res.custom and (res.group, res.plural) == (spec.get("group"), plural):
                for _, namespace, name in [k for k in self._objects if k[0] == res.kind]:
                    self.delete(res, namespace or None, name, force=True)

    # -- garbage collector (ownerReferences) ----------------------------------------- i12-ctl

    def _collect_garbage(self, owner_uid: str, orphan: bool) -> None:
        """What the garbage collector does once an owner is gone: a dependent whose every
        owner is now absent is deleted (background propagation; a DELETE, so its finalizers
        hold it), one with owners left loses the dangling reference, and with the Orphan
        policy every dependent only loses the reference. Runs synchronously, right after the
        owner's DELETED event (the real collector follows within moments)."""
        live = {o["metadata"]["uid"] for o in self._objects.values()}
        for (kind, namespace, name), obj in list(self._objects.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if not any(r.get("uid") == owner_uid for r in refs):
                continue
            res = _BY_KIND[kind]
            left = [r for r in refs if r.get("uid") != owner_uid and r.get("uid") in live]
            if left or orphan:
                kept = [r for r in refs if r.get("uid") != owner_uid]
                self.update(res, namespace or None, name, lambda o, k=kept: _with_owners(o, k))
            elif (kind, namespace, name) in self._objects:
                self.delete(res, namespace or None, name)

    def _commit(self, key: tuple[str, str, str], kind: str, obj: JSON, prev: JSON | None) -> JSON:
        self._rv += 1
        obj = _with_rv(_normalized(obj), self._rv)
        if kind == "DELETED":
            del self._objects[key]
        else:
            self._objects[key] = obj
        change = _Change(self._rv, kind, obj, prev)
        self._history.append(change)
        if self._history_limit is not None and len(self._history) > self._history_limit:
            self._compacted = self._history.pop(0).rv
        for watcher in self._watchers:
            watcher.offer(change)
        return copy.deepcopy(obj)

    def compact(self) -> None:
        with self._lock:
            self._history.clear()
            self._compacted = self._rv

    def open_watch(self, watcher: _Watcher, since: int | None) -> None:
        """Queue the initial events for ``watcher`` and register it, atomically."""
        with self._lock:
            if since is None:
                for obj in self.select(watcher.res, watcher.namespace, watcher.matches):
                    watcher.queue.put({"type": "ADDED", "object": obj})
            elif since < self._compacted:
                msg = f"too old resource version: {since} ({self._compacted})"
                watcher.queue.put({"type": "ERROR", "object": ApiError(410, msg).status})
                watcher.queue.put(_END)
                return
            else:
                for change in self._history:
                    if change.rv > since:
                        watcher.offer(change)
            watcher.progress = max(since or 0, self._rv)
            self._watchers.add(watcher)

    def drained_progress(self, watcher: _Watcher) -> int | None:
        """The watcher's resourceVersion if all its queued events were sent, else None."""
        with self._lock:
            return watcher.progress if watcher.queue.empty() else None

    def close_watch(self, watcher: _Watcher) -> None:
        with self._lock:
            self._watchers.discard(watcher)

    def close_watches(self, how: str = _END) -> int:
        with self._lock:
            for watcher in self._watchers:
                watcher.queue.put(how)
            count = len(self._watchers)
            self._watchers.clear()
            return count

    def watch_count(self) -> int:
        with self._lock:
            return len(self._watchers)

    def bookmark(self) -> None:
        with self._lock:
            for watcher in self._watchers:
                watcher.queue.put(_bookmark(watcher.res, self._rv))


def _with_owners(obj: JSON, refs: list[JSON]) -> JSON:
    obj["metadata"]["ownerReferences"] = refs or None
    return obj


def _spec_changed(old: JSON, new: JSON) -> bool:
    def body(o: JSON) -> JSON:
        return {k: v for k, v in o.items() if k not in ("metadata", "status")}

    return body(old) != body(new)


def _bookmark(res: Resource, rv: int) -> JSON:
    obj = {
        "kind": res.kind,
        "apiVersion": res.api_version,
        "metadata": {"resourceVersion": str(rv)},
    }
    return {"type": "BOOKMARK", "object": obj}


# ---------------------------------------------------------------- API semantics


class Route(NamedTuple):
    res: Resource
    namespace: str | None
    name: str | None
    sub: str | None


def parse_route(path: str) -> Route | None:
    """``/api/v1/...`` or ``/apis/{group}/{version}/...`` -> Route, or None if not served."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    found = [r for r in RESOURCES if (r.group, r.version) == (group, version)]
    res = next((r for r in found if rest and r.plural == rest[0]), None)
    if res is None or len(rest) > 3 or (namespace is not None and not res.namespaced):
        return None
    name, sub = [*rest[1:], None, None][:2]
    if name and res.namespaced and namespace is None:
        return None
    if sub is not None and not (sub == "status" and res.has_status):
        return None
    return Route(res, namespace, name, sub)


def _generate_name(prefix: str) -> str:
    return prefix + "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))


def _check_body(route: Route, body: Any) -> JSON:
    res = route.res
    if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
        raise ApiError(400, f"the body of the request must be a {res.kind} object")
    for field, want in (("apiVersion", res.api_version), ("kind", res.kind)):
        if body.get(field, want) != want:
            raise ApiError(400, f"the {field} in the data ({body[field]}) does not match {want}")
    obj = {**copy.deepcopy(body), "apiVersion": res.api_version, "kind": res.kind}
    meta = obj.setdefault("metadata", {})
    if not res.namespaced:
        meta.pop("namespace", None)
    elif meta.setdefault("namespace", route.namespace) != route.namespace:
        msg = (
            "the namespace of the provided object does not match the namespace sent on the request"
        )
        raise ApiError(400, msg)
    return obj


def api_create(store: ObjectStore, route: Route, body: Any) -> JSON:
    """POST: validate, fill name from generateName, apply the create strategy, store."""
    obj = _check_body(route, body)
    meta = obj["metadata"]
    if not meta.get("name"):
        if not meta.get("generateName"):
            raise ApiError(422, f"{route.res.kind} is invalid: metadata.name: Required value")
        meta["name"] = _generate_name(meta["generateName"])
    if meta.get("resourceVersion"):
        raise ApiError(500, "resourceVersion should not be set on objects to be created")
    for field in _SYSTEM_FIELDS:
        meta.pop(field, None)
    if route.res.kind == "Pod":
        obj["status"] = {"phase": "Pending"}
    elif route.res.custom and route.res.has_status:  # the CR create strategy resets status
        obj.pop("status", None)
    elif route.res.kind == "CustomResourceDefinition":
        obj["status"] = _crd_status(obj)
    return store.create(route.res, obj)


def _crd_status(crd: JSON) -> JSON:
    """What the API server's CRD controllers write soon after a create: names accepted and
    established (here at once, so ``kubectl wait --for=condition=Established`` returns)."""
    spec = crd.get("spec") or {}
    now = _now()
    stored = [v.get("name") for v in spec.get("versions") or [] if v.get("storage")]
    conditions = [
        {"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": now}
        for t, r, m in (
            ("NamesAccepted", "NoConflicts", "no conflicts found"),
            ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        )
    ]
    return {"acceptedNames": spec.get("names") or {}, "conditions": conditions,
            "storedVersions": stored}  # fmt: skip


def _check_preconditions(res: Resource, old: JSON, meta: JSON) -> None:
    uid, current = meta.get("uid"), old["metadata"]["uid"]
    if uid and uid != current:
        msg = f"Precondition failed: UID in precondition: {uid}, UID in object meta: {current}"
        raise ApiError(409, msg, details=res.details(old["metadata"]["name"]))
    rv = meta.get("resourceVersion")
    if rv and rv != old["metadata"]["resourceVersion"]:
        raise _stale(res, old["metadata"]["name"])


def _update_strategy(route: Route, old: JSON, new: JSON) -> JSON:
    """What an update of the main resource or of ``/status`` may change: a CR's ``/status``
    write keeps everything of the old object but ``status`` (metadata too, as the CR status
    strategy does); a pod's or node's keeps spec and owner references."""
    if route.sub == "status" and route.res.custom:
        kept = copy.deepcopy(old)
        kept.pop("status", None)
        return {**kept, **({"status": new["status"]} if "status" in new else {})}
    if route.sub == "status":
        new = {**new, "spec": old.get("spec")}
        new["metadata"]["ownerReferences"] = old["metadata"].get("ownerReferences")
    elif route.res.has_status:
        new = {**new, "status": old.get("status")}
    new["metadata"] = {k: v for k, v in new["metadata"].items() if v is not None}
    return {k: v for k, v in new.items() if v is not None}


def _unconditional_update(res: Resource) -> bool:
    """Whether a PUT without resourceVersion is allowed (the strategy's
    AllowUnconditionalUpdate): not for Leases, whose holders must not overwrite each other,
    nor for custom resources."""
    return not res.custom and res.kind != "Lease"


def api_replace(store: ObjectStore, route: Route, body: Any) -> JSON:
    """PUT: resourceVersion/UID preconditions, then replace."""
    obj = _check_body(route, body)
    if obj["metadata"].get("name") != route.name:
        msg = f"the name of the object ({obj['metadata'].get('name')}) does not match the name "
        raise ApiError(400, msg + f"on the URL ({route.name})")

    def change(old: JSON) -> JSON:
        if not obj["metadata"].get("resourceVersion") and not _unconditional_update(route.res):
            msg = f'{route.res.kind}.{route.res.group or "core"} "{route.name}" is invalid: '
            msg += "metadata.resourceVersion: Invalid value: 0: must be specified for an update"
            raise ApiError(422, msg, "Invalid", route.res.details(route.name or ""))
        _check_preconditions(route.res, old, obj["metadata"])
        return _update_strategy(route, old, obj)

    return store.update(route.res, route.namespace, route.name or "", change)


def api_patch(store: ObjectStore, route: Route, content_type: str, body: Any) -> JSON:
    """PATCH: apply the patch, then the same preconditions and strategy as PUT."""

    def change(old: JSON) -> JSON:
        new = apply_patch(route.res, old, content_type, body)
        _check_preconditions(route.res, old, new["metadata"])
        return _update_strategy(route, old, new)

    return store.update(route.res, route.namespace, route.name or "", change)


def api_delete(store: ObjectStore, route: Route, body: Any) -> JSON:
    """DELETE: DeleteOptions preconditions; pods and pending deletions return the object."""
    res, name = route.res, route.name or ""
    pre = (body.get("preconditions") or {}) if isinstance(body, dict) else {}

    def check(old: JSON) -> None:
        for field in ("uid", "resourceVersion"):
            want, have = pre.get(field), old["metadata"][field]
            if want and want != have:
                label = "UID" if field == "uid" else "ResourceVersion"
                msg = f"Precondition failed: {label} in precondition: {want}, "
                raise ApiError(
                    409, msg + f"{label} in object meta: {have}", details=res.details(name)
                )

    policy = (body.get("propagationPolicy") if isinstance(body, dict) else None) or "Background"
    if policy not in ("Background", "Orphan", "Foreground"):
        raise ApiError(400, f"unsupported propagationPolicy: {policy!r}")
    obj, deleted = store.delete(res, route.namespace, name, check, orphan=policy == "Orphan")
    if not deleted or res.kind == "Pod":
        return obj
    details = res.details(name, obj["metadata"]["uid"])
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": details,
    }


def _selector(res: Resource, query: dict[str, str]) -> Callable[[JSON], bool]:
    fields = parse_field_selector(res, query.get("fieldSelector", ""))
    labels = parse_label_selector(query.get("labelSelector", ""))
    return lambda obj: fields(obj) and labels(obj)


def api_list(store: ObjectStore, route: Route, query: dict[str, str]) -> JSON:
    """GET collection, with selectors and limit/continue paging."""
    res = route.res
    items, rv = store.snapshot(res, route.namespace, _selector(res, query))
    meta: JSON = {"resourceVersion": str(rv)}
    if query.get("continue"):
        try:
            token = json.loads(base64.urlsafe_b64decode(query["continue"]))
            start, rv = tuple(token["start"]), int(token["rv"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ApiError(400, f"continue key is not valid: {exc}") from exc
        meta["resourceVersion"] = str(rv)
        items = [
            o for o in items if (o["metadata"].get("namespace", ""), o["metadata"]["name"]) > start
        ]
    limit = _int_param(query, "limit")
    if 0 < limit < len(items):
        last = items[limit - 1]["metadata"]
        token = {"rv": rv, "start": [last.get("namespace", ""), last["name"]]}
        meta["continue"] = base64.urlsafe_b64encode(json.dumps(token).encode()).decode()
        if not (query.get("fieldSelector") or query.get("labelSelector")):
            meta["remainingItemCount"] = len(items) - limit
        items = items[:limit]
    if not res.custom:  # built-in list items carry no apiVersion/kind, CR items do
        items = [{k: v for k, v in o.items() if k not in ("apiVersion", "kind")} for o in items]
    return {
        "kind": f"{res.kind}List",
        "apiVersion": res.api_version,
        "metadata": meta,
        "items": items,
    }


def _parse_rv(value: str | None) -> int | None:
    if value in (None, "", "0"):
        return None
    try:
        return int(value or "")
    except ValueError as exc:
        raise ApiError(400, f"invalid resource version: {value!r}") from exc


def _int_param(query: dict[str, str], name: str) -> int:
    try:
        return int(query.get(name) or 0)
    except ValueError as exc:
        raise ApiError(400, f"{name}: invalid integer {query[name]!r}") from exc


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "t", "true")


_VERSION = {
    "major": "1", "minor": "31", "gitVersion": "v1.31.0-plexus-standin",
    "gitCommit": "0" * 40, "gitTreeState": "clean", "buildDate": "2024-08-13T07:28:49Z",
    "goVersion": "go1.22.5", "compiler": "gc", "platform": "linux/amd64",
}  # fmt: skip


def discovery(path: str, served: Callable[[Resource], bool] | None = None) -> JSON | None:
    """Minimal /version, /api, /apis and per-group-version discovery documents (of the
    resources ``served`` accepts, all by default)."""
    path = path.rstrip("/")
    resources = [r for r in RESOURCES if served is None or served(r)]
    versions: dict[str, list[str]] = {}  # a group's versions, the preferred (first) first
    for r in resources:
        if r.group and r.version not in versions.setdefault(r.group, []):
            versions[r.group].append(r.version)
    groups = sorted(versions)
    gv = {g: [{"groupVersion": f"{g}/{v}", "version": v} for v in versions[g]] for g in groups}
    if path == "/version":
        return dict(_VERSION)
    if path == "/api":
        cidr = {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [cidr]}
    group_docs = {g: {"name": g, "versions": gv[g], "preferredVersion": gv[g][0]} for g in groups}
    if path == "/apis":
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": list(group_docs.values())}
    if path.startswith("/apis/") and path[6:] in group_docs:
        return {"kind": "APIGroup", "apiVersion": "v1", **group_docs[path[6:]]}
    served_here = [r for r in resources if path in ("/api/v1", f"/apis/{r.api_version}")]
    if not served_here:
        return None
    verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
    listed = []
    for r in served_here:
        one = {"name": r.plural, "singularName": r.kind.lower(), "namespaced": r.namespaced}
        listed.append({**one, "kind": r.kind, "verbs": verbs})
        if r.has_status:
            listed.append({**one, "name": f"{r.plural}/status", "kind": r.kind, "verbs": verbs[3:]})
    group_version = served_here[0].api_version
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
            "resources": listed}  # fmt: skip


# ---------------------------------------------------------------- admission webhooks
# Calls validating admission webhooks as kube-apiserver does (admissionregistration.k8s.io/v1
# ValidatingWebhookConfiguration): every webhook whose rules, namespaceSelector and
# objectSelector match a CREATE or UPDATE gets an AdmissionReview POSTed over TLS verified
# with its caBundle; a denial answers the client with the API's Status text, a call that fails
# follows failurePolicy, warnings go back in `Warning` headers. A service clientConfig is
# dialled through `Admission.services` ({"name.namespace.svc": "127.0.0.1:port"}), the name
# still being what the certificate is verified against, as the API server verifies it.


def _selector_matches(selector: Any, labels: JSON) -> bool:
    """metav1.LabelSelector semantics (absent or empty selects everything)."""
    if not isinstance(selector, dict):
        return True
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        present = key in labels
        ok = {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }.get(op, False)
        if not ok:
            return False
    return True


def _rule_matches(rule: JSON, res: Resource, sub: str | None, operation: str) -> bool:
    def has(key: str, value: str) -> bool:
        listed = rule.get(key) or []
        return "*" in listed or value in listed

    resource = f"{res.plural}/{sub}" if sub else res.plural
    resources = rule.get("resources") or []
    named = resource in resources or (sub is None and "*" in resources)
    named = named or (sub is not None and ("*/*" in resources or f"{res.plural}/*" in resources))
    scope = rule.get("scope", "*")
    in_scope = scope == "*" or (scope == "Namespaced") == res.namespaced
    return (
        has("operations", operation)
        and has("apiGroups", res.group)
        and has("apiVersions", res.version)
        and named
        and in_scope
    )


class Admission:
    """The webhook calls of one stand-in; `services` maps a Service's DNS name to an address."""

    def __init__(self, standin: ApiStandin) -> None:
        self.standin = standin
        self.services: dict[str, str] = {}
        self.calls = 0

    def admit(self, method: str, route: Route, ctype: str, body: Any) -> list[str]:
        """Run the matching webhooks for a write about to happen; raises ApiError when one
        denies (or fails, failurePolicy Fail); returns their warnings."""
        if route.res.group == "admissionregistration.k8s.io":
            return []  # as the API server: webhook configurations are never sent to webhooks
        try:
            operation, obj, old = self._candidate(method, route, ctype, body)
        except (ApiError, ValueError, KeyError, TypeError, AttributeError):
            return []  # the write itself will fail and say why
        hooks = self._matching(route, operation, obj, old)
        warnings: list[str] = []
        for config_name, hook in hooks:
            warnings += self._call(config_name, hook, route, operation, obj, old=old)
        return warnings

    def _candidate(
        self, method: str, route: Route, ctype: str, body: Any
    ) -> tuple[str, JSON, JSON | None]:
        """The object as it would be stored (what the API server sends webhooks)."""
        if method == "POST":
            obj = _check_body(route, body)
            meta = obj["metadata"]
            if not meta.get("name") and meta.get("generateName"):
                # Name it now, and in the body too, so the stored object has the admitted name.
                meta["name"] = body["metadata"]["name"] = _generate_name(meta["generateName"])
            return "CREATE", obj, None
        old = self.standin.store.get(route.res, route.namespace, route.name or "")
        new = apply_patch(route.res, old, ctype, body) if method == "PATCH" else body
        new = _update_strategy(route, old, _check_body(route, new))
        return "UPDATE", new, old

    def _matching(
        self, route: Route, operation: str, obj: JSON, old: JSON | None
    ) -> list[tuple[str, JSON]]:
        configs = self.standin.list_objects("ValidatingWebhookConfiguration")
        labels = (obj.get("metadata") or {}).get("labels") or {}
        old_labels = ((old or {}).get("metadata") or {}).get("labels") or {}
        found = []
        for config in sorted(configs, key=lambda c: c["metadata"]["name"]):
            for hook in config.get("webhooks") or []:
                rules = hook.get("rules") or []
                if not any(_rule_matches(r, route.res, route.sub, operation) for r in rules):
                    continue
                if route.res.namespaced and not _selector_matches(
                    hook.get("namespaceSelector"), self._namespace_labels(route.namespace or "")
                ):
                    continue
                selector = hook.get("objectSelector")
                if not (
                    _selector_matches(selector, labels) or _selector_matches(selector, old_labels)
                ):
                    continue
                found.append((config["metadata"]["name"], hook))
        return found

    def _namespace_labels(self, namespace: str) -> JSON:
        ns = self.standin.get("Namespace", None, namespace) or {}
        labels = dict((ns.get("metadata") or {}).get("labels") or {})
        labels.setdefault("kubernetes.io/metadata.name", namespace)  # as the API server adds
        return labels

    def _call(
        self, config: str, hook: JSON, route: Route, operation: str, obj: JSON, *, old: JSON | None
    ) -> list[str]:
        name = hook.get("name", config)
        uid = str(uuid.uuid4())
        res = route.res
        request: JSON = {
            "uid": uid,
            "kind": {"group": res.group, "version": res.version, "kind": res.kind},
            "resource": {"group": res.group, "version": res.version, "resource": res.plural},
            "requestKind": {"group": res.group, "version": res.version, "kind": res.kind},
            "requestResource": {
                "group": res.group, "version": res.version, "resource": res.plural,
            },
            "name": obj["metadata"].get("name", ""),
            "operation": operation,
            "userInfo": {"username": "standin-admin", "groups": ["system:masters"]},
            "object": obj,
            "oldObject": old,
            "dryRun": False,
        }  # fmt: skip
        if route.sub:
            request["subResource"] = route.sub
        if res.namespaced:
            request["namespace"] = route.namespace
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}
        self.calls += 1
        try:
            if "v1" not in (hook.get("admissionReviewVersions") or []):
                raise OSError("admissionReviewVersions does not list v1")
            answer = self._post(hook, {**review, "request": request})
            response = answer.get("response") if isinstance(answer, dict) else None
            if not isinstance(response, dict) or response.get("uid") != uid:
                raise OSError(f"expected response.uid={uid!r}")
        except (OSError, ValueError, http.client.HTTPException) as exc:
            if hook.get("failurePolicy", "Fail") == "Ignore":
                return []
            message = f'failed calling webhook "{name}": failed to call webhook: {exc}'
            raise ApiError(500, f"Internal error occurred: {message}") from None
        if response.get("allowed") is True:
            return [str(w) for w in response.get("warnings") or []]
        raise self._denied(name, response.get("status") or {})

    @staticmethod
    def _denied(name: str, status: JSON) -> ApiError:
        """k8s.io/apiserver webhook errors.ToStatusErr: a code under 400 becomes 400, the
        message is prefixed with who denied it."""
        code = status.get("code") or 0
        code = code if isinstance(code, int) and code >= 400 else 400
        denied = f'admission webhook "{name}" denied the request'
        why = status.get("message") or status.get("reason")
        message = f"{denied}: {why}" if why else f"{denied} without explanation"
        return ApiError(code, message, str(status.get("reason") or ""))

    def _post(self, hook: JSON, review: JSON) -> Any:
        client = hook.get("clientConfig") or {}
        timeout = max(1, min(30, int(hook.get("timeoutSeconds") or 10)))
        context = ssl.create_default_context()
        if client.get("caBundle"):
            context = ssl.create_default_context(
                cadata=base64.b64decode(client["caBundle"]).decode()
            )
        if client.get("url"):
            url = urlsplit(client["url"])
            server_name, address = url.hostname or "", f"{url.hostname}:{url.port or 443}"
            path = url.path or "/"
        else:
            service = client.get("service") or {}
            server_name = f"{service.get('name')}.{service.get('namespace')}.svc"
            if server_name not in self.services:
                raise OSError(f'service "{server_name}" has no address in this test')
            address, path = self.services[server_name], service.get("path") or "/"
        host, _, port = address.rpartition(":")
        raw = socket.create_connection((host, int(port)), timeout=timeout)
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        conn.sock = context.wrap_socket(raw, server_hostname=server_name)
        try:
            data = json.dumps(review).encode()
            conn.request("POST", path, data, {"Content-Type": "application/json"})
            reply = conn.getresponse()
            body = reply.read()
            if reply.status != 200:
                raise OSError(f"the server responded with HTTP {reply.status}")
            return json.loads(body)
        finally:
            conn.close()


# ---------------------------------------------------------------- HTTP


class RecordedRequest(NamedTuple):
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: bytes


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, standin: ApiStandin, host: str) -> None:
        self.standin = standin
        super().__init__((host, 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (a daemon stopped mid-watch) is routine, as for the API
        server; anything else is printed as socketserver does."""
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Maps HTTP requests onto the API semantics above; serves watches as chunked streams."""

    protocol_version = "HTTP/1.1"
    server: _Server
    warnings: list[str] = []  # set by admission for the response being written

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.standin._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.standin._track(self.connection, False)

    def do_GET(self) -> None:
        """Every verb: record, maybe fail as told by ``fail_next``, else serve."""
        method, url = self.command, urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        ctype = self.headers.get("Content-Type", "")
        standin = self.server.standin
        standin._record(RecordedRequest(method, url.path, query, ctype, raw))
        try:
            injected = standin._take_failure(method, url.path)
            if injected:
                raise ApiError(injected, f"injected failure for {method} {url.path}")
            answer = self._handle(method, url.path, query, ctype, raw)
        except ApiError as err:
            answer = err.code, err.status
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # a bad request body
            answer = 500, ApiError(500, f"Internal error occurred: {exc!r}").status
        if answer is not None:
            self._send_json(*answer)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _handle(
        self, method: str, path: str, query: dict[str, str], ctype: str, raw: bytes
    ) -> tuple[int, JSON] | None:
        store = self.server.standin.store
        doc = discovery(path, store.served) if method == "GET" else None
        if doc is not None:
            return 200, doc
        route = parse_route(path)
        if route is None or not store.served(route.res):  # i12-ctl: CRD-driven serving
            raise ApiError(404, "the server could not find the requested resource")
        try:
            body = json.loads(raw) if raw else None
        except ValueError as exc:
            raise ApiError(400, f"the body of the request could not be decoded: {exc}") from exc
        if route.name is None:
            return self._collection(method, route, query, body)
        return self._item(method, route, ctype, body)

    def _collection(
        self, method: str, route: Route, query: dict[str, str], body: Any
    ) -> tuple[int, JSON] | None:
        store = self.server.standin.store
        if method == "GET" and _truthy(query.get("watch")):
            self._serve_watch(route, query)
            return None
        if method == "GET":
            return 200, api_list(store, route, query)
        if method == "POST" and (route.namespace or not route.res.namespaced):
            self.warnings = self.server.standin.admission.admit(method, route, "", body)
            return 201, api_create(store, route, body)
        raise ApiError(405, "the server does not allow this method on the requested resource")

    def _item(self, method: str, route: Route, ctype: str, body: Any) -> tuple[int, JSON]:
        store = self.server.standin.store
        verbs: dict[str, Callable[[], JSON]] = {
            "GET": lambda: store.get(route.res, route.namespace, route.name or ""),
            "PUT": lambda: api_replace(store, route, body),
            "PATCH": lambda: api_patch(store, route, ctype, body),
        }
        if route.sub is None:
            verbs["DELETE"] = lambda: api_delete(store, route, body)
        if method not in verbs:
            raise ApiError(405, "the server does not allow this method on the requested resource")
        if method in ("PUT", "PATCH"):
            self.warnings = self.server.standin.admission.admit(method, route, ctype, body)
        return 200, verbs[method]()

    def _send_json(self, code: int, body: JSON) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for warning in self.warnings:  # admission webhooks' (RFC 7234 code 299)
            text = warning.replace('"', "'").encode("ascii", "replace").decode()
            self.send_header("Warning", f'299 - "{text}"')
        self.warnings = []
        if code == 429:
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(data)

    def _serve_watch(self, route: Route, query: dict[str, str]) -> None:
        store = self.server.standin.store
        watcher = _Watcher(route.res, route.namespace, _selector(route.res, query))
        since = _parse_rv(query.get("resourceVersion"))
        timeout = _int_param(query, "timeoutSeconds")
        deadline = time.monotonic() + timeout if timeout > 0 else None
        standin = self.server.standin
        with standin.streams_done:
            standin.streams += 1
        store.open_watch(watcher, since)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            ending = self._pump(watcher, deadline, _truthy(query.get("allowWatchBookmarks")))
            if ending == _ABORT:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
            else:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True
        finally:
            store.close_watch(watcher)
            with standin.streams_done:
                standin.streams -= 1
                standin.streams_done.notify_all()

    def _pump(self, watcher: _Watcher, deadline: float | None, bookmarks: bool) -> str:
        """Write queued events until the stream ends; returns how it ended."""
        while deadline is None or time.monotonic() < deadline:
            wait = 0.1 if deadline is None else min(0.1, max(0.0, deadline - time.monotonic()))
            try:
                item = watcher.queue.get(timeout=wait)
            except queue.Empty:
                if self._client_gone():
                    return _ABORT
                continue
            if isinstance(item, str):
                return item
            self._write_chunk(item)
        progress = self.server.standin.store.drained_progress(watcher)
        if bookmarks and progress is not None:  # like the watch cache, bookmark at the timeout
            self._write_chunk(_bookmark(watcher.res, progress))
        return _END

    def _client_gone(self) -> bool:
        readable, _, _ = select.select([self.connection], [], [], 0)
        try:
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def _write_chunk(self, event: JSON) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


# ---------------------------------------------------------------- public facade


@dataclass
class _Failure:
    method: str
    prefix: str
    status: int
    times: int


class ApiStandin:
    """The stand-in API server: start/stop, kubeconfig, fixtures, fault injection."""

    def __init__(
        self, history_limit: int | None = None, require_crds: bool = False, host: str = "127.0.0.1"
    ) -> None:
        """``require_crds``: serve a custom resource only while a CustomResourceDefinition for
        it exists (off by default: the Plexus kinds are served from the start). ``host``: the
        address to listen on (a multi-node bed serves its nodes' namespaces on a bridge)."""
        self.host = host
        self.store = ObjectStore(history_limit, require_crds)
        self._lock = threading.Lock()
        self._log: list[RecordedRequest] = []
        self._failures: list[_Failure] = []
        self._connections: set[socket.socket] = set()
        # Watch streams still being written; stop() lets them end cleanly before cutting
        # connections, as the API server ends watches on shutdown.
        self.streams = 0
        self.streams_done = threading.Condition()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.admission = Admission(self)

    # lifecycle

    def start(self) -> ApiStandin:
        if self._server is None:
            self._server = _Server(self, self.host)
            self._thread = threading.Thread(
                target=self._server.serve_forever, args=(0.05,), name="k8s-standin", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Close open watches and connections, stop serving, join the server thread."""
        server, self._server = self._server, None
        if server is None:
            return
        self.store.close_watches()
        server.shutdown()
        self.store.close_watches()  # any opened meanwhile
        with self.streams_done:
            self.streams_done.wait_for(lambda: self.streams == 0, timeout=2)
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ApiStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("ApiStandin is not started")
        return f"http://{self.host}:{self._server.server_address[1]}"

    def kubeconfig(self, path: str | os.PathLike[str]) -> str:
        """Write a kubeconfig (JSON, which is YAML) pointing at this server; return its path."""
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "standin", "preferences": {},
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "standin", "user": {}}],
            "contexts": [{"name": "standin",
                          "context": {"cluster": "standin", "user": "standin",
                                      "namespace": "default"}}],
        }  # fmt: skip
        with open(path, "w", encoding="utf-8") as out:
            json.dump(config, out, indent=2)
        return os.fspath(path)

    # storage-level fixtures (no API strategy: status is kept as given)

    def create(self, obj: JSON) -> JSON:
        """Store a new object (kind/apiVersion required); assigns uid, resourceVersion, ..."""
        res = resource_for(obj.get("kind", ""))
        obj = {**copy.deepcopy(obj), "apiVersion": res.api_version}
        meta = obj.setdefault("metadata", {})
        if res.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ValueError("metadata.name or metadata.generateName is required")
            meta["name"] = _generate_name(meta["generateName"])
        meta.pop("resourceVersion", None)
        return self.store.create(res, obj)

    def update(self, obj: JSON) -> JSON:
        """Overwrite an object unconditionally (resourceVersion ignored), emitting MODIFIED."""
        res = resource_for(obj.get("kind", ""))
        meta = obj["metadata"]
        namespace = meta.get("namespace", "default") if res.namespaced else None
        return self.store.update(res, namespace, meta["name"], lambda _: copy.deepcopy(obj), True)

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> JSON | None:
        """Remove an object now (finalizers ignored), emitting DELETED; None if absent."""
        res = resource_for(kind)
        if api_version != res.api_version:
            raise ValueError(f"{kind} is served as {res.api_version}, not {api_version}")
        try:
            return self.store.delete(res, namespace, name, force=True)[0]
        except ApiError:
            return None

    def get(self, kind: str, namespace: str | None, name: str) -> JSON | None:
        try:
            return self.store.get(resource_for(kind), namespace, name)
        except ApiError:
            return None

    def list_objects(self, kind: str, namespace: str | None = None) -> list[JSON]:
        return self.store.select(resource_for(kind), namespace, lambda _: True)

    def events(self) -> list[JSON]:
        """Stored Event objects, oldest first."""
        found = self.list_objects("Event")
        return sorted(found, key=lambda e: int(e["metadata"]["resourceVersion"]))

    @property
    def resource_version(self) -> str:
        return str(self.store.resource_version)

    # observation and fault injection

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path without query) of every request received, in order."""
        with self._lock:
            return [(r.method, r.path) for r in self._log]

    @property
    def request_log(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._log)

    def compact(self) -> None:
        """Drop retained watch history: watching from an older resourceVersion gets 410."""
        self.store.compact()

    def fail_next(self, method: str, path_prefix: str, status: int, times: int = 1) -> None:
        """Answer the next ``times`` matching requests with a ``status`` error Status."""
        with self._lock:
            self._failures.append(_Failure(method.upper(), path_prefix, status, times))

    def close_watches(self, abrupt: bool = False) -> int:
        """End every open watch stream, cleanly (like a server-side timeout) or, if
        ``abrupt``, by dropping the connection mid-stream. Returns how many were open."""
        return self.store.close_watches(_ABORT if abrupt else _END)

    def send_bookmarks(self) -> None:
        """Send a BOOKMARK at the current resourceVersion on every open watch."""
        self.store.bookmark()

    @property
    def watch_count(self) -> int:
        return self.store.watch_count()

    def wait_for_watches(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until at least ``count`` watches are open; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.store.watch_count() < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # used by the handler

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._log.append(request)

    def _take_failure(self, method: str, path: str) -> int | None:
        with self._lock:
            for failure in self._failures:
                if failure.method == method and path.startswith(failure.prefix):
                    failure.times -= 1
                    if failure.times <= 0:
                        self._failures.remove(failure)
                    return failure.status
        return None

    def _track(self, conn: socket.socket, is_open: bool) -> None:
        with self._lock:
            if is_open:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)


# ---------------------------------------------------------------- serve from the command line (i12-ctl)


def main() -> None:
    """``python -m tests.k8s_standin``: serve until stdin closes, printing the URL first (for
    benchmarks, which must not import the tests, and for trying a client by hand)."""
    with ApiStandin() as api:
        print(api.url, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
