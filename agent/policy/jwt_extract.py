"""Where a request carries JWTs, and the tokens there, as Envoy's jwt_authn extractor finds them.

Locations.  A rule reads its token from `fromHeaders` (header name, optional value prefix),
`fromParams` (query parameters, percent-decoded) and `fromCookies`; with none of them set,
from `Authorization: Bearer <token>` and the `access_token` parameter.  A prefix is found
anywhere in the header value (case-sensitive) and the token is the run of base64url and `.`
characters after it; a header without the prefix is no token at all (missing, not invalid).
A rule's locations are in Envoy's extraction order: headers, then parameters, then cookies, each
sorted by name.  Where a parameter or cookie is repeated, its first value counts.

`TokenExtractor` numbers the distinct locations of a workload's rules once (rules sharing a
location share its slot; `slots` lists each rule's).  Per request, `find(headers, query)`
answers the raw value at every slot (None where there is none), or None when no location holds
one: a header with its prefix, a parameter still percent-encoded.  Those raw values key the
authenticator's cache (`agent.policy.jwt`), so a reused token costs the header lookups and no
extraction; only on a cache miss does `tokens(found)` cut the tokens out of them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from agent.policy.jwt_rules import JwtRule

_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True, slots=True)
class Location:
    kind: str  # "header" | "param" | "cookie"
    name: str
    prefix: str = ""


class TokenExtractor:
    """The token locations of a workload's rules, numbered (see the module docstring)."""

    __slots__ = ("_cookies", "_headers", "_params", "locations", "slots")

    def __init__(self, rules: Sequence[JwtRule]) -> None:
        index: dict[Location, int] = {}
        slots = []
        for rule in rules:
            own = _rule_locations(rule)
            for location in own:
                index.setdefault(location, len(index))
            slots.append(tuple(index[loc] for loc in own))
        self.slots = tuple(slots)  # each rule's locations, as indexes into `locations`
        self.locations = tuple(sorted(index, key=index.__getitem__))
        self._headers = tuple(
            (i, loc.name, loc.prefix)
            for i, loc in enumerate(self.locations)
            if loc.kind == "header"
        )
        self._params = {loc.name: i for i, loc in enumerate(self.locations) if loc.kind == "param"}
        self._cookies = {
            loc.name: i for i, loc in enumerate(self.locations) if loc.kind == "cookie"
        }

    def find(self, headers: Mapping[str, str], query: str) -> tuple[str | None, ...] | None:
        """The raw value holding a token at each location (None where there is none), or None
        when no location has one.  Raw values (a header with its prefix, a parameter still
        percent-encoded) key the authenticator's cache, so a reused token costs no extraction."""
        found: list[str | None] = [None] * len(self.locations)
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

    def tokens(self, found: tuple[str | None, ...]) -> tuple[str | None, ...]:
        """The tokens in the raw values: after a header's prefix the run of base64url and "."
        characters (the whole value when there is none), a parameter percent-decoded, a cookie
        without its quotes."""
        tokens: list[str | None] = []
        for location, value in zip(self.locations, found, strict=True):
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


def _rule_locations(rule: JwtRule) -> list[Location]:
    """The rule's locations in Envoy's extraction order: headers, params, cookies, each sorted."""
    headers = [Location("header", h.name, h.prefix) for h in rule.from_headers]
    params = [Location("param", p) for p in rule.from_params]
    cookies = [Location("cookie", c) for c in rule.from_cookies]
    if not (headers or params or cookies):
        headers = [Location("header", "authorization", "Bearer ")]
        params = [Location("param", "access_token")]
    headers.sort(key=lambda loc: loc.name + loc.prefix)
    return list(
        dict.fromkeys(
            headers
            + sorted(set(params), key=lambda loc: loc.name)
            + sorted(set(cookies), key=lambda loc: loc.name)
        )
    )
