"""The libcni-equivalent runner: injection, ordering, version negotiation, capability filter."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cnispec.errors import DelegateFailed, IncompatibleVersion, InvalidConfig, PluginNotFound
from cnispec.netconf import NetworkConfigList, PreparedNetwork
from delegates.chain import CallEnv, ChainRunner
from delegates.external import ExecOutput
from delegates.registry import PluginRegistry
from tests.support.fake_exec import FakeExec, FakePlugin

CONFLIST = {
    "cniVersion": "1.1.0",
    "name": "chain",
    "plugins": [
        {"type": "first", "capabilities": {"mac": True}, "keep": {"nested": [1, 2]}},
        {"type": "second", "capabilities": {"portMappings": True}},
    ],
}


def runner(*plugins: FakePlugin) -> tuple[ChainRunner, FakeExec]:
    fake = FakeExec(*plugins)
    return ChainRunner(registry=PluginRegistry(exec_=fake)), fake


ENV = CallEnv(
    container_id="c1",
    netns="/run/netns/p1",
    ifname="net1",
    cni_args="IgnoreUnknown=1;K8S_POD_NAME=p",
    path=("/fake",),
)


def prepared(run: ChainRunner, config: dict, **caps: object) -> PreparedNetwork:
    return run.prepare(config, caps, ("/fake",))


def test_add_runs_in_order_with_prev_result_and_filtered_runtime_config() -> None:
    run, fake = runner(FakePlugin("first"), FakePlugin("second"))
    result = run.add(
        prepared(run, CONFLIST, mac="0a:00:00:00:00:01", portMappings=[{"hostPort": 1}]), ENV
    )
    adds = [c for c in fake.calls if c.command == "ADD"]
    assert [c.plugin for c in adds] == ["first", "second"]
    first, second = (c.config for c in adds)
    assert first["name"] == "chain" and first["cniVersion"] == "1.1.0"
    assert first["runtimeConfig"] == {"mac": "0a:00:00:00:00:01"}
    assert "capabilities" not in first
    assert first["keep"] == {"nested": [1, 2]}  # unknown keys pass through untouched
    assert "prevResult" not in first
    assert second["runtimeConfig"] == {"portMappings": [{"hostPort": 1}]}
    assert second["prevResult"]["ips"][0]["address"] == "10.9.0.2/24"
    assert result.ips[0].address == "10.9.0.2/24"
    env = adds[0].env
    assert env["CNI_CONTAINERID"] == "c1" and env["CNI_IFNAME"] == "net1"
    assert env["CNI_ARGS"] == "IgnoreUnknown=1;K8S_POD_NAME=p"
    assert env["CNI_NETNS"] == "/run/netns/p1" and env["CNI_PATH"] == "/fake"


def test_no_runtime_config_without_declared_capability() -> None:
    run, fake = runner(FakePlugin("first"), FakePlugin("second"))
    run.add(prepared(run, CONFLIST, ips=["10.0.0.1"]), ENV)
    assert all("runtimeConfig" not in c.config for c in fake.calls if c.command == "ADD")


def test_delete_runs_in_reverse_with_the_recorded_result_and_tries_every_plugin() -> None:
    first = FakePlugin("first", fail={"DEL"})
    run, fake = runner(first, FakePlugin("second"))
    prev = run.add(prepared(run, CONFLIST), ENV)
    fake.calls.clear()
    with pytest.raises(DelegateFailed, match="first says no"):
        run.delete(prepared(run, CONFLIST), ENV, prev)
    assert fake.commands("DEL") == [("second", "DEL", "net1"), ("first", "DEL", "net1")]
    assert all(c.config["prevResult"]["ips"] for c in fake.calls if c.command == "DEL")


def test_one_point_oh_plugin_under_one_point_one_network_is_spoken_to_in_1_0_0() -> None:
    old = FakePlugin("first", versions=("0.3.1", "0.4.0", "1.0.0"))
    run, fake = runner(old, FakePlugin("second"))
    result = run.add(prepared(run, CONFLIST), ENV)
    by_plugin = {c.plugin: c.config["cniVersion"] for c in fake.calls if c.command == "ADD"}
    assert by_plugin == {"first": "1.0.0", "second": "1.1.0"}
    assert result.ips  # the 1.0.0 result was read and converted


def test_prev_result_is_rendered_in_each_plugins_version() -> None:
    run, fake = runner(FakePlugin("first"), FakePlugin("second", versions=("0.3.1", "0.4.0")))
    run.add(prepared(run, CONFLIST), ENV)
    second = next(c for c in fake.calls if c.command == "ADD" and c.plugin == "second")
    assert second.config["cniVersion"] == "0.4.0"
    assert second.config["prevResult"]["cniVersion"] == "0.4.0"
    assert second.config["prevResult"]["ips"][0]["version"] == "4"


def test_plugin_with_no_usable_version_is_refused() -> None:
    run, _ = runner(FakePlugin("first", versions=("0.1.0", "0.2.0")), FakePlugin("second"))
    with pytest.raises(IncompatibleVersion, match=r"plugin first speaks 0\.1\.0, 0\.2\.0"):
        run.add(prepared(run, CONFLIST), ENV)


class LegacyPlugin(FakePlugin):
    """A reference plugin of old: spoken to in 0.1.0/0.2.0 it answers with an `ip4` block."""

    def respond(self, command: str, env: Any, config: dict[str, Any]) -> ExecOutput:
        out = super().respond(command, env, config)
        if command != "ADD" or config.get("cniVersion") not in ("0.1.0", "0.2.0"):
            return out
        if "prevResult" in config:  # chained: passes the 0.2.0 result on, as it got it
            return ExecOutput(0, json.dumps(config["prevResult"]).encode(), b"")
        new = json.loads(out.stdout)
        ip = new["ips"][0]
        block = {"ip": ip["address"], "gateway": ip["gateway"], "routes": new["routes"]}
        legacy = {"cniVersion": config["cniVersion"], "ip4": block, "dns": {}}
        return ExecOutput(0, json.dumps(legacy).encode(), b"")


ALL_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0")  # Debian's macvlan


def test_a_0_2_0_network_is_run_in_0_2_0_and_its_result_read_up() -> None:
    run, fake = runner(LegacyPlugin("first", versions=ALL_VERSIONS))
    net = prepared(run, {"cniVersion": "0.2.0", "name": "old", "type": "first"})
    assert [p.version for p in net.plugins] == ["0.2.0"]
    result = run.add(net, ENV)
    (add,) = [c for c in fake.calls if c.command == "ADD"]
    assert add.config["cniVersion"] == "0.2.0"
    assert [(ip.address, ip.interface) for ip in result.ips] == [("10.9.0.2/24", None)]
    assert result.interfaces == []
    fake.calls.clear()
    run.check(net, ENV, result)  # CHECK came with 0.4.0: nothing to ask a 0.2.0 plugin
    run.delete(net, ENV, result)
    (delete,) = fake.calls
    assert delete.command == "DEL" and "prevResult" not in delete.config  # came with 0.4.0
    assert fake.live() == {}


def test_a_0_2_0_conflist_passes_prev_result_in_0_2_0() -> None:
    run, fake = runner(
        LegacyPlugin("first", versions=ALL_VERSIONS),
        LegacyPlugin("second", versions=("0.1.0", "0.2.0")),
    )
    conf = {
        "cniVersion": "0.2.0",
        "name": "old",
        "plugins": [{"type": "first"}, {"type": "second"}],
    }
    run.add(prepared(run, conf), ENV)
    second = next(c for c in fake.calls if c.command == "ADD" and c.plugin == "second")
    assert second.config["prevResult"]["cniVersion"] == "0.2.0"
    assert second.config["prevResult"]["ip4"]["ip"] == "10.9.0.2/24"


def test_a_0_1_0_network_and_a_plugin_that_only_speaks_0_3_0_and_later() -> None:
    run, _ = runner(LegacyPlugin("first", versions=ALL_VERSIONS), FakePlugin("second"))
    assert (
        prepared(run, {"cniVersion": "0.1.0", "name": "o", "type": "first"}).plugins[0].version
        == "0.1.0"
    )
    with pytest.raises(IncompatibleVersion, match=r"it needs one from 0\.1\.0 to 0\.2\.0"):
        prepared(run, {"cniVersion": "0.2.0", "name": "o", "type": "second"})


def test_a_0_3_0_and_later_network_never_speaks_0_2_0() -> None:
    # Negotiating down across 0.3.0 would lose the interfaces the next plugin and the runtime
    # read; such a plugin is refused as before.
    run, _ = runner(LegacyPlugin("first", versions=("0.1.0", "0.2.0")))
    with pytest.raises(IncompatibleVersion, match=r"it needs one from 0\.3\.0 to 1\.0\.0"):
        prepared(run, {"cniVersion": "1.0.0", "name": "n", "type": "first"})


def test_check_skips_pre_0_4_0_plugins_and_disable_check() -> None:
    run, fake = runner(FakePlugin("first", versions=("0.3.1",)), FakePlugin("second"))
    conf = {**CONFLIST, "cniVersion": "1.0.0"}
    prev = run.add(prepared(run, conf), ENV)
    fake.calls.clear()
    run.check(prepared(run, conf), ENV, prev)
    assert fake.commands("CHECK") == [("second", "CHECK", "net1")]
    fake.calls.clear()
    run.check(prepared(run, {**conf, "disableCheck": True}), ENV, prev)
    assert fake.commands("CHECK") == []


def test_gc_and_status_only_reach_1_1_0_plugins() -> None:
    run, fake = runner(FakePlugin("first", versions=("1.0.0",)), FakePlugin("second"))
    valid = [{"containerID": "c1", "ifname": "net1"}]
    run.gc(run.prepare(CONFLIST, {}, ("/fake",)), valid, ("/fake",))
    run.status(CONFLIST, ("/fake",))
    assert fake.commands() == [("second", "GC", ""), ("second", "STATUS", "")]
    gc = next(c for c in fake.calls if c.command == "GC")
    assert gc.config["cni.dev/valid-attachments"] == valid
    assert gc.config["cni.dev/attachments"] == valid
    assert "CNI_CONTAINERID" not in gc.env


def test_single_plugin_config_is_a_one_element_list() -> None:
    net = NetworkConfigList.parse({"cniVersion": "0.3.1", "name": "n", "type": "first"})
    assert net.version == "0.3.1" and [p["type"] for p in net.plugins] == ["first"]


def test_cni_versions_picks_the_highest_supported() -> None:
    net = NetworkConfigList.parse(
        {"cniVersions": ["0.4.0", "1.1.0", "9.9.9"], "name": "n", "plugins": [{"type": "x"}]}
    )
    assert net.version == "1.1.0"


def test_a_network_config_without_cni_version_is_0_1_0_as_libcni_reads_it() -> None:
    for config in ({"name": "n", "type": "x"}, {"cniVersion": "", "name": "n", "type": "x"}):
        assert NetworkConfigList.parse(config).version == "0.1.0"


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0"])
def test_a_pre_0_3_0_network_config_is_accepted(version: str) -> None:
    assert NetworkConfigList.parse({"cniVersion": version, "name": "n", "type": "x"}).version == (
        version
    )
    with pytest.raises(IncompatibleVersion, match=r"0\.1\.0, 0\.2\.0, 0\.3\.0"):
        NetworkConfigList.parse({"cniVersion": "0.5.0", "name": "n", "type": "x"})


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"cniVersion": "1.0.0", "type": "x"}, "name"),
        ({"cniVersion": "1.0.0", "name": "bad name", "type": "x"}, "name"),
        ({"cniVersion": 1.0, "name": "n", "type": "x"}, "cniVersion must be a string"),
        ({"cniVersion": "1.0.0", "name": "n"}, "neither 'type' nor 'plugins'"),
        ({"cniVersion": "1.0.0", "name": "n", "plugins": []}, "non-empty"),
        ({"cniVersion": "1.0.0", "name": "n", "plugins": [{"ipam": {}}]}, "no string 'type'"),
    ],
)
def test_bad_network_config(config: dict, fragment: str) -> None:
    with pytest.raises(InvalidConfig, match=fragment):
        NetworkConfigList.parse(config)


def test_unknown_plugin_type_names_the_path() -> None:
    run, _ = runner(FakePlugin("first"))
    with pytest.raises(PluginNotFound):
        run.add(prepared(run, {"cniVersion": "1.0.0", "name": "n", "type": "nope"}), ENV)


def test_delegate_error_json_is_kept_in_details() -> None:
    run, _ = runner(FakePlugin("first", fail={"ADD"}, fail_code=11), FakePlugin("second"))
    with pytest.raises(DelegateFailed) as err:
        run.add(prepared(run, CONFLIST), ENV)
    assert '"code":11' in err.value.details
    assert "first says no" in err.value.msg
