"""Istio's `RequestAuthentication` `spec.jwtRules[]` as plain data, validated as istiod does.

`JwtRule.from_spec(raw)` checks one `jwtRules[]` object the way Istio's webhook does and answers a
frozen `JwtRule`; a ValueError names the field and shows the bad value.  `to_spec()` gives the
object back (`from_spec(rule.to_spec()) == rule`), which is how a rule travels to the proxies.

What is checked: no unknown field; `issuer` set; `jwksUri` an http:// or https:// URL with a host
and a valid port; an inline `jwks` that `agent.policy.jwks` parses (one of `jwks` and `jwksUri`
is required: OIDC discovery is not supported); `fromHeaders[].name` a header token (kept in lower
case); `outputPayloadToHeader` and `outputClaimToHeaders[].header` Istio's header names (letters,
digits, `-`, `_`; lower-cased), each claim mapping with both fields; `fromParams`, `fromCookies`,
`audiences` and `spaceDelimitedClaims` lists of non-empty strings; `forwardOriginalToken` a
boolean; `timeout` a positive protobuf duration such as `5s` or `1.5s`.

The agent fetches `jwksUri` itself and passes the keys in `jwks` (`agent.policy.jwks`), so the
proxy never fetches; `agent.policy.jwt` turns the rules of one workload into its authenticator.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from agent.policy.jwks import JwksError, parse_jwks, shown

_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_OUTPUT_HEADER_NAME = re.compile(r"[-_A-Za-z0-9]+")  # Istio's check for output headers
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
