"""ADD, DEL, CHECK and STATUS for one pod, as named steps (GC lives in `metaplugin.gc`).

ADD: find the pod's requests → plan the attachments → prepare each (binary, version, exact
config) → record them durably → attach each, rolling back in reverse on failure → publish
network-status → answer with the cluster network's result in the caller's version. DEL replays
what ADD recorded, in reverse, and needs neither the API, the netns nor prevResult. The daemon
serialises calls per container, so nothing here locks.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Protocol

import structlog

from delegates import _nl, podnet
from delegates.chain import CallEnv, ChainRunner, PreparedNetwork
from delegates.netns import existing_interfaces
from metaplugin import cni
from metaplugin.cni import CniRequest, Result, Route
from metaplugin.config import DaemonConfig
from metaplugin.devices import DeviceSource
from metaplugin.errors import (
    AttachmentConflict,
    InternalError,
    InvalidConfig,
    NetworkNotFound,
    NotReady,
    PlexusError,
    PodNotFound,
    TeardownIncomplete,
    TryAgainLater,
    UnknownContainer,
)
from metaplugin.resolve import PlannedAttachment, PodInfo, Resolver
from metaplugin.status import StatusSink, added_interface_message, network_status
from metaplugin.store import AttachmentRecord, AttachmentStore, ContainerRecords

POD_ANNOTATIONS_KEY: Final = "io.kubernetes.cri.pod-annotations"
READINESS_WAIT: Final = 10.0

log = structlog.get_logger(__name__)


class PodSource(Protocol):
    """Cluster mode: a pod's identity and annotations from the API (watch-fed cache)."""

    def get(self, namespace: str, name: str, uid: str) -> PodInfo | None: ...


class Orchestrator:
    def __init__(
        self,
        *,
        config: DaemonConfig,
        resolver: Resolver,
        store: AttachmentStore,
        runner: ChainRunner,
        sink: StatusSink,
        pods: PodSource | None = None,
        devices: DeviceSource | None = None,
        existing: Callable[[str, list[str]], list[str]] = existing_interfaces,
        move_default_route: Callable[[str, str, list[str]], set[int]] = podnet.move_default_route,
        reap_links: Callable[[str], None] = podnet.delete_pod_links,
    ) -> None:
        self._cfg = config
        self._resolver = resolver
        self._store = store
        self._runner = runner
        self._sink = sink
        self._pods = pods
        self._devices = devices
        self._existing = existing
        self._move_default_route = move_default_route
        self._reap_links = reap_links

    def handle(self, req: CniRequest) -> dict[str, Any] | None:
        if req.command == cni.ADD:
            return self.add(req)
        if req.command == cni.DEL:
            self.delete(req)
        elif req.command == cni.CHECK:
            self.check(req)
        elif req.command == cni.STATUS:
            self.status(req)
        elif req.command == cni.VERSION:
            return cni.version_result(req.cni_version)
        return None

    # --- ADD ----------------------------------------------------------------------------------

    def add(self, req: CniRequest) -> dict[str, Any]:
        runtime_config = _runtime_config(req)
        pod = self._pod(req, runtime_config)
        self._wait_ready()
        plan = self._plan(req, pod, runtime_config)
        self._refuse_leftovers(req)
        self._refuse_foreign_interfaces(req, plan)
        if self._devices is not None:
            plan = self._devices.assign(req, pod, plan)
        try:
            records = self._record_plan(req, pod, plan)
            added = self._attach_all(req, records)
            added = self._apply_default_routes(req, records, added)
        except Exception:
            if self._devices is not None:
                self._devices.release_unattached(req.container_id)
            raise
        if pod is not None:
            self._publish(pod, added)
        primary = added[0].parsed_result()
        assert primary is not None
        return primary.to_wire(req.cni_version)

    def _pod(self, req: CniRequest, runtime_config: Mapping[str, Any]) -> PodInfo | None:
        annotations = runtime_config.get(POD_ANNOTATIONS_KEY)
        if isinstance(annotations, dict):
            return PodInfo(
                namespace=req.pod_namespace or "default",
                name=req.pod_name or req.container_id,
                uid=req.pod_uid,
                annotations={str(k): str(v) for k, v in annotations.items()},
            )
        if not (req.pod_namespace and req.pod_name):
            return None  # not a Kubernetes pod (e.g. `ctr run --cni`): cluster network only
        if self._pods is None:
            # Local mode: requests come only from the runtime, and it sent none.
            return PodInfo(req.pod_namespace, req.pod_name, req.pod_uid)
        pod = self._pods.get(req.pod_namespace, req.pod_name, req.pod_uid)
        if pod is None:
            raise PodNotFound(
                f"pod {req.pod_namespace}/{req.pod_name} (uid {req.pod_uid or '?'}) is not known "
                "to the API server",
            )
        return pod

    def _wait_ready(self) -> None:
        indicator = self._cfg.readiness_indicator_file
        if not indicator:
            return
        deadline = time.monotonic() + READINESS_WAIT
        while not Path(indicator).exists():
            if time.monotonic() > deadline:
                raise TryAgainLater(
                    f"the primary network is not ready: readiness indicator file {indicator} "
                    "does not exist yet",
                )
            time.sleep(0.25)

    def _plan(
        self, req: CniRequest, pod: PodInfo | None, runtime_config: Mapping[str, Any]
    ) -> list[PlannedAttachment]:
        try:
            return self._resolver.plan(ifname=req.ifname, pod=pod, runtime_config=runtime_config)
        except NetworkNotFound as exc:
            if pod is not None:
                self._sink.network_not_found(pod, exc.msg)
            raise

    def _refuse_leftovers(self, req: CniRequest) -> None:
        existing = self._store.load(req.container_id)
        if existing:
            names = ", ".join(f"{r.ifname} ({r.network})" for r in existing.records)
            raise AttachmentConflict(
                f"container {req.container_id} already has attachments {names} from an earlier "
                "ADD; the runtime must DEL it before adding again",
            )

    def _refuse_foreign_interfaces(self, req: CniRequest, plan: list[PlannedAttachment]) -> None:
        # Checked before anything runs: a rollback DEL must never remove an interface that
        # someone else created under a name we planned to use.
        taken = self._existing(req.netns, [att.ifname for att in plan])
        if taken:
            raise InvalidConfig(
                f"interface {', '.join(taken)} already exists in {req.netns}; Plexus will not "
                "take over an interface it did not create",
            )

    def _record_plan(
        self, req: CniRequest, pod: PodInfo | None, plan: list[PlannedAttachment]
    ) -> list[AttachmentRecord]:
        """Prepare every attachment (a missing plugin fails here, before anything ran) and
        record exactly what will run, durably, before the first delegate starts."""
        cni_args = _delegate_cni_args(req)
        path = self.path(req.path)
        records = []
        for index, att in enumerate(plan):
            try:
                prepared = self._runner.prepare(att.config, att.capability_args, path)
            except PlexusError as exc:
                raise type(exc)(
                    f"network {att.network} ({att.ifname}): {exc.msg}", exc.details, code=exc.code
                ) from None
            records.append(
                AttachmentRecord(
                    container_id=req.container_id,
                    index=index,
                    network=att.network,
                    ifname=att.ifname,
                    is_default=att.is_default,
                    runtime_ifname=req.ifname,
                    netns=req.netns,
                    pod_namespace=pod.namespace if pod else "",
                    pod_name=pod.name if pod else "",
                    pod_uid=pod.uid if pod else req.pod_uid,
                    cni_args=cni_args,
                    cni_path=list(path),
                    config=json.dumps(att.config, separators=(",", ":")),
                    prepared=prepared.to_dict(),
                    default_route=list(att.default_route)
                    if att.default_route is not None
                    else None,
                )
            )
        self._store.plan(records)
        return records

    def _attach_all(
        self, req: CniRequest, records: list[AttachmentRecord]
    ) -> list[AttachmentRecord]:
        added: list[AttachmentRecord] = []
        for position, record in enumerate(records):
            try:
                result = self._runner.add(_prepared(record), self._env(record, req.netns))
                added.append(self._store.mark_added(record, result))
            except Exception as exc:  # noqa: BLE001 - every failure rolls back, then re-raises
                raise self._rollback(records, added, position, exc) from None
            log.info(
                "attachment_added",
                network=record.network,
                attachment=record.ifname,
                ips=[ip.address for ip in result.ips],
            )
        return added

    def _apply_default_routes(
        self, req: CniRequest, records: list[AttachmentRecord], added: list[AttachmentRecord]
    ) -> list[AttachmentRecord]:
        """NPWG default-route: the attachment that asks for it carries the pod's default route
        for that family; every other attachment's default route of that family goes, in the
        pod and in the recorded results (which DEL, CHECK and network-status read)."""
        for chosen in [r for r in added if r.default_route is not None]:
            try:
                families = self._move_default_route(
                    req.netns, chosen.ifname, list(chosen.default_route or [])
                )
                added = [self._store.mark_added(r, _rerouted(r, chosen, families)) for r in added]
            except Exception as exc:  # noqa: BLE001 - the whole ADD is undone
                raise self._rollback(records, added, len(records), exc, culprit=chosen) from None
        return added

    def _rollback(
        self,
        records: list[AttachmentRecord],
        added: list[AttachmentRecord],
        failed_at: int,
        cause: Exception,
        *,
        culprit: AttachmentRecord | None = None,
    ) -> PlexusError:
        """Undo an ADD that failed at `failed_at` (len(records): after every delegate ran): DEL
        the failed attachment and every earlier one once, in reverse. The failed attachment's
        record goes either way; an earlier one whose DEL fails stays recorded so a later DEL or
        GC retries it."""
        failures: list[str] = []
        failed = records[failed_at] if failed_at < len(records) else None
        if failed is not None:
            try:
                self._runner.delete(_prepared(failed), self._env(failed, failed.netns), None)
            except Exception as exc:  # noqa: BLE001 - reported in the error, rollback goes on
                failures.append(f"{failed.network} ({failed.ifname}): {_msg(exc)}")
        for record in records[failed_at:]:
            self._store.remove(record)
        for record in reversed(added):
            try:
                self._delete_one(record, record.netns)
            except Exception as exc:  # noqa: BLE001 - reported in the error, rollback goes on
                failures.append(f"{record.network} ({record.ifname}): {_msg(exc)}")
        blamed = failed or culprit or records[-1]
        self._store.remove_container(blamed.container_id)
        return _attachment_error(blamed, cause, failures)

    def _publish(self, pod: PodInfo, added: list[AttachmentRecord]) -> None:
        # network-status is informational (NPWG §5): a failure to publish it must never fail,
        # or half-undo, a pod whose interfaces are all in place.
        try:
            self._sink.attached(
                pod,
                network_status(added, self._device_info),
                [added_interface_message(r) for r in added],
            )
        except Exception:
            log.exception("network_status_not_published")

    # --- DEL ----------------------------------------------------------------------------------

    def delete(
        self, req: CniRequest, *, prefer_recorded_netns: bool = False, issued_at: float = 0.0
    ) -> None:
        """DEL the container's attachments. A late DEL (`issued_at`, from the spool) never
        touches attachments made after it was issued, or for another pod."""
        loaded = self._store.load(req.container_id)
        if loaded.quarantined:
            log.error("attachment_records_quarantined", files=list(loaded.quarantined))
        if not loaded:
            self._store.remove_container(req.container_id)
            return
        if loaded.runtime_ifname != req.ifname:
            log.info("del_for_other_interface", recorded=loaded.runtime_ifname)
            return
        first = loaded.records[0]
        if issued_at and (
            first.created_at > issued_at
            or (req.pod_uid and first.pod_uid and req.pod_uid != first.pod_uid)
        ):
            log.warning("stale_del_ignored", recorded_at=first.created_at, issued_at=issued_at)
            return
        netns = req.netns or (loaded.netns if prefer_recorded_netns else "")
        self.teardown(loaded, netns)

    def teardown(self, loaded: ContainerRecords, netns: str) -> None:
        """DEL every recorded attachment in reverse; keep (and report) the ones that fail."""
        # A vanished netns is passed as "": plugins then clean up what lives outside it.
        usable = netns if netns and cni.is_netns(netns) else ""
        # Reaping first is only safe when every plugin is a built-in: an exec'd plugin's DEL
        # (tuning, a vendor's) may need to find its interface to clean up after it.
        reap_first = usable and all(
            not plugin.path for record in loaded.records for plugin in _prepared(record).plugins
        )
        if reap_first:
            self._reap_pod_links(usable)
        failures: list[str] = []
        for record in reversed(loaded.records):
            try:
                self._delete_one(record, usable)
            except Exception as exc:  # noqa: BLE001 - DEL tries every attachment
                failures.append(f"{record.network} ({record.ifname}): {_msg(exc)}")
        if usable and not reap_first and not failures:
            self._reap_pod_links(usable)  # whatever a built-in left behind
        if failures:
            raise TeardownIncomplete(
                f"container {loaded.container_id}: DEL failed for {len(failures)} attachment(s); "
                "they stay recorded and the next DEL or GC retries them: " + "; ".join(failures),
            )
        self._store.remove_container(loaded.container_id)
        log.info("attachments_deleted", count=len(loaded.records))

    def _reap_pod_links(self, netns: str) -> None:
        """Remove every link the built-ins made in the pod in one go (one RCU wait instead of
        one per link); their DELs then find them gone, which DEL takes in its stride."""
        try:
            self._reap_links(netns)
            log.debug("pod_links_reaped", netns=netns)
        except Exception as exc:  # noqa: BLE001 - each delegate's DEL still removes its own
            log.warning("pod_links_not_reaped", error=_msg(exc))

    def _delete_one(self, record: AttachmentRecord, netns: str) -> None:
        self._runner.delete(_prepared(record), self._env(record, netns), _prev_result(record))
        self._store.remove(record)

    # --- CHECK --------------------------------------------------------------------------------

    def check(self, req: CniRequest) -> None:
        loaded = self._store.load(req.container_id)
        if not loaded or loaded.runtime_ifname != req.ifname:
            raise UnknownContainer(
                f"no attachments recorded for container {req.container_id} ({req.ifname})",
            )
        for record in loaded.records:
            prev = _prev_result(record)
            if record.state != "added" or prev is None:
                raise InvalidConfig(
                    f"network {record.network} ({record.ifname}): its ADD never completed",
                )
            try:
                self._runner.check(_prepared(record), self._env(record, req.netns), prev)
            except PlexusError as exc:
                raise _attachment_error(record, exc, []) from None

    # --- STATUS -------------------------------------------------------------------------------

    def status(self, req: CniRequest) -> None:
        indicator = self._cfg.readiness_indicator_file
        if indicator and not Path(indicator).exists():
            raise NotReady(f"readiness indicator file {indicator} does not exist yet")
        try:
            net = self._resolver.cluster_network()
            self._runner.status(net.config, self.path(req.path))
        except NotReady:
            raise
        except PlexusError as exc:
            if exc.code in (50, 51):
                raise
            raise NotReady(f"cluster network is not usable: {exc.msg}") from None

    # --- queries (plexusctl) ------------------------------------------------------------------

    def pod_network_status(self, namespace: str, name: str) -> list[dict[str, Any]] | None:
        newest: ContainerRecords | None = None
        for loaded in self._store.all():
            first = loaded.records[0]
            if (first.pod_namespace, first.pod_name) != (namespace, name):
                continue
            if newest is None or first.created_at > newest.records[0].created_at:
                newest = loaded
        return network_status(newest.records, self._device_info) if newest else None

    # --- helpers ------------------------------------------------------------------------------

    def _device_info(self, pci: str) -> dict[str, str]:
        if self._devices is None:
            return {"pci-address": pci}
        return self._devices.device_info(pci)

    def path(self, request_path: tuple[str, ...]) -> tuple[str, ...]:
        """Where delegates are looked up: cniPath first, then the runtime's CNI_PATH."""
        return tuple(dict.fromkeys([*self._cfg.cni_path, *request_path]))

    def _env(self, record: AttachmentRecord, netns: str) -> CallEnv:
        return CallEnv(
            container_id=record.container_id,
            netns=netns,
            ifname=record.ifname,
            cni_args=record.cni_args,
            path=self.path(tuple(record.cni_path)),
        )


def _prepared(record: AttachmentRecord) -> PreparedNetwork:
    return PreparedNetwork.from_dict(record.prepared)


def _prev_result(record: AttachmentRecord) -> Result | None:
    """The recorded result, or None when it no longer decodes (DEL then runs without it, as
    the spec allows, rather than never running)."""
    try:
        return record.parsed_result()
    except PlexusError as exc:
        log.error("attachment_result_unreadable", attachment=record.ifname, error=exc.msg)
        return None


def _rerouted(record: AttachmentRecord, chosen: AttachmentRecord, families: set[int]) -> Result:
    """The record's result once `chosen` carries the default route of `families`."""
    result = record.parsed_result() or Result()
    keep = [r for r in result.routes if not (_is_default(r.dst) and _family(r.dst) in families)]
    if record.index == chosen.index:
        keep += [
            Route(dst="0.0.0.0/0" if _nl.family_of(gw) == socket.AF_INET else "::/0", gw=gw)
            for gw in chosen.default_route or []
        ]
        keep += [
            r
            for r in result.routes
            if _is_default(r.dst) and _family(r.dst) in families and not chosen.default_route
        ]
    return result.model_copy(update={"routes": keep})


def _is_default(dst: str) -> bool:
    return ipaddress.ip_network(dst, strict=False).prefixlen == 0


def _family(dst: str) -> int:
    version = ipaddress.ip_network(dst, strict=False).version
    return socket.AF_INET if version == 4 else socket.AF_INET6


def _runtime_config(req: CniRequest) -> dict[str, Any]:
    rc = req.config.get("runtimeConfig")
    return dict(rc) if isinstance(rc, dict) else {}


def _delegate_cni_args(req: CniRequest) -> str:
    # Reference plugins reject unknown CNI_ARGS keys unless IgnoreUnknown is set (Multus does
    # the same); the runtime's own pairs pass through unchanged.
    return cni.format_cni_args({"IgnoreUnknown": "1", **req.args})


def _msg(exc: BaseException) -> str:
    return exc.msg if isinstance(exc, PlexusError) else f"{type(exc).__name__}: {exc}"


def _attachment_error(
    record: AttachmentRecord, cause: BaseException, rollback_failures: list[str]
) -> PlexusError:
    """Our error for a failed attachment: msg names the network, details carry the delegate's
    own error JSON first, then any rollback DEL that failed."""
    if isinstance(cause, PlexusError):
        msg, details, code, cls = cause.msg, cause.details, cause.code, type(cause)
    else:
        msg, details, code, cls = _msg(cause), "", InternalError.cni_code, InternalError
    text = f"network {record.network} ({record.ifname}): {msg}"
    if rollback_failures:
        note = "rollback DEL failed for " + "; ".join(rollback_failures)
        text = f"{text}; {note}"
        details = f"{details}; {note}" if details else note
    return cls(text, details, code=code)
