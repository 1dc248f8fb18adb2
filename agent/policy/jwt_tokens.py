"""One JWT against one rule, as Envoy's jwt_verify_lib checks it (pure; `cryptography` lazily).

`parse_token(raw)` checks the compact form and the claims Envoy types and answers a `Token` (or
the `Reason` it fails); `Verifier` holds one rule's issuer, audiences, keys and clock skew, and
`check(token, now)` makes the rule's checks; `time_bounds(token)` names the instants at which
those checks change their answer (the authenticator's cache holds an outcome between them).

Checks per token, in Envoy's order, each failure a 401 with Envoy's text (`Reason`) except a
403 for the audience: size (at most 64 KiB) and form (three base64url segments, JSON object
header and payload, string `alg` among RS256/384/512, PS256/384/512, ES256/384/512 and EdDSA,
so `none` and HS* are refused, string `kid`, no `crit`, typed `iss`/`sub`/`jti`/`aud` and
integer `iat`/`nbf`/`exp`, base64url signature); `iss` equal to the rule's issuer; time with a
60 s clock skew (`nbf` <= now + skew, now <= `exp` + skew, and `iat` <= now + skew: a stricter
check than Envoy's); `aud` (a string or list) meets the rule's audiences when it has any, both
compared without an `http://`/`https://` scheme and trailing `/` as Envoy does; a key of the
JWKS whose `kid` matches the token's (keys or tokens without one match any) and whose type,
curve and `alg` fit the token's `alg` verifies the signature ("Jwks doesn't have key to match
kid or alg from Jwt" when no key fits, "Jwt verification fails" when none verifies).

`cryptography` (already a Ferry dependency, for certificates) checks signatures: RSA PKCS#1 v1.5
and PSS, ECDSA and Ed25519 through OpenSSL, the fastest option in Python.  Ferry does not use
PyJWT or joserfc: both wrap these same `cryptography` calls and would add a dependency, a second
parse of every token and exceptions to map back onto Envoy's reason texts and order of checks,
while the JOSE part they would add (compact-form parsing, the alg/key table) is small and is the
part that must match Envoy exactly.  No primitive is written here.  `cryptography` is imported
when a verifier with keys is built, never by importing this module: a proxy worker whose
workloads have no RequestAuthentication never loads it.  The keys come decoded and checked from
`agent.policy.jwks`; a key OpenSSL still refuses is skipped.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.policy.jwks import Jwk, JwksError, b64url_decode, parse_jwks

MAX_TOKEN_BYTES = 64 * 1024
ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class Reason(enum.StrEnum):
    """Why a token passed or failed: Envoy's jwt_verify_lib texts, sent as the 401/403 body."""

    OK = "OK"
    MISSING = "Jwt is missing"
    NOT_YET_VALID = "Jwt not yet valid"
    EXPIRED = "Jwt is expired"
    ISSUED_IN_FUTURE = "Jwt [iat] is in the future"  # Ferry's own (Envoy does not check iat)
    TOO_LARGE = f"Jwt is larger than {MAX_TOKEN_BYTES} bytes"  # Ferry's own
    BAD_FORMAT = "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
    HEADER_BAD_BASE64 = "Jwt header is an invalid Base64url encoded"
    HEADER_BAD_JSON = "Jwt header is an invalid JSON"
    HEADER_BAD_ALG = "Jwt header [alg] field is required and must be a string"
    HEADER_ALG_NOT_SUPPORTED = "Jwt header [alg] is not supported"
    HEADER_BAD_KID = "Jwt header [kid] field is not a string"
    HEADER_CRIT = "Jwt header [crit] is not supported"  # Ferry's own (RFC 7515 4.1.11)
    PAYLOAD_BAD_BASE64 = "Jwt payload is an invalid Base64url encoded"
    PAYLOAD_BAD_JSON = "Jwt payload is an invalid JSON"
    ISS_NOT_STRING = "Jwt payload [iss] field is not a string"
    SUB_NOT_STRING = "Jwt payload [sub] field is not a string"
    JTI_NOT_STRING = "Jwt payload [jti] field is not a string"
    AUD_NOT_STRING = "Jwt payload [aud] field is not a string or string list"
    IAT_NOT_INTEGER = "Jwt payload [iat] field is not an integer"
    IAT_OUT_OF_RANGE = "Jwt payload [iat] field is not a positive 64 bit integer"
    NBF_NOT_INTEGER = "Jwt payload [nbf] field is not an integer"
    NBF_OUT_OF_RANGE = "Jwt payload [nbf] field is not a positive 64 bit integer"
    EXP_NOT_INTEGER = "Jwt payload [exp] field is not an integer"
    EXP_OUT_OF_RANGE = "Jwt payload [exp] field is not a positive 64 bit integer"
    SIGNATURE_BAD_BASE64 = "Jwt signature is an invalid Base64url encoded"
    ED25519_WRONG_LENGTH = "Jwt ED25519 signature is wrong length"
    UNKNOWN_ISSUER = "Jwt issuer is not configured"
    AUDIENCE_NOT_ALLOWED = "Audiences in Jwt are not allowed"
    VERIFICATION_FAIL = "Jwt verification fails"
    NO_VALID_KEYS = "Jwks doesn't have any valid public key"
    KID_ALG_MISMATCH = "Jwks doesn't have key to match kid or alg from Jwt"


_TIME_CLAIMS = (
    ("iat", Reason.IAT_NOT_INTEGER, Reason.IAT_OUT_OF_RANGE),
    ("nbf", Reason.NBF_NOT_INTEGER, Reason.NBF_OUT_OF_RANGE),
    ("exp", Reason.EXP_NOT_INTEGER, Reason.EXP_OUT_OF_RANGE),
)
_STRING_CLAIMS = (
    ("iss", Reason.ISS_NOT_STRING),
    ("sub", Reason.SUB_NOT_STRING),
    ("jti", Reason.JTI_NOT_STRING),
)


@dataclass(frozen=True, slots=True)
class Token:
    """A well-formed token (not yet verified)."""

    alg: str
    kid: str
    iss: str
    sub: str
    audiences: tuple[str, ...]
    iat: int
    nbf: int
    exp: int
    payload: dict[str, Any]
    payload_segment: str
    signing_input: bytes
    signature: bytes


def parse_token(raw: str) -> Token | Reason:
    """Check the compact form and the header and payload claims Envoy types (no signature)."""
    if len(raw) > MAX_TOKEN_BYTES:
        return Reason.TOO_LARGE
    parts = raw.split(".")
    if len(parts) != 3 or not all(parts):
        return Reason.BAD_FORMAT
    header_segment, payload_segment, signature_segment = parts
    header_bytes = b64url_decode(header_segment)
    if header_bytes is None:
        return Reason.HEADER_BAD_BASE64
    header = _json_object(header_bytes)
    if header is None:
        return Reason.HEADER_BAD_JSON
    alg = header.get("alg")
    if not isinstance(alg, str):
        return Reason.HEADER_BAD_ALG
    if alg not in ALGORITHMS:
        return Reason.HEADER_ALG_NOT_SUPPORTED
    kid = header.get("kid", "")
    if not isinstance(kid, str):
        return Reason.HEADER_BAD_KID
    if "crit" in header:
        return Reason.HEADER_CRIT
    payload_bytes = b64url_decode(payload_segment)
    if payload_bytes is None:
        return Reason.PAYLOAD_BAD_BASE64
    payload = _json_object(payload_bytes)
    if payload is None:
        return Reason.PAYLOAD_BAD_JSON
    for name, not_string in _STRING_CLAIMS:
        if not isinstance(payload.get(name, ""), str):
            return not_string
    times = []
    for name, not_integer, out_of_range in _TIME_CLAIMS:
        value = payload.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return not_integer
        if not 0 <= value < 2**64:
            return out_of_range
        times.append(int(value))
    aud = payload.get("aud", [])
    audiences = (aud,) if isinstance(aud, str) else aud
    if not isinstance(audiences, (tuple, list)) or not all(isinstance(a, str) for a in audiences):
        return Reason.AUD_NOT_STRING
    signature = b64url_decode(signature_segment)
    if signature is None:
        return Reason.SIGNATURE_BAD_BASE64
    return Token(
        alg=alg,
        kid=kid,
        iss=payload.get("iss", ""),
        sub=payload.get("sub", ""),
        audiences=tuple(audiences),
        iat=times[0],
        nbf=times[1],
        exp=times[2],
        payload=payload,
        payload_segment=payload_segment,
        signing_input=f"{header_segment}.{payload_segment}".encode("ascii"),
        signature=signature,
    )


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_JSON = json.JSONDecoder(parse_constant=_refuse_constant)  # NaN and Infinity are not JSON


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        value = _JSON.decode(data.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError included
        return None
    return value if isinstance(value, dict) else None


_Verify = Callable[[str, bytes, bytes], Reason]


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str
    algorithms: frozenset[str]
    verify: _Verify


class Verifier:
    """One rule's checks of a well-formed token: issuer, time, audience, key and signature."""

    __slots__ = ("audiences", "by_kid", "issuer", "keys", "skew")

    def __init__(self, issuer: str, audiences: Sequence[str], jwks: str, skew: float) -> None:
        self.issuer = issuer
        self.skew = skew
        self.audiences = frozenset(_bare_audience(a) for a in audiences)
        self.keys = keys = _load_keys(jwks)
        self.by_kid: dict[str, tuple[_Key, ...]] = {
            kid: tuple(k for k in keys if k.kid in ("", kid)) for kid in {k.kid for k in keys}
        }

    def check(self, token: Token, now: int) -> Reason:
        """The first check the token fails at `now` (whole seconds), in Envoy's order, or OK."""
        if token.iss != self.issuer:
            return Reason.UNKNOWN_ISSUER
        if now + self.skew < token.nbf:
            return Reason.NOT_YET_VALID
        if token.exp and now > token.exp + self.skew:
            return Reason.EXPIRED
        if now + self.skew < token.iat:
            return Reason.ISSUED_IN_FUTURE
        if self.audiences and self.audiences.isdisjoint(_bare_audience(a) for a in token.audiences):
            return Reason.AUDIENCE_NOT_ALLOWED
        if not self.keys:
            return Reason.NO_VALID_KEYS
        matched = False
        for key in self._candidates(token.kid):
            if token.alg not in key.algorithms:
                continue
            matched = True
            status = key.verify(token.alg, token.signature, token.signing_input)
            if status is not Reason.VERIFICATION_FAIL:
                return status
        return Reason.VERIFICATION_FAIL if matched else Reason.KID_ALG_MISMATCH

    def time_bounds(self, token: Token) -> list[float]:
        """The instants (whole seconds) at which the token's time checks change their answer."""
        points: list[float] = [math.ceil(token.nbf - self.skew), math.ceil(token.iat - self.skew)]
        if token.exp:
            points.append(math.floor(token.exp + self.skew) + 1)
        return points

    def _candidates(self, kid: str) -> tuple[_Key, ...]:
        if not kid:
            return self.keys
        return self.by_kid.get(kid) or self.by_kid.get("", ())


def _bare_audience(audience: str) -> str:
    """An audience without `http://`/`https://` and one trailing `/` (Envoy's CheckAudience)."""
    for scheme in ("http://", "https://"):
        if audience.startswith(scheme):
            audience = audience[len(scheme) :]
            break
    return audience[:-1] if audience.endswith("/") else audience


def _load_keys(jwks: str) -> tuple[_Key, ...]:
    """The rule's keys as verifiers; none (every token rejected) when the text has no usable key."""
    if not jwks:
        return ()
    try:
        parsed = parse_jwks(jwks)
    except JwksError:
        return ()
    keys = []
    for jwk in parsed.keys:
        verify = _verifier(jwk)
        if verify is not None:
            keys.append(_Key(jwk.kid, jwk.algorithms, verify))
    return tuple(keys)


def _verifier(jwk: Jwk) -> _Verify | None:
    """A signature check for the key, built with `cryptography` (imported here, lazily)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    digests = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}
    try:
        if jwk.kty == "RSA":
            n, e = (int.from_bytes(v, "big") for v in jwk.material)
            rsa_key = rsa.RSAPublicNumbers(e, n).public_key()
            schemes: dict[str, tuple[padding.AsymmetricPadding, hashes.HashAlgorithm]] = {}
            for bits, digest in digests.items():
                schemes["RS" + bits] = (padding.PKCS1v15(), digest)
                pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=padding.PSS.AUTO)
                schemes["PS" + bits] = (pss, digest)

            def verify_rsa(alg: str, signature: bytes, data: bytes) -> Reason:
                scheme, digest = schemes[alg]
                try:
                    rsa_key.verify(signature, data, scheme, digest)
                except InvalidSignature:
                    return Reason.VERIFICATION_FAIL
                return Reason.OK

            return verify_rsa
        if jwk.kty == "EC":
            curves = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}
            x, y = (int.from_bytes(v, "big") for v in jwk.material)
            ec_key = ec.EllipticCurvePublicNumbers(x, y, curves[jwk.crv]).public_key()
            size = len(jwk.material[0])
            ecdsa = ec.ECDSA(digests[next(iter(jwk.algorithms))[2:]])

            def verify_ec(alg: str, signature: bytes, data: bytes) -> Reason:
                if len(signature) != 2 * size:
                    return Reason.VERIFICATION_FAIL
                r = int.from_bytes(signature[:size], "big")
                s = int.from_bytes(signature[size:], "big")
                try:
                    ec_key.verify(encode_dss_signature(r, s), data, ecdsa)
                except InvalidSignature:
                    return Reason.VERIFICATION_FAIL
                return Reason.OK

            return verify_ec
        ed_key = ed25519.Ed25519PublicKey.from_public_bytes(jwk.material[0])

        def verify_ed25519(alg: str, signature: bytes, data: bytes) -> Reason:
            if len(signature) != 64:
                return Reason.ED25519_WRONG_LENGTH
            try:
                ed_key.verify(signature, data)
            except InvalidSignature:
                return Reason.VERIFICATION_FAIL
            return Reason.OK

        return verify_ed25519
    except ValueError:  # a key OpenSSL refuses although the JWKS checks passed: skip it
        return None
