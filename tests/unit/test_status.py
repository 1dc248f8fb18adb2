"""`agent status` rendering and assessment (pure), against golden files.

Regenerate with `UPDATE_GOLDEN=1 pytest tests/unit/test_status.py` and review the diff.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest

from agent.status import SCHEMA, assess, render

GOLDEN = Path(__file__).parent.parent / "golden"
NOW = 1_764_400_000.0


def document(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "generated_at": NOW,
        "node": "node-a",
        "backend": "iptables",
        "backend_reason": "redirection.backend is iptables",
        "state_dir": "/run/ferry",
        "agent": {
            "running": True,
            "version": "0.1.0",
            "pid": 10,
            "uptime_seconds": 300.0,
            "last_reconcile": {"at": NOW - 4, "actions": []},
            "identity": {
                "enabled": True,
                "trust_domain": "cluster.local",
                "node_certificate_expires": NOW + 300 * 86400,
                "certificates": {"netns-4-7": {"not_after": NOW + 43_200, "serial": "ab"}},
            },
            "directory": {
                "folder": "/run/ferry/directory",
                "version": 7,
                "entries": 6,
                "skipped": 0,
                "problems": [],
            },
            "proxies": [
                {
                    "pid": 11,
                    "version": "0.1.0",
                    "since": NOW - 300,
                    "policy_version": 3,
                    "policy_error": "",
                }
            ],
            "policy": {
                "source": "directory /etc/ferry/policies",
                "version": 3,
                "loaded_at": NOW - 90,
                "documents": 2,
                "rejected": None,
                "warnings": [],
                "jwks": {
                    "https://idp.example/jwks": {
                        "fetched_at": NOW - 600,
                        "attempted_at": NOW - 600,
                        "outcome": "ok",
                        "failures": 0,
                        "keys": 2,
                        "next_fetch_at": NOW + 600,
                    }
                },
                "workloads": {
                    "netns-4-7": [
                        "AuthorizationPolicy shop/allow-get",
                        "RequestAuthentication shop/jwt",
                    ]
                },
            },
        },
        "proxy": {
            "running": True,
            "version": "0.1.0",
            "pid": 11,
            "workers": 2,
            "workers_alive": 2,
            "agent_connected": True,
            "active_connections": 3,
            "applied": [
                {
                    "worker": n,
                    "directory_version": 7,
                    "directory_entries": 6,
                    "directory_rejected": 0,
                    "trust_domain": "cluster.local",
                    "certificates": {"netns-4-7": NOW + 43_200},
                    "policy_version": 3,
                }
                for n in (0, 1)
            ],
        },
        "workloads": [
            {
                "name": "web",
                "netns": "/var/run/netns/web",
                "namespace": "shop",
                "service_account": "web",
                "labels": {"app": "web", "version": "v1"},
                "identity": "spiffe://cluster.local/ns/shop/sa/web",
                "mode": "strict",
                "ips": ["10.1.0.2/24", "fd00::2/64"],
                "netns_present": True,
                "redirection": "ok",
                "differences": [],
                "certificate": {"not_after": NOW + 43_200, "serial": "ab"},
                "security": {"mtls": 40, "plaintext": 2, "denied": 3},
                "denied_by": {"denied_by_policy": 1, "no_allow_match": 2},
                "policies": [
                    "AuthorizationPolicy shop/allow-get",
                    "RequestAuthentication shop/jwt",
                ],
                "served_by_proxy": True,
                "listeners": [{"direction": "outbound", "family": 4, "listening": True}] * 6,
                "traffic": {
                    "outbound": {"connections_opened": 2, "bytes_received": 100, "bytes_sent": 900},
                    "inbound": {
                        "connections_opened": 40,
                        "bytes_received": 2048,
                        "bytes_sent": 3 << 20,
                    },
                },
            }
        ],
    }
    doc.update(changes)
    doc["problems"] = assess(doc)
    doc["healthy"] = not doc["problems"]
    return doc


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text + "\n")
    assert path.exists(), f"{path} is missing; run with UPDATE_GOLDEN=1 to create it"
    assert text + "\n" == path.read_text()


def test_healthy_node_renders_as_golden() -> None:
    doc = document()
    assert doc["healthy"]
    check_golden("status_healthy.golden", render(doc))


def test_broken_node_names_every_problem() -> None:
    doc = document()
    broken = copy.deepcopy(doc["workloads"][0])
    broken.update(
        name="db",
        redirection="drifted",
        differences=["iptables -t nat -A FERRY_OUTPUT -p tcp -j REDIRECT --to-ports 15001"],
        certificate={"not_after": NOW - 1, "serial": "cd"},
    )
    gone = copy.deepcopy(doc["workloads"][0])
    gone.update(name="old", netns_present=False, redirection="gone", netns="/var/run/netns/old")
    doc = document(
        proxy={"running": False, "error": "nothing is listening on /run/ferry/proxy.sock"},
        workloads=[doc["workloads"][0], broken, gone],
    )
    assert not doc["healthy"]
    check_golden("status_broken.golden", render(doc))


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"agent": {"running": False, "error": "x"}}, "agent is not running"),
        ({"proxy": {"running": False, "error": "x"}}, "refused (fail closed)"),
    ],
)
def test_assess(change: dict[str, Any], needle: str) -> None:
    assert any(needle in p for p in document(**change)["problems"])


def test_a_node_without_credentials_says_traffic_is_plaintext() -> None:
    doc = document()
    doc["agent"]["identity"] = {"enabled": False, "trust_domain": "cluster.local"}
    assert "no node credentials, traffic between nodes is plaintext" in render(doc)


def _applied(doc: dict[str, Any], worker: int) -> dict[str, Any]:
    return dict(doc["proxy"]["applied"][worker])


@pytest.mark.parametrize(
    ("worker_change", "needle"),
    [
        ({"directory_version": 6},
         "proxy worker 1 has directory version 6 (6 entries); the agent sent version 7"),
        ({"directory_entries": 5}, "proxy worker 1 has directory version 7 (5 entries)"),
        ({"trust_domain": ""}, "proxy worker 1 trusts 'no trust domain'"),
        ({"trust_domain": "other.local"}, "proxy worker 1 trusts 'other.local'"),
        ({"certificates": {}}, "proxy worker 1 does not hold the current certificate of netns-4-7"),
        ({"certificates": {"netns-4-7": NOW}}, "does not hold the current certificate"),
    ],
)  # fmt: skip
def test_what_a_worker_did_not_apply_is_a_problem(
    worker_change: dict[str, Any], needle: str
) -> None:
    doc = document()
    lagging = {**_applied(doc, 1), **worker_change}
    doc = document(proxy={**doc["proxy"], "applied": [_applied(doc, 0), lagging]})
    assert [p for p in doc["problems"] if needle in p], doc["problems"]
    assert not any("worker 0" in p for p in doc["problems"])


def test_skipped_directory_entries_are_problems_and_counted() -> None:
    doc = document()
    directory = {
        **doc["agent"]["directory"],
        "skipped": 1,
        "problems": ["node-b.json entry 3: entry ip '10.0.0.300' is not an IP address"],
    }
    doc = document(agent={**doc["agent"], "directory": directory})
    assert "mesh directory: node-b.json entry 3: entry ip '10.0.0.300'" in doc["problems"][0]
    assert "6 address(es), 1 skipped   applied by 2/2 proxy worker(s)" in render(doc)


def test_policy_trouble_is_named() -> None:
    doc = document()
    policy = doc["agent"]["policy"]
    policy["rejected"] = {
        "at": NOW - 5,
        "errors": ["/etc/ferry/policies/a.yaml: AuthorizationPolicy shop/x: spec.action: "
                   "'CUSTOM' is not supported"],
    }  # fmt: skip
    policy["jwks"]["https://idp.example/jwks"].update(
        outcome="GET https://idp.example/jwks: HTTP 503 Service Unavailable", failures=1
    )
    policy["jwks"]["https://other.example/jwks"] = {
        "fetched_at": None,
        "attempted_at": NOW - 1,
        "outcome": "GET https://other.example/jwks: timed out",
        "failures": 1,
        "keys": 0,
        "next_fetch_at": NOW + 59,
    }
    doc["agent"]["proxies"][0]["policy_error"] = "proxy (pid 11) refused PolicyChunk: bad"
    doc["proxy"]["applied"][1]["policy_version"] = 2
    doc = document(agent=doc["agent"], proxy=doc["proxy"])
    assert doc["problems"] == [
        "proxy worker 1 enforces policy version 2; the agent sent version 3",
        "policy change rejected, version 3 stays in force: /etc/ferry/policies/a.yaml: "
        "AuthorizationPolicy shop/x: spec.action: 'CUSTOM' is not supported",
        "jwks https://idp.example/jwks: GET https://idp.example/jwks: HTTP 503 Service "
        "Unavailable (keeping 2 key(s) of the last good fetch)",
        "jwks https://other.example/jwks: GET https://other.example/jwks: timed out (no keys: "
        "every token of its issuer is rejected)",
        "proxy pid 11: proxy (pid 11) refused PolicyChunk: bad",
    ]
    check_golden("status_policy_trouble.golden", render(doc))
