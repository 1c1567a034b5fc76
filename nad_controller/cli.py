"""`plexus-controller`: the cluster controller.

    plexus-controller run [--kubeconfig F] [--namespace NS] [--identity ID] ...
    plexus-controller webhook --tls-cert-file CERT --tls-private-key-file KEY --port PORT

`run` reconciles VFPool status under a Lease (only the leader writes); given TLS flags it also
serves the admission webhook in the same process. `webhook` serves only the webhook (provided by
`nad_controller.webhook`: `add_arguments(parser)` and `serve(args) -> int`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import socket
import sys
import threading
from types import ModuleType
from typing import Any

import structlog
from prometheus_client import generate_latest

from cnispec import logs
from cnispec.httpserve import MetricsServer
from nad_controller.controller import DEFAULT_NAMESPACE, LEASE_NAME, Controller, Settings
from nad_controller.leader import ElectionTiming
from nad_controller.metrics import ControllerMetrics

log = structlog.get_logger("nad_controller.cli")


def _webhook() -> ModuleType | None:
    """The webhook module if this build has it (another part of the controller provides it)."""
    try:
        return importlib.import_module("nad_controller.webhook")
    except ImportError:
        return None


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="plexus-controller", description=__doc__.split("\n")[0])
    top.add_argument(
        "--log-level",
        default=os.environ.get("PLEXUS_LOG_LEVEL", "info"),
        choices=("debug", "info", "warning", "error"),
    )
    top.add_argument("--log-format", default="json", choices=("json", "console", "auto"))
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="reconcile VFPools under leader election")
    run.add_argument(
        "--kubeconfig",
        default=os.environ.get("KUBECONFIG") or None,
        help="kubeconfig file (default: in-cluster config in a pod)",
    )
    run.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE", DEFAULT_NAMESPACE),
        help="namespace of the Lease (default $POD_NAMESPACE or plexus-system)",
    )
    run.add_argument(
        "--identity",
        default=os.environ.get("POD_NAME") or socket.gethostname(),
        help="this replica's name in the Lease (default $POD_NAME or the hostname)",
    )
    run.add_argument("--lease-name", default=LEASE_NAME)
    run.add_argument(
        "--lease-duration", type=float, default=_env_float("PLEXUS_LEASE_DURATION", 15)
    )
    run.add_argument(
        "--renew-deadline", type=float, default=_env_float("PLEXUS_RENEW_DEADLINE", 10)
    )
    run.add_argument("--retry-period", type=float, default=_env_float("PLEXUS_RETRY_PERIOD", 2))
    run.add_argument(
        "--stale-after",
        type=float,
        default=120.0,
        help="seconds without a node-state update before the node counts as stale",
    )
    run.add_argument(
        "--debounce",
        type=float,
        default=0.1,
        help="seconds to gather a burst of node-state updates (default 0.1)",
    )
    run.add_argument(
        "--metrics-address",
        default=":9466",
        help="[host]:port serving Prometheus metrics at GET /metrics (default :9466, every "
        "address); empty turns it off",
    )
    webhook = _webhook()
    if webhook is not None:
        # The same flags on `run`, where they are optional: given TLS files, `run` also serves
        # the webhook; without them it only reconciles.
        known = len(run._actions)
        webhook.add_arguments(run, kubeconfig=False)
        for action in run._actions[known:]:
            action.required = False
        webhook.add_arguments(sub.add_parser("webhook", help="serve only the admission webhook"))
    return top


def run(args: argparse.Namespace) -> int:
    from nad_controller import k8s

    try:
        timing = ElectionTiming(args.lease_duration, args.renew_deadline, args.retry_period)
        api = k8s.ClusterApi(k8s.connect(args.kubeconfig))
    except (ValueError, k8s.ConfigError) as exc:
        log.error("controller_config_invalid", error=str(exc))
        return 2
    settings = Settings(
        namespace=args.namespace,
        identity=args.identity,
        lease_name=args.lease_name,
        timing=timing,
        stale_after=args.stale_after,
        debounce=args.debounce,
    )
    controller = Controller(api, settings)
    done = threading.Event()

    def shutdown(signum: int, _: Any) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    # The metrics port first: a bad or taken address fails before the replica campaigns, and a
    # scraper finds the port as soon as the replica can lead.
    if not _serve_metrics(args.metrics_address, controller.metrics):
        return 2
    controller.start()
    _maybe_serve_webhook(args, controller.metrics)
    done.wait()
    controller.stop(release=True)
    return 0


def _serve_metrics(address: str, metrics: ControllerMetrics) -> bool:
    """Serve /metrics on threads of its own, with plexusd's connection cap; False if it
    cannot."""
    if not address:
        return True
    try:
        server = MetricsServer(address, lambda: generate_latest(metrics.registry))
    except ValueError as exc:
        log.error("controller_config_invalid", error=f"--metrics-address: {exc}")
        return False
    except OSError as exc:
        log.error("metrics_not_served", address=address, error=str(exc))
        return False
    server.start()
    return True


def _maybe_serve_webhook(args: argparse.Namespace, metrics: ControllerMetrics) -> None:
    webhook = _webhook()
    if webhook is None or not getattr(args, "tls_cert_file", None):
        return
    threading.Thread(
        target=webhook.serve, args=(args, metrics), name="webhook", daemon=True
    ).start()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    identity = getattr(args, "identity", None) or socket.gethostname()
    logs.configure(
        args.log_level,
        args.log_format,
        cache=False,
        component="plexus-controller",
        identity=identity,
    )
    if args.command == "run":
        return run(args)
    webhook = _webhook()
    if webhook is None:  # pragma: no cover - the parser offers "webhook" only when it exists
        return 2
    return int(webhook.serve(args))


if __name__ == "__main__":
    sys.exit(main())
