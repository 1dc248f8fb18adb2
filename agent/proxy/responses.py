"""Local replies of the HTTP inspectors: what a client gets when the proxy answers itself.

A request that policy denies never reaches the workload; the proxy answers it, with the status
that says why (Envoy's statuses and bodies, so clients and dashboards see what they would see in
Istio):

| why                    | HTTP/1.1 and HTTP/2             | gRPC (trailers-only, :status 200) |
| ---------------------- | ------------------------------- | --------------------------------- |
| authorization denied   | 403 "RBAC: access denied"       | grpc-status 7 PERMISSION_DENIED   |
| JWT missing or invalid | 401 (reason), www-authenticate  | grpc-status 16 UNAUTHENTICATED    |
| rate limited           | 429 "local_rate_limited",       | grpc-status 8 RESOURCE_EXHAUSTED  |
|                        | retry-after, x-ratelimit-*      |                                   |
| malformed request      | 400 "bad request"               | grpc-status 13 INTERNAL (a path   |
|                        |                                 | that does not normalize; else     |
|                        |                                 | stream or connection errors)      |
| request head too slow  | 408 "request header timeout"    | (HTTP/2: GOAWAY instead)          |
|                        | (HTTP/1.1, limits.request_      |                                   |
|                        | header_timeout)                 |                                   |

Every reply is `content-type: text/plain` (gRPC: `application/grpc`) and names the policy that
decided in `x-ferry-denied-by: <ns>/<name>` when one did.  HTTP/1.1 replies say
`connection: close`: the inspector closes the connection after writing one (what came after the
denied request is never sent upstream).  A `Denial` is the plain-data description; the builders
turn it into HTTP/1.1 bytes (`http1_reply`) or an HTTP/2 header list and body (`h2_reply`).

gRPC carries the message in `grpc-message`, percent-encoded as the gRPC HTTP/2 protocol says
(`grpc_message`): UTF-8, then every byte outside printable ASCII (0x20-0x7E) and `%` itself as
`%XX`.  Values that end up in header fields (policy names, `www-authenticate`, messages) must not
contain CR, LF or NUL: a builder raises ValueError naming the value instead of writing a broken
or injected header.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from http import HTTPStatus

FORBIDDEN = 403
UNAUTHORIZED = 401
TOO_MANY_REQUESTS = 429
BAD_REQUEST = 400
REQUEST_TIMEOUT = 408

GRPC_PERMISSION_DENIED = 7
GRPC_UNAUTHENTICATED = 16
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_INTERNAL = 13  # HTTP 400 in gRPC's HTTP-to-gRPC status mapping, as Envoy answers it
GRPC_STATUS = {
    FORBIDDEN: GRPC_PERMISSION_DENIED,
    UNAUTHORIZED: GRPC_UNAUTHENTICATED,
    TOO_MANY_REQUESTS: GRPC_RESOURCE_EXHAUSTED,
    BAD_REQUEST: GRPC_INTERNAL,
}
DEFAULT_MESSAGE = {
    FORBIDDEN: "RBAC: access denied",
    UNAUTHORIZED: "Jwt verification fails",
    TOO_MANY_REQUESTS: "local_rate_limited",
    BAD_REQUEST: "bad request",
    REQUEST_TIMEOUT: "request header timeout",
}
_UNSAFE = frozenset(b"\r\n\x00")


@dataclass(frozen=True, slots=True)
class RateLimitHeaders:
    """What a 429 tells the client about the bucket (`x-ratelimit-*`, `retry-after`)."""

    limit: int
    remaining: int
    reset_seconds: float  # until the bucket is full again
    retry_after: float  # until the next token


@dataclass(frozen=True, slots=True)
class Denial:
    """Why the proxy answers a request itself; `status` is 403, 401, 429, 400 or 408."""

    status: int
    denied_by: str = ""  # "<ns>/<name>" of the deciding policy (of every ALLOW policy, comma-
    # separated, when none of them matched); "" when none decided
    message: str = ""  # body text (gRPC: grpc-message); "" for the status' default
    www_authenticate: str = ""  # 401 only: the challenge, e.g. 'Bearer realm="..."'
    rate_limit: RateLimitHeaders | None = None  # 429 only

    @property
    def text(self) -> str:
        return self.message or DEFAULT_MESSAGE.get(self.status, HTTPStatus(self.status).phrase)


def _checked(name: str, value: str) -> str:
    if not _UNSAFE.isdisjoint(value.encode()):
        raise ValueError(f"{name} {value!r} contains CR, LF or NUL: it cannot go in a header")
    return value


def _fields(denial: Denial) -> list[tuple[str, str]]:
    """The header fields every reply to `denial` carries, after the content type."""
    fields: list[tuple[str, str]] = []
    if denial.denied_by:
        fields.append(("x-ferry-denied-by", _checked("policy name", denial.denied_by)))
    if denial.status == UNAUTHORIZED and denial.www_authenticate:
        fields.append(("www-authenticate", _checked("www-authenticate", denial.www_authenticate)))
    limit = denial.rate_limit
    if denial.status == TOO_MANY_REQUESTS and limit is not None:
        fields += [
            ("retry-after", str(math.ceil(limit.retry_after))),
            ("x-ratelimit-limit", str(limit.limit)),
            ("x-ratelimit-remaining", str(limit.remaining)),
            ("x-ratelimit-reset", str(math.ceil(limit.reset_seconds))),
        ]
    return fields


def http1_reply(denial: Denial, *, head: bool = False) -> bytes:
    """The HTTP/1.1 response for `denial`; `head`: the request was HEAD (no body is sent)."""
    body = _checked("message", denial.text).encode()
    status = HTTPStatus(denial.status)
    lines = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        "content-type: text/plain",
        f"content-length: {len(body)}",
    ]
    lines += [f"{name}: {value}" for name, value in _fields(denial)]
    lines.append("connection: close")
    reply = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return reply if head else reply + body


BAD_REQUEST_REPLY = http1_reply(Denial(BAD_REQUEST))
REQUEST_TIMEOUT_REPLY = http1_reply(Denial(REQUEST_TIMEOUT))


def grpc_message(text: str) -> str:
    """Percent-encode `text` for `grpc-message` (gRPC over HTTP/2, "Responses")."""
    return "".join(
        chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in text.encode()
    )


def h2_reply(denial: Denial, *, grpc: bool) -> tuple[list[tuple[str, str]], bytes]:
    """The HTTP/2 response for `denial`: (header list, body).  For a gRPC call it is trailers-
    only (one HEADERS frame with END_STREAM, empty body): :status 200, grpc-status, grpc-message.
    """
    if grpc:
        status = GRPC_STATUS.get(denial.status)
        if status is None:
            raise ValueError(f"HTTP status {denial.status} has no gRPC status (403, 401, 429, 400)")
        fields = [
            (":status", "200"),
            ("content-type", "application/grpc"),
            ("grpc-status", str(status)),
            ("grpc-message", grpc_message(denial.text)),
        ]
        return fields + _fields(denial), b""
    body = _checked("message", denial.text).encode()
    fields = [
        (":status", str(denial.status)),
        ("content-type", "text/plain"),
        ("content-length", str(len(body))),
    ]
    return fields + _fields(denial), body
