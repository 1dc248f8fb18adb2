"""The HBONE core: a client core and a server core talking over in-memory bytes, and `h2` peers."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.tunnel.authority import format_authority, parse_authority
from agent.tunnel.events import (
    ConnectionEnded,
    Data,
    Event,
    LocalProtocolError,
    StreamAccepted,
    StreamEnded,
    StreamRefused,
    StreamRequested,
    StreamReset,
    TunnelProtocolError,
    WindowOpened,
)
from agent.tunnel.floods import DEFAULT
from agent.tunnel.hbone import HboneConnection
from agent.tunnel.windows import MAX_FRAME_SIZE


class Pair:
    """A client and a server core; `pump()` moves bytes both ways until both are quiet."""

    def __init__(self) -> None:
        self.client = HboneConnection(client=True)
        self.server = HboneConnection(client=False)
        self.pump()

    def pump(self) -> tuple[list[Event], list[Event]]:
        to_client: list[Event] = []
        to_server: list[Event] = []
        while True:
            c2s = self.client.data_to_send()
            s2c = self.server.data_to_send()
            if not c2s and not s2c:
                return to_client, to_server
            if c2s:
                to_server += self.server.receive(c2s)
            if s2c:
                to_client += self.client.receive(s2c)

    def open(self, authority: str = "10.0.0.2:80") -> int:
        sid = self.client.open_stream(authority)
        _, at_server = self.pump()
        assert at_server == [StreamRequested(sid, authority)]
        self.server.accept(sid)
        at_client, _ = self.pump()
        assert at_client == [StreamAccepted(sid)]
        return sid


def payload(events: list[Event], sid: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Data) and e.stream_id == sid)


def test_authority_forms() -> None:
    assert format_authority("10.1.2.3", 80) == "10.1.2.3:80"
    assert format_authority("fd00::3", 8080) == "[fd00::3]:8080"
    assert parse_authority("10.1.2.3:80") == ("10.1.2.3", 80)
    assert parse_authority("[fd00::3]:8080") == ("fd00::3", 8080)
    for bad in ("10.1.2.3", "host:80", "10.1.2.3:0", "10.1.2.3:70000", "fd00::3:80", "[x]:1"):
        with pytest.raises(ValueError):
            parse_authority(bad)


def test_open_data_both_ways_and_half_close_both_ways() -> None:
    p = Pair()
    sid = p.open()
    p.client.send_data(sid, b"hello ")
    p.client.send_data(sid, b"server")
    _, at_server = p.pump()
    assert payload(at_server, sid) == b"hello server"
    p.client.end_stream(sid)
    _, at_server = p.pump()
    assert StreamEnded(sid) in at_server
    # The other direction still flows after the client's half-close.
    p.server.send_data(sid, b"answer")
    p.server.end_stream(sid)
    at_client, _ = p.pump()
    assert payload(at_client, sid) == b"answer"
    assert at_client[-1] == StreamEnded(sid)
    assert p.client.open_streams == 0 and p.server.open_streams == 0


def test_server_half_closes_first() -> None:
    p = Pair()
    sid = p.open()
    p.server.end_stream(sid)
    at_client, _ = p.pump()
    assert at_client == [StreamEnded(sid)]
    p.client.send_data(sid, b"late")
    _, at_server = p.pump()
    assert payload(at_server, sid) == b"late"


def test_reset_both_ways() -> None:
    p = Pair()
    a, b = p.open(), p.open("10.0.0.2:81")
    p.client.reset(a)
    _, at_server = p.pump()
    assert next(e for e in at_server if isinstance(e, StreamReset)).stream_id == a
    p.server.reset(b)
    at_client, _ = p.pump()
    assert next(e for e in at_client if isinstance(e, StreamReset)).stream_id == b
    # Resetting a stream that is gone is harmless.
    p.client.reset(a)
    p.client.end_stream(a)
    p.pump()


@pytest.mark.parametrize("status", [403, 503])
def test_refused(status: int) -> None:
    p = Pair()
    sid = p.client.open_stream("10.0.0.9:80")
    p.pump()
    p.server.refuse(sid, status)
    at_client, _ = p.pump()
    assert at_client == [StreamRefused(sid, status)]
    assert p.client.open_streams == 0


def test_many_streams_interleaved() -> None:
    p = Pair()
    sids = [p.open(f"10.0.0.2:{1000 + i}") for i in range(DEFAULT.streams_per_connection)]
    for sid in sids:
        p.client.send_data(sid, str(sid).encode())
    _, at_server = p.pump()
    for sid in sids:
        assert payload(at_server, sid) == str(sid).encode()


def test_large_frames_are_used() -> None:
    p = Pair()
    sid = p.open()
    assert p.client.send_window(sid) == DEFAULT.stream_window
    blob = bytes(range(256)) * 8192  # 2 MiB
    p.client.send_data(sid, blob)
    wire = p.client.data_to_send()
    events = p.server.receive(wire)
    datas = [e for e in events if isinstance(e, Data)]
    assert b"".join(d.data for d in datas) == blob
    assert len(datas) == len(blob) // MAX_FRAME_SIZE  # 1 MiB frames, not 16 KiB ones


def test_data_header_is_send_data_without_the_copy() -> None:
    p = Pair()
    sid = p.open()
    assert p.client.max_frame == MAX_FRAME_SIZE  # the server's setting
    blob = bytes(range(256)) * 4096  # 1 MiB: one frame
    p.client.send_data(sid, b"first")  # queued in `out`: must go before the direct frame
    header = p.client.data_header(sid, len(blob))
    assert len(header) == 9
    assert p.client.send_window(sid) == DEFAULT.stream_window - 5 - len(blob)
    wire = p.client.data_to_send() + header + blob
    events = p.server.receive(wire)
    assert payload(events, sid) == b"first" + blob
    with pytest.raises(LocalProtocolError):
        p.client.data_header(sid, MAX_FRAME_SIZE + 1)
    p.client.reset(sid)
    assert p.client.data_header(sid, 1) == b""  # gone: nothing more to send


def test_window_exhaustion_and_reopening_after_consumed() -> None:
    p = Pair()
    sid = p.open()
    window = p.client.send_window(sid)
    p.client.send_data(sid, b"x" * window)
    _, at_server = p.pump()
    assert len(payload(at_server, sid)) == window
    assert p.client.send_window(sid) == 0  # the server app has not taken the bytes yet
    # Another stream is not blocked by this one (the connection window is large).
    other = p.open("10.0.0.2:81")
    assert p.client.send_window(other) == DEFAULT.stream_window
    p.server.consumed(sid, 512)
    at_client, _ = p.pump()
    assert p.client.send_window(sid) == 0  # no window update for every few bytes
    p.server.consumed(sid, window - 512)
    at_client, _ = p.pump()
    assert WindowOpened(sid) in at_client
    assert p.client.send_window(sid) == window


def test_goaway_is_connection_ended() -> None:
    p = Pair()
    sid = p.open()
    p.server.close()
    at_client, _ = p.pump()
    assert at_client == [ConnectionEnded(0, sid)]
    assert not p.client.can_open


def test_interop_with_a_plain_h2_client() -> None:
    server = HboneConnection(client=False)
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    peer.initiate_connection()
    sid = peer.get_next_available_stream_id()
    peer.send_headers(sid, [(":method", "CONNECT"), (":authority", "[fd00::2]:443")])
    peer.send_data(sid, b"ping", end_stream=True)
    events = server.receive(peer.data_to_send())
    assert StreamRequested(sid, "[fd00::2]:443") in events
    assert payload(events, sid) == b"ping" and StreamEnded(sid) in events
    server.accept(sid)
    server.send_data(sid, b"pong")
    server.end_stream(sid)
    got = peer.receive_data(server.data_to_send())
    response = next(e for e in got if isinstance(e, h2.events.ResponseReceived))
    assert (b":status", b"200") in response.headers
    data = b"".join(e.data for e in got if isinstance(e, h2.events.DataReceived))
    assert data == b"pong"
    assert any(isinstance(e, h2.events.StreamEnded) for e in got)


def test_interop_with_a_plain_h2_server() -> None:
    client = HboneConnection(client=True)
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    peer.initiate_connection()
    sid = client.open_stream("10.0.0.2:80")
    client.send_data(sid, b"hi")
    got = peer.receive_data(client.data_to_send())
    request = next(e for e in got if isinstance(e, h2.events.RequestReceived))
    headers = dict(request.headers)
    assert headers == {b":method": b"CONNECT", b":authority": b"10.0.0.2:80"}
    peer.send_headers(sid, [(":status", "200")])
    peer.send_data(sid, b"yo", end_stream=True)
    events = client.receive(peer.data_to_send())
    assert StreamAccepted(sid) in events
    assert payload(events, sid) == b"yo" and StreamEnded(sid) in events


def test_non_connect_requests_are_refused() -> None:
    server = HboneConnection(client=False)
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    peer.initiate_connection()
    peer.send_headers(
        1, [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "x")]
    )
    assert not [e for e in server.receive(peer.data_to_send()) if isinstance(e, StreamRequested)]
    got = peer.receive_data(server.data_to_send())
    response = next(e for e in got if isinstance(e, h2.events.ResponseReceived))
    assert (b":status", b"405") in response.headers


def test_garbage_is_a_protocol_error() -> None:
    server = HboneConnection(client=False)
    with pytest.raises(TunnelProtocolError):
        server.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=512), st.booleans(), st.booleans())
def test_arbitrary_bytes_raise_only_protocol_errors(
    data: bytes, with_preface: bool, client: bool
) -> None:
    conn = HboneConnection(client=client)
    try:
        conn.receive((PREFACE if with_preface and not client else b"") + data)
        conn.receive(data)
    except TunnelProtocolError:
        pass
    conn.data_to_send()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=64), max_size=8))
def test_arbitrary_frames_after_a_valid_open(chunks: list[bytes]) -> None:
    p = Pair()
    sid = p.open()
    try:
        for chunk in chunks:
            # a frame header claiming a type and this stream, then arbitrary payload
            header = len(chunk).to_bytes(3, "big") + bytes([chunk[0] % 10 if chunk else 0, 0])
            p.server.receive(header + sid.to_bytes(4, "big") + chunk)
    except TunnelProtocolError:
        pass
