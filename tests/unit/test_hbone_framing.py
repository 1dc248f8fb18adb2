"""The HBONE core's framing: any split of the byte stream gives the same events; padding.

A socket read ends anywhere: inside a frame header, a padded frame, a header block or a DATA
payload that is being streamed out as views.  The core must give the same events (DATA payloads
coalesced per stream, since a split DATA frame comes out in pieces) and queue the same replies
whether the bytes come at once, one byte at a time, or in two pieces split at every offset.
"""

from __future__ import annotations

import itertools

import h2.config
import h2.connection
import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.tunnel.events import (
    Data,
    Event,
    StreamAccepted,
    StreamEnded,
    StreamRequested,
    TunnelProtocolError,
)
from agent.tunnel.floods import DEFAULT
from agent.tunnel.frames import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    FRAME_SIZE_ERROR,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    WINDOW_UPDATE,
    frame_header,
    rst_stream,
    settings_frame,
    window_update,
)
from agent.tunnel.hbone import HboneConnection
from agent.tunnel.windows import MAX_FRAME_SIZE

AUTHORITY = "10.0.0.2:80"


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return frame_header(len(payload), ftype, flags, sid) + payload


def padded(pad: int, payload: bytes, extra: int | None = None) -> bytes:
    """A PADDED payload: pad length byte, payload, `pad` zero bytes (`extra` if given)."""
    return bytes([pad]) + payload + bytes(pad if extra is None else extra)


def connect_block(authority: str = AUTHORITY) -> bytes:
    return bytes(hpack.Encoder().encode([(":method", "CONNECT"), (":authority", authority)]))


def normalized(events: list[Event]) -> list[Event]:
    """Events with the payloads of adjacent Data events of one stream joined (and copied)."""
    merged: list[Event | tuple[int, bytearray]] = []
    for ev in events:
        if isinstance(ev, Data):
            last = merged[-1] if merged else None
            if isinstance(last, tuple) and last[0] == ev.stream_id:
                last[1].extend(ev.data)
            else:
                merged.append((ev.stream_id, bytearray(ev.data)))
        else:
            merged.append(ev)
    return [Data(m[0], bytes(m[1])) if isinstance(m, tuple) else m for m in merged]


def feed(core: HboneConnection, pieces: list[bytes]) -> tuple[list[Event], bytes, int | None]:
    """(events, replies, error code or None) of feeding `pieces` one by one.  After an error
    only the code and the replies (with the GOAWAY) are compared: the events of the read that
    failed are lost, and which read that is depends on the split."""
    events: list[Event] = []
    try:
        for piece in pieces:
            events += core.receive(piece)
    except TunnelProtocolError as exc:
        return [], core.data_to_send(), exc.code
    return normalized(events), core.data_to_send(), None


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def client_stream(big: bool) -> bytes:
    """What a client sends: preface, SETTINGS, streams with DATA of several shapes (padded,
    empty, split by the peer's frame size when `big`), a header block in three frames with
    padding and priority, PING, PRIORITY, an unknown frame type, END_STREAM and a reset."""
    client = HboneConnection(client=True)
    client.receive(HboneConnection(client=False).data_to_send())  # the server's SETTINGS
    a = client.open_stream(AUTHORITY)
    b = client.open_stream("[fd00::2]:443")
    client.send_data(a, b"hello")
    client.out += frame(DATA, PADDED, b, padded(3, b"padded"))
    client.out += frame(DATA, PADDED, b, padded(0, b"no padding"))
    client.out += frame(DATA, PADDED, a, padded(6, b""))  # padding only
    client.out += frame(DATA, 0, a)  # empty
    client.out += frame(PING, 0, 0, b"pingpong")
    client.out += frame(PRIORITY, 0, a, bytes(5))
    client.out += frame(0x42, 0, 0, b"an extension")
    block = connect_block("10.0.0.3:8080")
    c = 5
    client.out += frame(HEADERS, PADDED | PRIORITY_FLAG, c, padded(2, bytes(5) + block[:4]))
    client.out += frame(CONTINUATION, 0, c, block[4:9])
    client.out += frame(CONTINUATION, END_HEADERS, c, block[9:])
    client.send_data(b, bytes(range(256)) * (100 if big else 1))
    client.end_stream(b)
    client.out += rst_stream(a, 8)
    client.out += frame(WINDOW_UPDATE, 0, 0, (1000).to_bytes(4, "big"))
    client.out += frame(DATA, END_STREAM, c, b"bye")
    return client.data_to_send()


SMALL = client_stream(big=False)
FULL = client_stream(big=True)


def expected(data: bytes) -> tuple[list[Event], bytes, int | None]:
    return feed(HboneConnection(client=False), [data])


def test_the_stream_carries_what_it_should() -> None:
    events, replies, code = expected(FULL)
    assert code is None
    requested = [e for e in events if isinstance(e, StreamRequested)]
    assert requested == [
        StreamRequested(1, AUTHORITY),
        StreamRequested(3, "[fd00::2]:443"),
        StreamRequested(5, "10.0.0.3:8080"),
    ]
    data = b"".join(e.data for e in events if isinstance(e, Data) and e.stream_id == 3)
    assert data == b"padded" + b"no padding" + bytes(range(256)) * 100
    assert StreamEnded(3) in events and StreamEnded(5) in events
    assert b"pingpong" in replies  # the PING was acked


@pytest.mark.parametrize("data", [SMALL, FULL], ids=["small", "full"])
def test_one_byte_at_a_time(data: bytes) -> None:
    pieces = [data[i : i + 1] for i in range(len(data))]
    assert feed(HboneConnection(client=False), pieces) == expected(data)


def test_two_pieces_split_at_every_offset() -> None:
    want = expected(SMALL)
    for cut in range(1, len(SMALL)):
        got = feed(HboneConnection(client=False), [SMALL[:cut], SMALL[cut:]])
        assert got == want, f"split at {cut}"


def server_stream() -> tuple[bytes, list[int]]:
    """What a server sends back for four client streams: 200 + DATA + END_STREAM, a refusal,
    DATA split by the client's 1 MiB frame size, a reset."""
    client = fresh_client()
    server = HboneConnection(client=False)
    server.receive(client.data_to_send())
    sids = [1, 3, 5, 7]
    server.accept(1)
    server.send_data(1, b"response")
    server.end_stream(1)
    server.refuse(3, 403)
    server.accept(5)
    server.send_data(5, bytes(MAX_FRAME_SIZE + 10))
    server.accept(7)
    server.reset(7)
    return server.data_to_send(), sids


def fresh_client() -> HboneConnection:
    client = HboneConnection(client=True)
    for port in (80, 81, 82, 83):
        client.open_stream(f"10.0.0.2:{port}")
    return client


def test_client_side_any_split() -> None:
    data, _ = server_stream()
    want = feed(fresh_client(), [data])
    assert want[2] is None and StreamAccepted(5) in want[0]
    assert sum(len(e.data) for e in want[0] if isinstance(e, Data)) == 8 + MAX_FRAME_SIZE + 10
    step = 4099  # every offset of the small frames, a sample inside the large DATA payload
    head = [i for i in range(1, len(data)) if i < 200 or i > len(data) - 200 or i % step == 0]
    for cut in head:
        assert feed(fresh_client(), [data[:cut], data[cut:]]) == want, f"split at {cut}"
    small = [data[i : i + 7] for i in range(0, len(data), 7)]
    assert feed(fresh_client(), small) == want


# -- padding ---------------------------------------------------------------------------------


def opened() -> HboneConnection:
    server = HboneConnection(client=False)
    server.receive(PREFACE + settings_frame([]) + frame(HEADERS, END_HEADERS, 1, connect_block()))
    server.data_to_send()
    return server


@pytest.mark.parametrize(
    ("body", "data", "code"),
    [
        (padded(0, b"abc"), b"abc", None),  # PADDED with no padding
        (padded(1, b"abc"), b"abc", None),
        (padded(200, b"abc"), b"abc", None),
        (padded(4, b"", 4), b"", None),  # padding is all that follows the pad length
        (padded(6, b"abc", 2), b"", PROTOCOL_ERROR),  # more padding than follows
        (padded(4, b"", 3), b"", PROTOCOL_ERROR),  # padding = the whole payload length
        (padded(255, b"", 0), b"", PROTOCOL_ERROR),
        (b"", b"", PROTOCOL_ERROR),  # no pad length at all
    ],
)
def test_padded_data(body: bytes, data: bytes, code: int | None) -> None:
    events, _, got = feed(opened(), [frame(DATA, PADDED, 1, body)])
    assert got == code
    if code is None:
        assert events == ([Data(1, data)] if data else [])


def test_padding_is_flow_controlled_and_credited() -> None:
    server = opened()
    pad = 255
    chunk = bytes(MAX_FRAME_SIZE - 1 - pad)
    frames = frame(DATA, PADDED, 1, padded(pad, chunk)) * 3  # 3 MiB against a 4 MiB window
    events, _, code = feed(server, [frames])
    assert code is None
    assert DEFAULT.stream_window // 2 <= 3 * MAX_FRAME_SIZE  # enough for a WINDOW_UPDATE
    server.consumed(1, sum(len(e.data) for e in events if isinstance(e, Data)))
    assert server.data_to_send() == window_update(1, 3 * MAX_FRAME_SIZE)  # padding included


@pytest.mark.parametrize(
    ("pad", "extra", "split_at", "code"),
    [
        (0, None, 4, None),
        (3, None, 4, None),
        (3, None, 0, None),  # HEADERS carries only padding and priority: all in CONTINUATIONs
        (20, 2, 4, PROTOCOL_ERROR),  # more padding than the frame holds
    ],
)
def test_padded_headers_with_continuation(
    pad: int, extra: int | None, split_at: int, code: int | None
) -> None:
    block = connect_block()
    first = padded(pad, bytes(5) + block[:split_at], extra)
    data = (
        PREFACE
        + settings_frame([])
        + frame(HEADERS, PADDED | PRIORITY_FLAG, 1, first)
        + frame(CONTINUATION, 0, 1, block[split_at : split_at + 3])
        + frame(CONTINUATION, END_HEADERS, 1, block[split_at + 3 :])
    )
    events, _, got = feed(HboneConnection(client=False), [data])
    assert got == code
    if code is None:
        assert events == [StreamRequested(1, AUTHORITY)]


def test_priority_fields_cut_short() -> None:
    data = PREFACE + settings_frame([]) + frame(HEADERS, PRIORITY_FLAG | END_HEADERS, 1, b"abc")
    assert feed(HboneConnection(client=False), [data])[2] == FRAME_SIZE_ERROR


def test_h2_padded_data_and_priority() -> None:
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    peer.initiate_connection()
    sid = peer.get_next_available_stream_id()
    peer.send_headers(sid, [(":method", "CONNECT"), (":authority", AUTHORITY)], priority_weight=42)
    for pad in (0, 1, 17, 255):
        peer.send_data(sid, b"x" * pad, pad_length=pad)
    peer.send_data(sid, b"", end_stream=True, pad_length=9)
    events, _, code = feed(HboneConnection(client=False), [peer.data_to_send()])
    assert code is None
    assert events == [
        StreamRequested(sid, AUTHORITY),
        Data(sid, b"x" * (1 + 17 + 255)),
        StreamEnded(sid),
    ]


# -- property: splits never matter ------------------------------------------------------------

FRAMES = st.one_of(
    st.builds(lambda n: frame(DATA, 0, 1, bytes(n)), st.integers(0, 300)),
    st.builds(
        lambda n, pad: frame(DATA, PADDED, 1, padded(pad, bytes(n))),
        st.integers(0, 50),
        st.integers(0, 255),
    ),
    st.builds(lambda n: frame(DATA, PADDED, 1, bytes([n])), st.integers(0, 3)),  # bad padding
    st.just(frame(PING, 0, 0, b"abcdefgh")),
    st.just(frame(PRIORITY, 0, 3, bytes(5))),
    st.builds(lambda t, n: frame(t, 0, 0, bytes(n)), st.integers(10, 255), st.integers(0, 40)),
    st.builds(lambda n: frame(WINDOW_UPDATE, 0, 1, n.to_bytes(4, "big")), st.integers(0, 9)),
    st.just(frame(HEADERS, 0, 3, connect_block()[:5])),  # a block, completed or interrupted
    st.just(frame(CONTINUATION, END_HEADERS, 3, connect_block()[5:])),
    st.just(rst_stream(1, 8)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(FRAMES, max_size=12), st.lists(st.integers(0, 4000), max_size=12))
def test_any_split_of_any_frames_gives_the_same_result(
    frames: list[bytes], cuts: list[int]
) -> None:
    head = PREFACE + settings_frame([]) + frame(HEADERS, END_HEADERS, 1, connect_block())
    data = head + b"".join(frames)
    want = feed(HboneConnection(client=False), [data])
    got = feed(HboneConnection(client=False), split(data, [c % (len(data) + 1) for c in cuts]))
    assert got == want
