"""The one enrollment path, driven through the agent with recording fakes (no kernel).

The admin `enroll` request and a declared workload (the config's `workloads`, enrolled by the
reconcile) must take the same steps in the same order and, when step k fails, undo steps k..1 in
reverse, leaving the store, the proxies, the rules, the certificates and the directory as they
were.  One table drives both paths, failing each operation in turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import Config
from agent.daemon import Agent
from agent.netns_id import NetnsId
from agent.workloads import Workload
from tests.unit.fakes import FakeNode, Journal, Parts, config_with

# (step, its operations, what undoing it does), in order
ENROLL = [
    ("persist", ["store.save"], ["store.save"]),
    ("proxies", ["hub.add"], ["hub.del"]),
    ("certificate", ["certs.mint", "hub.cert"], []),
    ("redirection", ["backend.apply"], ["backend.remove"]),
    ("directory", ["publish"], ["publish"]),
]
UNENROLL = [
    ("persist", ["store.save"], ["store.save"]),
    ("redirection", ["backend.remove"], ["backend.apply"]),
    ("proxies", ["hub.del"], ["hub.add", "hub.cert"]),
    ("certificate", [], ["certs.mint"]),
    ("directory", ["publish"], ["publish"]),
]


def story(steps: list[tuple[str, list[str], list[str]]], fail: str | None) -> tuple[list[str], str]:
    """The journal when `fail` fails: the operations up to it, then steps k..1 undone."""
    journal: list[str] = []
    for k, (name, ops, _undo) in enumerate(steps):
        for op in ops:
            if op == fail:
                journal.append(f"{op} FAILED")
                for _name, _ops, undo in reversed(steps[: k + 1]):
                    journal += undo
                return journal, name
            journal.append(op)
    return journal, ""


def operations(steps: list[tuple[str, list[str], list[str]]]) -> list[str]:
    return [op for _name, ops, _undo in steps for op in ops]


@pytest.fixture
def node(tmp_path: Path) -> FakeNode:
    return FakeNode(tmp_path / "netns", "web", "db")


class Harness:
    """An agent whose enrollment is made of fakes, a journal, and what to look at."""

    def __init__(self, tmp_path: Path, node: FakeNode, config: Config) -> None:
        self.journal = Journal()
        self.parts = Parts(tmp_path / "state", self.journal, node)
        self.agent = Agent(config, tmp_path / "state", backend=self.parts.backend)
        self.agent.enrollment = self.parts.enrollment

    def state(self) -> dict[str, Any]:
        """Everything an enrollment touches."""
        parts = self.parts
        return {
            "memory": sorted(parts.enrollment.enrollments),
            "store": sorted(parts.store.load()),
            "proxies": sorted(parts.hub.workloads),
            "proxy certificates": sorted(parts.hub.certificates),
            "rules": sorted(netns.uid for netns in parts.backend.installed_in),
            "certificates": sorted(parts.certificates.current),
            "published": parts.publisher.published,
        }

    async def enroll(self, netns: str, sa: str = "web") -> dict[str, Any]:
        body = {"op": "enroll", "netns": netns, "namespace": "shop", "service_account": sa}
        return await self.agent.handle(body)


@pytest.fixture
def harness(tmp_path: Path, node: FakeNode) -> Iterator[Harness]:
    made = Harness(tmp_path, node, config_with())
    yield made
    made.agent.executor.shutdown()


def test_enrollment_takes_its_steps_in_order(harness: Harness) -> None:
    reply = asyncio.run(harness.enroll("web"))
    assert reply["ok"], reply
    assert harness.journal.entries == operations(ENROLL)
    uid = reply["workload"]["uid"]
    assert harness.state() == {
        "memory": [uid],
        "store": [uid],
        "proxies": [uid],
        "proxy certificates": [uid],
        "rules": [uid],
        "certificates": [uid],
        "published": [uid],
    }


@pytest.mark.parametrize("how", ["admin", "declared"])
@pytest.mark.parametrize("fail", operations(ENROLL))
def test_a_failure_at_step_k_undoes_steps_k_to_1_in_reverse(
    tmp_path: Path, node: FakeNode, how: str, fail: str
) -> None:
    harness = Harness(tmp_path, node, config_with(("web", "shop", "web")))

    async def scenario() -> tuple[dict[str, Any], str]:
        assert (await harness.enroll("db", "db"))["ok"]  # already there, must stay
        before = harness.state()
        harness.journal.entries.clear()
        harness.journal.fail = fail
        if how == "admin":
            reply = await harness.enroll("web")
            assert reply["ok"] is False
            return before, str(reply["error"])
        actions = await harness.agent.reconcile()
        assert len(actions) == 1 and actions[0].startswith("FAILED: enrolled declared workload")
        return before, actions[0]

    try:
        before, error = asyncio.run(scenario())
    finally:
        harness.agent.executor.shutdown()
    expected, step = story(ENROLL, fail)
    assert harness.journal.entries == expected
    assert harness.state() == before
    assert f"enrolling 'web' (shop/web) failed at {step}: {fail} failed (injected)" in error


@pytest.mark.parametrize("fail", operations(UNENROLL))
def test_a_failed_unenrollment_is_undone_too(harness: Harness, fail: str) -> None:
    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        assert (await harness.enroll("web"))["ok"]
        before = harness.state()
        harness.journal.entries.clear()
        harness.journal.fail = fail
        return before, await harness.agent.handle({"op": "unenroll", "netns": "web"})

    before, reply = asyncio.run(scenario())
    expected, step = story(UNENROLL, fail)
    assert harness.journal.entries == expected
    assert reply["ok"] is False
    assert f"unenrolling 'web' (shop/web) failed at {step}" in reply["error"]
    assert harness.state() == before


def test_unenrollment_stops_traffic_first_and_leaves_nothing(harness: Harness) -> None:
    async def scenario() -> dict[str, Any]:
        assert (await harness.enroll("web"))["ok"]
        harness.journal.entries.clear()
        return await harness.agent.handle({"op": "unenroll", "netns": "web"})

    assert asyncio.run(scenario())["ok"]
    assert harness.journal.entries == operations(UNENROLL)
    assert harness.state() == {
        "memory": [],
        "store": [],
        "proxies": [],
        "proxy certificates": [],
        "rules": [],
        "certificates": [],
        "published": [],
    }


def test_a_gone_namespace_is_forgotten_without_touching_rules(
    harness: Harness, node: FakeNode
) -> None:
    async def scenario() -> list[str]:
        assert (await harness.enroll("db", "db"))["ok"]
        node.delete("db")
        harness.journal.entries.clear()
        return await harness.agent.reconcile()

    actions = asyncio.run(scenario())
    assert actions[0].startswith("forgot shop/db")
    assert harness.journal.entries == ["store.save", "hub.del", "publish"]
    assert harness.state()["memory"] == []


@pytest.mark.parametrize("how", ["admin", "declared"])
def test_the_node_namespace_is_refused_before_anything_is_applied(
    tmp_path: Path, node: FakeNode, how: str
) -> None:
    harness = Harness(tmp_path, node, config_with(("host", "shop", "web")))

    async def scenario() -> str:
        if how == "admin":
            reply = await harness.enroll("host")
            assert reply["ok"] is False
            return str(reply["error"])
        [action] = await harness.agent.reconcile()
        return action

    try:
        error = asyncio.run(scenario())
    finally:
        harness.agent.executor.shutdown()
    assert "refusing to enroll network namespace 'host'" in error
    assert "the network namespace the agent itself runs in" in error
    assert harness.journal.entries == []  # nothing was done, not even persisted


def test_one_namespace_cannot_be_enrolled_twice_by_two_paths(
    harness: Harness, node: FakeNode
) -> None:
    node.alias("web-again", of="web")

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        first = await harness.enroll("web")
        harness.journal.entries.clear()
        second = await harness.enroll("web-again", "other")
        assert harness.journal.entries == []  # the refusal changed nothing
        gone = await harness.agent.handle({"op": "unenroll", "netns": "web-again"})
        return first, second, gone

    first, second, gone = asyncio.run(scenario())
    assert first["ok"] and not second["ok"]
    assert "already enrolled as shop/web (as 'web'" in second["error"]
    assert first["workload"]["uid"] in second["error"]
    assert gone["ok"] and gone["workload"]["name"] == "web"  # unenrolled by its other path
    assert harness.state()["rules"] == []


def test_a_stale_record_at_the_same_path_is_forgotten_first(
    harness: Harness, node: FakeNode
) -> None:
    async def scenario() -> dict[str, Any]:
        assert (await harness.enroll("web"))["ok"]
        node.recreate("web")  # a new namespace under the old name
        harness.journal.entries.clear()
        return await harness.enroll("web", "v2")

    reply = asyncio.run(scenario())
    assert reply["ok"], reply
    assert harness.journal.entries == ["store.save", "hub.del", "publish", *operations(ENROLL)]
    [workload] = harness.parts.enrollment.enrollments.values()
    assert isinstance(workload, Workload) and workload.service_account == "v2"


def test_an_unexpected_error_is_answered_not_dropped(harness: Harness) -> None:
    def full(_name: str) -> tuple[Path, NetnsId]:
        raise OSError(28, "No space left on device")

    harness.parts.enrollment.resolve = full
    reply = asyncio.run(harness.enroll("web"))
    assert reply == {
        "ok": False,
        "error": "enroll failed: OSError: [Errno 28] No space left on device",
    }
