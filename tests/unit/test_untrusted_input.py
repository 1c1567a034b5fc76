"""Input the daemon cannot trust (issue 10 item 7): JSON nested too deep, over-long container
IDs, environment values that are not text, NUL bytes. Each gets a CNI error with a documented
code and leaves nothing behind, where each used to get 999 with a Python exception in `msg`."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from cnispec import cni, jsontext
from cnispec.annotations import parse_networks
from cnispec.errors import DecodeFailure, InvalidConfig, InvalidEnvironment
from cnispec.nad import network_config, parse_manifests
from metaplugin.scheduler import Scheduler
from metaplugin.server import Api
from tests.support.world import World, nad_manifest, simple_net

NETNS = "/proc/self/ns/net"
CONF: dict[str, Any] = {"cniVersion": "1.0.0", "name": "plexus", "type": "plexus"}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def env(**over: str) -> dict[str, str]:
    base = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": NETNS,
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p",
        "CNI_PATH": "/fake",
    }
    return {**base, **over}


# --- the bounded JSON decoder ------------------------------------------------------------------


def test_json_as_deep_as_the_bound_decodes_and_one_more_level_is_refused() -> None:
    assert jsontext.loads(nested(jsontext.MAX_DEPTH)) is not None
    obj = '{"a":' * jsontext.MAX_DEPTH + "1" + "}" * jsontext.MAX_DEPTH
    assert jsontext.loads(obj)["a"]["a"]
    for text in (nested(jsontext.MAX_DEPTH + 1), '{"a":' + nested(jsontext.MAX_DEPTH) + "}"):
        with pytest.raises(jsontext.JsonRefused, match=f"deeper than {jsontext.MAX_DEPTH}"):
            jsontext.loads(text)


def test_json_nested_past_the_interpreters_recursion_limit_is_refused_not_a_crash() -> None:
    for depth in (1_000, 3_000, 100_000):
        with pytest.raises(jsontext.JsonRefused, match="deeper than"):
            jsontext.loads(nested(depth))
        with pytest.raises(jsontext.JsonRefused):
            jsontext.loads(nested(depth).encode())


def test_brackets_inside_strings_are_not_nesting() -> None:
    assert jsontext.loads(json.dumps({"a": "[" * 5000})) == {"a": "[" * 5000}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"name": "\\ud800"}', "surrogate"),
        ('{"\\udcff": 1}', "surrogate"),
        ('{"mtu": NaN}', "NaN"),
        ("[Infinity]", "Infinity"),
        ("[-Infinity]", "Infinity"),
    ],
)
def test_json_that_python_reads_but_is_not_text_or_not_json_is_refused(
    text: str, problem: str
) -> None:
    with pytest.raises(jsontext.JsonRefused, match=problem):
        jsontext.loads(text)


def test_refusals_are_value_errors_so_existing_handlers_catch_them() -> None:
    assert issubclass(jsontext.JsonRefused, ValueError)


# --- parse_request: the config on stdin -------------------------------------------------------


def test_config_nested_too_deep_is_a_decode_failure() -> None:
    deep = json.dumps(CONF)[:-1] + ', "x": ' + nested(3000) + "}"
    with pytest.raises(DecodeFailure, match="nested deeper than") as err:
        cni.parse_request(env(), deep, check_netns=False)
    assert err.value.code == 6


def test_prev_result_nested_too_deep_is_a_decode_failure() -> None:
    conf = {**CONF, "prevResult": {"interfaces": [{"name": "eth0"}]}}
    deep = json.dumps(conf).replace('"eth0"', nested(500))
    with pytest.raises(DecodeFailure, match="nested deeper than"):
        cni.parse_request(env(CNI_COMMAND="DEL"), deep, check_netns=False)


def test_config_with_a_lone_surrogate_is_a_decode_failure() -> None:
    conf = json.dumps({**CONF, "name": "\ud800"})
    assert "\\ud800" in conf
    with pytest.raises(DecodeFailure, match="surrogate"):
        cni.parse_request(env(), conf, check_netns=False)


# --- parse_request: the environment -----------------------------------------------------------


@pytest.mark.parametrize(
    "over",
    [
        {"CNI_IFNAME": "eth\udcff"},  # what the Python shim forwards for an invalid byte
        {"CNI_IFNAME": "eth\ufffd"},  # what a replacing decoder leaves of it
        {"CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p\udcff"},
        {"CNI_NETNS": NETNS + "\udcff"},
        {"CNI_PATH": "/fake:/opt/\udc80"},
        {"CNI_CONTAINERID": "c1\udcff"},
    ],
)
@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK"])
def test_environment_values_that_are_not_utf8_text_are_code_4(
    command: str, over: dict[str, str]
) -> None:
    with pytest.raises(InvalidEnvironment, match="not valid UTF-8") as err:
        cni.parse_request(env(CNI_COMMAND=command, **over), json.dumps(CONF))
    assert err.value.code == 4
    json.dumps(err.value.to_dict()).encode()  # the message itself is sendable


@pytest.mark.parametrize(
    "over",
    [
        {"CNI_NETNS": NETNS + "\x00x"},
        {"CNI_ARGS": "K8S_POD_NAME=p\x00"},
        {"CNI_IFNAME": "e\x00"},
        {"CNI_PATH": "/fake\x00"},
    ],
)
def test_a_nul_in_an_environment_value_is_code_4(over: dict[str, str]) -> None:
    with pytest.raises(InvalidEnvironment, match="NUL") as err:
        cni.parse_request(env(**over), json.dumps(CONF))
    assert err.value.code == 4


def test_a_container_id_with_a_trailing_newline_is_refused() -> None:
    # `$` also matches before a final newline: the ID "c1\n" used to name a record directory.
    with pytest.raises(InvalidEnvironment, match="CNI_CONTAINERID"):
        cni.parse_request(env(CNI_CONTAINERID="c1\n"), json.dumps(CONF))
    assert not cni.valid_network_name("net\n")


@pytest.mark.parametrize("ifname", [".0", ".hidden", "e\x00"])
def test_an_interface_name_with_a_leading_dot_or_a_nul_is_refused(ifname: str) -> None:
    # The store names the record after the interface: ".0@<digest>.record" was skipped as a
    # temp file, so DEL found nothing and the attachment leaked.
    assert not cni.valid_ifname(ifname)
    with pytest.raises(InvalidEnvironment, match="CNI_IFNAME"):
        cni.parse_request(env(CNI_IFNAME=ifname), json.dumps(CONF), check_netns=False)
    with pytest.raises(InvalidConfig, match="interface"):
        parse_networks(json.dumps([{"name": "net-a", "interface": ifname}]))


@pytest.mark.parametrize("command", ["ADD", "CHECK"])
def test_add_and_check_refuse_an_over_long_container_id(command: str) -> None:
    long_id = "a" * (cni.MAX_CONTAINER_ID + 1)
    with pytest.raises(InvalidEnvironment, match=f"at most {cni.MAX_CONTAINER_ID}") as err:
        cni.parse_request(env(CNI_COMMAND=command, CNI_CONTAINERID=long_id), json.dumps(CONF))
    assert err.value.code == 4


def test_del_of_an_over_long_container_id_is_accepted() -> None:
    long_id = "a" * 300
    req = cni.parse_request(env(CNI_COMMAND="DEL", CNI_CONTAINERID=long_id), json.dumps(CONF))
    assert req.container_id == long_id


def test_an_environment_value_that_is_not_a_string_is_code_4() -> None:
    with pytest.raises(InvalidEnvironment):
        cni.parse_request({**env(), "CNI_IFNAME": 5}, json.dumps(CONF))  # type: ignore[dict-item]


# --- the networks annotation ------------------------------------------------------------------


@pytest.mark.parametrize("value", ["[" * 3000, nested(3000), '[{"name": "a", "x.y": ' + nested(80)])
def test_a_networks_annotation_nested_too_deep_is_invalid_config(value: str) -> None:
    with pytest.raises(InvalidConfig, match=r"nested deeper than|not valid JSON") as err:
        parse_networks(value)
    assert err.value.code == 7


def test_a_deep_but_complete_annotation_names_the_bound() -> None:
    with pytest.raises(InvalidConfig, match=f"deeper than {jsontext.MAX_DEPTH}"):
        parse_networks('[{"name": "a", "x.y": ' + nested(80) + "}]")


# --- through the daemon's request handler -----------------------------------------------------


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    w.add_nads(nad_manifest("net-a", simple_net("net-a")))
    return w


@pytest.fixture
def api(world: World) -> Api:
    return Api(
        handle=world.orchestrator.handle,
        orchestrator=world.orchestrator,
        scheduler=Scheduler(max_concurrent=2, max_queue=2),
        store=world.store,
        ready=lambda: True,
    )


def call(api: Api, config: dict[str, Any] | str = CONF, **over: str) -> tuple[int, dict[str, Any]]:
    stdin = config if isinstance(config, str) else json.dumps(config)
    status, body = api.cni(json.dumps({"env": env(**over), "config": stdin}).encode())
    return status, json.loads(body) if body else {}


def records(world: World) -> list[str]:
    root = world.state / "attachments"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def assert_refused(reply: tuple[int, dict[str, Any]], code: int, world: World) -> str:
    status, body = reply
    assert (status, body.get("code")) == (400, code), body
    assert "internal error" not in body["msg"]
    assert records(world) == [], "a refused request left a record (directory)"
    assert world.exec.live() == {}, "a refused request left a delegate's attachment"
    return str(body["msg"])


def test_daemon_answers_code_6_for_a_deep_config(api: Api, world: World) -> None:
    msg = assert_refused(call(api, '{"cniVersion": "1.0.0", "a": ' + nested(3000) + "}"), 6, world)
    assert "nested deeper than" in msg


def test_daemon_answers_code_7_for_a_deep_networks_annotation(api: Api, world: World) -> None:
    annotations = {"k8s.v1.cni.cncf.io/networks": "[" * 3000}
    conf = {**CONF, "runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations}}
    assert_refused(call(api, conf), 7, world)


def test_daemon_answers_code_6_for_a_deep_envelope(api: Api, world: World) -> None:
    body = b'{"env": {}, "config": "", "x": ' + nested(3000).encode() + b"}"
    status, reply = api.cni(body)
    assert (status, json.loads(reply)["code"]) == (400, 6)


@pytest.mark.parametrize(
    "over",
    [
        {"CNI_IFNAME": "eth\udcff"},
        {"CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p\udcff"},
        {"CNI_NETNS": NETNS + "\x00"},
    ],
)
def test_daemon_answers_code_4_for_environment_junk_and_leaves_no_record_dir(
    api: Api, world: World, over: dict[str, str]
) -> None:
    assert_refused(call(api, **over), 4, world)


def test_over_long_container_id_add_is_refused_and_its_del_is_a_no_op(
    api: Api, world: World
) -> None:
    long_id = "a" * 300
    assert_refused(call(api, CNI_CONTAINERID=long_id), 4, world)
    assert call(api, CNI_COMMAND="DEL", CNI_CONTAINERID=long_id) == (200, {})
    assert records(world) == []


@pytest.mark.parametrize(
    ("over", "annotation"),
    [({"CNI_IFNAME": ".0"}, None), ({}, '[{"name": "net-a", "interface": ".1"}]')],
)
def test_an_interface_the_store_would_hide_is_refused_before_anything_runs(
    api: Api, world: World, over: dict[str, str], annotation: str | None
) -> None:
    conf = dict(CONF)
    if annotation:
        annotations = {"k8s.v1.cni.cncf.io/networks": annotation}
        conf["runtimeConfig"] = {"io.kubernetes.cri.pod-annotations": annotations}
    assert_refused(call(api, conf, **over), 7 if annotation else 4, world)


def test_a_container_id_at_the_limit_adds_and_deletes(api: Api, world: World) -> None:
    cid = "b" * cni.MAX_CONTAINER_ID
    status, body = call(api, CNI_CONTAINERID=cid)
    assert status == 200, body
    assert records(world)[0] == cid
    assert call(api, CNI_COMMAND="DEL", CNI_CONTAINERID=cid) == (200, {})
    assert records(world) == []


# --- NAD manifests (the local NAD directory, plexusctl validate) ------------------------------

NAD_HEAD = "apiVersion: k8s.cni.cncf.io/v1\nkind: NetworkAttachmentDefinition\n"


@pytest.mark.parametrize(
    "text",
    [
        "[" * 3000 + "]" * 3000,
        "- " * 1000 + "x\n",
        NAD_HEAD + "metadata: just-a-string\n",
        NAD_HEAD + "metadata: {name: n}\nspec: [config]\n",
        NAD_HEAD + "metadata: {name: n, annotations: [a, b]}\n",
        NAD_HEAD + "metadata: {name: n, namespace: 5}\n",
        # annotation values are strings in Kubernetes; str() of this one is ~5 GB
        NAD_HEAD
        + "x:\n  - &a0 [x, x, x, x, x, x, x, x, x, x]\n"
        + "".join(f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9))
        + "metadata: {name: n, annotations: {k: *a8}}\n",
    ],
)
def test_nad_manifests_that_are_not_nads_are_invalid_config(text: str) -> None:
    with pytest.raises(InvalidConfig) as err:
        parse_manifests(text, "nads.yaml")
    assert err.value.code == 7


def test_a_nad_config_nested_too_deep_is_invalid_config() -> None:
    (nad,) = parse_manifests(
        NAD_HEAD + f"metadata: {{name: n}}\nspec: {{config: '{{\"a\": {nested(3000)}}}'}}\n", "f"
    )
    with pytest.raises(InvalidConfig, match="nested deeper than"):
        network_config(nad, "/nonexistent")


# --- GC and STATUS carry no container ---------------------------------------------------------


@pytest.mark.parametrize("command", ["GC", "STATUS"])
def test_gc_and_status_ignore_the_container_variables(command: str) -> None:
    req = cni.parse_request(
        env(CNI_COMMAND=command), json.dumps({**CONF, "cniVersion": "1.1.0"}), check_netns=False
    )
    assert (req.container_id, req.netns, req.ifname) == ("", "", "")


def test_a_gc_that_names_a_container_does_not_wedge_the_daemon(world: World) -> None:
    # The fuzz tier's finding: the request took its container's (shared) hold on the gate, and
    # GC then waited for the exclusive hold behind itself; every later ADD and DEL queued
    # behind that wait, for good. Api and GC share one Scheduler, as in plexusd.
    api = Api(
        handle=lambda req: world.collector.gc(req) if req.command == "GC" else None,
        orchestrator=world.orchestrator,
        scheduler=world.scheduler,
        store=world.store,
        ready=lambda: True,
    )
    conf = {**CONF, "cniVersion": "1.1.0", cni.VALID_ATTACHMENTS_KEY: []}
    answers: list[tuple[int, dict[str, Any]]] = []
    worker = threading.Thread(
        target=lambda: answers.append(call(api, conf, CNI_COMMAND="GC")), daemon=True
    )
    worker.start()
    worker.join(20)  # a bound on a deadlock, not a timing: GC answers in milliseconds
    assert not worker.is_alive(), "GC deadlocked on its own container hold"
    assert answers == [(200, {})]
