"""plexus-controller's command line: `run` flags, and the webhook's flags (from
nad_controller.webhook when present) optional on `run`, as given on `webhook`."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest
import structlog

from nad_controller import cli, webhook


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """cli.main configures structlog for the process: put the suite's configuration back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[argparse.Namespace]:
    """The real webhook module's flags, with serving replaced by a record of the arguments."""
    calls: list[argparse.Namespace] = []

    def serve(args: argparse.Namespace) -> int:
        calls.append(args)
        return 0

    monkeypatch.setattr(webhook, "serve", serve)
    return calls


def test_run_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "plexus-controller-7d9f-abcde")
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    args = cli.parser().parse_args(["run"])
    assert args.identity == "plexus-controller-7d9f-abcde"
    assert args.namespace == "plexus-system"
    assert args.lease_name == "plexus-controller"
    assert (args.lease_duration, args.renew_deadline, args.retry_period) == (15, 10, 2)


def test_webhook_flags_are_optional_on_run(served: list[argparse.Namespace]) -> None:
    run = cli.parser().parse_args(["run", "--kubeconfig", "kc"])
    assert run.tls_cert_file is None and run.kubeconfig == "kc"  # one --kubeconfig for both
    argv = ["webhook", "--tls-cert-file", "c", "--tls-private-key-file", "k", "--kubeconfig", "kc"]
    assert cli.main(argv) == 0
    assert served[0].tls_cert_file == "c" and served[0].port == webhook.DEFAULT_PORT
    assert served[0].kubeconfig == "kc"


def test_bad_election_timing_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["run", "--kubeconfig", "/nonexistent", "--lease-duration", "5",
                     "--renew-deadline", "6"])  # fmt: skip
    assert code == 2
    assert "retry-period < renew-deadline < lease-duration" in capsys.readouterr().err
