"""Network policy in local mode through containerd's CRI, with the pods' labels from the
runtime (`criSocket`): a NetworkPolicy manifest in the local directory lets `app=web` reach
`app=db` on its port and nothing else; the node (kubelet's probes) still reaches it; removing
the manifest opens the pod again."""

from __future__ import annotations

import time
from collections.abc import Callable

import yaml

from testbed.cri import Pod
from tests.e2e.conftest import CriBed

PORT = 7000
SERVE = f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {PORT}))
s.listen(16)
print("listening", flush=True)
while True:
    conn, _ = s.accept()
    conn.sendall(b"db\\n")
    conn.close()
"""
CONNECT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5) as s:
        print(s.recv(16).decode().strip())
except OSError as exc:
    print(type(exc).__name__)
"""
POLICY = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "db-from-web", "namespace": "default"},
    "spec": {
        "podSelector": {"matchLabels": {"app": "db"}},
        "policyTypes": ["Ingress"],
        "ingress": [
            {
                "from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                "ports": [{"protocol": "TCP", "port": PORT}],
            }
        ],
    },
}


def connect(cri: CriBed, client: Pod | None, address: str) -> str:
    """What a client in `client`'s netns (None: the node, containerd's netns) gets from db."""
    netns = client.netns if client else ""
    out = cri.containerd.in_netns(netns, "python3", "-I", "-c", CONNECT, address, str(PORT))
    return out.stdout.strip()


def eventually(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_policy_selects_pods_by_the_labels_the_runtime_holds(cri: CriBed) -> None:
    (cri.nad_dir / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    cri.start_plexus(criSocket=cri.containerd.socket)
    db = cri.containerd.run_pod("db", labels={"app": "db"})
    web = cri.containerd.run_pod("web", labels={"app": "web"})
    other = cri.containerd.run_pod("other", labels={"app": "other"})
    address = cri.interfaces(db)["eth0"][0].split("/")[0]
    server = cri.containerd.spawn_in_netns(db.netns, "python3", "-I", "-c", SERVE)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        # db's labels come from the runtime once its sandbox is stored (after the ADD): the
        # policy takes hold within moments, and then only web gets in.
        eventually(lambda: connect(cri, other, address) == "TimeoutError", "other still gets in")
        assert connect(cri, web, address) == "db"
        assert connect(cri, None, address) == "db"  # the node: kubelet's health checks
        table = cri.containerd.in_netns(db.netns, "nft", "list", "table", "inet", "plexus_policy")
        assert 'iifname "eth0" jump in_eth0' in table.stdout
        # web and other are selected by no policy: no table in their namespaces
        for pod in (web, other):
            listed = cri.containerd.in_netns(pod.netns, "nft", "list", "tables", check=False)
            assert "plexus_policy" not in listed.stdout
        # The manifest removed: db is open again.
        (cri.nad_dir / "policy.yaml").unlink()
        eventually(lambda: connect(cri, other, address) == "db", "db stays closed")
    finally:
        server.kill()
        server.communicate(timeout=10)  # reaps it and closes its pipes
    for pod in (db, web, other):
        cri.containerd.stop_pod(pod)
        cri.containerd.remove_pod(pod)
    cri.assert_nothing_left()
