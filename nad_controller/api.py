"""What the controller needs from the Kubernetes API, as a protocol over plain JSON objects,
and the failures it tells apart. `nad_controller.k8s` implements it with the `kubernetes`
client (the only module that imports it); the elector and the reconciler see only this."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

JSON = dict[str, Any]


class ApiFailure(Exception):
    """The API could not answer (unreachable, 5xx, 429): try again later."""


class Conflict(ApiFailure):
    """409: someone else wrote first (stale resourceVersion) or the object already exists."""


class NotFound(ApiFailure):
    """404: the object does not exist."""


class Gone(ApiFailure):
    """410: the watch's resourceVersion was compacted away: list again."""


Handler = Callable[[str, JSON | None], None]  # (kind, object or None after a relist)


class LeaseApi(Protocol):
    def get_lease(self, namespace: str, name: str) -> JSON | None: ...

    def create_lease(self, namespace: str, body: JSON) -> JSON: ...

    def replace_lease(self, namespace: str, name: str, body: JSON) -> JSON: ...


class Cache(Protocol):
    """The informers' view: every VFPool, VFPoolNodeState, Node and NAD, as last seen (NADs
    and Nodes trimmed to their metadata)."""

    def pools(self) -> list[JSON]: ...

    def states(self) -> list[JSON]: ...

    def nodes(self) -> list[JSON]: ...

    def nads(self) -> list[JSON]: ...


class StatusWriter(Protocol):
    def patch_pool_status(self, name: str, status: JSON) -> JSON: ...

    def create_event(self, namespace: str, body: JSON) -> JSON: ...

    def patch_event(self, namespace: str, name: str, patch: JSON) -> JSON: ...
