"""JWT authentication for Istio's `RequestAuthentication`, as Envoy's jwt_authn does it (pure).

`JwtRule` is one `spec.jwtRules[]` entry as plain data (`JwtRule.from_spec` validates it the way
Istio's webhook does).  The agent fetches `jwksUri` itself and passes the keys in `jwks`, so the
proxy never fetches (`agent.policy.jwks`).  `JwtAuthenticator` is built from every rule of the
RequestAuthentications that select one workload; `authenticate(headers, query, now)` answers a
`JwtOutcome` per request.  Semantics (Istio's generated jwt_authn config, Envoy's extractor,
authenticator and verifier; see `shared/notes/policy-semantics.md` section 2):

Locations.  A rule reads its token from `fromHeaders` (header name, optional value prefix),
`fromParams` (query parameters, percent-decoded) and `fromCookies`; with none of them set,
from `Authorization: Bearer <token>` and the `access_token` parameter.  A prefix is found
anywhere in the header value (case-sensitive) and the token is the run of base64url and `.`
characters after it; a header without the prefix is no token at all (missing, not invalid).

Requirement.  A token found at no location: the request passes without identity (status 0,
facts None; an AuthorizationPolicy with `requestPrincipals` decides).  Otherwise, for one rule,
every token found at that rule's locations must verify.  For several rules (sorted by issuer,
as istiod does) Istio asks for "any one rule verifies all its tokens, or else every rule either
verifies or finds no token"; when that fails, the reason reported is the last one that is
neither "missing" nor "issuer is not configured", else "issuer is not configured".  So rules
sharing a location each pick their own tokens by `iss`, and a token of an unknown issuer is
rejected with "Jwt issuer is not configured".

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

After a success.  The verified token's facts: principal `iss/sub` ("" when either is missing),
`aud`, `azp`, and the payload as claims with `scope`, `permission` and the rule's
`spaceDelimitedClaims` split on spaces.  Unless `forwardOriginalToken`, the token's header is
removed (and its query parameter stripped: Envoy leaves it, Ferry does not).
`outputPayloadToHeader` gets the payload segment (base64url), `outputClaimToHeaders` string,
number and boolean claims as text and objects and lists as base64 JSON (nested claims `a.b`).
Every output header name of every rule is removed from every request first, token or not
(anti-spoofing: Envoy only strips those of the rules it evaluated).  `JwtOutcome.remove_headers`
is applied before `set_headers`.  When one rule found several tokens (all verified), the facts
and output headers are the first one's in location order (headers, then parameters, then
cookies, each sorted by name), as Envoy's metadata ends up; only one query parameter is named
for stripping and cookies are never stripped.

For the proxy.  A CORS preflight (`is_cors_preflight`) skips JWT authentication, as Istio
configures it.  A 401/403 answer carries `www_authenticate(...)` and the reason as its body.

Caching.  Verifying a signature costs tens of microseconds and parsing a token a few tens; the
proxy does it on every request.  The outcome is kept in a bounded LRU (10,000 entries, 16 MiB
of keys) under the raw values found at the token locations (a header with its prefix, a
parameter still percent-encoded), with the span of seconds over which it holds: the clock only
matters at a token's `nbf`/`iat` - skew and `exp` + skew, so a cached outcome is reused while
now stays between the nearest such instants and recomputed past them; an accepted token's entry
never outlives its `exp` + skew.  A reused token costs the header lookups and one dict lookup.

`cryptography` (already a Ferry dependency, for certificates) checks signatures: RSA PKCS#1 v1.5
and PSS, ECDSA and Ed25519 through OpenSSL, the fastest option in Python.  Ferry does not use
PyJWT or joserfc: both wrap these same `cryptography` calls and would add a dependency, a second
parse of every token and exceptions to map back onto Envoy's reason texts and order of checks,
while the JOSE part they would add (compact-form parsing, the alg/key table) is small and is the
part that must match Envoy exactly.  No primitive is written here.  `cryptography` is imported
when an authenticator with keys is built, never by importing this module: a proxy worker whose
workloads have no RequestAuthentication never loads it.
"""

from __future__ import annotations

import base64
import enum
import json
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any
from urllib.parse import unquote, urlsplit

from agent.policy.facts import JwtFacts
from agent.policy.jwks import Jwk, JwksError, b64url_decode, parse_jwks, shown

MAX_TOKEN_BYTES = 64 * 1024
DEFAULT_CLOCK_SKEW = 60.0
CACHE_ENTRIES = 10_000
CACHE_BYTES = 16 << 20
ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
SPACE_DELIMITED_CLAIMS = ("scope", "permission")


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
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_.-]+")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_OUTPUT_HEADER_NAME = re.compile(r"[-_A-Za-z0-9]+")  # Istio's check for output headers
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_DURATION = re.compile(r"(\d{1,12})(?:\.(\d{1,9}))?s")
_RULE_FIELDS = frozenset(
    {
        "issuer",
        "audiences",
        "jwksUri",
        "jwks",
        "fromHeaders",
        "fromParams",
        "fromCookies",
        "outputPayloadToHeader",
        "forwardOriginalToken",
        "outputClaimToHeaders",
        "timeout",
        "spaceDelimitedClaims",
    }
)


@dataclass(frozen=True, slots=True)
class TokenHeader:
    """A header to read a token from (`fromHeaders[]`); `name` is lower-case."""

    name: str
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class ClaimToHeader:
    """`outputClaimToHeaders[]`: copy claim `claim` (nested: `a.b`) to header `header`."""

    header: str
    claim: str


@dataclass(frozen=True, slots=True)
class JwtRule:
    """One `jwtRules[]` entry.  `jwks` is the key set as JSON text: inline in the document, or
    fetched by the agent from `jwks_uri` ("" while no good fetch exists: fail closed).
    `timeout` bounds that fetch in seconds (None: the agent's default, 5 s as in Istio)."""

    issuer: str
    audiences: tuple[str, ...] = ()
    jwks: str = ""
    jwks_uri: str = ""
    from_headers: tuple[TokenHeader, ...] = ()
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    forward_original_token: bool = False
    output_payload_to_header: str = ""
    output_claim_to_headers: tuple[ClaimToHeader, ...] = ()
    space_delimited_claims: tuple[str, ...] = ()
    timeout: float | None = None

    @staticmethod
    def from_spec(raw: Mapping[str, Any]) -> JwtRule:
        """Parse and validate one `jwtRules[]` object; ValueError names the field and value."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"a jwtRule must be an object, not {type(raw).__name__}")
        unknown = sorted(str(k) for k in raw if k not in _RULE_FIELDS)
        if unknown:
            raise ValueError(
                f"unknown field {shown(unknown[0])} (known: {', '.join(sorted(_RULE_FIELDS))})"
            )
        issuer = _text(raw, "issuer")
        if not issuer:
            raise ValueError("issuer: must be set")
        jwks_uri = _text(raw, "jwksUri")
        if jwks_uri:
            _check_uri(jwks_uri)
        jwks = _text(raw, "jwks")
        if jwks:
            try:
                parse_jwks(jwks)
            except JwksError as e:
                raise ValueError(f"jwks: {e}") from None
        elif not jwks_uri:
            raise ValueError("jwks or jwksUri: one must be set (OIDC discovery is not supported)")
        headers = []
        for i, item in enumerate(_list(raw, "fromHeaders", Mapping)):
            where = f"fromHeaders[{i}]"
            _no_unknown(item, where, {"name", "prefix"})
            name = _text(item, "name", where)
            if _HEADER_NAME.fullmatch(name) is None:
                raise ValueError(f"{where}.name: {shown(name)} is not a header name")
            headers.append(TokenHeader(name.lower(), _text(item, "prefix", where)))
        claims = []
        for i, item in enumerate(_list(raw, "outputClaimToHeaders", Mapping)):
            where = f"outputClaimToHeaders[{i}]"
            _no_unknown(item, where, {"header", "claim"})
            header = _output_header(_text(item, "header", where), f"{where}.header")
            claim = _text(item, "claim", where)
            if not header or not claim:
                raise ValueError(f"{where}: header and claim must both be set")
            claims.append(ClaimToHeader(header, claim))
        forward = raw.get("forwardOriginalToken", False)
        if not isinstance(forward, bool):
            raise ValueError(f"forwardOriginalToken: {shown(forward)} is not a boolean")
        return JwtRule(
            issuer=issuer,
            audiences=_names(raw, "audiences"),
            jwks=jwks,
            jwks_uri=jwks_uri,
            from_headers=tuple(headers),
            from_params=_names(raw, "fromParams"),
            from_cookies=_names(raw, "fromCookies"),
            forward_original_token=forward,
            output_payload_to_header=_output_header(
                _text(raw, "outputPayloadToHeader"), "outputPayloadToHeader"
            ),
            output_claim_to_headers=tuple(claims),
            space_delimited_claims=_names(raw, "spaceDelimitedClaims"),
            timeout=_duration(raw.get("timeout")),
        )

    def to_spec(self) -> dict[str, Any]:
        """The rule as a `jwtRules[]` object again (`from_spec(rule.to_spec()) == rule`)."""
        out: dict[str, Any] = {"issuer": self.issuer}
        optional: dict[str, Any] = {
            "audiences": list(self.audiences),
            "jwks": self.jwks,
            "jwksUri": self.jwks_uri,
            "fromHeaders": [
                {"name": h.name, "prefix": h.prefix} if h.prefix else {"name": h.name}
                for h in self.from_headers
            ],
            "fromParams": list(self.from_params),
            "fromCookies": list(self.from_cookies),
            "forwardOriginalToken": self.forward_original_token,
            "outputPayloadToHeader": self.output_payload_to_header,
            "outputClaimToHeaders": [
                {"header": c.header, "claim": c.claim} for c in self.output_claim_to_headers
            ],
            "spaceDelimitedClaims": list(self.space_delimited_claims),
        }
        out.update((k, v) for k, v in optional.items() if v)
        if self.timeout is not None:
            out["timeout"] = f"{self.timeout:.9f}".rstrip("0").rstrip(".") + "s"
        return out


def _text(raw: Mapping[str, Any], name: str, where: str = "") -> str:
    value = raw.get(name, "")
    if not isinstance(value, str):
        raise ValueError(f"{where + '.' if where else ''}{name}: {shown(value)} is not a string")
    return value


def _list(raw: Mapping[str, Any], name: str, kind: type) -> list[Any]:
    value = raw.get(name, [])
    if not isinstance(value, list):
        raise ValueError(f"{name}: {shown(value)} is not a list")
    expected = "an object" if kind is Mapping else "a string"
    for i, item in enumerate(value):
        if not isinstance(item, kind):
            raise ValueError(f"{name}[{i}]: {shown(item)} is not {expected}")
    return value


def _names(raw: Mapping[str, Any], name: str) -> tuple[str, ...]:
    values = _list(raw, name, str)
    for i, value in enumerate(values):
        if not value:
            raise ValueError(f"{name}[{i}]: must not be empty")
    return tuple(values)


def _no_unknown(item: Mapping[str, Any], where: str, known: set[str]) -> None:
    unknown = sorted(str(k) for k in item if k not in known)
    if unknown:
        raise ValueError(f"{where}: unknown field {shown(unknown[0])}")


def _output_header(name: str, where: str) -> str:
    if name and _OUTPUT_HEADER_NAME.fullmatch(name) is None:
        raise ValueError(f"{where}: {shown(name)} is not a header name (letters, digits, '-', '_')")
    return name.lower()


def _check_uri(uri: str) -> None:
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as e:
        raise ValueError(f"jwksUri: {shown(uri)} is not a URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"jwksUri: {shown(uri)} is not an http:// or https:// URL with a host")


def _duration(value: Any) -> float | None:
    if value is None:
        return None
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"timeout: {shown(value)} is not a duration like '5s' or '1.5s'")
    seconds = int(match[1]) + int((match[2] or "0").ljust(9, "0")) / 1e9
    if seconds <= 0:
        raise ValueError(f"timeout: {shown(value)} must be more than 0s")
    return seconds


@dataclass(frozen=True, slots=True)
class JwtOutcome:
    """What the proxy does with a request: pass (status 0) or answer `status` with `reason`.

    On a pass the caller removes `remove_headers`, then adds `set_headers`, and strips the query
    parameter `strip_query_param`; `facts` is the verified token's (None without a token)."""

    status: int
    facts: JwtFacts | None
    reason: str
    remove_headers: tuple[str, ...] = ()
    set_headers: tuple[tuple[str, str], ...] = ()
    strip_query_param: str | None = None


def www_authenticate(scheme: str, host: str, path: str) -> str:
    """The `www-authenticate` value of a 401/403 JWT answer (Envoy: the realm is the request
    URL, and every rejected token is an `invalid_token`)."""
    realm = f"{scheme}://{host}{path}".replace("\\", "\\\\").replace('"', '\\"')
    return f'Bearer realm="{realm}", error="invalid_token"'


def is_cors_preflight(method: str, headers: Mapping[str, str]) -> bool:
    """True for a CORS preflight, which Istio lets through without JWT authentication."""
    return (
        method == "OPTIONS"
        and bool(headers.get("origin"))
        and bool(headers.get("access-control-request-method"))
    )


@dataclass(frozen=True, slots=True)
class _Location:
    kind: str  # "header" | "param" | "cookie"
    name: str
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class _Token:
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


_Verify = Callable[[str, bytes, bytes], Reason]


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str
    algorithms: frozenset[str]
    verify: _Verify


class _Provider:
    """One rule, compiled: its locations (indexes into the authenticator's), keys by kid."""

    __slots__ = ("audiences", "by_kid", "keys", "locations", "rule", "space_claims")

    def __init__(self, rule: JwtRule, locations: tuple[int, ...], keys: tuple[_Key, ...]) -> None:
        self.rule = rule
        self.locations = locations
        self.audiences = frozenset(_bare_audience(a) for a in rule.audiences)
        self.keys = keys
        self.by_kid: dict[str, tuple[_Key, ...]] = {
            kid: tuple(k for k in keys if k.kid in ("", kid)) for kid in {k.kid for k in keys}
        }
        self.space_claims = tuple(
            dict.fromkeys(SPACE_DELIMITED_CLAIMS + rule.space_delimited_claims)
        )

    def candidates(self, kid: str) -> tuple[_Key, ...]:
        if not kid:
            return self.keys
        return self.by_kid.get(kid) or self.by_kid.get("", ())


class JwtAuthenticator:
    """The JWT rules of one workload, compiled; `authenticate` decides one request."""

    def __init__(
        self,
        rules: Sequence[JwtRule],
        *,
        clock_skew: float = DEFAULT_CLOCK_SKEW,
        cache_entries: int = CACHE_ENTRIES,
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        self._skew = clock_skew
        index: dict[_Location, int] = {}
        providers = []
        for rule in sorted(rules, key=lambda r: r.issuer):
            own = _rule_locations(rule)
            for location in own:
                index.setdefault(location, len(index))
            providers.append(
                _Provider(rule, tuple(index[loc] for loc in own), _load_keys(rule.jwks))
            )
        self._locations = sorted(index, key=index.__getitem__)
        self._providers = tuple(providers)
        self._headers = tuple(
            (i, loc.name, loc.prefix)
            for i, loc in enumerate(self._locations)
            if loc.kind == "header"
        )
        self._params = {loc.name: i for i, loc in enumerate(self._locations) if loc.kind == "param"}
        self._cookies = {
            loc.name: i for i, loc in enumerate(self._locations) if loc.kind == "cookie"
        }
        outputs = [r.output_payload_to_header for r in rules if r.output_payload_to_header]
        outputs += [c.header for r in rules for c in r.output_claim_to_headers]
        self._sanitize = tuple(dict.fromkeys(outputs))
        self._no_token = JwtOutcome(0, None, Reason.MISSING, self._sanitize)
        self._cache: OrderedDict[tuple[str | None, ...], tuple[JwtOutcome, float, float, int]] = (
            OrderedDict()
        )
        self._cache_entries = cache_entries
        self._cache_bytes = cache_bytes
        self._cached_bytes = 0

    def authenticate(self, headers: Mapping[str, str], query: str, now: float) -> JwtOutcome:
        """Decide one request from its headers (lower-case names, repeated headers joined with
        ","), its raw query string (without "?") and the time (seconds since the epoch)."""
        found = self._find(headers, query)
        if found is None:
            return self._no_token
        second = math.floor(now)
        cached = self._cache.get(found)
        if cached is not None:
            if cached[1] <= second < cached[2]:
                self._cache.move_to_end(found)
                return cached[0]
            self._forget(found)
        bounds: list[float] = []
        outcome = self._decide(self._tokens(found), second, bounds)
        size = sum(len(v) for v in found if v is not None)
        if size <= self._cache_bytes:
            low = max((b for b in bounds if b <= second), default=-math.inf)
            high = min((b for b in bounds if b > second), default=math.inf)
            self._cache[found] = (outcome, low, high, size)
            self._cached_bytes += size
            while len(self._cache) > self._cache_entries or self._cached_bytes > self._cache_bytes:
                self._forget(next(iter(self._cache)))
        return outcome

    def _forget(self, key: tuple[str | None, ...]) -> None:
        self._cached_bytes -= self._cache.pop(key)[3]

    def _find(self, headers: Mapping[str, str], query: str) -> tuple[str | None, ...] | None:
        """The raw value holding a token at each location (None where there is none), or None
        when no location has one.  Raw values (a header with its prefix, a parameter still
        percent-encoded) key the cache, so a reused token costs no extraction."""
        found: list[str | None] = [None] * len(self._locations)
        seen = False
        for i, name, prefix in self._headers:
            value = headers.get(name)
            if value is not None and (not prefix or prefix in value):
                found[i] = value
                seen = True
        if self._params and query:
            for part in query.split("&"):
                name, _, value = part.partition("=")
                slot = self._params.get(unquote(name) if "%" in name else name)
                if slot is not None and found[slot] is None:
                    found[slot] = value
                    seen = True
        if self._cookies and "cookie" in headers:
            for part in headers["cookie"].split(";"):
                name, _, value = part.strip().partition("=")
                slot = self._cookies.get(name)
                if slot is not None and found[slot] is None:
                    found[slot] = value
                    seen = True
        return tuple(found) if seen else None

    def _tokens(self, found: tuple[str | None, ...]) -> tuple[str | None, ...]:
        """The tokens in the raw values: after a header's prefix the run of base64url and "."
        characters (the whole value when there is none), a parameter percent-decoded, a cookie
        without its quotes."""
        tokens: list[str | None] = []
        for location, value in zip(self._locations, found, strict=True):
            if value is not None:
                if location.kind == "param":
                    value = unquote(value)
                elif location.kind == "cookie":
                    quoted = len(value) > 1 and value[0] == value[-1] == '"'
                    value = value[1:-1] if quoted else value
                elif location.prefix:
                    start = value.find(location.prefix) + len(location.prefix)
                    run = _TOKEN_CHARS.search(value, start)
                    value = run[0] if run is not None else value
            tokens.append(value)
        return tuple(tokens)

    def _decide(self, found: tuple[str | None, ...], now: int, bounds: list[float]) -> JwtOutcome:
        parsed: dict[str, _Token | Reason] = {}
        statuses: list[Reason] = []
        for provider in self._providers:
            status, verified = self._check_provider(provider, found, now, parsed, bounds)
            if status is Reason.OK:
                return self._success(provider, verified)
            statuses.append(status)
        if len(statuses) > 1:
            # Istio's requires_all{requires_any{P_i, allow_missing}}: the first real failure.
            statuses.append(next((s for s in statuses if s is not Reason.MISSING), Reason.OK))
            if statuses[-1] is Reason.OK:
                return self._no_token
        final = Reason.MISSING
        for status in statuses:
            if status not in (Reason.MISSING, Reason.UNKNOWN_ISSUER) or final is Reason.MISSING:
                final = status
        if final is Reason.MISSING:
            return self._no_token
        return JwtOutcome(403 if final is Reason.AUDIENCE_NOT_ALLOWED else 401, None, final)

    def _check_provider(
        self,
        provider: _Provider,
        found: tuple[str | None, ...],
        now: int,
        parsed: dict[str, _Token | Reason],
        bounds: list[float],
    ) -> tuple[Reason, list[tuple[int, _Token]]]:
        """Verify every token at the provider's locations, last location first (Envoy's order)."""
        verified: list[tuple[int, _Token]] = []
        for i in reversed(provider.locations):
            raw = found[i]
            if raw is None:
                continue
            token = parsed.get(raw)
            if token is None:
                token = parsed[raw] = _parse(raw)
                if isinstance(token, _Token):
                    bounds.extend(self._time_bounds(token))
            if isinstance(token, Reason):
                return token, []
            status = self._check_token(provider, token, now)
            if status is not Reason.OK:
                return status, []
            verified.append((i, token))
        return (Reason.OK, verified) if verified else (Reason.MISSING, [])

    def _time_bounds(self, token: _Token) -> list[float]:
        """The instants (whole seconds) at which the token's time checks change their answer."""
        points: list[float] = [math.ceil(token.nbf - self._skew), math.ceil(token.iat - self._skew)]
        if token.exp:
            points.append(math.floor(token.exp + self._skew) + 1)
        return points

    def _check_token(self, provider: _Provider, token: _Token, now: int) -> Reason:
        if token.iss != provider.rule.issuer:
            return Reason.UNKNOWN_ISSUER
        if now + self._skew < token.nbf:
            return Reason.NOT_YET_VALID
        if token.exp and now > token.exp + self._skew:
            return Reason.EXPIRED
        if now + self._skew < token.iat:
            return Reason.ISSUED_IN_FUTURE
        if provider.audiences and provider.audiences.isdisjoint(
            _bare_audience(a) for a in token.audiences
        ):
            return Reason.AUDIENCE_NOT_ALLOWED
        if not provider.keys:
            return Reason.NO_VALID_KEYS
        matched = False
        for key in provider.candidates(token.kid):
            if token.alg not in key.algorithms:
                continue
            matched = True
            status = key.verify(token.alg, token.signature, token.signing_input)
            if status is not Reason.VERIFICATION_FAIL:
                return status
        return Reason.VERIFICATION_FAIL if matched else Reason.KID_ALG_MISMATCH

    def _success(self, provider: _Provider, verified: list[tuple[int, _Token]]) -> JwtOutcome:
        rule = provider.rule
        remove = list(self._sanitize)
        strip = None
        if not rule.forward_original_token:
            for i, _ in verified:
                location = self._locations[i]
                if location.kind == "header" and location.name not in remove:
                    remove.append(location.name)
                elif location.kind == "param" and strip is None:
                    strip = location.name
        token = verified[-1][1]  # verified last-location-first: this is the first location's
        set_headers = []
        if rule.output_payload_to_header:
            set_headers.append((rule.output_payload_to_header, token.payload_segment))
        for item in rule.output_claim_to_headers:
            value = _claim_text(token.payload, item.claim)
            if value:
                set_headers.append((item.header, value))
        facts = JwtFacts(
            principal=f"{token.iss}/{token.sub}" if token.iss and token.sub else "",
            audiences=token.audiences,
            presenter=azp if isinstance(azp := token.payload.get("azp"), str) else "",
            claims=MappingProxyType(_split_claims(token.payload, provider.space_claims)),
        )
        return JwtOutcome(0, facts, Reason.OK, tuple(remove), tuple(set_headers), strip)


def _rule_locations(rule: JwtRule) -> list[_Location]:
    """The rule's locations in Envoy's extraction order: headers, params, cookies, each sorted."""
    headers = [_Location("header", h.name, h.prefix) for h in rule.from_headers]
    params = [_Location("param", p) for p in rule.from_params]
    cookies = [_Location("cookie", c) for c in rule.from_cookies]
    if not (headers or params or cookies):
        headers = [_Location("header", "authorization", "Bearer ")]
        params = [_Location("param", "access_token")]
    headers.sort(key=lambda loc: loc.name + loc.prefix)
    return list(
        dict.fromkeys(
            headers
            + sorted(set(params), key=lambda loc: loc.name)
            + sorted(set(cookies), key=lambda loc: loc.name)
        )
    )


def _bare_audience(audience: str) -> str:
    """An audience without `http://`/`https://` and one trailing `/` (Envoy's CheckAudience)."""
    for scheme in ("http://", "https://"):
        if audience.startswith(scheme):
            audience = audience[len(scheme) :]
            break
    return audience[:-1] if audience.endswith("/") else audience


def _parse(raw: str) -> _Token | Reason:
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
    return _Token(
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


def _split_claims(payload: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The payload with space-delimited string claims as lists (Istio's normalization)."""
    claims = payload
    for name in names:
        value = payload.get(name)
        if isinstance(value, str) and (words := value.split()):
            if claims is payload:
                claims = dict(payload)
            claims[name] = words
    return claims


def _claim_text(payload: dict[str, Any], path: str) -> str:
    """A claim as Envoy writes it into a header; "" when absent or unfit for a header."""
    value: Any = payload
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return ""
        value = value[part]
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float)):
        integral = isinstance(value, int) or value.is_integer()
        text = str(int(value)) if integral and 0 <= value < 2**64 else f"{value:f}"
    elif isinstance(value, str):
        text = value
    elif isinstance(value, (dict, list)):
        encoded = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        text = base64.b64encode(encoded).decode("ascii")
    else:
        return ""
    return text if _HEADER_VALUE.fullmatch(text) else ""


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
