"""JSON Web Key Sets (`agent.policy.jwks.parse_jwks`): what a `jwksUri` answers, or `jwks`.

Input: the document (decoded as the fetcher decodes it).  Contract: `parse_jwks` raises nothing
but `JwksError`, and the keys it takes encode (`to_json`, the keys inlined into policy for the
proxy) to a set that parses to the same keys (what it skipped, and said so, is not encoded).
"""

from __future__ import annotations

import json
from pathlib import Path

from agent.policy.jwks import JwksError, parse_jwks
from fuzz.harness import main

VECTORS = Path(__file__).parents[2] / "tests" / "unit" / "jwt_vectors"  # RFC examples


def vector(name: str) -> dict[str, object]:
    """One of the RFC test vectors the JWT tests use: {"jwks": ..., "token": ...}."""
    loaded: dict[str, object] = json.loads((VECTORS / f"{name}.json").read_text())
    return loaded


def check(data: bytes) -> None:
    try:
        keys = parse_jwks(data.decode())
    except (UnicodeDecodeError, JwksError):
        return
    assert parse_jwks(keys.to_json()).keys == keys.keys, keys


def seeds() -> dict[str, bytes]:
    found = {
        name: json.dumps(vector(name)["jwks"]).encode()
        for name in ("rfc7515_a2_rs256", "rfc7515_a3_es256", "rfc8037_a4_ed25519")
    }
    return found | {
        "two-keys": json.dumps(
            {
                "keys": [
                    {**json.loads(found["rfc7515_a3_es256"])["keys"][0], "kid": "a", "use": "sig"},
                    {
                        **json.loads(found["rfc8037_a4_ed25519"])["keys"][0],
                        "kid": "b",
                        "alg": "EdDSA",
                    },
                ]
            }
        ).encode(),
        "empty": b'{"keys": []}',
        "bad-base64": found["rfc7515_a3_es256"].replace(b'"x": "', b'"x": "!'),
        "nan": b'{"keys": [{"kty": "EC", "crv": NaN}]}',
    }


if __name__ == "__main__":
    main(check)
