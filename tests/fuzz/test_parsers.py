"""In-process fuzzing of the parsers at Plexus's door: the CNI request (environment + stdin),
the pod annotations, and NAD manifests from the local NAD directory."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from cnispec import cni
from cnispec.annotations import parse_default_network, parse_networks
from cnispec.nad import network_config, parse_manifests
from tests.fuzz import strategies as s
from tests.fuzz.conftest import budget
from tests.fuzz.tally import case, expect_cni_outcome

# What each parser may answer: the spec's codes for a request, 7 for an annotation or a NAD.
REQUEST_CODES = frozenset({1, 4, 6, 7})
CONFIG_CODES = frozenset({7})


@budget(ci=250, long=30_000)
@given(env=s.cni_env(), stdin=s.stdin_texts(), check_netns=st.booleans())
def test_parse_request(env: dict[str, str], stdin: str, check_netns: bool) -> None:
    with case("parse_request (env + stdin)"):
        req = expect_cni_outcome(
            lambda: cni.parse_request(env, stdin, check_netns=check_netns), allowed=REQUEST_CODES
        )
        if req is not None and req.command in (cni.ADD, cni.CHECK, cni.DEL):
            # what parse_request lets through can be recorded: it must encode
            assert req.container_id and req.ifname
            for value in req.env().values():
                value.encode()


@budget(ci=250, long=20_000)
@given(networks=s.networks_annotation, default=s.default_network_annotation)
def test_pod_annotations(networks: str, default: str) -> None:
    with case("pod annotations (both forms)"):
        expect_cni_outcome(lambda: parse_networks(networks), allowed=CONFIG_CODES)
        expect_cni_outcome(lambda: parse_default_network(default), allowed=CONFIG_CODES)


@budget(ci=150, long=15_000)
@given(text=s.nad_manifests())
def test_nad_manifests(text: str) -> None:
    conf_dir = str(Path("/nonexistent/plexus-fuzz/net.d"))
    with case("NAD manifests (YAML)"):
        nads = expect_cni_outcome(lambda: parse_manifests(text, "fuzz.yaml"), allowed=CONFIG_CODES)
        for nad in nads or []:
            expect_cni_outcome(lambda nad=nad: network_config(nad, conf_dir), allowed=CONFIG_CODES)
