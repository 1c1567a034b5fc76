"""ADD, DEL, CHECK and STATUS for one pod, as named steps (GC lives in `metaplugin.gc`).

ADD: find the pod's requests → plan the attachments → give each that needs one its device →
prepare each (binary, version, exact config) and record them durably → attach each → run the
pod-wide steps (`metaplugin.podwide`) → publish network-status → answer with the cluster
network's result in the caller's version. Every step that changes something registers its undo
on one stack the moment it succeeds; a failure anywhere runs them all, newest first (a failed
attachment is DEL'd too, its delegates may have half-made it). DEL replays what ADD recorded,
in reverse, and needs neither the API, the netns nor prevResult. A DEL that fails keeps the
record for the retry, until no retry will come (the runtime's last DEL, GC of a container the
runtime no longer knows, a spooled DEL out of retries): then the attachment is given up, what
Plexus can release itself is released, and the record goes to quarantine (`_abandon`). The
daemon serialises calls per container, so nothing here locks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Final, Protocol

import structlog

from cnispec import cni
from cnispec.cni import CniRequest, Result
from cnispec.errors import (
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
from cnispec.identity import Holder, PodInfo
from cnispec.netconf import NetworkConfigList, has_plugin_key, with_plugin_key
from delegates import podlinks
from delegates.chain import CallEnv, ChainRunner
from kernel.netns import existing_interfaces
from metaplugin.config import DaemonConfig
from metaplugin.podwide import DefaultRoute, PodStep
from metaplugin.resolve import PlannedAttachment, Resolver
from metaplugin.salvage import Salvage
from metaplugin.status import StatusSink, added_interface_message, network_status
from metaplugin.store import Attachment, AttachmentKey, AttachmentStore, ContainerRecords
from sriov.devices import DeviceRequest, DeviceSource

POD_ANNOTATIONS_KEY: Final = "io.kubernetes.cri.pod-annotations"
READINESS_WAIT: Final = 10.0

log = structlog.get_logger(__name__)


class PodSource(Protocol):
    """Cluster mode: a pod's identity and annotations from the API (watch-fed cache)."""

    def get(self, namespace: str, name: str, uid: str) -> PodInfo | None: ...


class PolicyHook(Protocol):
    """The policy engine (metaplugin.policy_engine): told of each pod that got its interfaces
    and of each that lost them."""

    def pod_added(self, netns: str, added: list[Attachment]) -> None:
        """Apply the new pod's rules; raising fails (and rolls back) the ADD."""
        ...

    def pod_removed(self, netns: str) -> None: ...


class _Undo:
    """ADD's one undo stack. Each undo is registered right after the step it undoes succeeded
    (an attachment's before it runs: a failed delegate may have half-made it); on failure they
    all run, newest first, and the ones that fail are collected for the error."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self.failures: list[str] = []
        self.culprit: Attachment | None = None  # the attachment being made, if any
        self.kept: set[AttachmentKey] = set()  # records whose rollback DEL failed

    def push(self, failed: str, fn: Callable[..., Any], *args: Any) -> None:
        """`failed`: how the error says this undo failed ("rollback DEL failed for ...")."""
        self._stack.callback(self._run, failed, fn, *args)

    def _run(self, failed: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported in the error, the rollback goes on
            self.failures.append(f"{failed}: {_msg(exc)}")

    def commit(self) -> None:
        self._stack.pop_all()

    def rollback(self) -> None:
        self._stack.close()


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
        pod_steps: tuple[PodStep, ...] = (DefaultRoute(),),
        reap_links: Callable[[str], None] = podlinks.reap,
        salvage: Salvage | None = None,
        policy: PolicyHook | None = None,
        pods_changed: Callable[[], None] | None = None,
    ) -> None:
        self._cfg = config
        self._resolver = resolver
        self._store = store
        self._runner = runner
        self._sink = sink
        self._pods = pods
        self._devices = devices
        self._existing = existing
        self._pod_steps = pod_steps
        self._reap_links = reap_links
        self._policy = policy
        # Told (never blocking) after a pod got or lost its interfaces: multicast membership.
        self._pods_changed = pods_changed or (lambda: None)
        self._salvage = salvage or Salvage(
            host_local_data_dir=config.host_local_data_dir, paths=config.ipam_paths()
        )

    def handle(self, req: CniRequest) -> dict[str, Any] | None:
        """ADD, DEL, CHECK, STATUS (GC is `metaplugin.gc`; the shim answers VERSION itself)."""
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
        try:
            return self._add(req, pod, runtime_config)
        except PlexusError as exc:
            # NetworkNotFound has its own Event (NoNetworkFound), sent where it is raised.
            if pod is not None and not isinstance(exc, NetworkNotFound):
                self._sink.add_failed(pod, exc)
            raise

    def _add(
        self, req: CniRequest, pod: PodInfo | None, runtime_config: Mapping[str, Any]
    ) -> dict[str, Any]:
        self._wait_ready()
        plan = self._plan(req, pod, runtime_config)
        self._refuse_leftovers(req)
        self._refuse_foreign_interfaces(req, plan)
        undo = _Undo()
        try:
            plan = self._assign_devices(req, pod, plan, undo)
            planned = self._record_plan(req, pod, plan, undo)
            added = [self._attach(att, req.netns, undo) for att in planned]
            added = self._finish_pod(req.netns, added, undo)
            self._protect(req.netns, added, undo)
        except Exception as exc:  # noqa: BLE001 - everything is undone, then re-raised
            undo.rollback()
            raise _add_error(undo.culprit, exc, undo.failures) from None
        undo.commit()
        self._pods_changed()
        if pod is not None:
            self._publish(pod, added)
        primary = added[0].result
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

    def _assign_devices(
        self, req: CniRequest, pod: PodInfo | None, plan: list[PlannedAttachment], undo: _Undo
    ) -> list[PlannedAttachment]:
        """Each attachment of a network with a resourceName gets its device (VF) as `deviceID`
        in every plugin's config and as the deviceID capability, as Multus does."""
        if self._devices is None:
            return plan
        wanting = [
            (i, att)
            for i, att in enumerate(plan)
            if att.resource_name and not has_plugin_key(att.config, "deviceID")
        ]
        if not wanting:
            return plan
        requests = [
            DeviceRequest(
                holder=Holder.of(req.container_id, att.ifname, req.netns, pod, uid=req.pod_uid),
                network=att.network,
                resource=att.resource_name or "",
                plugin_types=NetworkConfigList.parse(att.config).types,
            )
            for _, att in wanting
        ]
        devices = self._devices.assign(pod, requests)
        undo.push(
            "giving back the devices failed", self._devices.release_unattached, req.container_id
        )
        out = list(plan)
        for (i, att), pci in zip(wanting, devices, strict=True):
            out[i] = att.with_config(
                with_plugin_key(att.config, "deviceID", pci),
                capability_args={**att.capability_args, "deviceID": pci},
            )
        return out

    def _record_plan(
        self, req: CniRequest, pod: PodInfo | None, plan: list[PlannedAttachment], undo: _Undo
    ) -> list[Attachment]:
        """Prepare every attachment (a missing plugin fails here, before anything ran) and
        record exactly what will run, durably, before the first delegate starts."""
        cni_args = _delegate_cni_args(req)
        path = self.path(req.path)
        planned = []
        for seq, att in enumerate(plan):
            try:
                prepared = self._runner.prepare(att.config, att.capability_args, path)
            except PlexusError as exc:
                raise exc.prefixed(f"network {att.network} ({att.ifname})") from None
            planned.append(
                Attachment(
                    holder=Holder.of(req.container_id, att.ifname, req.netns, pod, uid=req.pod_uid),
                    network=att.network,
                    seq=seq,
                    is_default=att.is_default,
                    runtime_ifname=req.ifname,
                    cni_args=cni_args,
                    cni_path=path,
                    prepared=prepared,
                    default_route=att.default_route,
                )
            )
        self._store.plan(planned)
        undo.push(
            "forgetting the planned attachments failed",
            lambda: self._store.discard_planned(req.container_id, keep=undo.kept),
        )
        return planned

    def _attach(self, att: Attachment, netns: str, undo: _Undo) -> Attachment:
        """ADD of one attachment; its DEL is on the undo stack before its delegates run."""
        undo.culprit = att
        undo.push(
            f"rollback DEL failed for {att.label}", self._detach_as_recorded, att.key, netns, undo
        )
        result = self._runner.add(att.prepared, self._env(att, netns))
        added = self._store.mark_added(att, result)
        log.info(
            "attachment_added",
            network=att.network,
            attachment=att.ifname,
            ips=[ip.address for ip in result.ips],
        )
        return added

    def _finish_pod(self, netns: str, added: list[Attachment], undo: _Undo) -> list[Attachment]:
        """The pod-wide steps, once every attachment is in place; results they change are
        recorded (DEL, CHECK and network-status read them)."""
        undo.culprit = None  # a step's own error names the attachment it is about
        for step in self._pod_steps:
            applied = step.apply(netns, added)
            undo.push(f"undoing {step.name} failed", applied.undo)
            added = [
                self._store.mark_added(new, new.result or Result()) if new is not old else old
                for old, new in zip(added, applied.attachments, strict=True)
            ]
        return added

    def _protect(self, netns: str, added: list[Attachment], undo: _Undo) -> None:
        """Last step: the pod's network policy in force before the ADD answers, so a pod a
        policy selects never runs unprotected (docs/policy.md)."""
        if self._policy is None:
            return
        undo.push("forgetting the pod's policy failed", self._policy.pod_removed, netns)
        self._policy.pod_added(netns, added)

    def _publish(self, pod: PodInfo, added: list[Attachment]) -> None:
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

    def delete(self, req: CniRequest) -> None:
        """DEL the container's attachments, in the netns the runtime names (or none). The
        runtime's DEL without a netns that exists is its last one (containerd's second DEL
        carries none; a retry finds no more than this one did): an attachment whose DEL still
        fails then is given up (`_abandon`) instead of failing this DEL, and every DEL after."""
        self._delete(req, issued_at=None, last=False)

    def delete_spooled(self, req: CniRequest, spooled_at: float, *, last: bool = False) -> None:
        """A DEL the shim spooled while the daemon was down. It is late: it never touches
        attachments made after it was issued, or for another pod, and without a netns from the
        runtime it uses the recorded one (if that still exists, it is the pod's). `last`: the
        replayer's retries are used up, so what still fails is given up."""
        self._delete(req, issued_at=spooled_at, last=last)

    def _delete(self, req: CniRequest, *, issued_at: float | None, last: bool) -> None:
        """`issued_at` None: the runtime's own DEL; else when the shim spooled it (0: unknown)."""
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
            or (req.pod_uid and first.holder.pod_uid and req.pod_uid != first.holder.pod_uid)
        ):
            log.warning("stale_del_ignored", recorded_at=first.created_at, issued_at=issued_at)
            return
        netns = req.netns or (loaded.netns if issued_at is not None else "")
        why = None
        if last:
            why = "a spooled DEL that failed on every retry"
        elif issued_at is None and not _usable(netns):
            why = "the runtime's last DEL (the pod's netns is gone)"
        self.teardown(loaded, netns, last_chance=why)

    def teardown(
        self, loaded: ContainerRecords, netns: str, *, last_chance: str | None = None
    ) -> None:
        """DEL every recorded attachment in reverse; keep (and report) the ones that fail.
        `last_chance`: why no DEL will come after this one; the ones that fail are then given
        up instead (`_abandon`) and teardown succeeds."""
        # A vanished netns is passed as "": plugins then clean up what lives outside it.
        usable = _usable(netns)
        # Reaping first is only safe when every plugin is a built-in: an exec'd plugin's DEL
        # (tuning, a vendor's) may need to find its interface to clean up after it.
        reap_first = usable and all(r.prepared.builtin_only for r in loaded.records)
        if reap_first:
            self._reap_pod_links(usable)
        failures: list[str] = []
        for record in reversed(loaded.records):
            try:
                self.detach(record, usable)
            except Exception as exc:  # noqa: BLE001 - DEL tries every attachment
                if last_chance is None:
                    failures.append(f"{record.label}: {_msg(exc)}")
                    continue
                try:
                    self._abandon(record, usable, exc, last_chance)
                except Exception as why_not:  # noqa: BLE001 - not set aside: kept, and reported
                    failures.append(
                        f"{record.label}: {_msg(exc)}; giving it up failed: {_msg(why_not)}"
                    )
        if usable and not reap_first and not failures:
            self._reap_pod_links(usable)  # whatever a built-in left behind
        if failures:
            raise TeardownIncomplete(
                f"container {loaded.container_id}: DEL failed for {len(failures)} attachment(s); "
                "they stay recorded and the next DEL or GC retries them: " + "; ".join(failures),
            )
        self._store.remove_container(loaded.container_id)
        if self._policy is not None:
            self._policy.pod_removed(loaded.netns)
        self._pods_changed()
        log.info("attachments_deleted", count=len(loaded.records))

    def detach(self, record: Attachment, netns: str) -> None:
        """DEL of one attachment, replaying its record: with its result as prevResult once ADD
        finished, without before. The record goes when DEL succeeds and stays when it fails,
        so the next DEL or GC retries it."""
        self._runner.delete(record.prepared, self._env(record, netns), record.result)
        self._store.remove(record)

    def _abandon(self, record: Attachment, netns: str, exc: BaseException, why: str) -> None:
        """Give up an attachment whose DEL failed when no DEL will follow (a pod stuck
        Terminating otherwise, and a GC failing for ever). Plexus releases what it can itself
        (`metaplugin.salvage`: host-local leases, the links named in the record), sets the
        record aside in the quarantine dir with why and what was done, and tells the operator:
        a warning in the log and a Warning Event on the pod. What the delegate keeps that Plexus
        cannot see (another IPAM's lease, a vendor's state) is named, not guessed at."""
        error = _msg(exc)
        done = self._salvage.everything(record, netns)
        where = self._store.quarantine(
            record,
            {
                "at": time.time(),
                "container": record.container_id,
                "network": record.network,
                "ifname": record.ifname,
                "why": why,
                "error": error,
                **done.as_dict(),
            },
        )
        log.warning(
            "teardown_abandoned",
            container_id=record.container_id,
            network=record.network,
            ifname=record.ifname,
            why=why,
            error=error,
            **done.as_dict(),
            quarantined=where,
        )
        holder = record.holder
        if holder.pod_name:
            self._event(
                PodInfo(holder.pod_namespace, holder.pod_name, holder.pod_uid),
                f"DEL of {record.label} failed on {why}: {error}. Plexus gave the attachment "
                f"up: it {done.describe()}; the record is kept in {where}",
            )

    def _event(self, pod: PodInfo, message: str) -> None:
        try:
            self._sink.teardown_abandoned(pod, message)
        except Exception:  # an Event is informational: DEL has done its work
            log.exception("teardown_event_not_sent", pod=pod.ref)

    def _detach_as_recorded(self, key: AttachmentKey, netns: str, undo: _Undo) -> None:
        """Rollback's DEL: the record as it is now (planned, or added with its result). When
        its DEL fails, the record stays (`discard_planned` keeps it: the runtime's DEL after the
        failed ADD, or GC, retries the delegate) and the links it names go now, so the pod is
        not left with a half-made interface."""
        record = self._store.get(key)
        if record is None:
            return
        try:
            self.detach(record, netns)
        except Exception as exc:  # noqa: BLE001 - re-raised below, with what was done
            undo.kept.add(key)
            done = self._salvage.links(record, netns)
            log.warning(
                "rollback_del_failed",
                network=record.network,
                ifname=record.ifname,
                error=_msg(exc),
                **done.as_dict(),
            )
            note = f"the record stays for the runtime's DEL; Plexus {done.describe()}"
            if isinstance(exc, PlexusError):
                raise exc.with_msg(f"{exc.msg} ({note})") from None
            raise InternalError(f"{_msg(exc)} ({note})") from None

    def _reap_pod_links(self, netns: str) -> None:
        """Remove every link the built-ins made in the pod in one go (one RCU wait instead of
        one per link); their DELs then find them gone, which DEL takes in its stride."""
        try:
            self._reap_links(netns)
            log.debug("pod_links_reaped", netns=netns)
        except Exception as exc:  # noqa: BLE001 - each delegate's DEL still removes its own
            log.warning("pod_links_not_reaped", error=_msg(exc))

    # --- CHECK --------------------------------------------------------------------------------

    def check(self, req: CniRequest) -> None:
        loaded = self._store.load(req.container_id)
        if not loaded or loaded.runtime_ifname != req.ifname:
            raise UnknownContainer(
                f"no attachments recorded for container {req.container_id} ({req.ifname})",
            )
        for record in loaded.records:
            if record.state != "added" or record.result is None:
                raise InvalidConfig(f"network {record.label}: its ADD never completed")
            try:
                self._runner.check(record.prepared, self._env(record, req.netns), record.result)
            except PlexusError as exc:
                raise exc.prefixed(f"network {record.label}") from None

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
        containers = self._store.of_pod(namespace, name)
        if not containers:
            return None
        return network_status(containers[-1].records, self._device_info)

    # --- helpers ------------------------------------------------------------------------------

    def _device_info(self, pci: str) -> dict[str, str]:
        if self._devices is None:
            return {"pci-address": pci}
        return self._devices.device_info(pci)

    def path(self, request_path: tuple[str, ...]) -> tuple[str, ...]:
        """Where delegates are looked up: cniPath first, then the runtime's CNI_PATH."""
        return tuple(dict.fromkeys([*self._cfg.cni_path, *request_path]))

    def _env(self, record: Attachment, netns: str) -> CallEnv:
        return CallEnv(
            container_id=record.container_id,
            netns=netns,
            ifname=record.ifname,
            cni_args=record.cni_args,
            path=self.path(record.cni_path),
        )


def _usable(netns: str) -> str:
    """`netns` when it is a network namespace now, else "" (gone, or never given)."""
    return netns if netns and cni.is_netns(netns) else ""


def _runtime_config(req: CniRequest) -> dict[str, Any]:
    rc = req.config.get("runtimeConfig")
    return dict(rc) if isinstance(rc, dict) else {}


def _delegate_cni_args(req: CniRequest) -> str:
    # Reference plugins reject unknown CNI_ARGS keys unless IgnoreUnknown is set (Multus does
    # the same); the runtime's own pairs pass through unchanged.
    return cni.format_cni_args({"IgnoreUnknown": "1", **req.args})


def _msg(exc: BaseException) -> str:
    return exc.msg if isinstance(exc, PlexusError) else f"{type(exc).__name__}: {exc}"


def _add_error(
    culprit: Attachment | None, cause: BaseException, rollback_failures: list[str]
) -> PlexusError:
    """Our error for a failed ADD: msg names the attachment being made when it failed, details
    carry the delegate's own error JSON first, then any undo that failed."""
    if isinstance(cause, PlexusError):
        error = cause
    else:
        # A bug, not a refusal: its traceback is logged here, where it is handled, once.
        log.error("add_crashed", exc_info=cause)
        error = InternalError(f"internal error in Plexus: {_msg(cause)}")
    if culprit is not None:
        error = error.prefixed(f"network {culprit.label}")
    if rollback_failures:
        note = "; ".join(rollback_failures)
        details = f"{error.details}; {note}" if error.details else note
        error = error.with_msg(f"{error.msg}; {note}", details)
    return error
