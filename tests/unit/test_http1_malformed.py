"""Malformed and smuggling-shaped requests, head limits and protocol sniffing.

Each row is what a hostile client sends, in one read and split at every offset; the inspector must
answer ProtocolError with a 400, announce no request and send nothing upstream.
"""

from __future__ import annotations

import pytest

from agent.proxy import http1, http1_framing
from agent.proxy.http1 import Forward, Http1Inspector, ProtocolError, RequestHead
from agent.proxy.http1_framing import MAX_HEAD, Body
from agent.proxy.responses import BAD_REQUEST_REPLY
from agent.proxy.sniff import looks_like_h2_preface, looks_like_http1

H = b"Host: web\r\n"
CHUNKED = b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
BAD_BODIES = {
    "chunk size 0x": CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n",
    "chunk size with a space": CHUNKED + b"5 \r\nhello\r\n0\r\n\r\n",
    "chunk size negative": CHUNKED + b"-5\r\nhello\r\n0\r\n\r\n",
    "chunk size overflow": CHUNKED + b"1" + b"0" * 16 + b"\r\nhello\r\n0\r\n\r\n",
    "chunk longer than its size": CHUNKED + b"3\r\nhello\r\n0\r\n\r\n",
    "chunk with bare LF": CHUNKED + b"5\nhello\n0\n\n",
}
P = b"POST / HTTP/1.1\r\n" + H
BAD = {
    "CL and TE": P + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "TE and CL": P + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    "two different CL": P + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "CL list": P + b"Content-Length: 5, 5\r\n\r\nhello",
    "CL sign": P + b"Content-Length: +5\r\n\r\nhello",
    "TE gzip, chunked": P + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "TE twice": P + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "TE in HTTP/1.0": b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "TE xchunked": P + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "TE after a vertical tab": P + b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
    "name with a leading space": P + b" Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\n" + H + b"X-A: b\r\n c\r\n\r\n",
    "bare LF": b"GET / HTTP/1.1\n" + H + b"\r\n",
    "bare LF in a field": b"GET / HTTP/1.1\r\nHost: web\nX: y\r\n\r\n",
    "bare CR": b"GET / HTTP/1.1\r\nHost: web\rX: y\r\n\r\n",
    "space before colon": b"POST / HTTP/1.1\r\n" + H + b"Content-Length : 5\r\n\r\nhello",
    "NUL in a value": b"GET / HTTP/1.1\r\n" + H + b"X: a\x00b\r\n\r\n",
    "two spaces in the request line": b"GET  /admin HTTP/1.1\r\n" + H + b"\r\n",
    "space in the target": b"GET /a /b HTTP/1.1\r\n" + H + b"\r\n",
    "HTTP/0.9": b"GET /\r\n\r\n",
    "HTTP/1.2": b"GET / HTTP/1.2\r\n" + H + b"\r\n",
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "no Host": b"GET / HTTP/1.1\r\n\r\n",
    "two Hosts": b"GET / HTTP/1.1\r\n" + H + b"Host: evil\r\n\r\n",
    "unknown method": b"BREW / HTTP/1.1\r\n" + H + b"\r\n",
    "lower-case method": b"get / HTTP/1.1\r\n" + H + b"\r\n",
    "upgrade with a body": (
        b"GET / HTTP/1.1\r\nHost: web\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: 4\r\n\r\nGET "
    ),
    "CONNECT with a body": (
        b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\nContent-Length: 4\r\n\r\nGET "
    ),
    "CONNECT to a path": b"CONNECT /x HTTP/1.1\r\n" + H + b"\r\n",
    "userinfo": b"GET http://user@web/ HTTP/1.1\r\n" + H + b"\r\n",
    "fragment": b"GET /a#frag HTTP/1.1\r\n" + H + b"\r\n",
    "unknown scheme": b"GET ftp://web/ HTTP/1.1\r\n" + H + b"\r\n",
    "asterisk with GET": b"GET * HTTP/1.1\r\n" + H + b"\r\n",
}


def feed(
    inspector: Http1Inspector, *parts: bytes, clean: bool = True
) -> tuple[list[RequestHead], bytes, list[str]]:
    """Allow every request; (heads, what went upstream, protocol errors).  A ProtocolError's
    reply must be the 400 if `clean`, else nothing."""
    heads: list[RequestHead] = []
    upstream = bytearray()
    errors: list[str] = []
    for part in parts:
        for ev in inspector.client_data(part):
            if isinstance(ev, RequestHead):
                heads.append(ev)
                upstream += inspector.allow(ev.request_id)
            elif isinstance(ev, Forward):
                upstream += ev.data
            else:
                assert isinstance(ev, ProtocolError)
                assert ev.reply == (BAD_REQUEST_REPLY if clean else b"")
                errors.append(ev.reason)
                return heads, bytes(upstream), errors
    return heads, bytes(upstream), errors


@pytest.mark.parametrize("data", BAD.values(), ids=BAD.keys())
def test_malformed_request_gets_400_and_nothing_goes_upstream(data: bytes) -> None:
    for cut in range(len(data)):
        heads, upstream, errors = feed(Http1Inspector(), data[:cut], data[cut:])
        assert len(errors) == 1, cut
        assert upstream == b"" and heads == [], cut


@pytest.mark.parametrize("data", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_malformed_chunked_body(data: bytes) -> None:
    """Found in the read of its head: a 400 before anything went upstream.  Found after the
    head was allowed: the connection ends there, with what came before sent upstream."""
    heads, upstream, errors = feed(Http1Inspector(), data)
    assert len(errors) == 1 and upstream == b"" and heads == []
    late = 0
    for cut in range(len(CHUNKED), len(data)):
        inspector = Http1Inspector()
        (head,) = inspector.client_data(data[:cut])
        if isinstance(head, ProtocolError):  # seen in the first read
            assert head.reply == BAD_REQUEST_REPLY
            continue
        assert isinstance(head, RequestHead)
        assert inspector.allow(head.request_id) == data[:cut]
        (ev,) = inspector.client_data(data[cut:])
        assert isinstance(ev, ProtocolError) and ev.reply == b"", cut
        late += 1
    assert late


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (BAD["CL and TE"], "Content-Length"),
        (BAD["two Hosts"], "2 Host headers"),
        (BAD["two spaces in the request line"], "request line b'GET  /admin HTTP/1.1'"),
        (BAD["TE gzip, chunked"], "'gzip, chunked'"),
        (BAD_BODIES["chunk size 0x"], "chunk size b'0x5'"),
        (BAD["HTTP/0.9"], "HTTP version 0.9"),
    ],
)
def test_errors_name_the_bad_value(data: bytes, reason: str) -> None:
    _, _, errors = feed(Http1Inspector(), data)
    assert reason in errors[0]


def test_framing_disagreement_with_llhttp_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Were Ferry's framing to end a body elsewhere than llhttp does (a bug, or a shape the
    two read differently), the request is refused rather than passed on ambiguous."""
    framing = http1_framing.framing
    request = b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello"
    for shift, error in (
        (1, "ambiguous message framing: llhttp ended the message before the end of its body"),
        (-1, "ambiguous message framing: llhttp did not end the message at the end of its body"),
    ):

        def shifted(
            length: bytes, codings: bytes, request: bool, shift: int = shift
        ) -> Body | None:
            body = framing(length, codings, request)
            if body is not None:
                body.left += shift
            return body

        monkeypatch.setattr(http1, "framing", shifted)
        _, upstream, errors = feed(Http1Inspector(), request)
        assert upstream == b"" and errors == [error]


def test_malformed_after_a_good_request_closes_without_a_reply() -> None:
    """The client is owed a response (or a half-sent body): no clean 400 is possible."""
    inspector = Http1Inspector()
    heads, _, _ = feed(inspector, b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    assert len(heads) == 1
    (ev,) = inspector.client_data(BAD["obs-fold"])
    assert isinstance(ev, ProtocolError) and ev.reply == b""
    inspector = Http1Inspector()
    head = b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    feed(inspector, head + b"5\r\nhel")
    (ev,) = inspector.client_data(b"lo\r\nZZ\r\n")
    assert isinstance(ev, ProtocolError) and ev.reply == b"" and "ZZ" in ev.reason


def test_pipelined_good_requests_before_a_bad_one_are_withdrawn() -> None:
    inspector = Http1Inspector()
    good = b"GET / HTTP/1.1\r\n" + H + b"\r\n"
    events = inspector.client_data(good + good + BAD["CL and TE"])
    assert [type(e) for e in events] == [ProtocolError]


def test_head_size_limit() -> None:
    line = b"GET / HTTP/1.1\r\n" + H
    pad = MAX_HEAD - len(line) - len(b"X: \r\n\r\n")
    fits = line + b"X: " + b"a" * pad + b"\r\n\r\n"
    assert len(fits) == MAX_HEAD
    for parts in ([fits], [fits[:1000], fits[1000:]], [fits[:-1], fits[-1:]]):
        heads, upstream, errors = feed(Http1Inspector(), *parts)
        assert len(heads) == 1 and upstream == fits and not errors
    too_long = line + b"X: " + b"a" * (pad + 1) + b"\r\n\r\n"
    for parts in ([too_long], [too_long[:1000], too_long[1000:]], [too_long[:-1]]):
        _, upstream, errors = feed(Http1Inspector(), *parts)
        assert errors == [f"head longer than {MAX_HEAD} bytes"] and upstream == b""


def test_chunk_lines_and_trailers_are_bounded() -> None:
    ext = b"5;" + b"e" * 5000 + b"\r\nhello\r\n0\r\n\r\n"
    _, _, errors = feed(Http1Inspector(), CHUNKED, ext[:3000], ext[3000:], clean=False)
    assert errors and "4096" in errors[0]
    trailers = b"0\r\n" + b"x-t: v\r\n" * 9000 + b"\r\n"
    _, _, errors = feed(Http1Inspector(), CHUNKED, trailers, clean=False)
    assert errors and "trailers" in errors[0]


@pytest.mark.parametrize(
    ("first", "verdict"),
    [
        (b"", None),
        (b"G", None),
        (b"GET", None),
        (b"GET /", None),
        (b"GET / HTTP/1.1", None),
        (b"GET / HTTP/1.1\r\n", True),
        (b"POST /x?y HTTP/1.0\r\nHost: a\r\n\r\n", True),
        (b"M-SEARCH * HTTP/1.1\r\n", True),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", False),
        (b"GET / HTTP/1.1\n", False),
        (b"GET / RTSP/1.0\r\n", False),
        (b"get / HTTP/1.1\r\n", False),
        (b"\x16\x03\x01\x02\x00\x01", False),  # a TLS ClientHello
        (b"SSH-2.0-OpenSSH_9.2\r\n", False),
        (b"GETX / HTTP/1.1\r\n", False),
        (b"GET /" + b"a" * MAX_HEAD, False),
    ],
)
def test_looks_like_http1(first: bytes, verdict: bool | None) -> None:
    assert looks_like_http1(first) is verdict


@pytest.mark.parametrize(
    ("first", "verdict"),
    [
        (b"", None),
        (b"PRI * HTTP/2.0\r\n", None),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", True),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04", True),
        (b"PRI * HTTP/1.1\r\n", False),
        (b"GET / HTTP/1.1\r\n", False),
    ],
)
def test_looks_like_h2_preface(first: bytes, verdict: bool | None) -> None:
    assert looks_like_h2_preface(first) is verdict
