"""The HTTP/1.1 inspector as its owner drives it: requests decided in order, bytes passed through.

`Owner` plays the worker in memory: it feeds the inspector what a client and a server send,
decides each RequestHead with a policy function and records what would go upstream, what would go
back to the client, and whether the connection closed or turned opaque.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.proxy.http1 import (
    Event,
    Forward,
    Http1Inspector,
    LocalProtocolError,
    LocalReply,
    Opaque,
    ProtocolError,
    RequestHead,
)
from agent.proxy.responses import Denial, http1_reply

DENIED = http1_reply(Denial(403, "ns/deny-admin"))
Policy = Callable[[RequestHead], bool]


def allow_all(head: RequestHead) -> bool:
    return True


class Owner:
    """The worker's side of the inspector, in memory."""

    def __init__(self, policy: Policy = allow_all) -> None:
        self.inspector = Http1Inspector()
        self.policy = policy
        self.heads: list[RequestHead] = []
        self.upstream = bytearray()
        self.client = bytearray()
        self.forwards_up = 0  # Forward events towards the server
        self.closed = False
        self.opaque: bytes | None = None
        self.errors: list[str] = []

    def handle(self, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, RequestHead):
                self.heads.append(ev)
                if self.policy(ev):
                    self.upstream += self.inspector.allow(ev.request_id)
                    continue
                reply = self.inspector.deny(ev.request_id, DENIED)
                self.client += reply
                self.closed = bool(reply)
                return  # the rest of the list is void after a denial
            if isinstance(ev, Forward):
                if ev.to_server:
                    self.forwards_up += 1
                    self.upstream += ev.data
                else:
                    self.client += ev.data
            elif isinstance(ev, LocalReply):
                self.client += ev.data
                self.closed = True
            elif isinstance(ev, Opaque):
                self.upstream += ev.to_server
                self.opaque = ev.to_server
            else:
                assert isinstance(ev, ProtocolError)
                self.errors.append(ev.reason)
                self.client += ev.reply
                self.closed = True

    def send(self, data: bytes) -> None:
        self.handle(self.inspector.client_data(data))

    def answer(self, data: bytes) -> None:
        self.handle(self.inspector.server_data(data))


GET = b"GET /api/v1/items?limit=10&x=%20y HTTP/1.1\r\nHost: web.ns:8080\r\nUser-Agent: t\r\n\r\n"
POST = b"POST /upload HTTP/1.1\r\nHost: web\r\nContent-Length: 11\r\n\r\nhello world"
CHUNKED = (
    b"POST /c HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: t\r\n\r\n"
)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_get_head_fields_and_original_bytes() -> None:
    o = Owner()
    o.send(GET)
    (head,) = o.heads
    assert head == RequestHead(
        request_id=1,
        method="GET",
        target="/api/v1/items?limit=10&x=%20y",
        path="/api/v1/items",
        query="limit=10&x=%20y",
        host="web.ns:8080",
        headers=(("host", "web.ns:8080"), ("user-agent", "t")),
        version="1.1",
        keep_alive=True,
        upgrade="",
    )
    assert o.upstream == GET
    o.answer(OK)
    assert o.client == OK and not o.closed


def test_keep_alive_requests_and_responses_in_turn() -> None:
    o = Owner()
    for n in range(1, 4):
        o.send(GET)
        o.answer(OK)
        assert [h.request_id for h in o.heads] == list(range(1, n + 1))
    assert o.upstream == GET * 3 and o.client == OK * 3


@pytest.mark.parametrize("request_bytes", [GET, POST, CHUNKED], ids=["get", "post", "chunked"])
def test_split_at_every_offset(request_bytes: bytes) -> None:
    whole = Owner()
    whole.send(request_bytes)
    for cut in range(1, len(request_bytes)):
        o = Owner()
        o.send(request_bytes[:cut])
        o.send(request_bytes[cut:])
        assert o.heads == whole.heads, cut
        assert o.upstream == request_bytes, cut
    o = Owner()
    for k in range(len(request_bytes)):
        o.send(request_bytes[k : k + 1])
    assert o.heads == whole.heads and o.upstream == request_bytes


def test_allow_rewrites_only_the_headers_asked() -> None:
    o = Owner()
    request = b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t\r\nX-Keep:  v \r\n\r\n"
    o.handle(o.inspector.client_data(request))  # policy allows; check the rewrite on a second
    assert o.upstream == request
    events = o.inspector.client_data(request)
    (head,) = events
    assert isinstance(head, RequestHead)
    with pytest.raises(ValueError, match="x-bad"):
        o.inspector.allow(head.request_id, set_headers=[("x-bad", "a\r\nInjected: 1")])
    with pytest.raises(ValueError, match="content-length"):
        o.inspector.allow(head.request_id, remove_headers=["Content-Length"])
    with pytest.raises(ValueError, match="transfer-encoding"):
        o.inspector.allow(head.request_id, set_headers=[("Transfer-Encoding", "chunked")])
    out = o.inspector.allow(
        head.request_id,
        remove_headers=["authorization"],
        set_headers=[("x-jwt-sub", "alice"), ("X-KEEP", "new")],
    )
    assert out == b"GET / HTTP/1.1\r\nHost: a\r\nx-jwt-sub: alice\r\nX-KEEP: new\r\n\r\n"


@pytest.mark.parametrize(
    ("target", "path", "forwarded"),
    [
        (b"/a/%2e%2e/b?x=/../1", "/b", b"/b?x=/../1"),  # the query is kept as sent
        (b"/a/./b?", "/a/b", b"/a/b?"),
        (b"http://web/a/../b?q", "/b", b"http://web/b?q"),  # absolute-form: scheme, host kept
    ],
)
def test_allow_forwards_the_path_policy_decided_on(
    target: bytes, path: str, forwarded: bytes
) -> None:
    o = Owner()
    (head,) = o.inspector.client_data(b"GET " + target + b" HTTP/1.1\r\nHost: web\r\n\r\n")
    assert isinstance(head, RequestHead)
    with pytest.raises(ValueError, match="not valid"):
        o.inspector.allow(head.request_id, path="/b c")
    out = o.inspector.allow(head.request_id, path=path)
    assert out == b"GET " + forwarded + b" HTTP/1.1\r\nHost: web\r\n\r\n"


def test_rewrite_keeps_the_body_that_came_with_the_head() -> None:
    o = Owner()
    (head,) = o.inspector.client_data(POST)
    assert isinstance(head, RequestHead)
    out = o.inspector.allow(head.request_id, set_headers=[("x-a", "1")])
    assert out == POST.replace(b"\r\n\r\n", b"\r\nx-a: 1\r\n\r\n")


def test_pipelined_three_requests_middle_denied() -> None:
    o = Owner(policy=lambda h: h.path != "/admin")
    admin = b"POST /admin HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\n\r\nabc"
    o.send(GET + admin + POST)
    assert [h.path for h in o.heads] == ["/api/v1/items", "/admin"]
    assert o.upstream == GET  # neither the denied request nor the one after it
    assert o.client == b"" and not o.closed  # the 403 waits for the first response
    o.send(b"GET /more HTTP/1.1\r\nHost: web\r\n\r\n")  # dropped: the connection is closing
    assert len(o.heads) == 2 and o.upstream == GET
    o.answer(OK[:10])
    assert o.client == OK[:10] and not o.closed
    o.answer(OK[10:] + b"HTTP/1.1 200 OK\r\n")  # anything after the response is dropped
    assert o.client == OK + DENIED and o.closed


def test_denied_first_request_is_answered_at_once() -> None:
    o = Owner(policy=lambda h: False)
    cut = POST.index(b"\r\n\r\n") + 6  # the head and part of the body
    o.send(POST[:cut])
    assert o.client == DENIED and o.closed
    assert o.upstream == b""
    assert o.inspector.client_data(POST[cut:]) == []
    assert o.inspector.server_data(OK) == []


def test_decisions_in_order_and_before_more_bytes() -> None:
    inspector = Http1Inspector()
    first, second = inspector.client_data(GET + GET)
    assert isinstance(first, RequestHead) and isinstance(second, RequestHead)
    with pytest.raises(LocalProtocolError, match="decide request 1 before request 2"):
        inspector.allow(2)
    with pytest.raises(LocalProtocolError, match="decide request 1 before feeding"):
        inspector.client_data(GET)
    assert inspector.allow(1) == GET
    assert inspector.allow(2) == GET
    with pytest.raises(LocalProtocolError, match="request 3 is not waiting"):
        inspector.allow(3)


def test_body_streams_as_it_arrives() -> None:
    o = Owner()
    head = b"PUT /f HTTP/1.1\r\nHost: web\r\nContent-Length: 30\r\n\r\n"
    o.send(head + b"0123456789")
    assert o.upstream == head + b"0123456789" and o.forwards_up == 0  # came with the head
    o.send(b"abcdefghij")
    assert o.upstream.endswith(b"abcdefghij") and o.forwards_up == 1
    o.send(b"ABCDEFGHIJ" + GET)  # the rest of the body and a pipelined request
    assert o.upstream == head + b"0123456789abcdefghijABCDEFGHIJ" + GET
    assert len(o.heads) == 2


def test_chunked_body_and_trailers_pass_untouched() -> None:
    o = Owner()
    o.send(CHUNKED + GET)
    assert o.upstream == CHUNKED + GET
    assert [h.request_id for h in o.heads] == [1, 2]


def large_body_reads(total: int, read: int, chunked: bool) -> list[bytes]:
    """The reads a client's 10 MB upload arrives in: a head, then `read`-sized pieces."""
    if chunked:
        piece = b"%x\r\n" % 8000 + b"x" * 8000 + b"\r\n"
        body = piece * (total // 8000) + b"0\r\n\r\n"
        head = b"POST /big HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
    else:
        body = b"x" * total
        head = b"POST /big HTTP/1.1\r\nHost: web\r\nContent-Length: %d\r\n\r\n" % total
    return [head] + [body[k : k + read] for k in range(0, len(body), read)]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_ten_megabytes_stream_through_without_buffering(chunked: bool) -> None:
    reads = large_body_reads(10 << 20, 65536, chunked)
    inspector = Http1Inspector()
    (head,) = inspector.client_data(reads[0])
    assert isinstance(head, RequestHead)
    sent = len(inspector.allow(head.request_id))
    tracemalloc.start()
    try:
        for data in reads[1:]:
            (ev,) = inspector.client_data(data)  # one event per read, before the body ended
            assert isinstance(ev, Forward) and ev.to_server
            assert isinstance(ev.data, memoryview) and ev.data.obj is data  # no copy
            sent += len(ev.data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sent == sum(map(len, reads))
    assert peak < 256 * 1024, peak  # the 10 MB never sat in the inspector
    assert inspector.client_data(GET) != []  # and the next request is parsed


def test_response_framing_head_204_304_interim_chunked() -> None:
    o = Owner()
    head_req = b"HEAD /f HTTP/1.1\r\nHost: web\r\n\r\n"
    o.send(head_req + GET + GET + GET + GET)
    responses = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"  # to HEAD: no body follows
        b"HTTP/1.1 204 No Content\r\n\r\n"
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n"
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    for cut in range(len(responses)):
        o = Owner(policy=lambda h: h.request_id != 6)
        o.send(head_req + GET + GET + GET + GET + GET)  # the sixth is denied
        o.answer(responses[:cut])
        assert not o.closed
        o.answer(responses[cut:])
        assert o.client == responses + DENIED and o.closed, cut


def test_response_until_close() -> None:
    o = Owner(policy=lambda h: h.request_id == 1)
    o.send(GET + GET)
    o.answer(b"HTTP/1.0 200 OK\r\n\r\nstreamed until the server closes")
    o.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")  # body, not a response
    assert not o.closed and o.client.endswith(b"Content-Length: 0\r\n\r\n")


WEBSOCKET = (
    b"GET /chat HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


def test_upgrade_accepted_goes_opaque() -> None:
    o = Owner()
    o.send(WEBSOCKET + b"\x81\x02hi")  # a frame sent early waits for the answer
    (head,) = o.heads
    assert head.upgrade == "websocket"
    assert o.upstream == WEBSOCKET
    o.send(b"\x81\x02yo")
    o.answer(SWITCHED + b"\x81\x05hello")
    assert o.opaque == b"\x81\x02hi\x81\x02yo"
    assert o.upstream == WEBSOCKET + b"\x81\x02hi\x81\x02yo"
    assert o.client == SWITCHED + b"\x81\x05hello"
    with pytest.raises(LocalProtocolError, match="opaque"):
        o.inspector.client_data(b"GET")
    with pytest.raises(LocalProtocolError, match="opaque"):
        o.inspector.server_data(b"x")


def test_upgrade_refused_inspection_continues() -> None:
    o = Owner(policy=lambda h: h.path != "/admin")
    o.send(WEBSOCKET + b"GET /next HTTP/1.1\r\nHost: web\r\n\r\n")
    assert len(o.heads) == 1 and o.upstream == WEBSOCKET  # the GET waits
    refused = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\n\r\nno!"
    o.answer(refused)
    assert [h.path for h in o.heads] == ["/chat", "/next"]
    assert o.opaque is None and o.upstream.endswith(b"GET /next HTTP/1.1\r\nHost: web\r\n\r\n")
    o.answer(OK)
    o.send(b"GET /admin HTTP/1.1\r\nHost: web\r\n\r\n")  # still inspected
    assert o.client == refused + OK + DENIED and o.closed


def test_upgrade_denied_by_policy() -> None:
    o = Owner(policy=lambda h: not h.upgrade)
    o.send(WEBSOCKET + b"\x81\x02hi")
    assert o.client == DENIED and o.closed and o.upstream == b""


def test_connect_tunnel_and_refusal() -> None:
    connect = b"CONNECT db.ns:5432 HTTP/1.1\r\nHost: db.ns:5432\r\n\r\n"
    o = Owner()
    o.send(connect + b"\x00\x01raw")
    (head,) = o.heads
    assert (head.method, head.host, head.path, head.upgrade) == ("CONNECT", "db.ns:5432", "", "")
    o.answer(b"HTTP/1.1 200 Connection Established\r\n\r\n\x00\x02")
    assert o.opaque == b"\x00\x01raw" and o.client.endswith(b"\r\n\r\n\x00\x02")
    o = Owner()
    o.send(connect + GET)
    o.answer(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    assert [h.method for h in o.heads] == ["CONNECT", "GET"] and o.opaque is None


def test_bytes_held_for_an_upgrade_are_bounded() -> None:
    o = Owner()
    o.send(WEBSOCKET)
    o.send(b"x" * 65536)
    o.send(b"x")
    assert o.closed and o.errors and "65536" in o.errors[0]
    assert o.client == b""  # the upgrade is unanswered: no clean 400 possible


def test_connection_close_and_http10_end_the_requests() -> None:
    o = Owner()
    o.send(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" + GET)
    assert len(o.heads) == 1 and not o.heads[0].keep_alive
    o.send(GET)
    assert len(o.heads) == 1
    o = Owner()
    o.send(b"GET /old HTTP/1.0\r\n\r\n" + GET)
    assert [(h.version, h.keep_alive, h.host) for h in o.heads] == [("1.0", False, "")]
    o = Owner()
    o.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" + GET)
    assert [h.keep_alive for h in o.heads] == [True, True]


@pytest.mark.parametrize(
    ("line", "path", "query", "host"),
    [
        (b"GET http://api.ns:81/p/q?a=b HTTP/1.1", "/p/q", "a=b", "api.ns:81"),
        (b"GET https://api.ns HTTP/1.1", "/", "", "api.ns"),
        (b"GET http://api.ns?x HTTP/1.1", "/", "x", "api.ns"),
        (b"OPTIONS * HTTP/1.1", "*", "", "web"),
        (b"GET /a/../b?%2F HTTP/1.1", "/a/../b", "%2F", "web"),
    ],
)
def test_target_forms(line: bytes, path: str, query: str, host: str) -> None:
    o = Owner()
    o.send(line + b"\r\nHost: web\r\n\r\n")
    (head,) = o.heads
    assert (head.path, head.query, head.host) == (path, query, host)


def test_empty_lines_between_requests_are_dropped() -> None:
    o = Owner()
    o.send(b"\r\n" + GET + b"\r\n\r\n")
    o.send(b"\r")
    o.send(b"\n" + GET)
    assert len(o.heads) == 2 and o.upstream == GET + GET


def test_malformed_response_ends_the_connection() -> None:
    o = Owner()
    o.send(GET)
    o.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    assert o.closed and o.errors[0].startswith("response: ") and o.client == b""
    o = Owner()
    o.send(GET)
    o.answer(SWITCHED)  # nobody asked to switch
    assert o.closed and "101" in o.errors[0] and o.opaque is None


REQUESTS = [GET, POST, CHUNKED, b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n", b"\r\n" + GET]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(REQUESTS), min_size=1, max_size=6),
    st.lists(st.integers(min_value=0, max_value=2000), max_size=8),
)
def test_any_split_of_pipelined_requests(requests: list[bytes], cuts: list[int]) -> None:
    """However the reads cut a pipeline, the same requests are announced and every byte of
    them goes upstream in order (the empty lines between requests are dropped)."""
    data = b"".join(requests)
    o = Owner()
    start = 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        o.send(data[start:cut])
        start = cut
    assert len(o.heads) == len(requests) and not o.errors
    assert o.upstream == b"".join(r.lstrip(b"\r\n") for r in requests)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(client: bytes, server: bytes) -> None:
    """Whatever arrives, the inspector answers with events, never an exception."""
    o = Owner()
    o.send(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + client)
    o.answer(server)
    o = Owner()
    o.send(client)
    o.answer(server)
