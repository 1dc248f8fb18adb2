"""A JWT issuer for simulations: an ES256 key, its JWKS, and tokens signed with it.

The demo and the benchmarks need what an identity provider gives a real cluster: a JSON Web Key
Set to put in a RequestAuthentication (inline or served from a pod for `jwksUri`) and tokens
for clients.  `Issuer` makes a fresh P-256 key; `jwks()` is its public JWK Set; `token(...)`
signs claims (ES256, compact JWS: base64url header, payload and the raw r||s signature).
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Issuer:
    issuer: str
    kid: str = "sim-1"
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(
        ec.SECP256R1()), repr=False)  # fmt: skip

    def jwks(self) -> str:
        numbers = self.key.public_key().public_numbers()
        jwk = {"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
               "x": _b64(numbers.x.to_bytes(32, "big")),
               "y": _b64(numbers.y.to_bytes(32, "big"))}  # fmt: skip
        return json.dumps({"keys": [jwk]})

    def token(self, subject: str, audience: str = "", lifetime: float = 3600.0,
              **claims: Any) -> str:  # fmt: skip
        now = int(time.time())
        payload = {"iss": self.issuer, "sub": subject, "iat": now, "exp": now + int(lifetime),
                   **({"aud": audience} if audience else {}), **claims}  # fmt: skip
        header = {"alg": "ES256", "typ": "JWT", "kid": self.kid}
        signing_input = (f"{_b64(json.dumps(header).encode())}."
                         f"{_b64(json.dumps(payload).encode())}")  # fmt: skip
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(),
                                                  ec.ECDSA(hashes.SHA256())))  # fmt: skip
        return f"{signing_input}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
