"""`agent status` gathering: the configured trust domain, and the running agent's read-back.

The agent and the proxy are stood in for by admin servers on the real sockets (`serve_thread`),
and the enrolled namespace does not exist, so nothing here touches the kernel.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.admin import AGENT_SOCKET, serve_thread
from agent.config import Config, IdentityConfig
from agent.netns_id import NetnsId
from agent.status import gather
from agent.workloads import EnrollmentStore, new_workload

WEB = new_workload(Path("/var/run/netns/ferry-no-such-netns"), NetnsId(4, 7), "shop", "web")


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    store = EnrollmentStore(tmp_path)
    with store.locked():
        store.save({WEB.uid: WEB})
    return tmp_path


def configured(trust_domain: str) -> Config:
    return Config(node_name="node-a", identity=IdentityConfig(trust_domain=trust_domain))


def test_a_stopped_agent_leaves_the_configured_trust_domain(state_dir: Path) -> None:
    document = gather(state_dir, lambda: configured("example.org"))
    [workload] = document["workloads"]
    assert workload["identity"] == "spiffe://example.org/ns/shop/sa/web"
    assert (workload["netns_present"], workload["redirection"]) == (False, "gone")
    assert document["node"] == "node-a"
    assert (document["backend"], document["backend_reason"]) == (
        "iptables",
        "redirection.backend is iptables",
    )


@pytest.fixture
def agent_answering(state_dir: Path) -> Iterator[list[dict[str, Any]]]:
    asked: list[dict[str, Any]] = []

    def handle(body: dict[str, Any]) -> dict[str, Any]:
        asked.append(body)
        return {
            "ok": True,
            "node": "node-b",
            "backend": "iptables",
            "identity": {"enabled": False, "trust_domain": "agent.example"},
            "readback": {
                WEB.uid: {
                    "netns_present": True,
                    "ips": ["10.0.0.2/24"],
                    "redirection": "drifted",
                    "differences": ["-A FERRY_OUTPUT ..."],
                }
            },
        }

    server = serve_thread(state_dir / AGENT_SOCKET, handle)
    yield asked
    server.shutdown()
    server.server_close()


def test_a_running_agent_answers_for_the_kernel_and_its_settings(
    state_dir: Path, agent_answering: list[dict[str, Any]]
) -> None:
    def no_config() -> Config:
        raise AssertionError("the configuration is not needed while the agent answers")

    document = gather(state_dir, no_config)
    assert agent_answering == [{"op": "status", "readback": True}]
    [workload] = document["workloads"]
    assert workload["identity"] == "spiffe://agent.example/ns/shop/sa/web"
    assert workload["redirection"] == "drifted" and workload["ips"] == ["10.0.0.2/24"]
    assert "readback" not in document["agent"]
    assert document["node"] == "node-b"
    assert "shop/ferry-no-such-netns: redirection is drifted" in document["problems"]
