"""Policy documents (`agent.policy.documents.parse_text`): one file of the policy folder.

Input: the file (UTF-8; a file that is not is refused before parsing).  Contract: `parse_text`
raises nothing (every problem is a `PolicyError` of its result), a document comes with no
errors and errors with no document, and every valid document encodes (`encode`, the wire
format to the proxy) to one that parses equal.
"""

from __future__ import annotations

from agent.policy.documents import encode, parse_document, parse_text
from fuzz.harness import main

AUTHORIZATION = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-reads, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"], ipBlocks: [10.0.0.0/8]}}]
    to: [{operation: {methods: ["GET"], paths: ["/api/*", "/items/{*}/name"], ports: ["8080"]}}]
    when: [{key: "request.headers[x-team]", values: [blue]}, {key: source.namespace,
            notValues: [dev]}]
"""
DENY = """\
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: no-admin}
spec:
  action: DENY
  rules: [{to: [{operation: {notPaths: [/public/*], hosts: ["*.shop"]}}]}]
"""
AUTHENTICATION = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: shop}
spec:
  jwtRules:
  - {issuer: https://i, jwksUri: https://i/jwks, fromHeaders: [{name: x-jwt, prefix: "Bearer "}],
     forwardOriginalToken: true, outputClaimToHeaders: [{header: x-sub, claim: sub}], timeout: 2s}
"""
RATE_LIMIT = """\
apiVersion: ferry.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: rl, namespace: shop}
spec:
  rules: [{key: source.ip, bucket: {maxTokens: 3, fillInterval: 100ms}}]
"""


def check(data: bytes) -> None:
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return
    for parsed in parse_text(text, "fuzz.yaml"):
        assert (parsed.document is None) == bool(parsed.errors), parsed
        if parsed.document is not None:
            again = parse_document(encode(parsed.document), file="wire", index=0)
            assert again.document == parsed.document, (again, parsed.document)


def seeds() -> dict[str, bytes]:
    every = "---\n".join((AUTHORIZATION, DENY, AUTHENTICATION, RATE_LIMIT))
    return {
        "authorization": AUTHORIZATION.encode(),
        "deny": DENY.encode(),
        "authentication": AUTHENTICATION.encode(),
        "rate-limit": RATE_LIMIT.encode(),
        "every-kind": every.encode(),
        "json": b'{"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",'
        b' "metadata": {"name": "a"}, "spec": {}}',
        "typo": AUTHORIZATION.replace("principals", "principles").encode(),
        "bad-yaml": b"spec: [unclosed\n",
        "anchors": b"a: &x [1, 2]\nb: *x\n",
    }


if __name__ == "__main__":
    main(check)
