"""The policy set in force and what of it selects a workload: selectors, the root namespace, the
wire encoding, and which ports need HTTP inspection."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.policy.compile import PolicySet, WorkloadPolicy, compile_for
from agent.policy.documents import InvalidPolicy, encode, parse_text
from agent.policy.facts import Facts

ROOT = "ferry-system"
JWKS = json.dumps(
    {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}
)

DOCUMENTS = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: shop-web, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  rules: [{{from: [{{source: {{namespaces: [shop]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: shop-all, namespace: shop}}
spec:
  action: DENY
  rules: [{{to: [{{operation: {{ports: ['22']}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: mesh-v2, namespace: {ROOT}}}
spec:
  selector: {{matchLabels: {{app: web, version: v2}}}}
  action: DENY
  rules: [{{from: [{{source: {{ipBlocks: [192.168.0.0/16]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: mesh-all, namespace: {ROOT}}}
spec:
  action: AUDIT
  rules: [{{}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: other, namespace: bank}}
spec: {{}}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  jwtRules: [{{issuer: https://issuer, jwks: '{JWKS}'}}]
---
apiVersion: ferry.dev/v1alpha1
kind: RateLimitPolicy
metadata: {{name: rl, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  rules:
  - {{match: {{ports: [8080], paths: ['/api/*']}}, bucket: {{maxTokens: 5, fillInterval: 1s}}}}
  - {{match: {{ports: [9000]}}, bucket: {{maxTokens: 5, fillInterval: 1s}}}}
"""


def policy_set() -> PolicySet:
    parsed = parse_text(DOCUMENTS, "test")
    assert all(p.errors == () for p in parsed), [p.errors for p in parsed]
    return PolicySet.of(p.document for p in parsed if p.document is not None)


def workload(namespace: str, labels: dict[str, str]) -> WorkloadPolicy:
    return compile_for(
        policy_set(), namespace, labels, root_namespace=ROOT, trust_domain="cluster.local"
    )


@pytest.mark.parametrize(
    ("namespace", "labels", "policies"),
    [
        (
            "shop",
            {"app": "web", "version": "v2", "tier": "x"},
            [
                "AuthorizationPolicy ferry-system/mesh-all",
                "AuthorizationPolicy ferry-system/mesh-v2",
                "AuthorizationPolicy shop/shop-all",
                "AuthorizationPolicy shop/shop-web",
                "RateLimitPolicy shop/rl",
            ],
        ),
        (
            "shop",
            {"app": "web"},  # mesh-v2 needs both labels
            [
                "AuthorizationPolicy ferry-system/mesh-all",
                "AuthorizationPolicy shop/shop-all",
                "AuthorizationPolicy shop/shop-web",
                "RateLimitPolicy shop/rl",
            ],
        ),
        (
            "shop",
            {"app": "api"},
            [
                "AuthorizationPolicy ferry-system/mesh-all",
                "AuthorizationPolicy shop/shop-all",
                "RequestAuthentication shop/jwt",
            ],
        ),
        (
            "bank",
            {"app": "web", "version": "v2"},  # root-namespace selectors apply in every namespace
            [
                "AuthorizationPolicy ferry-system/mesh-all",
                "AuthorizationPolicy ferry-system/mesh-v2",
                "AuthorizationPolicy bank/other",
            ],
        ),
        ("empty", {}, ["AuthorizationPolicy ferry-system/mesh-all"]),
        (ROOT, {}, ["AuthorizationPolicy ferry-system/mesh-all"]),
    ],
)
def test_selection_by_namespace_labels_and_root_namespace(
    namespace: str, labels: dict[str, str], policies: list[str]
) -> None:
    assert list(workload(namespace, labels).policies) == policies


def test_the_compiled_workload_decides() -> None:
    web = workload("shop", {"app": "web", "version": "v2"})
    shop = "spiffe://cluster.local/ns/shop/sa/a"
    assert web.authz.decide(Facts(shop, "10.0.0.1", "10.1.0.1", 80)).allowed
    assert not web.authz.decide(Facts(shop, "192.168.0.1", "10.1.0.1", 80)).allowed  # root DENY
    assert not web.authz.decide(Facts(shop, "10.0.0.1", "10.1.0.1", 22)).allowed
    verdict = web.authz.decide(
        Facts("spiffe://cluster.local/ns/bank/sa/a", "10.0.0.1", "10.1.0.1", 80)
    )
    assert not verdict.allowed and verdict.audit == ("ferry-system/mesh-all",)
    assert not workload("bank", {}).authz.decide(Facts(shop, "10.0.0.1", "10.1.0.1", 80)).allowed


def test_jwt_and_rate_limits_are_built_only_when_selected() -> None:
    web, api, bank = (
        workload("shop", {"app": "web"}),
        workload("shop", {"app": "api"}),
        workload("bank", {}),
    )
    assert web.jwt is None and web.rate_limits is not None
    assert api.jwt is not None and api.rate_limits is None
    assert bank.jwt is None and bank.rate_limits is None


def test_needs_http() -> None:
    web, api, bank = (
        workload("shop", {"app": "web"}),
        workload("shop", {"app": "api"}),
        workload("bank", {}),
    )
    assert web.needs_http(8080)  # an HTTP rate-limit rule (paths)
    assert not web.needs_http(9000) and not web.needs_http(80)  # L4 rules only
    assert api.needs_http(5432)  # a RequestAuthentication: every port
    assert not bank.needs_http(80)


def test_policy_set_sorts_each_kind_and_round_trips_through_json() -> None:
    policy = policy_set()
    assert [d.ref for d in policy.authorization] == [
        "bank/other",
        "ferry-system/mesh-all",
        "ferry-system/mesh-v2",
        "shop/shop-all",
        "shop/shop-web",
    ]
    wire = json.loads(json.dumps(policy.to_json()))
    assert list(wire) == ["documents"] and len(wire["documents"]) == 7
    assert PolicySet.from_json(wire) == policy
    assert PolicySet.from_json(PolicySet().to_json()) == PolicySet()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "<policy set>: expected {'documents': [...]}, got list"),
        ({"documents": [{"kind": "Nope"}]}, "<policy set>: document #1: kind: unknown kind 'Nope'"),
        (
            {
                "documents": [
                    {
                        "apiVersion": "security.istio.io/v1",
                        "kind": "AuthorizationPolicy",
                        "metadata": {"name": "p"},
                        "spec": {"action": "DENY"},
                    }
                ]
            },
            "<policy set>: AuthorizationPolicy default/p: spec.rules: DENY without `rules`",
        ),
    ],
)
def test_from_json_validates_again(raw: Any, message: str) -> None:
    with pytest.raises(InvalidPolicy) as caught:
        PolicySet.from_json(raw)
    assert str(caught.value).startswith(message)


def test_from_json_refuses_duplicates() -> None:
    document = encode(policy_set().authorization[0])
    with pytest.raises(InvalidPolicy, match="duplicate"):
        PolicySet.from_json({"documents": [document, document]})


def test_from_json_remembers_only_what_validated() -> None:
    """Documents are remembered by their exact canonical text: a changed one is checked again."""
    policy = policy_set()
    wire = json.loads(json.dumps(policy.to_json()))
    assert PolicySet.from_json(wire) == policy
    wire["documents"][0]["spec"]["action"] = "DENY"  # bank/other: DENY without rules: refused
    del wire["documents"][0]["spec"]["rules"]
    with pytest.raises(InvalidPolicy) as caught:
        PolicySet.from_json(wire)
    assert [(e.document, e.field) for e in caught.value.errors] == [
        ("AuthorizationPolicy bank/other", "spec.rules")
    ]
    with pytest.raises(InvalidPolicy):
        PolicySet.from_json(wire)  # still refused: failures are never remembered
