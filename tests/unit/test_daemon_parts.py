"""Daemon pieces without a kernel: config loading, the error-code documentation, admission
and ordering, the socket server, the store's durability rules, and spool replay."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from cnispec.errors import PLEXUS_CODES, InvalidConfig, TryAgainLater
from metaplugin import config as daemon_config
from metaplugin.client import UnixHTTPConnection, get
from metaplugin.daemon import main as plexusd_main
from metaplugin.scheduler import Scheduler
from metaplugin.server import Api
from metaplugin.spool import SpoolReplayer
from metaplugin.store import StateLock
from metaplugin.transport import SocketServer
from tests.support.world import World, nad_manifest, simple_net

ROOT = Path(__file__).resolve().parents[2]

# --- config ---------------------------------------------------------------------------------


def parse(argv: list[str]) -> daemon_config.DaemonConfig:
    import argparse

    parser = argparse.ArgumentParser()
    daemon_config.add_arguments(parser)
    return daemon_config.from_args(parser.parse_args(argv))


def test_config_file_yaml_or_json_with_flag_overrides(tmp_path: Path) -> None:
    yml = tmp_path / "c.yaml"
    yml.write_text(
        "clusterNetwork: cbr0\nglobalNamespaces: a, b\nnamespaceIsolation: true\n"
        "stateDir: /tmp/x\nmaxQueue: 3\n"
    )
    cfg = parse(["--config", str(yml), "--state-dir", str(tmp_path / "s"), "--max-queue", "5"])
    assert cfg.cluster_network == "cbr0"
    assert cfg.global_namespaces == ["a", "b"]
    assert cfg.namespace_isolation is True
    assert cfg.state_dir == str(tmp_path / "s") and cfg.max_queue == 5
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"cniPath": ["/a", "/b"], "readinessindicatorfile": "/r"}))
    cfg = parse(["--config", str(js), "--no-namespace-isolation", "--cni-path", "/x:/y"])
    assert cfg.cni_path == ["/x", "/y"] and cfg.readiness_indicator_file == "/r"
    assert parse(["--local", "/nads"]).local_dir == "/nads"


def test_defaults_follow_multus() -> None:
    cfg = daemon_config.DaemonConfig()
    assert cfg.namespace_isolation is False
    assert cfg.global_namespaces == []
    assert cfg.multus_namespace == "kube-system"
    assert cfg.system_namespaces == ["kube-system"]
    assert cfg.socket_path == "/run/plexus/plexus.sock"
    assert cfg.spool_path == "/var/lib/plexus/spool"


def test_unknown_or_mistyped_keys_are_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("clusterNetwrok: typo\nmaxQueue: lots\n")
    with pytest.raises(InvalidConfig) as err:
        parse(["--config", str(bad)])
    assert "clusterNetwrok" in err.value.msg and "maxQueue" in err.value.msg


def test_run_dir_is_never_a_shared_directory() -> None:
    with pytest.raises(InvalidConfig, match="runDir /run is shared"):
        parse(["--run-dir", "/run"])


def test_help_documents_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        plexusd_main(["--help"])
    out = capsys.readouterr().out
    for key in (
        "clusterNetwork",
        "defaultNetworks",
        "systemNamespaces",
        "multusNamespace",
        "namespaceIsolation",
        "globalNamespaces",
        "readinessIndicatorFile",
        "kubeconfig",
        "localDir",
        "stateDir",
        "runDir",
        "cniBinDir",
        "cniConfDir",
        "cniPath",
    ):
        assert f"{key}:" in out, key


def test_error_codes_are_documented() -> None:
    doc = (ROOT / "docs" / "errors.md").read_text()
    documented = {int(code) for code, _ in re.findall(r"^\| (1\d\d) \| (\w+) \|", doc, re.M)}
    assert documented == set(PLEXUS_CODES)
    for code, cls in PLEXUS_CODES.items():
        assert f"| {code} | {cls.__name__} |" in doc


# --- scheduler --------------------------------------------------------------------------------


def test_one_operation_per_container_different_containers_in_parallel() -> None:
    sched = Scheduler(max_concurrent=4, max_queue=4)
    active: dict[str, int] = {}
    peak: dict[str, int] = {}
    overall: list[int] = []
    lock = threading.Lock()

    def work(cid: str) -> None:
        with sched.slot(cid):
            with lock:
                active[cid] = active.get(cid, 0) + 1
                peak[cid] = max(peak.get(cid, 0), active[cid])
                overall.append(sum(active.values()))
            time.sleep(0.05)
            with lock:
                active[cid] -= 1

    threads = [threading.Thread(target=work, args=(c,)) for c in ["a", "a", "a", "b", "c"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak == {"a": 1, "b": 1, "c": 1}
    assert max(overall) >= 2  # a, b and c did overlap


def test_a_full_queue_answers_try_again_instead_of_growing() -> None:
    sched = Scheduler(max_concurrent=1, max_queue=1)
    release = threading.Event()
    entered = threading.Event()

    def hold(cid: str) -> None:
        with sched.slot(cid):
            entered.set()
            release.wait(5)

    first = threading.Thread(target=hold, args=("a",))
    first.start()
    entered.wait(5)
    second = threading.Thread(target=hold, args=("b",))  # waits for the worker slot
    second.start()
    deadline = time.monotonic() + 5
    while sched.admitted < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(TryAgainLater) as err, sched.slot("c"):
        pass
    assert err.value.code == 11 and "saturated" in err.value.msg
    release.set()
    first.join()
    second.join()
    with sched.slot("c"):  # room again
        pass


# --- server -----------------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path):
    world = World(tmp_path)
    world.add_nads(nad_manifest("net-a", simple_net("net-a")))
    api = Api(
        handle=world.orchestrator.handle,
        orchestrator=world.orchestrator,
        scheduler=Scheduler(max_concurrent=2, max_queue=2),
        store=world.store,
        ready=lambda: True,
    )
    server = SocketServer(world.config.socket_path, api)
    server.start()
    yield world, world.config.socket_path
    server.stop()


def post(sock: str, body: dict) -> tuple[int, dict | None]:
    conn = UnixHTTPConnection(sock)
    try:
        conn.request(
            "POST",
            "/cni",
            body=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data else None
    finally:
        conn.close()


def test_socket_is_private_and_probes_are_harmless(served) -> None:
    _, sock = served
    path = Path(sock)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    for _ in range(3):  # a probe that connects and hangs up without a request
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock)
        s.close()
    assert get(sock, "/healthz")[0] == 200
    assert get(sock, "/readyz")[0] == 200
    assert b"\nplexus_requests_admitted 0.0\n" in get(sock, "/metrics")[1]


def test_cni_over_the_socket(served) -> None:
    _, sock = served
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": "/proc/self/ns/net",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p",
    }
    conf = {
        "cniVersion": "0.4.0",
        "name": "plexus",
        "type": "plexus",
        "runtimeConfig": {
            "io.kubernetes.cri.pod-annotations": {"k8s.v1.cni.cncf.io/networks": "net-a"}
        },
    }
    status, body = post(sock, {"env": env, "config": json.dumps(conf)})
    assert status == 200 and body is not None and body["cniVersion"] == "0.4.0"
    status, body = post(sock, {"env": {**env, "CNI_IFNAME": "x" * 20}, "config": json.dumps(conf)})
    assert status == 400 and body is not None and body["code"] == 4
    assert body["cniVersion"] == "0.4.0"
    status, body = post(sock, {"nope": 1})
    assert status == 400 and body is not None and body["code"] == 6
    metrics = get(sock, "/metrics")[1].decode()
    assert 'plexus_cni_request_duration_seconds_count{outcome="ok",verb="ADD"} 1.0' in metrics
    assert 'plexus_cni_errors_total{code="4",verb="ADD"} 1.0' in metrics
    assert 'plexus_cni_errors_total{code="6",verb="?"}' not in metrics  # bounded: "other"
    assert 'plexus_cni_errors_total{code="6",verb="other"} 1.0' in metrics
    listed = json.loads(get(sock, "/v1/attachments")[1])
    assert [a["ifname"] for a in listed[0]["attachments"]] == ["eth0", "net1"]


def test_a_second_daemon_on_the_same_socket_is_refused(served, tmp_path: Path) -> None:
    _, sock = served
    with pytest.raises(Exception, match="another daemon"):
        SocketServer(sock, None)  # type: ignore[arg-type]


def test_state_lock_is_exclusive(tmp_path: Path) -> None:
    first = StateLock(tmp_path)
    first.acquire()
    with pytest.raises(TryAgainLater, match="another plexusd"):
        StateLock(tmp_path).acquire()
    first.release()
    StateLock(tmp_path).acquire()


# --- spool ------------------------------------------------------------------------------------


def test_spool_replay_runs_dels_in_order_and_keeps_failures(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.add_nads(nad_manifest("net-a", simple_net("net-a")))
    from tests.unit.test_orchestrator import request

    world.orchestrator.add(request("ADD", "c1", networks="net-a"))
    world.orchestrator.add(request("ADD", "c2"))
    spool = tmp_path / "spool"
    spool.mkdir()
    for i, cid in enumerate(["c1", "c2"]):
        env = {
            "CNI_COMMAND": "DEL",
            "CNI_CONTAINERID": cid,
            "CNI_IFNAME": "eth0",
            "CNI_NETNS": "",
            "CNI_ARGS": "",
        }
        conf = json.dumps({"cniVersion": "1.0.0", "name": "plexus", "type": "plexus"})
        (spool / f"{i}-{cid}-eth0.json").write_text(json.dumps({"env": env, "config": conf}))
    (spool / "2-garbage.json").write_text("{torn")
    world.exec.plugins["cluster"].fail = {"DEL"}  # c2's DEL will fail and must stay spooled
    replayer = SpoolReplayer(
        str(spool),
        orchestrator=world.orchestrator,
        scheduler=Scheduler(max_concurrent=1, max_queue=0),
    )
    assert replayer.replay() == 2  # c1 fails on the cluster network too; c2 fails
    assert world.exec.live().get("macvlan") is None  # c1's net1 went anyway
    world.exec.plugins["cluster"].fail = set()
    assert replayer.replay() == 0
    assert [p.name for p in spool.glob("*.json")] == []
    assert (spool / "bad" / "2-garbage.json").exists()
    assert world.exec.live() == {}
