"""The HBONE tunnel core (`agent.tunnel.hbone`) reading what a peer proxy sends.

Input: an options byte (bit 0: we are the client, bit 1: the client opened a stream first, bit
2: the server refuses the tunnels it is asked for), then the reads.  Contract: `receive` raises
nothing but `TunnelProtocolError`, after which the connection has ended and stays failed; the
bytes queued for the peer stay within a small multiple of what it sent (replies are bounded by
`agent.tunnel.floods`).
"""

from __future__ import annotations

import hpack

from agent.tunnel import frames
from agent.tunnel.events import Data, StreamRequested, TunnelProtocolError
from agent.tunnel.hbone import HboneConnection
from fuzz.harness import main
from fuzz.inputs import join, options, reads

CLIENT, OPEN_FIRST, REFUSE = 1, 2, 4
_GREETING = 512  # SETTINGS, WINDOW_UPDATE and a CONNECT of our own, at most


def check(data: bytes) -> None:
    flags, rest = options(data)
    conn = HboneConnection(client=bool(flags & CLIENT))
    if flags & CLIENT and flags & OPEN_FIRST:
        conn.open_stream("10.0.0.2:80")
    conn.data_to_send()
    fed = 0
    for read in reads(rest):
        fed += len(read)
        try:
            events = conn.receive(read)
        except TunnelProtocolError:
            assert conn.ended
            try:
                conn.receive(b"")
            except TunnelProtocolError:
                return
            raise AssertionError("a failed connection accepted more bytes") from None
        for ev in events:
            if isinstance(ev, StreamRequested):
                if flags & REFUSE:
                    conn.refuse(ev.stream_id, 403)
                else:
                    conn.accept(ev.stream_id)
            elif isinstance(ev, Data):
                conn.consumed(ev.stream_id, len(ev.data))
        sent = len(conn.data_to_send())
        conn.drained()
        assert sent <= _GREETING + 2 * fed, f"{sent} bytes queued for {fed} received"


def _exchange() -> tuple[list[bytes], list[bytes]]:
    """(what a client sends, what the server answers), read by read, for two tunnels."""
    client, server = HboneConnection(client=True), HboneConnection(client=False)
    to_server, to_client = [], []
    to_client.append(server.data_to_send())
    client.receive(to_client[-1])
    a = client.open_stream("10.0.0.2:80")
    b = client.open_stream("[fd00::2]:443")
    client.send_data(a, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
    to_server.append(client.data_to_send())
    for ev in server.receive(to_server[-1]):
        if isinstance(ev, StreamRequested):
            server.accept(ev.stream_id)
    server.send_data(a, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    server.end_stream(a)
    to_client.append(server.data_to_send())
    client.receive(to_client[-1])
    client.send_data(b, bytes(range(256)) * 4)
    client.end_stream(b)
    client.reset(a)
    client.close()
    to_server.append(client.data_to_send())
    return to_server, to_client


def _frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return frames.frame_header(len(payload), ftype, flags, sid) + payload


def seeds() -> dict[str, bytes]:
    to_server, to_client = _exchange()
    preface = frames.PREFACE + frames.settings_frame([])
    block = hpack.Encoder().encode([(":method", "CONNECT"), (":authority", "10.0.0.2:80")])
    continued = _frame(
        frames.HEADERS,
        frames.PADDED | frames.PRIORITY_FLAG,
        1,
        b"\x02" + bytes(5) + block[:3] + b"\0\0",
    ) + _frame(frames.CONTINUATION, frames.END_HEADERS, 1, block[3:])
    return {
        "server-two-tunnels": bytes([0]) + join(to_server),
        "server-refuses": bytes([REFUSE]) + join(to_server),
        "client-two-tunnels": bytes([CLIENT | OPEN_FIRST]) + join(to_client),
        "server-continuation-padding": bytes([0]) + preface + continued,
        "server-ping-priority-unknown": bytes([0])
        + preface
        + _frame(frames.PING, 0, 0, b"pingpong")
        + _frame(frames.PRIORITY, 0, 3, bytes(5))
        + _frame(0x42, 0, 0, b"extension"),
        "bad-preface": bytes([0]) + b"GET / HTTP/1.1\r\n\r\n",
        "bad-frame-size": bytes([0]) + preface + _frame(frames.PING, 0, 0, b"short"),
        "bad-settings": bytes([0]) + frames.PREFACE + frames.settings_frame([(4, 1 << 31)]),
    }


if __name__ == "__main__":
    main(check)
