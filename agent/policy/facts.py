"""The authorization engine's inputs: what the proxy knows about a connection or a request (pure).

`Facts` describes one inbound connection (peer identity, addresses, destination port); with
`http` set it describes one HTTP request on it.  The proxy builds them,
`agent.policy.authz_engine` decides over them; nothing here does I/O.

Conventions the engine relies on (the producer's side of the contract):

- `Facts.source_principal` is the peer's SPIFFE ID as `agent.identity.spiffe` formats it
  (`spiffe://<td>/ns/<ns>/sa/<sa>`), or "" for plaintext: "" means *no principal*, so a positive
  `principals`/`namespaces` match fails and a `not*` match holds (Istio semantics 1.5).
- `HttpFacts.path` is `normalize_path(...)` of the request target: the engine never sees the query
  string, dot segments, back-slashes or percent-encoded unreserved characters (semantics 1.7).  A
  target that `normalize_path` refuses (`%00`) is answered 400 by the inspector, never decided.
- `HttpFacts.headers` has lower-case names; a header sent several times is one entry, the values
  joined with "," in the order received (`fold_headers` does exactly that).
- `HttpFacts.host` is the `:authority` / `Host` value as sent (with its port, if any), "" if none.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class JwtFacts:
    """A verified JWT, as far as authorization needs it (semantics 1.11)."""

    principal: str  # "<iss>/<sub>"; "" when iss or sub is missing (then `*` does not match it)
    audiences: tuple[str, ...]
    presenter: str  # azp, "" if absent
    claims: Mapping[str, Any] = field(default_factory=dict)  # the verified payload


@dataclass(frozen=True, slots=True)
class HttpFacts:
    """One HTTP request (HTTP/1.1 request head or one HTTP/2 stream's headers)."""

    method: str
    path: str  # normalized (`normalize_path`), without the query string
    host: str  # :authority / Host as sent, "" if absent
    headers: Mapping[str, str]  # lower-case names, duplicates joined with ","
    jwt: JwtFacts | None = None  # None: no (valid) token


@dataclass(frozen=True, slots=True)
class Facts:
    """One inbound connection; with `http` one request on it."""

    source_principal: str  # peer SPIFFE ID "spiffe://td/ns/n/sa/s"; "" for plaintext
    source_ip: str
    destination_ip: str
    destination_port: int
    http: HttpFacts | None = None  # None: an L4 decision (connection accepted)


def fold_headers(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Header pairs as received -> `HttpFacts.headers`: names lower-cased, repeated names joined
    with "," in arrival order (what Envoy does before matching, semantics 1.12)."""
    headers: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        previous = headers.get(key)
        headers[key] = value if previous is None else f"{previous},{value}"
    return headers


# RFC 3986 unreserved characters: the only percent-encodings Envoy's default normalization
# decodes (ALPHA, DIGIT, "-", ".", "_", "~"); %2F and %5C stay encoded.
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


def _decode_unreserved(match: re.Match[str]) -> str:
    code = int(match.group(1), 16)
    return chr(code) if code in _UNRESERVED else match.group(0)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4 on an absolute path: "." segments go, ".." removes its parent
    (never above the root); a trailing "." or ".." leaves a trailing "/"."""
    output: list[str] = []
    segments = path.split("/")[1:]
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
        elif segment == "..":
            if output:
                output.pop()
            if last:
                output.append("")
        else:
            output.append(segment)
    return "/" + "/".join(output)


def normalize_path(target: str) -> str | None:
    """The path authorization matches on, from a request target's path (query allowed, dropped):
    Envoy's default (`BASE`) normalization, which Istio's `paths` rely on (semantics 1.7).

    1. the query string (from the first "?") is dropped;
    2. "\\" becomes "/";
    3. percent-encoded unreserved characters are decoded (`%41` -> `A`, `%2e` -> `.`); other
       escapes (`%2F`, `%5C`, `%20`, ...) are kept as sent;
    4. dot segments are removed (RFC 3986 5.2.4), after decoding, so `/a/%2e%2e/b` is `/b`.

    Slashes are not merged and case is kept.  Returns None (the inspector answers 400) for `%00`
    anywhere, a target that is not an absolute path, or one whose decoding makes a new escape of
    a "%" sent bare (`/%%36%31dmin` -> `/%61dmin`, `/%%300` -> `/%00`): a backend that decodes
    the path again would serve `/admin`, which policy never saw.  The proxy forwards the
    normalized path, as Envoy does, so the backend sees what policy decided on; a normalized
    path normalizes to itself.
    """
    path = target.split("?", 1)[0]
    if "%00" in path:
        return None
    path = path.replace("\\", "/")
    if not path.startswith("/"):
        return None
    if "%" in path:
        path = _ESCAPE.sub(_decode_unreserved, path)
        if "%00" in path or _ESCAPE.sub(_decode_unreserved, path) != path:
            return None  # decoding made a new escape of a bare "%"
    if "/." in path:
        path = _remove_dot_segments(path)
    return path
