"""The HTTP/2 inspector (`agent.proxy.http2`) between a client (h2c, gRPC) and a server.

Input: the reads, alternately from the client and from the server.  Every stream is decided
as the proxy decides it (see `fuzz.targets.http1`).  Contract: the inspector raises nothing
(errors end the connection with a ConnectionEnded event and GOAWAYs), it holds no more DATA
than the windows it announced, and what it writes stays within a fixed multiple of what it
read (a denial answers a few bytes of request with a short response).
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events

from agent.policy.facts import normalize_path
from agent.proxy.http2 import CONNECTION_WINDOW, ConnectionEnded, Event, Http2Inspector
from agent.proxy.responses import Denial
from fuzz.harness import main
from fuzz.inputs import join, reads

_GREETING = 64 * 1024
_GROWTH = 32  # bytes written per byte read, at most (a denial's response to a tiny request)


def _handle(inspector: Http2Inspector, events: list[Event]) -> bool:
    """Decide every new stream; False once the connection ended."""
    for event in events:
        if isinstance(event, ConnectionEnded):
            return False
        normal = normalize_path(event.path)
        if normal is None:
            inspector.deny(event.stream_id, Denial(400, message="path is not valid"))
        elif "deny" in event.path:
            inspector.deny(event.stream_id, Denial(403, denied_by="shop/deny"))
        else:
            changed = normal if normal != event.path else ""
            inspector.allow(event.stream_id, ("cookie",), (("x-ferry", "1"),), changed)
    return True


def check(data: bytes) -> None:
    inspector = Http2Inspector()
    fed = written = 0
    for i, read in enumerate(reads(data)):
        fed += len(read)
        feed = inspector.server_data if i % 2 else inspector.client_data
        open_ = _handle(inspector, feed(read))
        written += len(inspector.data_for_client()) + len(inspector.data_for_server())
        inspector.client_drained()
        held = sum(len(s.to_server) + len(s.to_client) for s in inspector._streams.values())
        assert held <= 2 * CONNECTION_WINDOW, held
        assert written <= _GREETING + _GROWTH * fed, (written, fed)
        if not open_:
            assert not inspector.client_data(b"\0" * 9) and not inspector.open_streams
            return


def _exchange() -> list[bytes]:
    """A client and a server talking through the inspector, read by read: a GET, a gRPC call
    with trailers, a denied request, a reset, then GOAWAY."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    inspector = Http2Inspector()
    client.initiate_connection()
    server.initiate_connection()
    base = [(":scheme", "http"), (":authority", "web.shop")]
    client.send_headers(
        1,
        [(":method", "GET"), (":path", "/a/./b%41?q=1"), *base, ("cookie", "c=1")],
        end_stream=True,
    )
    client.send_headers(
        3,
        [
            (":method", "POST"),
            (":path", "/shop.Billing/Pay"),
            *base,
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
    )
    client.send_data(3, b"\0\0\0\0\x03abc", end_stream=True)
    client.send_headers(5, [(":method", "GET"), (":path", "/deny"), *base], end_stream=False)
    client.send_headers(7, [(":method", "PUT"), (":path", "/x"), *base])
    client.reset_stream(7)
    out = [client.data_to_send()]
    _handle(inspector, inspector.client_data(out[-1]))
    answers = server.receive_data(inspector.data_for_server())
    for ev in answers:
        if isinstance(ev, h2.events.RequestReceived):
            sid = ev.stream_id
            server.send_headers(sid, [(b":status", b"200"), (b"content-type", b"text/plain")])
            server.send_data(sid, b"hello", pad_length=3)
            trailers = [(b"grpc-status", b"0")] if sid == 3 else None
            if trailers:
                server.send_headers(sid, trailers, end_stream=True)
            else:
                server.end_stream(sid)
    out.append(server.data_to_send())
    inspector.server_data(out[-1])
    client.receive_data(inspector.data_for_client())
    client.ping(b"12345678")
    client.close_connection()
    out.append(client.data_to_send())
    return out


def seeds() -> dict[str, bytes]:
    exchange = _exchange()
    preface = exchange[0][:24]
    settings = b"\0\0\0\x04\0\0\0\0\0"
    return {
        "exchange": join(exchange),
        "client-only": exchange[0],
        "server-goaway": join([exchange[0], b"\0\0\x08\x07\0\0\0\0\0" + bytes(8)]),
        "bad-preface": b"PRI * HTTP/1.1\r\n\r\n",
        "ping-flood": preface + settings + b"\0\0\x08\x06\0\0\0\0\0pingpong" * 40,
        "continuation-open": preface
        + settings
        + b"\0\0\x01\x01\0\0\0\0\x01\x82"
        + b"\0\0\0\x09\0\0\0\0\x01" * 20,
    }


if __name__ == "__main__":
    main(check)
