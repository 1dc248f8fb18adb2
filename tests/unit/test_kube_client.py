"""The Kubernetes client (lightkube) against the stand-in API server (tests/kube_standin.py).

Real HTTP on loopback, the real wire format: a list, then a chunked watch from its
resourceVersion, bookmarks, 410 Gone after the history was compacted (a relist that learns of a
deletion the watch missed), errors counted and retried with backoff, a kind the server does not
serve, and the annotation PATCH.  Each test runs the agent's reflectors on their own loop.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.kube.client import KubeClient, Reflector, connect
from tests.kube_standin import KubeStandin

TOKEN = secrets.token_hex(16)
NODE = "node-a"


@pytest.fixture
def standin() -> Iterator[KubeStandin]:
    server = KubeStandin(TOKEN, bookmark_interval=0.2)
    try:
        yield server
    finally:
        server.close()


def kubeconfig(tmp_path: Path, server: str, token: str = TOKEN) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "c", "cluster": {"server": server}}],
            "users": [{"name": "u", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "c", "user": "u"}}],
        })
    )  # fmt: skip
    return str(path)


def pod(name: str, node: str = NODE, namespace: str = "shop", **labels: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": "web",
                 "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running"},
    }  # fmt: skip


async def eventually(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def run(tmp_path: Path, standin: KubeStandin, body: Callable[[KubeClient], Awaitable[None]],
        policies: bool = False) -> None:  # fmt: skip
    async def main() -> None:
        client = KubeClient(connect(kubeconfig(tmp_path, standin.url)), NODE, policies)
        tasks = [asyncio.create_task(r.run()) for r in client.reflectors]
        try:
            await body(client)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()

    asyncio.run(main())


def names(reflector: Reflector) -> list[str]:
    return sorted(name for _ns, name in reflector.objects)


def test_pods_of_this_node_listed_then_watched_from_the_list_version(
    tmp_path: Path, standin: KubeStandin
) -> None:
    standin.apply("pods", pod("web-0"))
    standin.apply("pods", pod("other", node="node-b"))

    async def body(client: KubeClient) -> None:
        await eventually(lambda: client.pods.health.synced, "the list")
        assert names(client.pods) == ["web-0"]
        listed_at = client.pods.health.resource_version
        standin.apply("pods", pod("web-1"))
        standin.apply("pods", pod("elsewhere", node="node-b"))
        standin.apply("pods", pod("web-0", app="web"))
        await eventually(lambda: names(client.pods) == ["web-0", "web-1"], "web-1 added")
        await eventually(lambda: client.pods.objects[("shop", "web-0")]["metadata"]["labels"]
                         == {"app": "web"}, "web-0 relabelled")  # fmt: skip
        standin.delete("pods", "shop", "web-1")
        await eventually(lambda: names(client.pods) == ["web-0"], "web-1 deleted")
        watches = [r for r in standin.asked("GET", "/api/v1/pods") if r.query.get("watch")]
        assert watches[0].query["resourceVersion"] == listed_at
        assert watches[0].query["allowWatchBookmarks"] == "true"
        assert all(r.query["fieldSelector"] == f"spec.nodeName={NODE}"
                   for r in standin.asked("GET", "/api/v1/pods"))  # fmt: skip
        assert client.pods.health.relists == 0 and client.pods.health.errors == 0

    run(tmp_path, standin, body)


def test_bookmarks_move_a_quiet_watch_forward(tmp_path: Path, standin: KubeStandin) -> None:
    standin.apply("pods", pod("web-0"))

    async def body(client: KubeClient) -> None:
        await eventually(lambda: client.pods.health.synced, "the list")
        before = int(client.pods.health.resource_version)
        for i in range(5):  # changes of another kind: the pod watch only hears of them by bookmark
            standin.apply("namespaces", {"metadata": {"name": f"ns-{i}"}})
        await eventually(lambda: int(client.pods.health.resource_version) >= before + 5,
                         "a bookmark")  # fmt: skip
        assert names(client.pods) == ["web-0"]

    run(tmp_path, standin, body)


def test_an_expired_watch_relists_and_sees_what_it_missed(
    tmp_path: Path, standin: KubeStandin, caplog: pytest.LogCaptureFixture
) -> None:
    standin.apply("pods", pod("web-0"))
    standin.apply("pods", pod("web-1"))

    async def body(client: KubeClient) -> None:
        await eventually(lambda: names(client.pods) == ["web-0", "web-1"], "the list")

        def meanwhile() -> None:  # while no watch is open: only a relist can see it
            standin.delete("pods", "shop", "web-1")
            standin.apply("pods", pod("web-2"))

        standin.expire(meanwhile)
        await eventually(lambda: names(client.pods) == ["web-0", "web-2"], "the relist")
        assert client.pods.health.relists == 1
        gone = [r for r in standin.asked("GET", "/api/v1/pods") if "watch" not in r.query]
        assert len(gone) == 2  # the first list, and the relist after 410

    with caplog.at_level(logging.INFO, logger="ferry.agent"):
        run(tmp_path, standin, body)
    assert "pods watch expired (410 Expired: too old resource version" in caplog.text


def test_errors_are_counted_logged_once_and_retried(
    tmp_path: Path, standin: KubeStandin, caplog: pytest.LogCaptureFixture
) -> None:
    standin.apply("pods", pod("web-0"))
    standin.fail_next(4, code=500)  # the first lists of pods and namespaces fail

    async def body(client: KubeClient) -> None:
        await eventually(lambda: client.pods.health.synced and client.namespaces.health.synced,
                         "the lists, retried")  # fmt: skip
        assert names(client.pods) == ["web-0"]
        errors = client.pods.health.errors + client.namespaces.health.errors
        assert errors == 4
        assert not client.pods.health.to_json()["failing"]
        assert "500 InternalError: injected failure" in client.pods.health.last_error

    with caplog.at_level(logging.WARNING, logger="ferry.agent"):
        run(tmp_path, standin, body)
    warnings = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert 2 <= len(warnings) <= 3, warnings  # the first of each streak, rate-limited after
    assert TOKEN not in caplog.text


def test_a_wrong_token_is_an_error_that_never_shows_the_token(
    tmp_path: Path, standin: KubeStandin, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = secrets.token_hex(16)

    async def main() -> None:
        client = KubeClient(connect(kubeconfig(tmp_path, standin.url, wrong)), NODE, False)
        task = asyncio.create_task(client.pods.run())
        await eventually(lambda: client.pods.health.errors >= 1, "the refusal")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()
        assert "401 Unauthorized" in client.pods.health.last_error

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    assert wrong not in caplog.text
    assert "401 Unauthorized" in caplog.text


def test_policy_kinds_and_a_kind_the_server_does_not_serve(
    tmp_path: Path, standin: KubeStandin
) -> None:
    standin.apply("authorizationpolicies", {"metadata": {"name": "p", "namespace": "shop"},
                                            "spec": {"action": "DENY"}})  # fmt: skip
    standin.unserved.add("ratelimitpolicies")

    async def body(client: KubeClient) -> None:
        policies = client.policies["AuthorizationPolicy"]
        await eventually(lambda: policies.health.synced, "the policy list")
        assert policies.objects[("shop", "p")]["spec"] == {"action": "DENY"}
        assert policies.api_version == "security.istio.io/v1"
        limits = client.policies["RateLimitPolicy"]
        await eventually(lambda: limits.health.synced, "the unserved kind counted as listed")
        assert limits.objects == {} and limits.health.to_json()["served"] is False

    run(tmp_path, standin, body, policies=True)


def test_annotations_are_patched_with_a_merge_patch(tmp_path: Path, standin: KubeStandin) -> None:
    standin.apply("pods", pod("web-0"))

    async def body(client: KubeClient) -> None:
        await eventually(lambda: client.pods.health.synced, "the list")
        patch = {"metadata": {"annotations": {"ferry.dev/redirection": "enabled"}}}
        await client.annotate("shop", "web-0", patch)
        stored = standin.get("pods", "shop", "web-0")
        assert stored is not None
        assert stored["metadata"]["annotations"] == {"ferry.dev/redirection": "enabled"}
        await eventually(lambda: client.pods.objects[("shop", "web-0")]["metadata"]
                         .get("annotations") == {"ferry.dev/redirection": "enabled"},
                         "the watch to bring the patch back")  # fmt: skip
        removal = {"metadata": {"annotations": {"ferry.dev/redirection": None}}}
        await client.annotate("shop", "web-0", removal)
        stored = standin.get("pods", "shop", "web-0")
        assert stored is not None and "ferry.dev/redirection" not in stored["metadata"].get(
            "annotations", {}
        )
        [request] = standin.asked("PATCH", "/api/v1/namespaces/shop/pods/web-0")[:1]
        assert request.headers["Content-Type"] == "application/merge-patch+json"

    run(tmp_path, standin, body)
