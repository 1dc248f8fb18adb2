"""JWT authentication for Istio's `RequestAuthentication`, as Envoy's jwt_authn does it (pure).

`JwtAuthenticator` is built from every rule (`agent.policy.jwt_rules.JwtRule`) of the
RequestAuthentications that select one workload; `authenticate(headers, query, now)` answers a
`JwtOutcome` per request.  It finds the tokens (`agent.policy.jwt_extract`), checks each against
its rules (`agent.policy.jwt_tokens`: form, claims, time, audience, signature), and decides here
what the request as a whole gets, caching the answer.  Semantics (Istio's generated jwt_authn
config, Envoy's extractor, authenticator and verifier; see `shared/notes/policy-semantics.md`
section 2):

Requirement.  A token found at no location: the request passes without identity (status 0,
facts None; an AuthorizationPolicy with `requestPrincipals` decides).  Otherwise, for one rule,
every token found at that rule's locations must verify.  For several rules (sorted by issuer,
as istiod does) Istio asks for "any one rule verifies all its tokens, or else every rule either
verifies or finds no token"; when that fails, the reason reported is the last one that is
neither "missing" nor "issuer is not configured", else "issuer is not configured".  So rules
sharing a location each pick their own tokens by `iss`, and a token of an unknown issuer is
rejected with "Jwt issuer is not configured".

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
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from agent.policy.facts import JwtFacts
from agent.policy.jwt_extract import TokenExtractor
from agent.policy.jwt_rules import JwtRule
from agent.policy.jwt_tokens import Reason, Token, Verifier, parse_token

DEFAULT_CLOCK_SKEW = 60.0
CACHE_ENTRIES = 10_000
CACHE_BYTES = 16 << 20
SPACE_DELIMITED_CLAIMS = ("scope", "permission")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


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


class _Provider:
    """One rule, compiled: its locations (indexes into the extractor's) and its verifier."""

    __slots__ = ("locations", "rule", "space_claims", "verifier")

    def __init__(self, rule: JwtRule, locations: tuple[int, ...], verifier: Verifier) -> None:
        self.rule = rule
        self.locations = locations
        self.verifier = verifier
        self.space_claims = tuple(
            dict.fromkeys(SPACE_DELIMITED_CLAIMS + rule.space_delimited_claims)
        )


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
        ordered = sorted(rules, key=lambda r: r.issuer)
        extractor = TokenExtractor(ordered)
        self._providers = tuple(
            _Provider(rule, own, Verifier(rule.issuer, rule.audiences, rule.jwks, clock_skew))
            for rule, own in zip(ordered, extractor.slots, strict=True)
        )
        self._extractor = extractor
        self._locations = extractor.locations
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
        found = self._extractor.find(headers, query)
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
        outcome = self._decide(self._extractor.tokens(found), second, bounds)
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

    def _decide(self, found: tuple[str | None, ...], now: int, bounds: list[float]) -> JwtOutcome:
        parsed: dict[str, Token | Reason] = {}
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
        parsed: dict[str, Token | Reason],
        bounds: list[float],
    ) -> tuple[Reason, list[tuple[int, Token]]]:
        """Verify every token at the provider's locations, last location first (Envoy's order)."""
        verified: list[tuple[int, Token]] = []
        for i in reversed(provider.locations):
            raw = found[i]
            if raw is None:
                continue
            token = parsed.get(raw)
            if token is None:
                token = parsed[raw] = parse_token(raw)
                if isinstance(token, Token):
                    bounds.extend(provider.verifier.time_bounds(token))
            if isinstance(token, Reason):
                return token, []
            status = provider.verifier.check(token, now)
            if status is not Reason.OK:
                return status, []
            verified.append((i, token))
        return (Reason.OK, verified) if verified else (Reason.MISSING, [])

    def _success(self, provider: _Provider, verified: list[tuple[int, Token]]) -> JwtOutcome:
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
