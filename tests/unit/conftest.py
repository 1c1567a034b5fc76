"""Fixtures the unit tests share: the API stand-in and a real `kubernetes` client on it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kubernetes import client

from tests.k8s_standin import ApiStandin


@pytest.fixture
def standin() -> Iterator[ApiStandin]:
    """A fresh API stand-in (no CRDs required) for one test."""
    with ApiStandin() as api:
        yield api


@pytest.fixture
def kube(standin: ApiStandin) -> Iterator[client.ApiClient]:
    """The real kubernetes client, pointed at `standin`."""
    with client.ApiClient(client.Configuration(host=standin.url)) as api:
        yield api
