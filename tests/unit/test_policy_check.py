"""`agent policy check`'s core: a request decided by the compiled policy, JWT before authorization.

`evaluate` runs over a `WorkloadPolicy` compiled from real documents (helper A's `compile_for`)
with real tokens (ES256, signed here, verified by helper B's `JwtAuthenticator`); the command
line's rendering is checked on the answers it prints.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import yaml

from agent.cli import render_check
from agent.policy.compile import PolicySet, WorkloadPolicy, compile_for
from agent.policy.documents import combine, parse_text
from agent.policy_check import UNREAD_TOKEN, CheckError, CheckRequest, evaluate
from tests.unit.jwks_server import ec_key, jwks, token

KEY = ec_key()
ISSUER = "https://idp.example"
WEB = "spiffe://cluster.local/ns/shop/sa/web"
DOCUMENTS = f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-admin, namespace: shop}}
spec:
  action: DENY
  rules: [{{to: [{{operation: {{ports: ["8080"], paths: ["/admin*"]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  rules:
  - from: [{{source: {{principals: ["cluster.local/ns/shop/sa/web"]}}}}]
    to: [{{operation: {{methods: [GET], ports: ["8080"]}}}}]
  - from: [{{source: {{requestPrincipals: ["{ISSUER}/alice"]}}}}]
  - from: [{{source: {{ipBlocks: [10.9.0.0/16]}}}}]
    to: [{{operation: {{ports: ["9000"]}}}}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  jwtRules:
  - issuer: {ISSUER}
    jwks: {yaml.safe_dump(jwks(KEY)).strip().removesuffix("...").strip()}
"""


def compiled(labels: dict[str, str], namespace: str = "shop") -> WorkloadPolicy:
    loaded = combine([(p, "test.yaml") for p in parse_text(DOCUMENTS, "test.yaml")])
    assert loaded.ok, loaded.errors
    return compile_for(PolicySet.of(loaded.documents), namespace, labels,
                       root_namespace="ferry-system", trust_domain="cluster.local")  # fmt: skip


API = compiled({"app": "api"})


def check(**body: Any) -> dict[str, Any]:
    return evaluate(API, "10.1.0.5", CheckRequest.from_json(body), time.time())


def bearer(sub: str, **claims: Any) -> str:
    now = int(time.time())
    return token(KEY, {"iss": ISSUER, "sub": sub, "iat": now, "exp": now + 600, **claims})


def test_documents_selecting_the_workload_are_listed() -> None:
    assert check(port=8080, from_principal=WEB)["policies"] == [
        "AuthorizationPolicy shop/allow",
        "AuthorizationPolicy shop/deny-admin",
        "RequestAuthentication shop/jwt",
    ]
    other = compiled({"app": "other"})
    assert other.policies == ("AuthorizationPolicy shop/deny-admin",)
    assert compiled({"app": "api"}, namespace="bank").policies == ()


@pytest.mark.parametrize(
    ("body", "allowed", "policy", "rule", "reason"),
    [
        ({"from_principal": "cluster.local/ns/shop/sa/web", "method": "GET"}, True,
         "shop/allow", 0, "allowed_by_policy"),
        ({"from_principal": WEB, "method": "POST"}, False, "", None, "no_allow_match"),
        ({"from_principal": WEB, "method": "GET", "path": "/admin/x"}, False,
         "shop/deny-admin", 0, "denied_by_policy"),
        ({"from_principal": WEB, "method": "GET", "path": "/a/../admin"}, False,
         "shop/deny-admin", 0, "denied_by_policy"),  # normalized as the proxy does
        ({"from_ip": "10.9.1.1", "port": 9000}, True, "shop/allow", 2, "allowed_by_policy"),
        ({"from_ip": "10.8.1.1", "port": 9000}, False, "", None, "no_allow_match"),
    ],
)  # fmt: skip
def test_authorization_names_the_policy_and_rule(
    body: dict[str, Any], allowed: bool, policy: str, rule: int | None, reason: str
) -> None:
    answer = check(**{"port": 8080, **body})
    assert (answer["allowed"], answer["policy"], answer["rule"], answer["reason"]) == (
        allowed,
        policy,
        rule,
        reason,
    )
    assert answer["decided_by"] == "authorization"


def test_jwt_is_verified_before_authorization() -> None:
    alice = check(port=8080, from_ip="10.0.0.1", path="/x", jwt=bearer("alice"))
    assert (alice["allowed"], alice["policy"], alice["rule"]) == (True, "shop/allow", 1)
    assert (alice["jwt"]["status"], alice["jwt"]["principal"]) == (0, f"{ISSUER}/alice")
    bob = check(port=8080, from_ip="10.0.0.1", path="/x", jwt=bearer("bob"))
    assert (bob["allowed"], bob["reason"]) == (False, "no_allow_match")
    expired = bearer("alice", exp=int(time.time()) - 3600)
    answer = check(port=8080, from_ip="10.0.0.1", path="/x", jwt=expired)
    assert (answer["allowed"], answer["decided_by"], answer["status"]) == (
        False,
        "authentication",
        401,
    )
    assert answer["reason"] == "Jwt is expired"
    forged = token(ec_key(), {"iss": ISSUER, "sub": "alice", "exp": int(time.time()) + 60})
    assert check(port=8080, from_ip="10.0.0.1", jwt=forged)["status"] == 401
    no_token = check(port=8080, from_ip="10.0.0.1", path="/x")
    assert (no_token["allowed"], no_token["jwt"]["principal"]) == (False, "")


def test_a_token_for_a_workload_without_request_authentication_is_not_read() -> None:
    other = compiled({"app": "other"})
    request = CheckRequest.from_json({"port": 80, "from_ip": "10.0.0.1", "jwt": bearer("alice")})
    answer = evaluate(other, "10.1.0.6", request, time.time())
    assert answer["jwt"] == {"status": 0, "reason": UNREAD_TOKEN, "principal": ""}
    assert answer["allowed"] and answer["reason"] == "no_policy"


def test_an_l4_check_on_an_http_port_says_so() -> None:
    answer = check(port=8080, from_principal=WEB)
    assert (answer["http"], answer["http_inspected_port"]) == (False, True)
    assert "inspected as HTTP" in render_check({**answer, "version": 3, "workload": "'api'"})


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"port": 0, "from_ip": "10.0.0.1"}, "port: 0 is not a TCP port"),
        ({"port": True, "from_ip": "10.0.0.1"}, "port: True"),
        ({"port": 80}, "give the source"),
        ({"port": 80, "from_ip": "10.0.0"}, "from_ip: '10.0.0' is not an IP address"),
        ({"port": 80, "from_ip": "10.0.0.1", "method": 1}, "method: 1 is not a string"),
        ({"port": 80, "from_ip": "10.0.0.1", "headers": ["x"]}, "headers: ['x']"),
    ],
)
def test_bad_requests_name_the_field(body: dict[str, Any], needle: str) -> None:
    with pytest.raises(CheckError) as info:
        CheckRequest.from_json(body)
    assert needle in str(info.value)
    with pytest.raises(CheckError, match="path: 'x' is not an absolute path"):
        check(port=80, from_ip="10.0.0.1", path="x")


def test_the_token_never_shows() -> None:
    secret = bearer("alice")
    request = CheckRequest.from_json({"port": 8080, "from_ip": "10.0.0.1", "jwt": secret})
    assert secret not in repr(request)
    answer = evaluate(API, "10.1.0.5", request, time.time())
    assert secret not in repr(answer)


def test_the_rendering_names_the_decision() -> None:
    base = {"version": 4, "workload": "'api' (shop/api)", "http": True,
            "http_inspected_port": True, "audit": [], "jwt": None,
            "policies": ["AuthorizationPolicy shop/allow"]}  # fmt: skip
    allowed = {**base, "allowed": True, "decided_by": "authorization", "status": 0,
               "policy": "shop/allow", "rule": 1, "action": "ALLOW",
               "reason": "allowed_by_policy"}  # fmt: skip
    assert render_check(allowed).splitlines() == [
        "ALLOW  'api' (shop/api)   policy version 4",
        "  decided by AuthorizationPolicy shop/allow rule 1 (ALLOW: allowed_by_policy)",
        "  documents selecting the workload: AuthorizationPolicy shop/allow",
    ]
    rejected = {**base, "allowed": False, "decided_by": "authentication", "status": 401,
                "policy": "", "rule": None, "action": "", "reason": "Jwt is expired"}  # fmt: skip
    assert render_check(rejected).splitlines()[:2] == [
        "DENY  'api' (shop/api)   policy version 4",
        "  rejected by JWT authentication (401): Jwt is expired",
    ]
