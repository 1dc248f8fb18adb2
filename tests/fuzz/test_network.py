"""Structured fuzzing of the parsers of network bytes: inputs built field by field (frames,
request lines, headers, chunked bodies, targets, tokens), cut into reads, through each fuzz
target's `check` (its contract: `fuzz.targets.<name>`).

These complement the byte mutations of `test_corpus.py` and the older properties beside each
parser's unit tests (`tests/unit/test_hbone_framing.py`: any split of valid frames gives the same
events; `test_http1.py`: any split of a pipeline gives the same requests), whose strategies are
reused here rather than written again.
"""

from __future__ import annotations

import base64
import json

import h2.config
import h2.connection
from hypothesis import given
from hypothesis import strategies as st

from agent.proxy.sniff import METHODS
from agent.tunnel.frames import END_HEADERS, HEADERS, PREFACE, settings_frame
from fuzz.inputs import join
from fuzz.targets import authority, hbone, http1, http1_framing, http2, jwt, path, sniff
from tests.fuzz.strategies import FUZZ, cut, json_values
from tests.unit.test_hbone_framing import FRAMES, connect_block, frame


def alternating(client: list[bytes], server: list[bytes]) -> bytes:
    """An input of client and server reads, taking turns (client first)."""
    turns = max(len(client), len(server))
    client, server = client + [b""] * (turns - len(client)), server + [b""] * (turns - len(server))
    return join([read for pair in zip(client, server, strict=True) for read in pair])


@FUZZ
@given(st.lists(FRAMES, max_size=12), st.integers(0, 255), st.data())
def test_hbone_frames(frames: list[bytes], flags: int, data: st.DataObject) -> None:
    stream = PREFACE + settings_frame([]) + frame(HEADERS, END_HEADERS, 1, connect_block())
    reads = data.draw(cut(stream + b"".join(frames)))
    hbone.check(bytes([flags & ~hbone.CLIENT]) + join(reads))


@FUZZ
@given(st.ip_addresses().map(str) | st.text(max_size=20), st.integers(-1, 70000), st.data())
def test_authorities(ip: str, port: int, data: st.DataObject) -> None:
    text = f"[{ip}]:{port}" if ":" in ip and data.draw(st.booleans()) else f"{ip}:{port}"
    authority.check(text.encode())


_FIELDS = ("Host", "Content-Length", "Transfer-Encoding", "Connection", "Upgrade", "Cookie", "X-A")
_VALUES = st.sampled_from(
    (
        "web",
        "3",
        "0",
        "-1",
        "chunked",
        "gzip, chunked",
        "close",
        "keep-alive",
        "Upgrade",
        "websocket",
        " a b ",
        "1\x00",
    )
) | st.text(alphabet="abc019 ,;=\t", max_size=10)
_TARGETS = st.sampled_from(("*", "http://web/a?b", "web:443", "/a#f", "//x")) | st.text(
    alphabet="/.%?#ab09~\\:@*2e", max_size=24
).map(lambda t: "/" + t)


@st.composite
def messages(draw: st.DrawFn, request: bool) -> bytes:
    """An HTTP/1.x request or response: a start line, fields, a body, each possibly wrong."""
    version = draw(st.sampled_from(("HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 ")))
    if request:
        method = draw(st.sampled_from(("GET", "HEAD", "POST", "PUT", "CONNECT", "OPTIONS", "get")))
        line = f"{method} {draw(_TARGETS)} {version}"
    else:
        line = f"{version} {draw(st.sampled_from((100, 101, 200, 204, 304, 404, 999)))} X"
    fields = draw(st.lists(st.tuples(st.sampled_from(_FIELDS), _VALUES), max_size=5))
    head = "\r\n".join([line, *(f"{name}: {value}" for name, value in fields)]) + "\r\n\r\n"
    return head.encode("latin-1") + draw(st.binary(max_size=40))


@FUZZ
@given(
    st.lists(messages(request=True), min_size=1, max_size=4),
    st.lists(messages(request=False), max_size=4),
    st.data(),
)
def test_http1_messages(requests: list[bytes], responses: list[bytes], data: st.DataObject) -> None:
    client = data.draw(cut(b"".join(requests)))
    server = data.draw(cut(b"".join(responses)))
    http1.check(alternating(client, server))


@st.composite
def chunked(draw: st.DrawFn) -> bytes:
    """A chunked body: sizes (hex of any case, sometimes wrong), extensions, trailers."""
    body = b""
    for chunk in draw(st.lists(st.binary(max_size=30), max_size=4)):
        size = draw(st.sampled_from(("%x", "%X", "%04x", "%x ", "0x%x", "%d"))) % len(chunk)
        extension = draw(st.sampled_from(("", ";a=b", ';a="c"', ";\r")))
        body += f"{size}{extension}\r\n".encode() + chunk + b"\r\n"
    trailers = draw(st.lists(st.sampled_from((b"T: 1\r\n", b"bad\n", b"X:\r\n")), max_size=2))
    return body + b"0\r\n" + b"".join(trailers) + b"\r\n"


@FUZZ
@given(chunked(), st.data())
def test_http1_chunked_bodies(body: bytes, data: st.DataObject) -> None:
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    http1_framing.check(join(data.draw(cut(head + body))))


@FUZZ
@given(
    st.sampled_from(sorted(METHODS)) | st.binary(max_size=8),
    st.binary(max_size=20),
    st.sampled_from((b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", b" HTTP/1.1\n", b"")),
)
def test_sniffed_request_lines(method: bytes, target: bytes, version: bytes) -> None:
    sniff.check(method + b" " + target + version)
    sniff.check(PREFACE[: len(target)] + method)


_H2_FIELDS = st.lists(
    st.tuples(
        st.sampled_from(
            (
                "content-type",
                "te",
                "cookie",
                "host",
                ":path",
                ":method",
                "Upper",
                "connection",
                "x-a",
                "",
            )
        ),
        st.sampled_from(("application/grpc", "trailers", "a=1", "web", "/x", "GET", "\x80")),
    ),
    max_size=4,
)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(("GET", "POST", "CONNECT", "")),
            _TARGETS,
            _H2_FIELDS,
            st.binary(max_size=40),
            st.booleans(),
        ),
        max_size=5,
    ),
    st.data(),
)
def test_http2_requests(
    requests: list[tuple[str, str, list[tuple[str, str]], bytes, bool]], data: st.DataObject
) -> None:
    """Requests an `h2` client sends without checking its own headers (hostile fields too)."""
    config = h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
    )
    client = h2.connection.H2Connection(config)
    client.initiate_connection()
    for i, (method, target, fields, body, end) in enumerate(requests):
        sid = 1 + 2 * i
        pseudo = [
            (":method", method),
            (":scheme", "http"),
            (":authority", "web"),
            (":path", target),
        ]
        client.send_headers(sid, pseudo + fields, end_stream=end and not body)
        if body:
            client.send_data(sid, body, end_stream=end)
    http2.check(alternating(data.draw(cut(client.data_to_send())), []))


_PATH_PARTS = (
    "/",
    "a",
    ".",
    "..",
    "\\",
    "?",
    "%",
    "%%",
    "%2e",
    "%2E",
    "%2f",
    "%5C",
    "%41",
    "%7e",
    "%30",
    "%31",
    "%36",
    "%00",
    "%0",
    "3",
    "0",
)


@FUZZ
@given(st.lists(st.sampled_from(_PATH_PARTS), max_size=12))
def test_paths(parts: list[str]) -> None:
    path.check(("/" + "".join(parts)).encode("latin-1"))


def _segment(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


_CLAIMS = ("iss", "sub", "aud", "exp", "nbf", "iat", "azp")


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(("alg", "kid", "typ", "crit")),
        st.sampled_from(("RS256", "ES256", "EdDSA", "none")) | json_values,
    ),
    st.dictionaries(st.sampled_from(_CLAIMS), json_values) | json_values,
    st.binary(max_size=70),
    st.sampled_from(("Bearer ", "bearer ", "Bearer", "")),
)
def test_jwt_tokens(header: object, claims: object, signature: bytes, scheme: str) -> None:
    encoded = base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
    jwt.check(f"{scheme}{_segment(header)}.{_segment(claims)}.{encoded}".encode("latin-1"))
