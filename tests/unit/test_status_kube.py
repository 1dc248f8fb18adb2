"""The Kubernetes view of `agent status` (pure): its section against a golden file, problems.

Regenerate with `UPDATE_GOLDEN=1 pytest tests/unit/test_status_kube.py` and review the diff.
"""

from __future__ import annotations

import copy
from typing import Any

from agent.kube import view as kubernetes_view
from agent.status import _ago, assess, render
from tests.unit.test_status import NOW, check_golden, document


def watch(**changes: Any) -> dict[str, Any]:
    healthy = {"synced": True, "served": True, "events": 12, "relists": 0, "errors": 0,
               "failing": False, "last_error": "", "last_error_at": None,
               "last_event_at": NOW - 3, "resource_version": "4711"}  # fmt: skip
    return {**healthy, **changes}


def pod(name: str, namespace: str, enrolled: bool, state: str | None, rule: str,
        reason: str = "") -> dict[str, Any]:  # fmt: skip
    return {"namespace": namespace, "name": name, "uid": f"uid-{name}", "service_account": "web",
            "enrolled": enrolled, "state": state, "rule": rule, "reason": reason,
            "workload": "netns-4-7" if enrolled else "", "netns": None}  # fmt: skip


KUBE: dict[str, Any] = {
    "node": "node-a",
    "pods": [
        pod("web-0", "shop", True, "enabled", "namespace label ferry.dev/mesh=enabled",
            "namespace label ferry.dev/mesh=enabled"),
        pod("batch-7", "shop", False, None, "pod label ferry.dev/mesh=disabled"),
        pod("api-1", "plain", False, "pending", "pod label ferry.dev/mesh=enabled",
            "waiting for the pod's network namespace (CNI or process scan)"),
        pod("agent-x", "ferry-system", False, None, "Ferry's own pod"),
    ],
    "watches": {
        "pods": watch(),
        "namespaces": watch(events=3, last_event_at=NOW - 600),
        "AuthorizationPolicy": watch(events=2, relists=1),
        "RequestAuthentication": watch(events=0, last_event_at=None),
        "RateLimitPolicy": watch(served=False, events=0, last_event_at=None),
    },
    "annotations": watch(),
    "ignored_objects": {},
    "scans": 2,
}  # fmt: skip


def with_kubernetes(kube: dict[str, Any]) -> dict[str, Any]:
    doc = document()
    doc["agent"]["kubernetes"] = kube
    doc["problems"] = assess(doc)
    doc["healthy"] = not doc["problems"]
    return doc


def test_the_kubernetes_view_renders_as_golden() -> None:
    doc = with_kubernetes(KUBE)
    assert doc["healthy"], doc["problems"]
    section = "\n".join(kubernetes_view.lines(KUBE, NOW, _ago))
    check_golden("status_kubernetes.golden", section)
    table = render(doc)
    assert section in table  # after the node's lines, before the workloads
    assert table.index("Identity  ") < table.index(section) < table.index("WORKLOAD  ")


def test_watch_trouble_and_unprotected_pods_are_problems() -> None:
    kube = copy.deepcopy(KUBE)
    kube["watches"]["pods"] = watch(failing=True, errors=7,
                                    last_error="503 ServiceUnavailable: etcd is down")  # fmt: skip
    kube["watches"]["namespaces"] = watch(synced=False, errors=1, last_error="401 Unauthorized")
    kube["annotations"] = watch(failing=True, last_error="pod shop/web-0: 403 Forbidden")
    kube["pods"][2] = pod("api-1", "plain", False, "failed", "pod label ferry.dev/mesh=enabled",
                          "enrolling failed at redirection: ...")  # fmt: skip
    doc = with_kubernetes(kube)
    assert not doc["healthy"]
    assert [p for p in doc["problems"] if p.startswith("kubernetes")] == [
        "kubernetes: the pods watch is failing (7 error(s) so far): 503 ServiceUnavailable: "
        "etcd is down",
        "kubernetes: namespaces not listed from the API server yet: 401 Unauthorized",
        "kubernetes: annotating pods fails: pod shop/web-0: 403 Forbidden",
        "kubernetes: pod plain/api-1 should be enrolled and is not: enrolling failed at "
        "redirection: ...",
    ]
    table = render(doc)
    assert "watch pods: FAILING, 12 event(s), last 3s ago, 0 relist(s), 7 error(s)" in table
    assert "watch namespaces: NOT LISTED YET" in table


def test_off_kubernetes_there_is_no_section() -> None:
    doc = with_kubernetes({})
    assert "Kubernetes" not in render(doc)
