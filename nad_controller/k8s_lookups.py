"""The admission webhook's few API calls, behind `cnispec.validation.Lookups`: list VFPools,
get a NAD, get a Namespace's labels; and patching the CA bundle into the
ValidatingWebhookConfiguration when the webhook made its own certificate.

The only webhook module that imports `kubernetes` (the import contract names it). Every call
has a short timeout: the API server waits for the webhook (timeoutSeconds), and the webhook
must answer within that even when the API is slow; a call that fails raises
`LookupUnavailable`, which the checks turn into a warning.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any, Final

import structlog
from kubernetes import client as kclient
from kubernetes import config as kconfig
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from cnispec import nad, vfpool_api
from cnispec.validation import LookupUnavailable

log = structlog.get_logger(__name__)
CALL_TIMEOUT: Final = 3.0  # seconds per API call; the VWC's timeoutSeconds is 10


def connect(kubeconfig: str | None) -> Any | None:
    """An ApiClient from `kubeconfig` (or $KUBECONFIG / ~/.kube/config), else in-cluster;
    None when neither is there (the webhook then checks what needs no API)."""
    configuration = kclient.Configuration()
    try:
        if kubeconfig:
            kconfig.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        else:
            try:
                kconfig.load_incluster_config(client_configuration=configuration)
            except kconfig.ConfigException:
                kconfig.load_kube_config(client_configuration=configuration)
    except (kconfig.ConfigException, OSError, TypeError) as exc:
        if kubeconfig:
            raise
        log.warning("no Kubernetes API configured: reference checks are skipped", error=str(exc))
        return None
    return kclient.ApiClient(configuration)


class ApiLookups:
    def __init__(self, api: Any) -> None:
        self._custom = kclient.CustomObjectsApi(api)
        self._core = kclient.CoreV1Api(api)

    def pool_resource_names(self) -> frozenset[str]:
        body = self._call(
            self._custom.list_cluster_custom_object,
            vfpool_api.GROUP,
            vfpool_api.VERSION,
            vfpool_api.POOL_PLURAL,
        )
        names = set()
        for item in body.get("items") or []:
            spec = item.get("spec") if isinstance(item, Mapping) else None
            if isinstance(spec, Mapping) and isinstance(spec.get("resourceName"), str):
                names.add(spec["resourceName"])
        return frozenset(names)

    def nad_exists(self, namespace: str, name: str) -> bool:
        try:
            self._call(
                self._custom.get_namespaced_custom_object,
                nad.GROUP,
                nad.VERSION,
                namespace,
                nad.PLURAL,
                name,
            )
        except _NotFound:
            return False
        return True

    def namespace_labels(self, namespace: str) -> Mapping[str, str]:
        try:
            found = self._call(self._core.read_namespace, namespace)
        except _NotFound:
            return {}
        labels = found.metadata.labels if found.metadata is not None else None
        return dict(labels or {})

    @staticmethod
    def _call(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args, _request_timeout=CALL_TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                raise _NotFound from None
            raise LookupUnavailable(f"API answered {exc.status} {exc.reason}") from None
        except (HTTPError, OSError) as exc:
            raise LookupUnavailable(f"API unreachable: {exc}") from None


class _NotFound(Exception):
    pass


def patch_ca_bundle(api: Any, name: str, ca_pem: bytes) -> int:
    """Write `ca_pem` into every webhook of the ValidatingWebhookConfiguration `name`; returns
    how many were patched. A strategic merge of the list would need every webhook's name, so
    the object is read and its webhooks written back (with resourceVersion: a concurrent
    change is refused, not overwritten)."""
    admission = kclient.AdmissionregistrationV1Api(api)
    current = admission.read_validating_webhook_configuration(name, _request_timeout=CALL_TIMEOUT)
    bundle = base64.b64encode(ca_pem).decode()
    webhooks = api.sanitize_for_serialization(current.webhooks or [])
    for hook in webhooks:
        hook.setdefault("clientConfig", {})["caBundle"] = bundle
    patch = {
        "metadata": {"resourceVersion": current.metadata and current.metadata.resource_version},
        "webhooks": webhooks,
    }
    admission.patch_validating_webhook_configuration(name, patch, _request_timeout=CALL_TIMEOUT)
    return len(webhooks)
