"""JWT test data: the RFC examples stored next to this file, and issuers that sign tokens.

The `*.json` files hold published test vectors, copied from the RFCs and checked against
`cryptography` when they were stored: RFC 7515 appendix A.2 (RS256) and A.3 (ES256), RFC 8037
appendix A.4 (Ed25519) and RFC 7519 section 6.1 (an unsecured JWT; with RFC 7515 A.1's HS256 token
over the same claims).  `Issuer` makes a fresh key for one JWS algorithm and signs whatever header
and claims a test needs, so tests can also forge tokens (wrong key, altered payload).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

HERE = Path(__file__).parent
HASHES: dict[str, type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
CURVES = {"ES256": ("P-256", ec.SECP256R1, 32), "ES384": ("P-384", ec.SECP384R1, 48),
          "ES512": ("P-521", ec.SECP521R1, 66)}  # fmt: skip

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def vector(name: str) -> dict[str, Any]:
    """One stored RFC vector (`rfc7515_a2_rs256`, ...)."""
    data: dict[str, Any] = json.loads((HERE / f"{name}.json").read_text())
    return data


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def segment(value: Any) -> str:
    """A JSON value as a base64url token segment."""
    return b64(json.dumps(value, separators=(",", ":")).encode())


def _int(value: int, size: int | None = None) -> str:
    return b64(value.to_bytes(size or (value.bit_length() + 7) // 8, "big"))


@cache
def _private_key(alg: str, serial: int) -> PrivateKey:
    """One key per (algorithm family, serial), made once per test session."""
    if alg[:2] in ("RS", "PS"):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg in CURVES:
        return ec.generate_private_key(CURVES[alg][1]())
    return ed25519.Ed25519PrivateKey.generate()


@dataclass
class Issuer:
    """Signs JWTs for one algorithm with its own key; `serial` picks another key of the kind."""

    alg: str
    kid: str | None = "k1"
    serial: int = 0
    key: PrivateKey = field(init=False)

    def __post_init__(self) -> None:
        family = "RS" if self.alg[:2] in ("RS", "PS") else self.alg
        self.key = _private_key(family, self.serial)

    def jwk(self, **extra: str) -> dict[str, str]:
        """The public key as a JWK, with `kid` when the issuer has one."""
        key = self.key
        out: dict[str, str]
        if isinstance(key, rsa.RSAPrivateKey):
            numbers = key.public_key().public_numbers()
            out = {"kty": "RSA", "n": _int(numbers.n), "e": _int(numbers.e)}
        elif isinstance(key, ec.EllipticCurvePrivateKey):
            crv, _, size = CURVES[self.alg]
            point = key.public_key().public_numbers()
            out = {"kty": "EC", "crv": crv, "x": _int(point.x, size), "y": _int(point.y, size)}
        else:
            raw = key.public_key().public_bytes_raw()
            out = {"kty": "OKP", "crv": "Ed25519", "x": b64(raw)}
        if self.kid is not None:
            out["kid"] = self.kid
        out.update(extra)
        return out

    def jwks(self, *others: Issuer) -> str:
        return json.dumps({"keys": [self.jwk(), *(o.jwk() for o in others)]})

    def sign(self, claims: Any, *, header: dict[str, Any] | None = None) -> str:
        """A compact JWS of `claims` (any JSON value) with `{"alg", "kid"}` plus `header`."""
        head: dict[str, Any] = {"alg": self.alg, "typ": "JWT"}
        if self.kid is not None:
            head["kid"] = self.kid
        head.update(header or {})
        signing_input = f"{segment(head)}.{segment(claims)}"
        return f"{signing_input}.{b64(self.signature(signing_input.encode()))}"

    def signature(self, data: bytes) -> bytes:
        key = self.key
        if isinstance(key, rsa.RSAPrivateKey):
            digest = HASHES[self.alg[2:]]()
            if self.alg.startswith("PS"):
                pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
                return key.sign(data, pss, digest)
            return key.sign(data, padding.PKCS1v15(), digest)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            size = CURVES[self.alg][2]
            der = key.sign(data, ec.ECDSA(HASHES[self.alg[2:]]()))
            r, s = decode_dss_signature(der)
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")
        return key.sign(data)


def hs256(secret: bytes, claims: Any, header: dict[str, Any] | None = None) -> str:
    """An HS256 token: what an attacker sends when a verifier might use a public key as the
    HMAC secret (key confusion)."""
    signing_input = f"{segment({'alg': 'HS256', **(header or {})})}.{segment(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"
