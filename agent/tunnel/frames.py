"""HTTP/2 wire format (RFC 9113 sections 4, 6 and 7) as far as the HBONE core needs it.

Numbers (frame types, flags, error codes, setting ids), the 9-byte frame header as a `struct`
(`pack_header` / `unpack_header`, the length split into 16 + 8 bits), and the frames the core
builds besides DATA: SETTINGS, WINDOW_UPDATE, RST_STREAM, GOAWAY, PING acks and a header block cut
into HEADERS + CONTINUATION.  Everything here is a pure function of its arguments; the state
(which stream, which window) lives in `agent.tunnel.hbone`.

`ConnError` is a connection error in the sense of RFC 9113 section 5.4.1: the code the GOAWAY
carries and what went wrong.  The core raises it while parsing and turns it into GOAWAY +
`TunnelProtocolError` at its one entry point, `receive()`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_WINDOW = (1 << 31) - 1
DEFAULT_WINDOW = 65535
DEFAULT_FRAME = 16384

# frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
# flags
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# error codes
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 5, 6, 7, 8, 9
ENHANCE_YOUR_CALM = 0xB
# settings
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 1, 2, 3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 4, 5, 6

_HEADER = struct.Struct(">HBBBL")  # length (24 bit: 16 + 8), type, flags, stream id
pack_header = _HEADER.pack  # (length >> 8, length & 0xFF, type, flags, stream id)
unpack_header = _HEADER.unpack_from  # -> (length >> 8, length & 0xFF, type, flags, stream id)
U32 = struct.Struct(">L")
_U32x2 = struct.Struct(">LL")
_SETTING = struct.Struct(">HL")

SETTINGS_ACK = pack_header(0, 0, SETTINGS, ACK, 0)

# frame type -> (name, needs a stream id (None: either way), payload length (None: any))
_SHAPES: dict[int, tuple[str, bool | None, int | None]] = {
    PRIORITY: ("PRIORITY", True, 5),
    RST_STREAM: ("RST_STREAM", True, 4),
    SETTINGS: ("SETTINGS", False, None),
    PING: ("PING", False, 8),
    GOAWAY: ("GOAWAY", False, None),
    WINDOW_UPDATE: ("WINDOW_UPDATE", None, 4),
}


class ConnError(Exception):
    """A connection error (RFC 9113 section 5.4.1): GOAWAY with `code`, the message says why;
    `limit` names the flood bound that was passed (`agent.tunnel.floods`), if that is why."""

    def __init__(self, code: int, msg: str, limit: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.limit = limit


def check_shape(ftype: int, sid: int, length: int) -> None:
    """The stream id and size rules of RFC 9113 section 6 for control frames."""
    shape = _SHAPES.get(ftype)
    if shape is None:
        return
    name, on_stream, size = shape
    if on_stream is not None and bool(sid) != on_stream:
        where = "on stream 0" if on_stream else f"on stream {sid}"
        raise ConnError(PROTOCOL_ERROR, f"{name} {where}")
    if size is not None and length != size:
        raise ConnError(FRAME_SIZE_ERROR, f"{name} of {length} bytes, not {size}")


def frame_header(length: int, ftype: int, flags: int, sid: int) -> bytes:
    return pack_header(length >> 8, length & 0xFF, ftype, flags, sid)


def settings_frame(settings: Iterable[tuple[int, int]]) -> bytes:
    body = b"".join(_SETTING.pack(key, value) for key, value in settings)
    return frame_header(len(body), SETTINGS, 0, 0) + body


def parse_settings(body: memoryview) -> dict[int, int]:
    """The settings of a SETTINGS payload (the last value of each id), each checked against
    RFC 9113 section 6.5.2."""
    if len(body) % 6:
        raise ConnError(FRAME_SIZE_ERROR, f"SETTINGS payload of {len(body)} bytes")
    settings = dict(_SETTING.unpack_from(body, off) for off in range(0, len(body), 6))
    if settings.get(S_ENABLE_PUSH, 0) > 1:
        raise ConnError(PROTOCOL_ERROR, f"SETTINGS_ENABLE_PUSH {settings[S_ENABLE_PUSH]}")
    if settings.get(S_INITIAL_WINDOW_SIZE, 0) > MAX_WINDOW:
        raise ConnError(FLOW_CONTROL_ERROR, f"initial window {settings[S_INITIAL_WINDOW_SIZE]}")
    if not DEFAULT_FRAME <= settings.get(S_MAX_FRAME_SIZE, DEFAULT_FRAME) < 1 << 24:
        raise ConnError(PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {settings[S_MAX_FRAME_SIZE]}")
    return settings


def window_update(sid: int, increment: int) -> bytes:
    return frame_header(4, WINDOW_UPDATE, 0, sid) + U32.pack(increment)


def rst_stream(sid: int, code: int) -> bytes:
    return frame_header(4, RST_STREAM, 0, sid) + U32.pack(code)


def goaway(last_sid: int, code: int) -> bytes:
    return frame_header(8, GOAWAY, 0, 0) + _U32x2.pack(last_sid, code)


def parse_goaway(body: memoryview) -> tuple[int, int]:
    """(last stream id, error code) of a GOAWAY payload (debug data ignored)."""
    if len(body) < 8:
        raise ConnError(FRAME_SIZE_ERROR, f"GOAWAY of {len(body)} bytes")
    last, code = _U32x2.unpack_from(body)
    return last & 0x7FFFFFFF, code


def ping_ack(opaque: memoryview) -> bytes:
    return frame_header(8, PING, ACK, 0) + opaque


def header_frames(block: bytes, sid: int, flags: int, max_frame: int) -> bytes:
    """A header block as HEADERS (with `flags`) and as many CONTINUATION frames as `max_frame`
    requires; the last frame carries END_HEADERS."""
    if len(block) <= max_frame:
        return frame_header(len(block), HEADERS, flags | END_HEADERS, sid) + block
    parts = [frame_header(max_frame, HEADERS, flags, sid), block[:max_frame]]
    for start in range(max_frame, len(block), max_frame):
        part = block[start : start + max_frame]
        last = END_HEADERS if start + max_frame >= len(block) else 0
        parts += (frame_header(len(part), CONTINUATION, last, sid), part)
    return b"".join(parts)


def unpad(body: memoryview, flags: int) -> memoryview:
    """The payload of a DATA or HEADERS frame without its padding (RFC 9113 section 6.1)."""
    if not flags & PADDED:
        return body
    if not body:
        raise ConnError(PROTOCOL_ERROR, "PADDED frame without a pad length")
    pad = body[0]
    if pad >= len(body):
        raise ConnError(PROTOCOL_ERROR, f"{pad} bytes of padding in a {len(body)}-byte payload")
    return body[1 : len(body) - pad]
