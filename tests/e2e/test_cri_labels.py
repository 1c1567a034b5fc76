"""A pod's labels from containerd's CRI (local mode's label source for network policy): what
the runtime answers while the CNI ADD runs inside RunPodSandbox, and once it has returned."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from metaplugin.config import DaemonConfig
from metaplugin.cri_labels import CriLabels
from metaplugin.policy_source import open_policy_source
from testbed.cri import Pod
from testbed.manifests import macvlan, nad
from tests.e2e.conftest import NETWORKS, CriBed

# Records the CNI_CONTAINERID it was given, then holds the ADD until the test releases it.
IDGATE = """#!/usr/bin/python3 -IS
import json, os, subprocess, sys, time
data = sys.stdin.buffer.read()
if os.environ.get("CNI_COMMAND") == "ADD":
    gate = json.loads(data)["gateDir"]
    with open(os.path.join(gate, "reached.tmp"), "w") as f:
        f.write(os.environ["CNI_CONTAINERID"])
    os.rename(os.path.join(gate, "reached.tmp"), os.path.join(gate, "reached"))
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(gate, "release")) and time.monotonic() < deadline:
        time.sleep(0.02)
sys.exit(subprocess.run(["/usr/lib/cni/macvlan"], input=data).returncode)
"""


def _wait_for(path: Path, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return path.read_text()


def test_the_runtime_knows_a_sandboxs_labels_only_once_its_network_setup_returned(
    cri: CriBed,
) -> None:
    gate = cri.root / "gate"
    gate.mkdir()
    plugin = cri.testbin / "idgate"
    plugin.write_text(IDGATE)
    plugin.chmod(0o755)
    gated = nad("gated", macvlan("pxm0", "10.96.0.0/16", cri.ipam, type="idgate"))
    gated["spec"]["config"] = json.dumps(
        {**json.loads(gated["spec"]["config"]), "gateDir": str(gate)}
    )
    (cri.nad_dir / "gated.yaml").write_text(yaml.safe_dump(gated))
    cri.start_plexus()
    labels = CriLabels(cri.containerd.socket)
    # What the policy engine uses: the local source, asking the same runtime.
    config = {"localDir": str(cri.nad_dir), "criSocket": cri.containerd.socket}
    source = open_policy_source(DaemonConfig.model_validate(config), None)
    known = threading.Event()
    source.on_change(known.set)
    made: dict[str, Any] = {}

    def run() -> None:
        try:
            made["pod"] = cri.containerd.run_pod("web", annotations={NETWORKS: "gated"})
        except Exception as exc:  # reported by the assertions below
            made["error"] = exc

    runner = threading.Thread(target=run)
    runner.start()
    try:
        sandbox_id = _wait_for(gate / "reached")
        during = labels.labels(sandbox_id)  # the ADD is held inside RunPodSandbox right now
        listed = [s.id for s in cri.containerd.sandboxes()]
        engine_during = source.pod_labels("default", "web", sandbox_id)
    finally:
        (gate / "release").touch()
        runner.join(120)
    assert "error" not in made, made.get("error")
    pod: Pod = made["pod"]
    assert pod.sandbox_id == sandbox_id
    after = labels.labels(sandbox_id)
    labels.close()

    assert during is None  # containerd 1.6 stores the sandbox after setupPodNetwork returns
    assert sandbox_id not in listed
    assert after == {"app": "plexus-e2e"}
    # the source asked again on its own, and told the engine once it knew
    assert engine_during is None
    assert known.wait(30)
    assert source.pod_labels("default", "web", sandbox_id) == {"app": "plexus-e2e"}
    source.close()

    cri.containerd.stop_pod(pod)
    cri.containerd.remove_pod(pod)
    assert CriLabels(cri.containerd.socket).labels(sandbox_id) is None  # gone: not known
