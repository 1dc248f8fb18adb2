"""JWKS fetching against a real HTTP server on loopback: fetch, refresh, failures keep the keys.

`fetch` is one GET (refusals named: status, size, scheme, redirect, timeout); `JwksKeys` follows
the URIs of the policy with B's pure refresh decision (`agent.policy.jwks.after_fetch`), driven
here by a clock the test moves, so "20 minutes later" takes no time while every fetch is real.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest

from agent.jwks_fetch import JwksFetchError, JwksKeys, fetch
from tests.unit.jwks_server import JwksServer, ec_key, jwks


@pytest.fixture
def server() -> Iterator[JwksServer]:
    s = JwksServer()
    yield s
    s.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1_764_400_000.0

    def __call__(self) -> float:
        return self.now


def kids(published: str) -> list[str]:
    return [key["kid"] for key in json.loads(published)["keys"]] if published else []


def test_fetch_returns_the_body(server: JwksServer) -> None:
    body = jwks(ec_key())
    server.serve("/jwks", body)
    assert fetch(server.url("/jwks"), timeout=2.0) == body


@pytest.mark.parametrize(
    ("status", "body", "needle"),
    [
        (404, b"nope", "HTTP 404"),
        (500, b"", "HTTP 500"),
        (204, b"", "HTTP 204"),
        (200, b"\xff\xfe", "not UTF-8"),
        (200, b"x" * 2_000_000, "exceeds 1048576 bytes"),
    ],
)
def test_fetch_failures_name_the_uri_and_the_reason(
    server: JwksServer, status: int, body: bytes, needle: str
) -> None:
    server.serve("/jwks", body, status=status)
    with pytest.raises(JwksFetchError) as info:
        fetch(server.url("/jwks"), timeout=2.0)
    assert server.url("/jwks") in str(info.value) and needle in str(info.value)


def test_fetch_refuses_other_schemes_and_redirects_to_them(server: JwksServer) -> None:
    with pytest.raises(JwksFetchError, match="'file:///etc/passwd' is not an http or https URL"):
        fetch("file:///etc/passwd", timeout=1.0)
    server.serve("/moved", b"", status=302, location="ftp://127.0.0.1/jwks")
    with pytest.raises(JwksFetchError, match=r"redirects to 'ftp://127\.0\.0\.1/jwks'"):
        fetch(server.url("/moved"), timeout=1.0)  # urllib alone would follow ftp
    server.serve("/file", b"", status=302, location="file:///etc/passwd")
    with pytest.raises(JwksFetchError, match="HTTP 302"):
        fetch(server.url("/file"), timeout=1.0)
    body = jwks(ec_key())
    server.serve("/jwks", body)
    server.serve("/old", b"", status=301, location=server.url("/jwks"))
    assert fetch(server.url("/old"), timeout=1.0) == body


def test_fetch_gives_up_after_its_timeout(server: JwksServer) -> None:
    server.serve("/slow", jwks(ec_key()), delay=1.5)
    started = time.monotonic()
    with pytest.raises(JwksFetchError, match="timed out"):
        fetch(server.url("/slow"), timeout=0.3)
    assert time.monotonic() - started < 1.0
    with pytest.raises(JwksFetchError, match="Connection refused"):
        fetch("http://127.0.0.1:1/jwks", timeout=1.0)


def test_keys_are_fetched_refreshed_and_kept_when_a_refresh_fails(server: JwksServer) -> None:
    clock = Clock()
    keys = JwksKeys(refresh=1200.0, clock=clock)
    uri = server.url("/jwks")
    server.serve("/jwks", jwks(ec_key()))

    async def scenario() -> None:
        assert await keys.resolve({uri: 2.0}) is True  # new: fetched at once
        assert kids(keys.published()[uri]) == ["k0"]
        assert await keys.resolve({uri: 2.0}) is False  # not due: not fetched again
        assert server.requests["/jwks"] == 1
        assert keys.next_due() == clock.now + 1200.0

        server.serve("/jwks", jwks(ec_key(), ec_key()))  # the provider rotates
        clock.now += 1200.0
        assert await keys.resolve({uri: 2.0}) is True
        assert kids(keys.published()[uri]) == ["k0", "k1"]
        status = keys.status()[uri]
        assert (status["outcome"], status["keys"], status["fetched_at"]) == ("ok", 2, clock.now)

        rotated = keys.published()[uri]
        server.serve("/jwks", b"down", status=503)
        clock.now += 1200.0
        assert await keys.resolve({uri: 2.0}) is False  # failed: the last good keys stay
        assert keys.published()[uri] == rotated
        status = keys.status()[uri]
        assert "HTTP 503" in status["outcome"] and status["failures"] == 1
        assert status["keys"] == 2 and status["fetched_at"] == clock.now - 1200.0
        assert keys.next_due() == clock.now + 60.0  # retried sooner (Istio: 1 minute)

        server.serve("/jwks", '{"keys": []}')  # answers, but with no usable key: also a failure
        clock.now += 60.0
        assert await keys.resolve({uri: 2.0}) is False
        assert keys.published()[uri] == rotated
        assert "doesn't have any valid public key" in keys.status()[uri]["outcome"]

        assert await keys.resolve({}) is False  # no rule names it any more: forgotten
        assert keys.published() == {} and keys.status() == {}

    asyncio.run(scenario())


def test_a_uri_that_never_answers_publishes_no_keys(server: JwksServer) -> None:
    clock = Clock()
    keys = JwksKeys(refresh=1200.0, clock=clock)
    good, bad = server.url("/good"), server.url("/missing")
    server.serve("/good", jwks(ec_key()))

    async def scenario() -> None:
        assert await keys.resolve({good: 2.0, bad: 2.0}) is True
        assert keys.published()[bad] == ""  # fail closed: every token of that issuer fails
        assert kids(keys.published()[good]) == ["k0"]
        status = keys.status()[bad]
        assert status["keys"] == 0 and status["fetched_at"] is None and "404" in status["outcome"]
        assert server.requests == {"/good": 1, "/missing": 1}  # both at once, concurrently

    asyncio.run(scenario())


def test_fetches_run_concurrently(server: JwksServer) -> None:
    keys = JwksKeys(refresh=1200.0)
    uris = {server.url(f"/slow{i}"): 5.0 for i in range(4)}
    for i in range(4):
        server.serve(f"/slow{i}", jwks(ec_key()), delay=0.4)

    async def scenario() -> float:
        started = time.monotonic()
        assert await keys.resolve(uris) is True
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 1.2  # not 4 x 0.4 s


def test_seeded_keys_are_refetched_at_once_and_kept_on_failure(server: JwksServer) -> None:
    clock = Clock()
    keys = JwksKeys(refresh=1200.0, clock=clock)
    uri = server.url("/down")
    server.serve("/down", b"", status=502)
    earlier = jwks(ec_key())
    keys.seed(uri, earlier, clock.now - 100)

    async def scenario() -> None:
        assert await keys.resolve({uri: 2.0}) is False
        assert server.requests["/down"] == 1 and keys.published()[uri] == earlier

    asyncio.run(scenario())
