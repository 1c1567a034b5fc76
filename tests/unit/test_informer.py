"""The list+watch cache both API adaptors use, against the API stand-in: what it holds after a
list and after watch events, when it tells its consumer, and how it recovers from an expired
resourceVersion answered with 410 when the watch starts (the ERROR event in the stream is
covered through the controller: tests/unit/test_controller.py::test_watch_expiry_relists)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from kubernetes import client

from kubeapi.informer import Informer, name_key
from tests.k8s_standin import ApiStandin


def node(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


def wait(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    return value


class Seen:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changes: list[str | None] = []  # object names; None after a (re)list

    def __call__(self, obj: Mapping[str, Any] | None) -> None:
        with self.lock:
            self.changes.append(None if obj is None else name_key(obj))

    def relists(self) -> int:
        with self.lock:
            return self.changes.count(None)


@pytest.fixture
def informer(standin: ApiStandin) -> Iterator[tuple[Informer[str], Seen]]:
    standin.create(node("n1", zone="a"))
    kube = client.ApiClient(client.Configuration(host=standin.url))
    seen = Seen()

    def labels(obj: Mapping[str, Any]) -> str:
        return str(obj["metadata"]["labels"].get("zone", ""))

    made: Informer[str] = Informer(
        "nodes", client.CoreV1Api(kube).list_node, labels, key=name_key, on_change=seen
    )
    made.start()
    try:
        assert made.synced.wait(10)
        yield made, seen
    finally:
        made.stop()
        kube.close()


def test_the_cache_follows_the_list_and_the_watch(
    standin: ApiStandin, informer: tuple[Informer[str], Seen]
) -> None:
    cache, seen = informer
    assert cache.get("n1") == "a"
    wait(lambda: seen.changes == [None])  # told right after `synced` is set, on its thread
    assert standin.wait_for_watches(1)
    standin.create(node("n2", zone="b"))
    assert cache.wait_for("n2", lambda zone: zone == "b", 10) == "b"
    moved = standin.get("Node", None, "n1")
    assert moved is not None
    moved["metadata"]["labels"]["zone"] = "c"
    standin.update(moved)
    assert cache.wait_for("n1", lambda zone: zone == "c", 10) == "c"
    standin.delete("v1", "Node", None, "n2")
    wait(lambda: cache.get("n2") is None)
    assert sorted(cache.values()) == ["c"]
    wait(lambda: seen.changes[1:] == ["n2", "n1", "n2"])  # told after the cache has it


def test_a_410_answer_to_the_watch_itself_lists_again(
    standin: ApiStandin, informer: tuple[Informer[str], Seen]
) -> None:
    cache, seen = informer
    assert standin.wait_for_watches(1)
    standin.fail_next("GET", "/api/v1/nodes", 410)  # the next watch request is refused
    standin.close_watches()
    wait(lambda: seen.relists() == 2)  # not the same dead resourceVersion over and over
    standin.create(node("n4", zone="e"))
    assert cache.wait_for("n4", lambda zone: zone == "e", 10) == "e"
