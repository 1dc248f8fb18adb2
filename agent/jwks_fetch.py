"""JWKS for `jwksUri` rules: fetched by the agent, cached, refreshed, inlined into the policy.

Istio's istiod resolves a RequestAuthentication's `jwksUri` itself and sends the keys inline, so
no proxy ever reaches an identity provider; Ferry's agent does the same.  Two parts:

- `fetch(uri, timeout)`: one HTTP GET (urllib, blocking: the caller runs it in a thread), http
  and https only (redirects too), at most `MAX_JWKS_BYTES`, the whole exchange within `timeout`
  seconds, TLS verified against the system's CAs; the body as text or `JwksFetchError` naming
  the URI and the reason.
- `JwksKeys`: every URI the policy in force names, each a `agent.policy.jwks.JwksSource` (the
  pure decision: when to fetch, what to keep).  `resolve(wanted)` fetches the URIs that are new
  or due, concurrently, each from its own thread, and forgets the ones no longer named; it says
  whether any URI's published keys changed, which makes a new policy version.  A new URI is
  fetched before the policy that names it is pushed (as istiod resolves at push time).  After a
  good fetch the next comes `policy.jwks_refresh` seconds later; a failed fetch keeps the last
  good keys and is retried sooner (1 minute, doubling up to an hour, Istio's timing); a URI that
  never answered with keys publishes "" and every token of its issuer is rejected (fail closed).

The agent's refresh loop calls `resolve` again when `next_due()` comes.  `status()` is what
`agent status` shows per URI: the last good fetch, the last attempt and its outcome, the keys.
No token and no key material is ever logged (the keys are public; they are counted, not shown).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlsplit

from agent import __version__
from agent.policy.jwks import MAX_JWKS_BYTES, JwksSource, after_fetch

log = logging.getLogger("ferry.agent")
SCHEMES = ("http", "https")
READ_CHUNK = 64 * 1024


class JwksFetchError(ValueError):
    """A JWKS could not be fetched; the message names the URI and why."""


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http and https URLs (urllib would follow ftp too)."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        if urlsplit(newurl).scheme not in SCHEMES:
            raise JwksFetchError(f"{req.full_url} redirects to {newurl!r}: not http or https")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(uri: str, timeout: float, max_bytes: int = MAX_JWKS_BYTES) -> str:
    """GET `uri` and return its body (see the module doc); `JwksFetchError` on any failure."""
    if urlsplit(uri).scheme not in SCHEMES:
        raise JwksFetchError(f"jwksUri {uri!r} is not an http or https URL")
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(_HttpOnlyRedirects())
    request = urllib.request.Request(
        uri, headers={"Accept": "application/json", "User-Agent": f"ferry-agent/{__version__}"}
    )
    try:
        with opener.open(request, timeout=timeout) as response:
            if response.status != 200:
                raise JwksFetchError(f"GET {uri}: HTTP {response.status} {response.reason}")
            body = bytearray()
            while chunk := response.read(READ_CHUNK):
                body += chunk
                if len(body) > max_bytes:
                    raise JwksFetchError(f"GET {uri}: the body exceeds {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise JwksFetchError(f"GET {uri}: took longer than {timeout:g} s")
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the connection
        raise JwksFetchError(f"GET {uri}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise JwksFetchError(f"GET {uri}: {exc.reason}") from None
    except (OSError, ValueError) as exc:  # timeouts, resets, malformed responses
        if isinstance(exc, JwksFetchError):
            raise
        raise JwksFetchError(f"GET {uri}: {exc or type(exc).__name__}") from None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise JwksFetchError(f"GET {uri}: the body is not UTF-8") from None


Fetch = Callable[[str, float], str]


@dataclass(frozen=True)
class Attempt:
    at: float
    outcome: str  # "ok" or the error


class JwksKeys:
    """The keys of every `jwksUri` in force (see the module doc)."""

    def __init__(
        self,
        refresh: float,
        fetch: Fetch = fetch,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.refresh = refresh
        self.fetch = fetch
        self.clock = clock
        self.sources: dict[str, JwksSource] = {}
        self.attempts: dict[str, Attempt] = {}

    def published(self) -> dict[str, str]:
        """uri -> the JWKS text to inline ("" while there are no good keys: fail closed)."""
        return {uri: source.published for uri, source in self.sources.items()}

    def seed(self, uri: str, published: str, fetched_at: float) -> None:
        """Start from keys fetched earlier (by the last agent): refetched at once, kept if that
        fails."""
        self.sources[uri] = JwksSource(uri, published=published, fetched_at=fetched_at)

    def next_due(self) -> float | None:
        """When the next fetch is due (a time from `clock`), None when no URI is named."""
        return min((s.next_fetch_at for s in self.sources.values()), default=None)

    async def resolve(self, wanted: Mapping[str, float]) -> bool:
        """Fetch the URIs of `wanted` (uri -> timeout) that are new or due; forget the others.
        True when the published keys of any wanted URI changed."""
        before = self.published()
        self.sources = {uri: self.sources.get(uri) or JwksSource(uri) for uri in wanted}
        self.attempts = {uri: a for uri, a in self.attempts.items() if uri in wanted}
        now = self.clock()
        due = [uri for uri, source in self.sources.items() if source.due(now)]
        if due:
            await asyncio.gather(*(self._refresh(uri, wanted[uri]) for uri in due))
        return any(self.sources[uri].published != before.get(uri, "") for uri in self.sources)

    async def _refresh(self, uri: str, timeout: float) -> None:
        body: str | None = None
        error = ""
        try:
            body = await asyncio.to_thread(self.fetch, uri, timeout)
        except JwksFetchError as exc:
            error = str(exc)
        now = self.clock()
        previous = self.sources[uri]
        source = after_fetch(previous, now, body=body, error=error, refresh_interval=self.refresh)
        self.sources[uri] = source
        self.attempts[uri] = Attempt(now, source.error or "ok")
        if source.error:
            kept = "keeping the last good keys" if source.published else "no keys: tokens fail"
            log.warning("jwks %s: %s (%s; retry in %.0f s)", uri, source.error, kept,
                        source.next_fetch_at - now)  # fmt: skip
        elif source.published != previous.published:
            log.info("jwks: %s: %d key(s) fetched", uri, _count(source.published))

    def status(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for uri, source in sorted(self.sources.items()):
            attempt = self.attempts.get(uri)
            out[uri] = {
                "fetched_at": source.fetched_at,
                "attempted_at": attempt.at if attempt else None,
                "outcome": attempt.outcome if attempt else "not fetched yet",
                "failures": source.failures,
                "keys": _count(source.published),
                "next_fetch_at": source.next_fetch_at,
            }
        return out


def _count(published: str) -> int:
    """How many keys a published JWKS text holds (0 for "")."""
    return len(json.loads(published)["keys"]) if published else 0
