"""plexus-controller's command line: `run` flags, and the webhook's flags (from
nad_controller.webhook when present) optional on `run`, as given on `webhook`."""

from __future__ import annotations

import argparse
import sys
import types
from collections.abc import Iterator

import pytest
import structlog

from nad_controller import cli


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """cli.main configures structlog for the process: put the suite's configuration back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture
def fake_webhook(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[argparse.Namespace]]:
    served: list[argparse.Namespace] = []
    module = types.ModuleType("nad_controller.webhook")

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--tls-cert-file", required=True)
        parser.add_argument("--tls-private-key-file", required=True)
        parser.add_argument("--port", type=int, default=9443)

    def serve(args: argparse.Namespace) -> int:
        served.append(args)
        return 0

    module.add_arguments = add_arguments  # type: ignore[attr-defined]
    module.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nad_controller.webhook", module)
    yield served


def test_run_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "plexus-controller-7d9f-abcde")
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    args = cli.parser().parse_args(["run"])
    assert args.identity == "plexus-controller-7d9f-abcde"
    assert args.namespace == "plexus-system"
    assert args.lease_name == "plexus-controller"
    assert (args.lease_duration, args.renew_deadline, args.retry_period) == (15, 10, 2)


def test_webhook_flags_are_optional_on_run(fake_webhook: list[argparse.Namespace]) -> None:
    assert cli.parser().parse_args(["run"]).tls_cert_file is None
    args = cli.parser().parse_args(
        ["webhook", "--tls-cert-file", "c", "--tls-private-key-file", "k"]
    )
    assert cli.main(["webhook", "--tls-cert-file", "c", "--tls-private-key-file", "k"]) == 0
    assert fake_webhook[0].tls_cert_file == "c" and args.port == 9443
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["webhook"])  # required there


def test_bad_election_timing_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["run", "--kubeconfig", "/nonexistent", "--lease-duration", "5",
                     "--renew-deadline", "6"])  # fmt: skip
    assert code == 2
    assert "retry-period < renew-deadline < lease-duration" in capsys.readouterr().err
