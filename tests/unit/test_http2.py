"""The HTTP/2 inspector between an `h2` client and an `h2` server, in memory.

`Wire` connects the three: what the client writes is fed to the inspector, what the inspector has
for the server goes to the server, and back; each StreamHead is decided by a policy function
(None: allow; a Denial: deny).  The peers acknowledge the DATA they receive unless told not to
(a slow reader), so flow control is exercised end to end.
"""

from __future__ import annotations

from collections.abc import Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest

from agent.proxy.http2 import (
    CONNECTION_WINDOW,
    ConnectionEnded,
    Http2Inspector,
    LocalProtocolError,
    StreamHead,
)
from agent.proxy.responses import Denial, RateLimitHeaders

Policy = Callable[[StreamHead], Denial | None]
Fields = list[tuple[bytes, bytes]]


def allow_all(head: StreamHead) -> Denial | None:
    return None


def grpc_request(method: str, authority: str = "billing.shop:50051") -> Fields:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", authority.encode()),
        (b":path", method.encode()),
        (b"content-type", b"application/grpc+proto"),
        (b"te", b"trailers"),
        (b"authorization", b"Bearer abc"),
    ]


def get_request(path: str) -> Fields:
    return [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"web.shop"),
        (b":path", path.encode()),
        (b"accept", b"*/*"),
    ]


def grpc_message(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


class Wire:
    """An h2 client -> the inspector -> an h2 server, pumped until quiet."""

    def __init__(
        self,
        policy: Policy = allow_all,
        *,
        server_settings: dict[h2.settings.SettingCodes, int] | None = None,
        decide: bool = True,
    ) -> None:
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.server = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        if server_settings:
            self.server.local_settings = h2.settings.Settings(
                client=False, initial_values=server_settings
            )
        self.client.initiate_connection()
        self.server.initiate_connection()
        self.inspector = Http2Inspector()
        self.policy = policy
        self.decide = decide
        self.heads: list[StreamHead] = []
        self.at_client: list[h2.events.Event] = []
        self.at_server: list[h2.events.Event] = []
        self.ended: list[str] = []
        self.client_reads = True
        self.server_reads = True
        self.pump()

    def handle(self, events: list[StreamHead | ConnectionEnded]) -> None:
        for ev in events:
            if isinstance(ev, ConnectionEnded):
                self.ended.append(ev.reason)
                continue
            self.heads.append(ev)
            if not self.decide:
                continue
            denial = self.policy(ev)
            if denial is None:
                self.inspector.allow(ev.stream_id)
            else:
                self.inspector.deny(ev.stream_id, denial)

    def pump(self) -> None:
        for _ in range(100000):
            moved = False
            data = self.client.data_to_send()
            if data:
                moved = True
                self.handle(self.inspector.client_data(data))
            data = self.server.data_to_send()
            if data:
                moved = True
                self.handle(self.inspector.server_data(data))
            data = self.inspector.data_for_client()
            if data:
                moved = True
                self.at_client += self._receive(self.client, data, self.client_reads)
            data = self.inspector.data_for_server()
            if data:
                moved = True
                self.at_server += self._receive(self.server, data, self.server_reads)
            if not moved:
                return
        raise AssertionError("the wire never went quiet")

    @staticmethod
    def _receive(
        conn: h2.connection.H2Connection, data: bytes, reads: bool
    ) -> list[h2.events.Event]:
        events = conn.receive_data(data)
        for ev in events:
            if reads and isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        return events

    def of(self, events: list[h2.events.Event], sid: int) -> list[h2.events.Event]:
        return [e for e in events if getattr(e, "stream_id", None) == sid]


def data_of(events: list[h2.events.Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))


def test_allowed_and_denied_grpc_calls_on_one_connection() -> None:
    w = Wire(policy=lambda h: Denial(403, "shop/deny-refunds") if "Refund" in h.path else None)
    w.client.send_headers(1, grpc_request("/shop.Billing/Charge"))
    w.client.send_headers(3, grpc_request("/shop.Billing/Refund"))
    w.client.send_data(1, grpc_message(b"charge"), end_stream=True)
    w.client.send_data(3, grpc_message(b"refund"), end_stream=True)
    w.pump()
    assert [(h.stream_id, h.path, h.grpc) for h in w.heads] == [
        (1, "/shop.Billing/Charge", True),
        (3, "/shop.Billing/Refund", True),
    ]
    # only the allowed call reached the server, headers and body as sent
    (request,) = [e for e in w.at_server if isinstance(e, h2.events.RequestReceived)]
    assert request.headers == grpc_request("/shop.Billing/Charge")
    up = request.stream_id
    assert data_of(w.at_server) == grpc_message(b"charge")
    assert any(isinstance(e, h2.events.StreamEnded) for e in w.of(w.at_server, up))
    # the server answers: headers, a message, trailers
    w.server.send_headers(up, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    w.server.send_data(up, grpc_message(b"ok"))
    w.server.send_headers(up, [(b"grpc-status", b"0")], end_stream=True)
    w.pump()
    one = w.of(w.at_client, 1)
    assert [type(e) for e in one] == [
        h2.events.ResponseReceived,
        h2.events.DataReceived,
        h2.events.TrailersReceived,
        h2.events.StreamEnded,
    ]
    assert isinstance(one[2], h2.events.TrailersReceived)
    assert one[2].headers == [(b"grpc-status", b"0")]
    assert data_of(one) == grpc_message(b"ok")
    three = w.of(w.at_client, 3)
    assert isinstance(three[0], h2.events.ResponseReceived)
    assert three[0].stream_ended is not None  # trailers-only: one HEADERS with END_STREAM
    assert three[0].headers == [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"7"),
        (b"grpc-message", b"RBAC: access denied"),
        (b"x-ferry-denied-by", b"shop/deny-refunds"),
    ]
    assert not any(isinstance(e, h2.events.StreamReset) for e in w.at_client)
    assert w.inspector.open_streams == 0 and not w.ended


@pytest.mark.parametrize(
    ("denial", "grpc_status", "message"),
    [
        (Denial(401, "shop/jwt", "Jwt is expired"), b"16", b"Jwt is expired"),
        (
            Denial(429, "shop/limit", rate_limit=RateLimitHeaders(5, 0, 2.0, 0.5)),
            b"8",
            b"local_rate_limited",
        ),
        (Denial(403, "shop/p", "100% d\u00e9nied"), b"7", b"100%25 d%C3%A9nied"),
    ],
)
def test_grpc_statuses(denial: Denial, grpc_status: bytes, message: bytes) -> None:
    w = Wire(policy=lambda h: denial)
    w.client.send_headers(1, grpc_request("/shop.Billing/Charge"), end_stream=True)
    w.pump()
    (resp,) = [e for e in w.at_client if isinstance(e, h2.events.ResponseReceived)]
    fields = dict(resp.headers)
    assert (fields[b"grpc-status"], fields[b"grpc-message"]) == (grpc_status, message)
    assert w.at_server == [] or not any(
        isinstance(e, h2.events.RequestReceived) for e in w.at_server
    )


def test_plain_http2_denial_has_status_and_body() -> None:
    w = Wire(policy=lambda h: Denial(403, "shop/admin") if h.path == "/admin" else None)
    w.client.send_headers(1, get_request("/admin?x=1"), end_stream=True)
    w.pump()
    (head,) = w.heads
    assert (head.method, head.scheme, head.authority, head.path, head.query) == (
        "GET",
        "http",
        "web.shop",
        "/admin",
        "x=1",
    )
    assert head.headers == (("accept", "*/*"),) and not head.grpc
    resp, body, end = w.of(w.at_client, 1)
    assert isinstance(resp, h2.events.ResponseReceived)
    assert resp.headers[:2] == [(b":status", b"403"), (b"content-type", b"text/plain")]
    assert (b"x-ferry-denied-by", b"shop/admin") in resp.headers
    assert isinstance(body, h2.events.DataReceived) and body.data == b"RBAC: access denied"
    assert isinstance(end, h2.events.StreamEnded)


def test_allow_rewrites_headers() -> None:
    w = Wire(decide=False)
    w.client.send_headers(1, grpc_request("/shop.Billing/Charge"), end_stream=True)
    w.pump()
    with pytest.raises(ValueError, match="content-length"):
        w.inspector.allow(1, set_headers=[("Content-Length", "3")])
    with pytest.raises(ValueError, match="x-a"):
        w.inspector.allow(1, set_headers=[("x-a", "1\r\n")])
    w.inspector.allow(1, remove_headers=["Authorization"], set_headers=[("X-Jwt-Sub", "alice")])
    w.pump()
    (request,) = [e for e in w.at_server if isinstance(e, h2.events.RequestReceived)]
    assert request.headers == [*grpc_request("/shop.Billing/Charge")[:-1], (b"x-jwt-sub", b"alice")]
    with pytest.raises(LocalProtocolError, match="stream 1 was already decided"):
        w.inspector.deny(1, Denial(403))


def test_allow_forwards_the_path_policy_decided_on() -> None:
    w = Wire(decide=False)
    w.client.send_headers(1, get_request("/a/%2e%2e/b?x=/../1"), end_stream=True)
    w.pump()
    with pytest.raises(ValueError, match="not valid"):
        w.inspector.allow(1, path="b")
    w.inspector.allow(1, path="/b")
    w.pump()
    (request,) = [e for e in w.at_server if isinstance(e, h2.events.RequestReceived)]
    assert (b":path", b"/b?x=/../1") in request.headers


def test_undecided_stream_holds_its_data_within_the_window() -> None:
    w = Wire(decide=False)
    w.client.send_headers(1, grpc_request("/shop.Billing/Upload"))
    body = b"u" * 200_000
    for k in range(0, 65535, 16384):  # the client's default window for a new stream
        w.client.send_data(1, body[k : min(k + 16384, 65535)])
    w.pump()
    assert not any(isinstance(e, h2.events.RequestReceived) for e in w.at_server)
    w.inspector.allow(1)
    w.pump()
    assert data_of(w.at_server) == body[:65535]


def test_five_megabytes_each_way_under_flow_control() -> None:
    w = Wire()
    size = 5 << 20
    w.client.send_headers(1, grpc_request("/shop.Files/Copy"))
    sent = 0
    got = bytearray()
    replied = 0
    up = 0
    for _ in range(10000):
        window = min(w.client.local_flow_control_window(1), w.client.max_outbound_frame_size)
        take = min(window, size - sent)
        if take:
            w.client.send_data(1, b"c" * take, end_stream=sent + take == size)
            sent += take
        w.pump()
        if not up:
            up = next(e.stream_id for e in w.at_server if isinstance(e, h2.events.RequestReceived))
            w.server.send_headers(up, [(b":status", b"200")])
        window = min(w.server.local_flow_control_window(up), w.server.max_outbound_frame_size)
        take = min(window, size - replied)
        if take:
            w.server.send_data(up, b"s" * take, end_stream=replied + take == size)
            replied += take
        got += data_of(w.at_client)
        w.at_client.clear()
        w.pump()
        got += data_of(w.at_client)
        w.at_client.clear()
        if sent == size and replied == size and len(got) == size:
            break
    assert data_of(w.at_server) == b"c" * size
    assert bytes(got) == b"s" * size


def test_a_reader_that_stops_stops_its_writer() -> None:
    """The server reads nothing: the inspector holds at most what its windows let in."""
    w = Wire()
    w.server_reads = False
    w.client.send_headers(1, grpc_request("/shop.Files/Upload"))
    w.pump()
    sent = 0
    for _ in range(200):
        window = min(w.client.local_flow_control_window(1), w.client.max_outbound_frame_size)
        if not window:
            break
        w.client.send_data(1, b"x" * window)
        sent += window
        w.pump()
    held = sum(len(st.to_server) for st in w.inspector._streams.values())
    assert held <= CONNECTION_WINDOW
    assert w.client.local_flow_control_window(1) == 0
    assert sent < 2 * 1024 * 1024  # the client was stopped: server's window + ours


def test_denied_stream_still_sending_is_cut_short_and_others_go_on() -> None:
    w = Wire(policy=lambda h: Denial(403) if h.path == "/upload" else None)
    w.client.send_headers(1, get_request("/upload"))
    w.client.send_data(1, b"a" * 1000)
    w.pump()
    reset = [e for e in w.at_client if isinstance(e, h2.events.StreamReset)]
    assert [(e.stream_id, e.error_code) for e in reset] == [(1, h2.errors.ErrorCodes.NO_ERROR)]
    w.client.send_headers(3, get_request("/ok"), end_stream=True)
    w.pump()
    assert [e.headers[3][1] for e in w.at_server if isinstance(e, h2.events.RequestReceived)] == [
        b"/ok"
    ]
    assert not w.ended


def test_resets_cross_over() -> None:
    w = Wire()
    w.client.send_headers(1, grpc_request("/a.B/C"))
    w.pump()
    (request,) = [e for e in w.at_server if isinstance(e, h2.events.RequestReceived)]
    w.client.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
    w.pump()
    (reset,) = [e for e in w.at_server if isinstance(e, h2.events.StreamReset)]
    assert (reset.stream_id, reset.error_code) == (request.stream_id, h2.errors.ErrorCodes.CANCEL)
    w.client.send_headers(3, grpc_request("/a.B/D"))
    w.pump()
    up = [e for e in w.at_server if isinstance(e, h2.events.RequestReceived)][-1].stream_id
    w.server.send_headers(up, [(b":status", b"200")])
    w.server.reset_stream(up, h2.errors.ErrorCodes.INTERNAL_ERROR)
    w.pump()
    (reset,) = [e for e in w.at_client if isinstance(e, h2.events.StreamReset)]
    assert (reset.stream_id, reset.error_code) == (3, h2.errors.ErrorCodes.INTERNAL_ERROR)
    assert w.inspector.open_streams == 0


def test_a_stream_reset_before_its_decision_is_ignored() -> None:
    w = Wire(decide=False)
    w.client.send_headers(1, get_request("/a"))
    w.client.send_data(1, b"x" * 1000)
    w.client.reset_stream(1)
    w.pump()
    w.inspector.allow(1)
    w.inspector.deny(1, Denial(403))
    w.pump()
    assert not any(isinstance(e, h2.events.RequestReceived) for e in w.at_server)


def send_all(conn: h2.connection.H2Connection, sid: int, data: bytes) -> None:
    for k in range(0, len(data), 16384):
        conn.send_data(sid, data[k : k + 16384])


def test_bytes_of_dropped_streams_are_credited_back() -> None:
    """Reset before the decision, or denied: what those streams held still reopens the
    connection window, or the connection would stall after a megabyte."""
    w = Wire(policy=lambda h: Denial(403) if h.path == "/denied" else None, decide=False)
    body = b"x" * 100_000
    sid = 1
    for _ in range(2 * CONNECTION_WINDOW // len(body)):
        w.client.send_headers(sid, get_request("/undecided"))
        send_all(w.client, sid, body)
        w.client.reset_stream(sid)
        w.pump()
        sid += 2
    w.decide = True
    for _ in range(2 * CONNECTION_WINDOW // len(body)):
        w.client.send_headers(sid, get_request("/denied"))
        send_all(w.client, sid, body)  # held until the denial, then dropped
        w.pump()
        sid += 2
    w.client.send_headers(sid, get_request("/ok"))
    send_all(w.client, sid, body)
    w.client.end_stream(sid)
    w.pump()
    assert data_of(w.at_server) == body


def test_client_trailers_and_informational_responses() -> None:
    w = Wire()
    w.client.send_headers(1, get_request("/t"))
    w.client.send_data(1, b"body")
    w.client.send_headers(1, [(b"x-checksum", b"1")], end_stream=True)
    w.pump()
    up = next(e.stream_id for e in w.at_server if isinstance(e, h2.events.RequestReceived))
    (trailers,) = [e for e in w.at_server if isinstance(e, h2.events.TrailersReceived)]
    assert trailers.headers == [(b"x-checksum", b"1")]
    w.server.send_headers(up, [(b":status", b"103"), (b"link", b"</s.css>")])
    w.server.send_headers(up, [(b":status", b"204")], end_stream=True)
    w.pump()
    assert [type(e) for e in w.of(w.at_client, 1)] == [
        h2.events.InformationalResponseReceived,
        h2.events.ResponseReceived,
        h2.events.StreamEnded,
    ]


def test_server_stream_limit_refuses_with_refused_stream() -> None:
    w = Wire(server_settings={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1})
    w.client.send_headers(1, get_request("/a"))
    w.client.send_headers(3, get_request("/b"))
    w.pump()
    (reset,) = [e for e in w.at_client if isinstance(e, h2.events.StreamReset)]
    assert (reset.stream_id, reset.error_code) == (3, h2.errors.ErrorCodes.REFUSED_STREAM)


def test_goaway_from_the_server_ends_the_connection() -> None:
    w = Wire()
    w.client.send_headers(1, get_request("/a"), end_stream=True)
    w.pump()
    w.server.close_connection()
    w.pump()
    assert w.ended == ["the server sent GOAWAY (code 0)"]
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in w.at_client)
    assert w.inspector.client_data(b"anything") == []


def test_protocol_error_from_the_client() -> None:
    w = Wire()
    w.handle(w.inspector.client_data(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00"))
    assert w.ended and w.ended[0].startswith("HTTP/2 protocol error from the client")
    goaway = w.client.receive_data(w.inspector.data_for_client())
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in goaway)


def test_protocol_error_from_the_server() -> None:
    w = Wire()
    w.handle(w.inspector.server_data(b"\x00\x00\x08\x07\x00\x00\x00\x00\x01" + b"\x00" * 8))
    assert w.ended and w.ended[0].startswith("HTTP/2 protocol error from the server")
    (ended,) = [
        e
        for e in w.client.receive_data(w.inspector.data_for_client())
        if isinstance(e, h2.events.ConnectionTerminated)
    ]
    assert ended.error_code == h2.errors.ErrorCodes.INTERNAL_ERROR
