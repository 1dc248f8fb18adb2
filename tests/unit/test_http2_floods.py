"""The HTTP/2 inspector against hostile clients: floods end the connection with GOAWAY
ENHANCE_YOUR_CALM, limits hold, and memory stays small.

Each flood is a table row (as in test_hbone_floods): the bytes for n frames and the largest n that
stays within the bound.  The row is fed in one piece and frame by frame (the owner deciding every
stream as it comes); within the bound nothing happens, one frame more ends the connection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import hpack
import pytest

from agent.proxy.http2 import (
    MAX_HEADER_LIST,
    ConnectionEnded,
    Event,
    Http2Inspector,
    StreamHead,
)
from agent.tunnel import floods
from agent.tunnel.frames import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    PRIORITY,
    PROTOCOL_ERROR,
    S_INITIAL_WINDOW_SIZE,
    S_MAX_CONCURRENT_STREAMS,
    frame_header,
    rst_stream,
    settings_frame,
)

STREAMS = floods.DEFAULT.streams_per_connection


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return frame_header(len(payload), ftype, flags, sid) + payload


def frames_of(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of each frame in `data`."""
    i = 0
    while i < len(data):
        length = int.from_bytes(data[i : i + 3], "big")
        sid = int.from_bytes(data[i + 5 : i + 9], "big")
        yield data[i + 3], data[i + 4], sid, data[i + 9 : i + 9 + length]
        i += 9 + length


def goaway_code(data: bytes) -> int | None:
    codes = [int.from_bytes(p[4:8], "big") for t, _, _, p in frames_of(data) if t == GOAWAY]
    return codes[-1] if codes else None


class Requests:
    """HEADERS frames of GET requests, from one HPACK encoder (as one client would send)."""

    def __init__(self) -> None:
        self.encoder = hpack.Encoder()

    def block(self, extra: list[tuple[str, str]] | None = None) -> bytes:
        fields = [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "a")]
        return bytes(self.encoder.encode(fields + (extra or [])))

    def request(self, sid: int, flags: int = END_HEADERS) -> bytes:
        return frame(HEADERS, flags, sid, self.block())


def inspector() -> Http2Inspector:
    """An inspector past the client preface and SETTINGS, its output taken and drained."""
    core = Http2Inspector()
    assert core.client_data(PREFACE + settings_frame([])) == []
    core.data_for_client()
    core.client_drained()
    return core


def ping_flood(n: int) -> bytes:
    return frame(PING, 0, 0, b"12345678") * n


def settings_flood(n: int) -> bytes:
    return settings_frame([(S_INITIAL_WINDOW_SIZE, 65535)]) * n


def many_settings(entries: int) -> bytes:
    return settings_frame([(S_MAX_CONCURRENT_STREAMS, 100)] * entries)


def rapid_reset(n: int) -> bytes:
    r = Requests()
    return b"".join(r.request(1 + 2 * i) + rst_stream(1 + 2 * i, 8) for i in range(n))


def continuation_flood(n: int) -> bytes:
    return frame(HEADERS, 0, 1, Requests().block()) + frame(CONTINUATION, 0, 1) * n


def empty_data(n: int) -> bytes:
    return Requests().request(1) + frame(DATA, 0, 1) * n


def priority_flood(n: int) -> bytes:
    return frame(PRIORITY, 0, 1, bytes(5)) * n


def unknown_flood(n: int) -> bytes:
    return frame(0x42, 0, 0, b"x") * n


def ping_ack_flood(n: int) -> bytes:
    return frame(PING, 1, 0, bytes(8)) * n


FLOODS: list[tuple[str, Callable[[int], bytes], int]] = [
    ("PING, replies never read", ping_flood, floods.DEFAULT.unread_replies),
    ("SETTINGS, acks never read", settings_flood, floods.DEFAULT.unread_replies),
    ("SETTINGS with too many entries", many_settings, floods.DEFAULT.settings_entries),
    ("Rapid Reset", rapid_reset, floods.DEFAULT.rapid_reset_streams // 2 - 1),
    ("CONTINUATION", continuation_flood, floods.DEFAULT.header_block_frames),
    ("empty DATA", empty_data, floods.DEFAULT.empty_frames_in_a_row),
    ("PRIORITY", priority_flood, floods.DEFAULT.empty_frames_in_a_row),
    ("unknown frame types", unknown_flood, floods.DEFAULT.empty_frames_in_a_row),
    ("PING acks never asked for", ping_ack_flood, floods.DEFAULT.empty_frames_in_a_row),
]


def feed(core: Http2Inspector, data: bytes, split: str) -> list[Event]:
    """Feed `data` whole, frame by frame or in 7-byte pieces (frame headers cut anywhere),
    allowing every stream as the owner would."""
    if split == "whole":
        pieces = [data]
    elif split == "frames":
        pieces = [data[i : i + 9 + len(p)] for i, p in _offsets(data)]
    else:
        pieces = [data[i : i + 7] for i in range(0, len(data), 7)]
    events: list[Event] = []
    for piece in pieces:
        new = core.client_data(piece)
        for ev in new:
            if isinstance(ev, StreamHead):
                core.allow(ev.stream_id)
        events += new
    return events


def _offsets(data: bytes) -> Iterator[tuple[int, bytes]]:
    i = 0
    for _, _, _, payload in frames_of(data):
        yield i, payload
        i += 9 + len(payload)


@pytest.mark.parametrize("split", ["whole", "frames", "7-byte pieces"])
@pytest.mark.parametrize(("name", "make", "within"), FLOODS, ids=[f[0] for f in FLOODS])
def test_flood_bounds(name: str, make: Callable[[int], bytes], within: int, split: str) -> None:
    core = inspector()
    events = feed(core, make(within), split)
    assert not [e for e in events if isinstance(e, ConnectionEnded)], name
    core = inspector()
    events = feed(core, make(within + 1), split)
    ended = [e for e in events if isinstance(e, ConnectionEnded)]
    assert len(ended) == 1 and "flood" in ended[0].reason, name
    out = core.data_for_client()
    assert goaway_code(out) == ENHANCE_YOUR_CALM
    assert len(out) < 64 * 1024  # the unread replies were never all queued
    assert core.client_data(ping_flood(1)) == []  # the connection is over


def test_replies_the_owner_drained_do_not_count() -> None:
    core = inspector()
    for _ in range(5):
        assert core.client_data(ping_flood(floods.DEFAULT.unread_replies)) == []
        core.data_for_client()
        core.client_drained()


def test_huge_control_frame_is_refused_from_its_header() -> None:
    core = inspector()
    (ended,) = core.client_data(frame_header(floods.DEFAULT.max_control_frame + 1, HEADERS, 0, 1))
    assert isinstance(ended, ConnectionEnded) and "flood" in ended.reason
    assert goaway_code(core.data_for_client()) == ENHANCE_YOUR_CALM


def test_pending_header_block() -> None:
    core = inspector()
    r = Requests()
    block = r.block()
    assert core.client_data(frame(HEADERS, END_STREAM, 1, block[:3])) == []
    assert core.pending_header_block
    events = core.client_data(frame(CONTINUATION, END_HEADERS, 1, block[3:]))
    assert [type(e) for e in events] == [StreamHead] and not core.pending_header_block


def test_concurrent_stream_limit() -> None:
    core = inspector()
    r = Requests()
    requests = b"".join(r.request(1 + 2 * i) for i in range(STREAMS))
    opened = feed(core, requests, "whole")
    assert len(opened) == STREAMS and core.open_streams == STREAMS
    core.data_for_client()
    (ended,) = core.client_data(r.request(1 + 2 * STREAMS))
    assert isinstance(ended, ConnectionEnded) and "protocol error" in ended.reason
    assert goaway_code(core.data_for_client()) == PROTOCOL_ERROR


def test_header_list_limit() -> None:
    core = inspector()
    r = Requests()
    big = r.block([("x-big", "v" * MAX_HEADER_LIST)])
    pieces = [big[i : i + 16384] for i in range(0, len(big), 16384)]
    data = frame(HEADERS, END_STREAM, 1, pieces[0])
    data += b"".join(frame(CONTINUATION, 0, 1, p) for p in pieces[1:-1])
    data += frame(CONTINUATION, END_HEADERS, 1, pieces[-1])
    (ended,) = core.client_data(data)
    assert isinstance(ended, ConnectionEnded)
    assert goaway_code(core.data_for_client()) is not None
    core = inspector()
    ok = Requests().block([("x-ok", "v" * 8000)])
    (head,) = core.client_data(frame(HEADERS, END_HEADERS, 1, ok))
    assert isinstance(head, StreamHead)
