"""HTTP inspection in memory, one core: requests/s through `Http1Inspector`, streams/s through
`Http2Inspector`.

What a proxy worker pays per request once a port has HTTP policies, without sockets: the owner's
side is played in the loop (feed the client's bytes, allow each RequestHead, feed the server's
response), so the figures are the inspector's own cost plus a few Python calls.

HTTP/1.1 rows (one request per read unless said otherwise; the response is a 2-byte 200):
- GET keep-alive: a 90-byte GET, allowed as is;
- GET, one header set: the same, allowed with `set_headers` (the head is re-serialized);
- GET x10 pipelined: ten GETs in one read;
- POST 1 MB: Content-Length, in 64 KiB reads (the body streams as Forward events), and chunked
  (16 KiB chunks) in 64 KiB reads;
- floor: httptools alone parsing the same GET (what llhttp costs at least).

HTTP/2 rows: a unary gRPC call per stream (HEADERS, one 5-byte message; response HEADERS, one
message, trailers) from an `h2` client through the inspector to an `h2` server, in batches of 50
concurrent streams: streams/s of the whole loop, the time spent inside the inspector per stream,
and the floor: the same calls from the `h2` client straight to the `h2` server.

Each figure is the best of `--repeat` passes.  No network, no root.

    .venv/bin/python -m bench.http_inspect [--requests 20000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

import h2.config
import h2.connection
import h2.events
import httptools

from agent.proxy.http1 import Forward, Http1Inspector, RequestHead
from agent.proxy.http2 import Http2Inspector, StreamHead

GET = b"GET /api/v1/items?limit=10 HTTP/1.1\r\nHost: web.shop:8080\r\nUser-Agent: bench\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
MB = 1 << 20
READ = 65536


def best(run: Callable[[], tuple[int, float]], repeat: int) -> tuple[float, float]:
    """(units per second, seconds per unit) of the fastest pass; `run` returns (units, extra
    seconds to report per pass, e.g. time inside the inspector)."""
    rate, inner = 0.0, 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        units, inside = run()
        elapsed = time.perf_counter() - start
        if units / elapsed > rate:
            rate, inner = units / elapsed, inside / units
    return rate, inner


def h1_loop(reads: Sequence[bytes], count: int, set_headers: bool = False) -> Callable[[], int]:
    """`count` rounds of: feed `reads`, allow every request, answer each with OK."""
    extra = [("x-ferry-principal", "spiffe://td/ns/shop/sa/web")] if set_headers else []

    def run() -> int:
        inspector = Http1Inspector()
        done = 0
        sent = 0
        for _ in range(count):
            heads = 0
            for data in reads:
                for ev in inspector.client_data(data):
                    if isinstance(ev, RequestHead):
                        sent += len(inspector.allow(ev.request_id, set_headers=extra))
                        heads += 1
                    elif isinstance(ev, Forward):
                        sent += len(ev.data)
            for ev in inspector.server_data(OK * heads):
                assert isinstance(ev, Forward)
            done += heads
        assert sent
        return done

    return run


def post_reads(chunked: bool) -> list[bytes]:
    if chunked:
        piece = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
        body = piece * (MB // 0x4000) + b"0\r\n\r\n"
        head = b"POST /upload HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
    else:
        body = b"x" * MB
        head = b"POST /upload HTTP/1.1\r\nHost: web\r\nContent-Length: %d\r\n\r\n" % MB
    data = head + body
    return [data[i : i + READ] for i in range(0, len(data), READ)]


def httptools_floor(count: int) -> int:
    class Callbacks:
        def on_url(self, url: bytes) -> None:
            pass

        def on_header(self, name: bytes, value: bytes) -> None:
            pass

    parser = httptools.HttpRequestParser(Callbacks())
    for _ in range(count):
        parser.feed_data(GET)
    return count


REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":authority", b"billing.shop:50051"),
    (b":path", b"/shop.Billing/Charge"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]
MESSAGE = b"\x00\x00\x00\x00\x05hello"


def h2_peers() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    client.initiate_connection()
    server.initiate_connection()
    return client, server


def serve(server: h2.connection.H2Connection, events: list[h2.events.Event]) -> int:
    """The server's side of unary calls: answer each request that ended; calls answered."""
    answered = 0
    for ev in events:
        if isinstance(ev, h2.events.DataReceived):
            server.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            server.send_headers(ev.stream_id, [(b":status", b"200")])
            server.send_data(ev.stream_id, MESSAGE)
            server.send_headers(ev.stream_id, [(b"grpc-status", b"0")], end_stream=True)
            answered += 1
    return answered


def h2_calls(streams: int, batch: int, inspect: bool) -> tuple[int, float]:
    """`streams` unary calls in batches of `batch`; (calls, seconds inside the inspector)."""
    client, server = h2_peers()
    inspector = Http2Inspector()
    inside = 0.0
    done = 0
    while done < streams:
        for _ in range(batch):
            sid = client.get_next_available_stream_id()
            client.send_headers(sid, REQUEST)
            client.send_data(sid, MESSAGE, end_stream=True)
        finished = 0
        while finished < batch:
            out = client.data_to_send()
            if inspect:
                t = time.perf_counter()
                for head in inspector.client_data(out):
                    assert isinstance(head, StreamHead)
                    inspector.allow(head.stream_id)
                out = inspector.data_for_server()
                inside += time.perf_counter() - t
            serve(server, server.receive_data(out))
            back = server.data_to_send()
            if inspect:
                t = time.perf_counter()
                inspector.server_data(back)
                back = inspector.data_for_client()
                inside += time.perf_counter() - t
            for ev in client.receive_data(back):
                if isinstance(ev, h2.events.DataReceived):
                    client.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    finished += 1
        done += batch
    return done, inside


def row(name: str, rate: float, unit: str, per: float, note: str = "") -> str:
    per_us = f"{per * 1e6:.1f}" if per else ""
    return f"| {name} | {rate:,.0f} {unit}/s | {1e6 / rate:.1f} | {per_us} | {note} |"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000, help="small requests per pass")
    parser.add_argument("--repeat", type=int, default=5, help="passes per figure (best kept)")
    opts = parser.parse_args(argv)
    n = opts.requests
    lines = [
        "| path | rate | us per unit (wall) | us inside the inspector | note |",
        "| --- | --- | --- | --- | --- |",
    ]

    def h1(reads: Sequence[bytes], count: int, set_headers: bool = False) -> tuple[float, float]:
        loop = h1_loop(reads, count, set_headers)
        return best(lambda: (loop(), 0.0), opts.repeat)

    rate, _ = h1([GET], n)
    lines.append(row("HTTP/1.1 GET keep-alive", rate, "req", 0.0))
    rate, _ = h1([GET], n, set_headers=True)
    lines.append(row("HTTP/1.1 GET, one header set", rate, "req", 0.0, "head re-serialized"))
    rate, _ = h1([GET * 10], n // 10)
    lines.append(row("HTTP/1.1 GET x10 pipelined", rate, "req", 0.0, "ten requests per read"))
    for chunked in (False, True):
        rate, _ = h1(post_reads(chunked), max(1, n // 200))
        kind = "chunked 16 KiB" if chunked else "Content-Length"
        lines.append(
            row(f"HTTP/1.1 POST 1 MB, {kind}", rate, "req", 0.0, f"{rate * MB / 1e9:.2f} GB/s")
        )
    rate, _ = best(lambda: (httptools_floor(n), 0.0), opts.repeat)
    lines.append(row("floor: httptools parses the GET", rate, "req", 0.0, "llhttp alone"))
    streams = max(50, n // 10 // 50 * 50)
    rate, inside = best(lambda: h2_calls(streams, 50, True), opts.repeat)
    lines.append(
        row("HTTP/2 gRPC unary calls via inspector", rate, "streams", inside, "h2 peers included")
    )
    rate, _ = best(lambda: h2_calls(streams, 50, False), opts.repeat)
    lines.append(row("floor: h2 client straight to h2 server", rate, "streams", 0.0, "no proxy"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
