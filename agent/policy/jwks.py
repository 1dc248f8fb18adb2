"""JSON Web Key Sets: parsing into verification keys, and when the agent refetches `jwksUri` (pure).

Parsing (`parse_jwks`).  A JWKS document (RFC 7517) is a JSON object whose `keys` array holds one
object per key.  Each key becomes a `Jwk`, plain data with the key type, its optional `kid` and
`alg`, its curve and its decoded public numbers; `agent.policy.jwt_tokens` turns those into
`cryptography` key objects when a workload needs them.  Like Envoy's jwt_verify_lib, a key that
cannot be used is skipped and the document is refused only when no usable key is left; every
skipped key is reported in `JwkSet.skipped`, named by its index and kid, with the reason.
Accepted keys, and what each can verify:

    kty RSA, n and e (e = 3 or 65537, n of 2048 to 16384 bits)  RS256/384/512, PS256/384/512
    kty EC,  crv P-256 / P-384 / P-521, x and y on the curve    ES256 / ES384 / ES512
    kty OKP, crv Ed25519, x of 32 bytes                         EdDSA

An `alg` on the key pins it to that one algorithm and must fit its type and curve (an EC key with
neither `crv` nor `alg` is P-256, as in Envoy).  Refused, with a reason: symmetric `oct` keys
(Ferry verifies no HMAC token: a shared secret in a policy file is a secret in every proxy, and
an HS256 token "signed" with an RSA public key is the classic key-confusion attack), keys marked
`"use": "enc"` or whose `key_ops` lack `verify`, other key types and curves, RSA keys under 2048
bits (RFC 7518 3.3), points that are not on their curve.  Private members (`d`, `p`, ...) are
never read and never published: `JwkSet.to_json` writes the usable public keys only.

Refreshing (`JwksSource`, `after_fetch`).  The agent fetches each `jwksUri` and inlines the keys
into the policy it pushes, as istiod does, so proxies never fetch.  The timing is Istio's
(`pilot/pkg/model/jwks_resolver.go`): fetch at once, then every 20 minutes; after a failure retry
in 1 minute, doubling on each further failure up to 1 hour; a success resets the interval.  A
failed fetch, or a document without a usable key, keeps the last good keys; keys that could not
be refreshed for 7 days are dropped.  With no good keys the published text is "" and
`agent.policy.jwt` rejects every token of that issuer ("Jwks doesn't have any valid public key"):
fail closed.  The HTTP GET itself is the agent's adapter (`agent.jwks_fetch`), which calls
this core:

    source = JwksSource(uri)                                # when a rule names a new jwksUri
    if source.due(now):
        try:
            body = await fetch(source.uri, timeout=rule.timeout or 5.0, max_bytes=MAX_JWKS_BYTES)
        except (OSError, TimeoutError, ValueError) as e:    # whatever the adapter raises
            source = after_fetch(source, now, error=str(e))
        else:
            source = after_fetch(source, now, body=body)
        # source.published is the `jwks` text to inline into every JwtRule with this jwksUri;
        # push a new policy version when it changed; source.error / .failures are for status.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

MAX_JWKS_BYTES = 1 << 20
"""A JWKS document larger than this (1 MiB) is refused; the fetcher should stop reading there."""

REFRESH_INTERVAL = 20 * 60.0
"""Seconds between two successful fetches of one `jwksUri` (Istio's default, 20 minutes)."""

RETRY_INTERVAL = 60.0
"""Seconds until the first retry after a failed fetch (Istio: 1 minute), doubled on each failure."""

MAX_RETRY_INTERVAL = 60 * 60.0
"""Upper bound of the doubling retry interval (Istio: 1 hour)."""

KEYS_LIFETIME = 7 * 24 * 3600.0
"""Keys not refreshed successfully for this long (Istio: 7 days) are dropped: fail closed."""

RSA_MIN_BITS = 2048
RSA_MAX_BITS = 16384
RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})

# crv -> (JWS alg, coordinate size in bytes, field prime p, curve coefficient b); a = -3 for all.
EC_CURVES: Mapping[str, tuple[str, int, int, int]] = {
    "P-256": (
        "ES256",
        32,
        2**256 - 2**224 + 2**192 + 2**96 - 1,
        0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B,
    ),
    "P-384": (
        "ES384",
        48,
        2**384 - 2**128 - 2**96 + 2**32 - 1,
        int(
            "B3312FA7E23EE7E4988E056BE3F82D19181D9C6EFE8141120314088F5013875A"
            "C656398D8A2ED19D2A85C8EDD3EC2AEF",
            16,
        ),
    ),
    "P-521": (
        "ES512",
        66,
        2**521 - 1,
        int(
            "0051953EB9618E1C9A1F929A21A0B68540EEA2DA725B99B315F3B8B489918EF1"
            "09E156193951EC7E937B1652C0BD3BB1BF073573DF883D2C34F1EF451FD46B503F00",
            16,
        ),
    ),
}
EC_ALGORITHMS = {alg: crv for crv, (alg, _, _, _) in EC_CURVES.items()}
ED25519_KEY_BYTES = 32

_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class JwksError(ValueError):
    """A JWKS document that yields no usable key; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Jwk:
    """One usable public key.  `material` is (n, e) for RSA, (x, y) for EC, (x,) for OKP, as the
    big-endian bytes of the JWK members; `algorithms` are the JWS algs it may verify."""

    kty: str
    kid: str
    alg: str
    crv: str
    material: tuple[bytes, ...]
    algorithms: frozenset[str]

    def to_dict(self) -> dict[str, str]:
        """The key as a JWK object with its public members only."""
        out = {"kty": self.kty}
        if self.kid:
            out["kid"] = self.kid
        if self.alg:
            out["alg"] = self.alg
        if self.crv:
            out["crv"] = self.crv
        names = {"RSA": ("n", "e"), "EC": ("x", "y"), "OKP": ("x",)}[self.kty]
        for name, value in zip(names, self.material, strict=True):
            out[name] = base64.urlsafe_b64encode(value).rstrip(b"=").decode("ascii")
        return out


@dataclass(frozen=True, slots=True)
class JwkSet:
    """The usable keys of a document, in document order, and why the others were skipped."""

    keys: tuple[Jwk, ...]
    skipped: tuple[str, ...] = ()

    def to_json(self) -> str:
        """Canonical JSON of the usable public keys: what the agent publishes to proxies
        (equal documents give equal text, so an unchanged refetch changes no policy version)."""
        return json.dumps(
            {"keys": [key.to_dict() for key in self.keys]}, sort_keys=True, separators=(",", ":")
        )


def parse_jwks(text: str) -> JwkSet:
    """The usable keys of a JWKS document; `JwksError` when there is none (the message lists
    every key's problem)."""
    if len(text) > MAX_JWKS_BYTES:
        raise JwksError(f"Jwks is larger than {MAX_JWKS_BYTES} bytes ({len(text)})")
    try:
        doc = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:
        raise JwksError(f"Jwks is an invalid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise JwksError(f"Jwks is not a JSON object but {_json_type(doc)}")
    if "keys" not in doc:
        raise JwksError("Jwks does not have [keys] field")
    entries = doc["keys"]
    if not isinstance(entries, list):
        raise JwksError(f"[keys] in Jwks is not an array but {_json_type(entries)}")
    keys: list[Jwk] = []
    skipped: list[str] = []
    for index, entry in enumerate(entries):
        try:
            keys.append(_parse_key(entry))
        except JwksError as e:
            skipped.append(f"{_key_label(index, entry)}: {e}")
    if not keys:
        problems = "; ".join(skipped) if skipped else "[keys] is empty"
        raise JwksError(f"Jwks doesn't have any valid public key: {problems}")
    return JwkSet(tuple(keys), tuple(skipped))


def _parse_key(entry: Any) -> Jwk:
    if not isinstance(entry, dict):
        raise JwksError(f"is not a JSON object but {_json_type(entry)}")
    kty = _member(entry, "kty", required=True)
    kid = _member(entry, "kid")
    alg = _member(entry, "alg")
    use = _member(entry, "use")
    if use not in ("", "sig"):
        raise JwksError(f"[use] is {shown(use)}, not 'sig'")
    ops = entry.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise JwksError("[key_ops] does not include 'verify'")
    if kty == "RSA":
        return _rsa_key(entry, kid, alg)
    if kty == "EC":
        return _ec_key(entry, kid, alg)
    if kty == "OKP":
        return _okp_key(entry, kid, alg)
    if kty == "oct":
        raise JwksError("symmetric [kty] 'oct' is refused: HMAC algorithms are not accepted")
    raise JwksError(f"[kty] {shown(kty)} is not supported (RSA, EC or OKP)")


def _rsa_key(entry: dict[str, Any], kid: str, alg: str) -> Jwk:
    if alg and alg not in RSA_ALGORITHMS:
        raise JwksError(f"[alg] {shown(alg)} does not fit an RSA key (RS256..512, PS256..512)")
    n = _number(entry, "n")
    e = _number(entry, "e")
    modulus = int.from_bytes(n, "big")
    exponent = int.from_bytes(e, "big")
    if exponent not in (3, 65537):
        raise JwksError(f"[e] is {exponent}, not 3 or 65537")
    if not RSA_MIN_BITS <= modulus.bit_length() <= RSA_MAX_BITS or modulus % 2 == 0:
        raise JwksError(
            f"[n] is a {modulus.bit_length()}-bit {'even ' if modulus % 2 == 0 else ''}number, "
            f"not an odd modulus of {RSA_MIN_BITS} to {RSA_MAX_BITS} bits"
        )
    return Jwk("RSA", kid, alg, "", (n, e), frozenset({alg}) if alg else RSA_ALGORITHMS)


def _ec_key(entry: dict[str, Any], kid: str, alg: str) -> Jwk:
    crv = _member(entry, "crv")
    if alg and alg not in EC_ALGORITHMS:
        raise JwksError(f"[alg] {shown(alg)} does not fit an EC key (ES256, ES384, ES512)")
    if not crv:
        crv = EC_ALGORITHMS[alg] if alg else "P-256"
    if crv not in EC_CURVES:
        raise JwksError(f"[crv] {shown(crv)} is not supported for an EC key (P-256/384/521)")
    curve_alg, size, p, b = EC_CURVES[crv]
    if alg and alg != curve_alg:
        raise JwksError(f"[alg] {shown(alg)} does not fit [crv] {shown(crv)} (needs {curve_alg})")
    x = _number(entry, "x")
    y = _number(entry, "y")
    if len(x) > size or len(y) > size:
        raise JwksError(f"[x] or [y] is longer than the {size} bytes of {crv}")
    px = int.from_bytes(x, "big")
    py = int.from_bytes(y, "big")
    if px >= p or py >= p or (py * py - (px * px * px - 3 * px + b)) % p != 0:
        raise JwksError(f"[x], [y] is not a point on {crv}")
    return Jwk(
        "EC", kid, alg, crv, (x.rjust(size, b"\0"), y.rjust(size, b"\0")), frozenset({curve_alg})
    )


def _okp_key(entry: dict[str, Any], kid: str, alg: str) -> Jwk:
    if alg and alg != "EdDSA":
        raise JwksError(f"[alg] {shown(alg)} does not fit an OKP key (EdDSA)")
    crv = _member(entry, "crv", required=True)
    if crv != "Ed25519":
        raise JwksError(f"[crv] {shown(crv)} is not supported for an OKP key (Ed25519)")
    x = _number(entry, "x")
    if len(x) != ED25519_KEY_BYTES:
        raise JwksError(f"[x] is {len(x)} bytes, an Ed25519 key is {ED25519_KEY_BYTES}")
    return Jwk("OKP", kid, alg, crv, (x,), frozenset({"EdDSA"}))


def _member(entry: dict[str, Any], name: str, *, required: bool = False) -> str:
    value = entry.get(name)
    if value is None:
        if required:
            raise JwksError(f"[{name}] is missing")
        return ""
    if not isinstance(value, str):
        raise JwksError(f"[{name}] is not a string but {_json_type(value)}")
    return value


def _number(entry: dict[str, Any], name: str) -> bytes:
    text = _member(entry, name, required=True)
    decoded = b64url_decode(text)
    if not decoded:
        raise JwksError(f"[{name}] is not base64url or is empty")
    return decoded


def b64url_decode(text: str) -> bytes | None:
    """Strict base64url (RFC 4648 section 5) with optional padding; None when malformed."""
    bare = text.rstrip("=")
    if len(text) - len(bare) > 2 or len(bare) % 4 == 1 or _B64URL.fullmatch(bare) is None:
        return None
    try:
        return base64.urlsafe_b64decode(bare + "=" * (-len(bare) % 4))
    except binascii.Error:
        return None


def _key_label(index: int, entry: Any) -> str:
    kid = entry.get("kid") if isinstance(entry, dict) else None
    return f"keys[{index}] (kid {shown(kid)})" if isinstance(kid, str) else f"keys[{index}]"


def shown(value: Any, limit: int = 60) -> str:
    """A short repr of an untrusted value for messages (never a whole key or document)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else "null"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@dataclass(frozen=True, slots=True)
class JwksSource:
    """What the agent knows about one `jwksUri`: the text it publishes and when to fetch next.

    `published` is the canonical JWKS of the last good fetch ("" while there is none: every token
    of the issuer is then rejected).  `fetched_at` is the last good fetch, `next_fetch_at` the
    next attempt (0: at once), `failures` the consecutive failures and `error` the last one."""

    uri: str
    published: str = ""
    fetched_at: float | None = None
    next_fetch_at: float = 0.0
    failures: int = 0
    error: str = ""

    def due(self, now: float) -> bool:
        """True when the agent should fetch this URI now."""
        return now >= self.next_fetch_at


def after_fetch(
    source: JwksSource,
    now: float,
    *,
    body: str | None = None,
    error: str = "",
    refresh_interval: float = REFRESH_INTERVAL,
) -> JwksSource:
    """The source after a fetch that returned `body`, or failed with `error` (body None).

    A body that is not a JWKS with a usable key counts as a failure; the message names it."""
    if body is not None:
        try:
            keys = parse_jwks(body)
        except JwksError as e:
            error = str(e)
        else:
            return replace(
                source,
                published=keys.to_json(),
                fetched_at=now,
                next_fetch_at=now + refresh_interval,
                failures=0,
                error="",
            )
    failures = source.failures + 1
    retry = min(RETRY_INTERVAL * 2 ** min(failures - 1, 32), MAX_RETRY_INTERVAL)
    published = source.published
    if source.fetched_at is not None and now - source.fetched_at >= KEYS_LIFETIME:
        published = ""
    return replace(
        source,
        published=published,
        next_fetch_at=now + retry,
        failures=failures,
        error=error or "fetch failed",
    )
