"""`JwtRule.from_spec`: one RequestAuthentication `jwtRules[]` entry, validated as Istio does."""

from __future__ import annotations

import re
from typing import Any

import pytest

from agent.policy.jwt_rules import ClaimToHeader, JwtRule, TokenHeader
from tests.unit.jwt_vectors import Issuer

JWKS = Issuer("ES256").jwks()


def test_every_field() -> None:
    spec = {
        "issuer": "https://issuer.example",
        "audiences": ["api", "https://api.example/"],
        "jwks": JWKS,
        "jwksUri": "https://issuer.example/.well-known/jwks.json",
        "fromHeaders": [{"name": "X-Jwt", "prefix": "Token "}, {"name": "x-other"}],
        "fromParams": ["jwt"],
        "fromCookies": ["session"],
        "forwardOriginalToken": True,
        "outputPayloadToHeader": "X-Jwt-Payload",
        "outputClaimToHeaders": [{"header": "x-tenant", "claim": "tenant.id"}],
        "spaceDelimitedClaims": ["roles"],
        "timeout": "10s",
    }
    rule = JwtRule.from_spec(spec)
    assert rule == JwtRule(
        issuer="https://issuer.example",
        audiences=("api", "https://api.example/"),
        jwks=JWKS,
        jwks_uri="https://issuer.example/.well-known/jwks.json",
        from_headers=(TokenHeader("x-jwt", "Token "), TokenHeader("x-other")),
        from_params=("jwt",),
        from_cookies=("session",),
        forward_original_token=True,
        output_payload_to_header="x-jwt-payload",
        output_claim_to_headers=(ClaimToHeader("x-tenant", "tenant.id"),),
        space_delimited_claims=("roles",),
        timeout=10.0,
    )
    assert JwtRule.from_spec(rule.to_spec()) == rule
    for timeout in ("1.5s", "0.000000001s", "5s"):
        again = JwtRule.from_spec({**spec, "timeout": timeout})
        assert again.to_spec()["timeout"] == timeout


def test_defaults() -> None:
    rule = JwtRule.from_spec({"issuer": "i", "jwksUri": "http://keys.example:8080/jwks"})
    assert rule == JwtRule(issuer="i", jwks_uri="http://keys.example:8080/jwks")
    assert (rule.jwks, rule.forward_original_token, rule.timeout) == ("", False, None)
    assert rule.to_spec() == {"issuer": "i", "jwksUri": "http://keys.example:8080/jwks"}


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ({"jwks": JWKS}, "issuer: must be set"),
        ({"issuer": "", "jwks": JWKS}, "issuer: must be set"),
        ({"issuer": 7, "jwks": JWKS}, "issuer: 7 is not a string"),
        ({"issuer": "i"}, "jwks or jwksUri: one must be set"),
        ({"issuer": "i", "jwks": "{"}, "jwks: Jwks is an invalid JSON"),
        ({"issuer": "i", "jwks": '{"keys": []}'}, "jwks: Jwks doesn't have any valid public key"),
        ({"issuer": "i", "jwks": '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'},
         "keys[0]: symmetric [kty] 'oct' is refused"),
        ({"issuer": "i", "jwksUri": "ftp://keys.example/jwks"}, "jwksUri: 'ftp://keys.example"),
        ({"issuer": "i", "jwksUri": "https:///jwks"}, "not an http:// or https:// URL with a host"),
        ({"issuer": "i", "jwksUri": "http://h:99999/"}, "jwksUri: 'http://h:99999/' is not a URL"),
        ({"issuer": "i", "jwks": JWKS, "audiences": "api"}, "audiences: 'api' is not a list"),
        ({"issuer": "i", "jwks": JWKS, "audiences": [""]}, "audiences[0]: must not be empty"),
        ({"issuer": "i", "jwks": JWKS, "audiences": [1]}, "audiences[0]: 1 is not a string"),
        ({"issuer": "i", "jwks": JWKS, "fromHeaders": [{"prefix": "Bearer "}]},
         "fromHeaders[0].name: '' is not a header name"),
        ({"issuer": "i", "jwks": JWKS, "fromHeaders": [{"name": "bad name"}]},
         "fromHeaders[0].name: 'bad name' is not a header name"),
        ({"issuer": "i", "jwks": JWKS, "fromHeaders": [{"name": "x", "value": "y"}]},
         "fromHeaders[0]: unknown field 'value'"),
        ({"issuer": "i", "jwks": JWKS, "fromHeaders": ["authorization"]},
         "fromHeaders[0]: 'authorization' is not an object"),
        ({"issuer": "i", "jwks": JWKS, "fromHeaders": [{"name": "x", "prefix": 1}]},
         "fromHeaders[0].prefix: 1 is not a string"),
        ({"issuer": "i", "jwks": JWKS, "fromParams": [""]}, "fromParams[0]: must not be empty"),
        ({"issuer": "i", "jwks": JWKS, "forwardOriginalToken": "yes"},
         "forwardOriginalToken: 'yes' is not a boolean"),
        ({"issuer": "i", "jwks": JWKS, "outputPayloadToHeader": "x:payload"},
         "outputPayloadToHeader: 'x:payload' is not a header name"),
        ({"issuer": "i", "jwks": JWKS, "outputClaimToHeaders": [{"header": "x-a"}]},
         "outputClaimToHeaders[0]: header and claim must both be set"),
        ({"issuer": "i", "jwks": JWKS, "outputClaimToHeaders": [{"header": "x a", "claim": "c"}]},
         "outputClaimToHeaders[0].header: 'x a' is not a header name"),
        ({"issuer": "i", "jwks": JWKS, "timeout": "5"}, "timeout: '5' is not a duration"),
        ({"issuer": "i", "jwks": JWKS, "timeout": 5}, "timeout: 5 is not a duration"),
        ({"issuer": "i", "jwks": JWKS, "timeout": "0s"}, "timeout: '0s' must be more than 0s"),
        ({"issuer": "i", "jwks": JWKS, "jwksURI": "x"}, "unknown field 'jwksURI'"),
    ],
)  # fmt: skip
def test_invalid_rules_name_the_field_and_value(spec: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        JwtRule.from_spec(spec)


def test_not_an_object() -> None:
    with pytest.raises(ValueError, match="a jwtRule must be an object, not list"):
        JwtRule.from_spec([])  # type: ignore[arg-type]
