"""Admission decisions: an `admission.k8s.io/v1` AdmissionReview in, its response out.

The checks themselves are `cnispec.validation` (shared with `plexusctl validate`, so both give
the same verdicts); this module reads the review, picks what to check for the operation, and
writes the response the API server expects: the request's uid echoed, `allowed`, a `status`
with code and message when refused, and `warnings`. Pure: API lookups come in as `Lookups`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from cnispec.annotations import DEFAULT_NETWORK_ANNOTATION, NETWORKS_ANNOTATION
from cnispec.validation import Lookups, Verdict, check_object

API_VERSION: Final = "admission.k8s.io/v1"
KIND: Final = "AdmissionReview"
# The API server truncates longer warnings; keep each readable in a terminal.
MAX_WARNING: Final = 250
MAX_WARNINGS: Final = 20


class BadReview(ValueError):
    """The body is not an AdmissionReview this webhook can answer (HTTP 400)."""


def review(body: Any, lookups: Lookups | None) -> dict[str, Any]:
    """The AdmissionReview to answer `body` with."""
    request = _request(body)
    verdict = decide(request, lookups)
    response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
    if verdict is not None:
        response["allowed"] = verdict.allowed
        if not verdict.allowed:
            # 400: the object is invalid (the API server shows "BadRequest" with our message).
            response["status"] = {
                "code": 400,
                "reason": "BadRequest",
                "message": verdict.message(),
            }
        warnings = [_clip(str(w)) for w in verdict.warnings][:MAX_WARNINGS]
        if warnings:
            response["warnings"] = warnings
    return {"apiVersion": API_VERSION, "kind": KIND, "response": response}


def decide(request: Mapping[str, Any], lookups: Lookups | None) -> Verdict | None:
    """The verdict for one request; None when there is nothing to check (a DELETE, a kind
    Plexus does not check, a pod update that leaves its network annotations as they were:
    those are read only when the sandbox is made, so a NAD deleted since must not block it)."""
    operation = request.get("operation")
    obj = request.get("object")
    if operation not in ("CREATE", "UPDATE") or not isinstance(obj, Mapping):
        return None
    kind = _kind(request, obj)
    if kind == "Pod" and operation == "UPDATE" and not _networks_changed(request):
        return None
    namespace = request.get("namespace")
    return check_object(
        {**obj, "kind": kind},
        namespace=namespace if isinstance(namespace, str) else "",
        lookups=lookups,
    )


def _kind(request: Mapping[str, Any], obj: Mapping[str, Any]) -> str:
    kind = request.get("kind")
    if isinstance(kind, Mapping) and isinstance(kind.get("kind"), str):
        return str(kind["kind"])
    return str(obj.get("kind", ""))


def _networks_changed(request: Mapping[str, Any]) -> bool:
    def annotations(obj: Any) -> Mapping[str, Any]:
        meta = obj.get("metadata") if isinstance(obj, Mapping) else None
        found = meta.get("annotations") if isinstance(meta, Mapping) else None
        return found if isinstance(found, Mapping) else {}

    new, old = annotations(request.get("object")), annotations(request.get("oldObject"))
    return any(new.get(k) != old.get(k) for k in (NETWORKS_ANNOTATION, DEFAULT_NETWORK_ANNOTATION))


def _request(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping) or body.get("kind") != KIND:
        raise BadReview(f"expected a {KIND} object")
    if body.get("apiVersion") != API_VERSION:
        raise BadReview(
            f"{KIND} apiVersion {body.get('apiVersion')!r} is not served; list only "
            f"'v1' in the webhook's admissionReviewVersions ({API_VERSION})"
        )
    request = body.get("request")
    if not isinstance(request, Mapping) or not isinstance(request.get("uid"), str):
        raise BadReview(f"{KIND} without request.uid")
    return request


def _clip(text: str) -> str:
    return text if len(text) <= MAX_WARNING else text[: MAX_WARNING - 3] + "..."
