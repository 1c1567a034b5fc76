"""The Event a given-up DEL leaves on its pod, through the real kubernetes client against the
HTTP stand-in (`metaplugin.k8s.ApiStatusSink.teardown_abandoned`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cnispec.identity import PodInfo
from metaplugin.config import DaemonConfig
from metaplugin.k8s import EVENT_MESSAGE_MAX, Cluster
from tests.k8s_standin import ApiStandin
from tests.unit.test_k8s import NODE, pod


@pytest.fixture
def api_and_cluster(tmp_path: Path) -> Iterator[tuple[ApiStandin, Cluster]]:
    with ApiStandin() as api:
        cfg = DaemonConfig.model_validate(
            {
                "kubeconfig": api.kubeconfig(tmp_path / "kubeconfig"),
                "nodeName": NODE,
                "stateDir": str(tmp_path / "state"),
            }
        )
        cluster = Cluster.connect(cfg)
        assert cluster.synced.wait(5)
        try:
            yield api, cluster
        finally:
            cluster.stop()


def test_a_given_up_del_is_a_warning_event_on_the_pod(
    api_and_cluster: tuple[ApiStandin, Cluster],
) -> None:
    api, cluster = api_and_cluster
    uid = api.create(pod("p1"))["metadata"]["uid"]
    message = "DEL of default/net-a (net1) failed on the runtime's last DEL: no master"
    cluster.sink.teardown_abandoned(PodInfo("default", "p1", uid), message)
    assert cluster.sink.flush()
    (event,) = api.events()
    assert (event["type"], event["reason"]) == ("Warning", "TeardownAbandoned")
    assert event["message"] == message
    assert event["involvedObject"]["uid"] == uid
    assert event["source"] == {"component": "plexus", "host": NODE}


def test_a_long_message_is_cut_to_what_an_event_holds(
    api_and_cluster: tuple[ApiStandin, Cluster],
) -> None:
    api, cluster = api_and_cluster
    api.create(pod("p1"))
    cluster.sink.teardown_abandoned(PodInfo("default", "p1"), "x" * 5000)
    assert cluster.sink.flush()
    (event,) = api.events()
    assert len(event["message"]) == EVENT_MESSAGE_MAX and event["message"].endswith("...")
