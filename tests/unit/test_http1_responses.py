"""Local replies (agent.proxy.responses): exact HTTP/1.1 bytes, HTTP/2 and gRPC header lists."""

from __future__ import annotations

import pytest

from agent.proxy.responses import (
    BAD_REQUEST_REPLY,
    Denial,
    RateLimitHeaders,
    grpc_message,
    h2_reply,
    http1_reply,
)

LIMIT = RateLimitHeaders(limit=10, remaining=0, reset_seconds=4.2, retry_after=0.4)


def test_http1_403_exact_bytes() -> None:
    assert http1_reply(Denial(403, denied_by="shop/deny-admin")) == (
        b"HTTP/1.1 403 Forbidden\r\n"
        b"content-type: text/plain\r\n"
        b"content-length: 19\r\n"
        b"x-ferry-denied-by: shop/deny-admin\r\n"
        b"connection: close\r\n"
        b"\r\n"
        b"RBAC: access denied"
    )


def test_http1_401_429_400() -> None:
    challenge = 'Bearer realm="https://issuer", error="invalid_token"'
    reply = http1_reply(Denial(401, "shop/jwt", "Jwt is expired", challenge))
    assert reply.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b"\r\nwww-authenticate: " + challenge.encode() + b"\r\n" in reply
    assert reply.endswith(b"\r\n\r\nJwt is expired")
    reply = http1_reply(Denial(429, "shop/limit", rate_limit=LIMIT))
    assert reply.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    for field in (
        b"retry-after: 1",
        b"x-ratelimit-limit: 10",
        b"x-ratelimit-remaining: 0",
        b"x-ratelimit-reset: 5",
        b"x-ferry-denied-by: shop/limit",
        b"connection: close",
    ):
        assert b"\r\n" + field + b"\r\n" in reply
    assert reply.endswith(b"local_rate_limited")
    assert BAD_REQUEST_REPLY.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"x-ferry-denied-by" not in BAD_REQUEST_REPLY  # no policy decided that


def test_head_reply_has_no_body() -> None:
    reply = http1_reply(Denial(403), head=True)
    assert reply.endswith(b"content-length: 19\r\nconnection: close\r\n\r\n")


def test_header_injection_is_refused() -> None:
    with pytest.raises(ValueError, match="policy name 'ns/a\\\\r\\\\nset-cookie: x'"):
        http1_reply(Denial(403, denied_by="ns/a\r\nset-cookie: x"))
    with pytest.raises(ValueError, match="www-authenticate"):
        h2_reply(Denial(401, www_authenticate="Bearer\n"), grpc=True)
    with pytest.raises(ValueError, match="message"):
        h2_reply(Denial(403, message="a\x00b"), grpc=False)


@pytest.mark.parametrize(
    ("text", "encoded"),
    [
        ("RBAC: access denied", "RBAC: access denied"),
        ("100% sure", "100%25 sure"),
        ("line\nbreak", "line%0Abreak"),
        ("caf\u00e9", "caf%C3%A9"),
        ("\u6f22", "%E6%BC%A2"),
        ("~ and \x7f", "~ and %7F"),
    ],
)
def test_grpc_message_percent_encoding(text: str, encoded: str) -> None:
    assert grpc_message(text) == encoded


@pytest.mark.parametrize(("status", "grpc_status"), [(403, "7"), (401, "16"), (429, "8")])
def test_grpc_trailers_only(status: int, grpc_status: str) -> None:
    fields, body = h2_reply(Denial(status, "ns/p", rate_limit=LIMIT), grpc=True)
    assert body == b""
    assert fields[:3] == [
        (":status", "200"),
        ("content-type", "application/grpc"),
        ("grpc-status", grpc_status),
    ]
    assert ("x-ferry-denied-by", "ns/p") in fields
    assert fields[3][0] == "grpc-message"


def test_h2_plain_reply() -> None:
    fields, body = h2_reply(Denial(429, "ns/p", rate_limit=LIMIT), grpc=False)
    assert body == b"local_rate_limited"
    assert fields[:3] == [
        (":status", "429"),
        ("content-type", "text/plain"),
        ("content-length", "18"),
    ]
    assert ("retry-after", "1") in fields


def test_a_malformed_grpc_request_gets_internal_as_envoy_answers_it() -> None:
    fields, _ = h2_reply(Denial(400, message="path '/a/%2e%2e' is not valid"), grpc=True)
    assert (":status", "200") in fields and ("grpc-status", "13") in fields


def test_no_grpc_status_for_other_statuses() -> None:
    with pytest.raises(ValueError, match="HTTP status 408 has no gRPC status"):
        h2_reply(Denial(408), grpc=True)
