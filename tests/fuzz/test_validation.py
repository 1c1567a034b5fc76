"""The admission checks (cnispec.validation) on hostile input: NAD manifests, built-in plugin
configs with any values, pod annotations, and AdmissionReview bodies. Every input gets a
verdict (or, for a file, a code-7 error naming the problem), never a traceback or a hang."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from cnispec.builtin_conf import MODELS
from cnispec.validation import check_manifests
from nad_controller.validate import BadReview, review
from tests.fuzz import strategies as s
from tests.fuzz.conftest import budget
from tests.fuzz.tally import Violation, bounded, case, expect_cni_outcome

CONFIG_CODES = frozenset({7})
KEYS = [
    "mode", "mtu", "mac", "master", "flag", "vlan", "vlanQoS", "vlanProto", "spoofchk",
    "trust", "link_state", "min_tx_rate", "max_tx_rate", "table", "linkInContainer",
    "capabilities", "bcqueuelen", "deviceID",
]  # fmt: skip
IPAM_KEYS = [
    "type", "subnet", "rangeStart", "rangeEnd", "gateway", "ranges", "routes", "addresses",
    "dataDir", "dns",
]  # fmt: skip
addresses = st.one_of(s.ip_like, st.sampled_from(["10.0.0.0/24", "fd00::/64", "10.0.0.1/31"]))
ipam = st.dictionaries(
    st.sampled_from(IPAM_KEYS),
    st.one_of(
        st.sampled_from(["host-local", "static"]),
        addresses,
        st.lists(st.lists(st.fixed_dictionaries({"subnet": addresses}), max_size=2), max_size=2),
        st.lists(st.fixed_dictionaries({"address": addresses}), max_size=2),
        s.json_values,
    ),
    max_size=5,
)
plugin = st.builds(
    lambda kind, keys, ipam: {"type": kind, **keys, **({"ipam": ipam} if ipam else {})},
    st.sampled_from([*MODELS, "plexus-nope", "bridge"]),
    st.dictionaries(st.sampled_from(KEYS), s.json_values, max_size=4),
    st.one_of(st.none(), ipam),
)
configs = st.one_of(
    plugin.map(lambda p: {"cniVersion": "1.0.0", **p}),
    st.lists(plugin, min_size=1, max_size=3).map(lambda ps: {"cniVersion": "1.0.0", "plugins": ps}),
)


def admission(obj: Any, kind: str) -> dict[str, Any]:
    request = {
        "uid": "u",
        "kind": {"group": "", "version": "v1", "kind": kind},
        "operation": "CREATE",
        "namespace": "ns",
        "object": obj,
    }
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


def expect_answer(body: Any) -> None:
    try:
        answer = bounded(lambda: review(json.loads(json.dumps(body)), None))
    except BadReview:
        return
    except Violation:
        raise
    except Exception as exc:
        raise Violation("traceback", repr(exc)) from None
    response = answer["response"]
    assert response["uid"] == "u"
    json.dumps(answer)  # what the server writes must encode
    if not response["allowed"]:
        assert response["status"]["message"]


@budget(ci=150, long=15_000)
@given(text=s.nad_manifests())
def test_manifest_files(text: str) -> None:
    with case("plexusctl validate (YAML manifests)"):
        expect_cni_outcome(lambda: check_manifests(text, "fuzz.yaml"), allowed=CONFIG_CODES)


@budget(ci=200, long=20_000)
@given(config=configs, name=s.network_names, raw=st.booleans(), junk=s.any_text)
def test_built_in_configs_in_admission_reviews(
    config: dict[str, Any], name: str, raw: bool, junk: str
) -> None:
    obj = {
        "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": name},
        "spec": {"config": junk if raw else json.dumps(config)},
    }
    with case("admission review: NAD"):
        expect_answer(admission(obj, "NetworkAttachmentDefinition"))


@budget(ci=150, long=15_000)
@given(networks=s.networks_annotation, default=s.default_network_annotation, body=s.json_values)
def test_pod_annotations_and_odd_bodies_in_admission_reviews(
    networks: str, default: str, body: Any
) -> None:
    annotations = {"k8s.v1.cni.cncf.io/networks": networks}
    annotations["v1.multus-cni.io/default-network"] = default
    pod = {"kind": "Pod", "metadata": {"name": "p", "annotations": annotations}}
    with case("admission review: pod and odd bodies"):
        expect_answer(admission(pod, "Pod"))
        expect_answer(admission(body, "NetworkAttachmentDefinition"))
        expect_answer(body)
