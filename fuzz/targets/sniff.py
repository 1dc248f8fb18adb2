"""Which inspector a connection's first bytes call for (`agent.proxy.sniff`).

Input: the first bytes a client sent.  Contract: neither check raises, and an answer, once
given (True or False, not None: "more bytes needed"), holds for every longer input: the proxy
asks again as bytes arrive, and a late change of mind would inspect a connection that was
already passed through (or the reverse).
"""

from __future__ import annotations

from agent.proxy.sniff import H2_PREFACE, looks_like_h2_preface, looks_like_http1
from fuzz.harness import main


def check(data: bytes) -> None:
    for looks in (looks_like_http1, looks_like_h2_preface):
        answer = looks(data)
        assert answer in (True, False, None)
        for cut in {len(data) // 2, len(data) - 1, data.find(b" ") + 1, data.find(b"\n")}:
            if 0 <= cut < len(data):
                earlier = looks(data[:cut])
                assert earlier is None or earlier == answer, (cut, earlier, answer)


def seeds() -> dict[str, bytes]:
    return {
        "get": b"GET /index.html HTTP/1.1\r\nHost: web\r\n\r\n",
        "m-search": b"M-SEARCH * HTTP/1.1\r\n",
        "http10": b"POST /x HTTP/1.0\r\n",
        "h2": H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00",
        "h2-partial": H2_PREFACE[:10],
        "tls": bytes.fromhex("160301020001000200"),
        "lowercase-method": b"get / HTTP/1.1\r\n",
        "http2-version": b"GET / HTTP/2.0\r\n",
        "no-version-yet": b"GET /" + b"a" * 300,
    }


if __name__ == "__main__":
    main(check)
