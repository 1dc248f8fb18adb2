"""JWTs in requests (`agent.policy.jwt_extract`, `agent.policy.jwt_tokens.parse_token`).

Input: the value of an Authorization header (latin-1, as the inspectors decode headers).
Contract: the extractor and `parse_token` raise nothing (a bad token is a `Reason`), and a token
that parses keeps its segments: its signing input is the first two segments of the token.
"""

from __future__ import annotations

import base64
import json

from agent.policy.jwt_extract import TokenExtractor
from agent.policy.jwt_rules import JwtRule
from agent.policy.jwt_tokens import Token, parse_token
from fuzz.harness import main
from fuzz.targets.jwks import vector

EXTRACTOR = TokenExtractor([JwtRule.from_spec({"issuer": "https://i", "jwksUri": "https://i/k"})])


def check(data: bytes) -> None:
    header = data.decode("latin-1")
    found = EXTRACTOR.find({"authorization": header}, "access_token=" + header)
    for token in EXTRACTOR.tokens(found) if found is not None else ():
        parsed = parse_token(token) if token is not None else None
        if isinstance(parsed, Token):
            assert token is not None
            assert token.startswith(parsed.signing_input.decode() + "."), token


def _segment(claims: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()


def seeds() -> dict[str, bytes]:
    found = {
        name: b"Bearer " + str(vector(name)["token"]).encode()
        for name in ("rfc7515_a2_rs256", "rfc7515_a3_es256", "rfc8037_a4_ed25519")
    }
    header = _segment({"alg": "RS256", "kid": "k1", "typ": "JWT"})
    claims = _segment({"iss": "https://i", "sub": "u", "aud": ["a", "b"], "exp": 2**40, "iat": 1.5})
    return found | {
        "claims": f"Bearer {header}.{claims}.c2ln".encode(),
        "unsecured": b"Bearer " + str(vector("rfc7519_unsecured")["token"]).encode(),
        "two-segments": f"Bearer {header}.{claims}".encode(),
        "bad-json": f"Bearer {header}.e30x.c2ln".encode(),
        "crit": f"Bearer {_segment({'alg': 'ES256', 'crit': ['b64']})}.{claims}.c2ln".encode(),
    }


if __name__ == "__main__":
    main(check)
