"""In-process fuzzing of the daemon's request handler (`Api.cni`) with a real Orchestrator,
Resolver, store and GC over fake delegates (tests/support/world.py): thousands of requests a
minute. After every case the world must be as it was: an ADD that failed leaves no record
(directory) and no delegate attachment; one that succeeded is DELeted, and that DEL must leave
nothing either."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given

from cnispec import cni
from metaplugin.daemon import Parts
from metaplugin.server import Api
from tests.fuzz import strategies as s
from tests.fuzz.conftest import budget
from tests.fuzz.tally import Violation, bounded, case, check_answer
from tests.support.world import World, nad_manifest, simple_net


class Door:
    """A World behind the daemon's request handler."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.world = self._build()

    def _build(self) -> World:
        shutil.rmtree(self.root, ignore_errors=True)
        world = World(self.root)
        world.add_nads(
            nad_manifest("net-a", simple_net("net-a")),
            nad_manifest("net-b", simple_net("net-b", capabilities={"ips": True, "mac": True})),
            nad_manifest("net-x", simple_net("net-x", "broken")),
            nad_manifest(
                "chained",
                {"cniVersion": "1.1.0", "plugins": [{"type": "ipvlan"}, {"type": "tuning"}]},
            ),
        )
        parts = Parts(
            store=world.store,
            resolver=world.resolver,
            orchestrator=world.orchestrator,
            collector=world.collector,
        )
        self.api = Api(
            handle=parts.handle,
            orchestrator=world.orchestrator,
            scheduler=world.scheduler,  # the one GC takes its exclusive hold on, as in plexusd
            store=world.store,
            ready=lambda: True,
        )
        return world

    def cni(self, body: bytes) -> tuple[int, bytes]:
        try:
            return bounded(lambda: self.api.cni(body))
        except Violation:
            self.reset()  # the hung request may hold the scheduler: a fresh world for the next
            raise

    def request(self, env: dict[str, str], stdin: str) -> tuple[int, bytes]:
        return self.cni(json.dumps({"env": env, "config": stdin}).encode())

    def leftovers(self) -> list[str]:
        attachments = self.world.state / "attachments"
        found = [str(p.relative_to(attachments)) for p in attachments.rglob("*")]
        found += [
            f"{plugin}: {key}" for plugin, live in self.world.exec.live().items() for key in live
        ]
        return found

    def reset(self) -> None:
        """After a leftover (already counted): a clean world, so one bug is not counted twice."""
        self.world = self._build()


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Door]:
    yield Door(tmp_path_factory.mktemp("fuzz-api") / "world")


def _answer(status: int, reply: bytes) -> Any:
    return check_answer(status == 200, reply)


def _judge(door: Door, env: dict[str, str], stdin: str, status: int, reply: bytes) -> None:
    body = _answer(status, reply)
    command = env.get("CNI_COMMAND")
    code = body.get("code", status) if isinstance(body, dict) else status
    event(
        f"{command if command in cni.COMMANDS else 'junk'}: {code}"
    )  # --hypothesis-show-statistics
    door.world.exec.calls.clear()
    if status == 200 and command == cni.ADD:
        if not isinstance(body, dict) or "cniVersion" not in body:
            raise Violation("contract", f"ADD succeeded without a result: {body!r:.300}")
        # The runtime's DEL (same env, same stdin) must undo all of it.
        del_status, del_reply = door.request({**env, "CNI_COMMAND": cni.DEL}, stdin)
        _answer(del_status, del_reply)
        if del_status != 200:
            raise Violation("leftover", f"DEL after a good ADD failed: {del_reply[:300]!r}")
    left = door.leftovers()
    if left:
        door.reset()
        what = "a failed ADD" if command == cni.ADD and status != 200 else f"{command}"
        raise Violation("leftover", f"{what} left {left}")


@budget(ci=200, long=25_000)
@given(env=s.cni_env(), stdin=s.stdin_texts())
def test_cni_requests(door: Door, env: dict[str, str], stdin: str) -> None:
    with case("Api.cni (env + config, orchestrator)"):
        status, reply = door.request(env, stdin)
        _judge(door, env, stdin, status, reply)


@budget(ci=150, long=10_000)
@given(body=s.envelopes())
def test_raw_request_bodies(door: Door, body: bytes) -> None:
    with case("Api.cni (raw request body)"):
        status, reply = door.cni(body)
        if status == 200:  # the body was a good request after all: judge it as one
            envelope = json.loads(body)
            _judge(door, envelope["env"], envelope["config"], status, reply)
        else:
            _judge(door, {}, "", status, reply)
