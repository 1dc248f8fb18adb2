"""HBONE, sans I/O: HTTP/2 CONNECT tunnels over one (TLS) byte stream; bytes in, events out.

The shape is Istio's HBONE: ALPN `h2`, one HTTP/2 stream per tunnelled TCP connection, a request
`:method CONNECT` with `:authority` = `ip:port` (`[v6]:port`) and no `:scheme` / `:path`; a `200`
response accepts the stream, anything else refuses it.  DATA frames carry the TCP payload,
END_STREAM is a TCP half-close (FIN), RST_STREAM a TCP reset, GOAWAY ends the connection.

`HboneConnection` owns the small HTTP/2 subset HBONE needs (RFC 9113 framing, SETTINGS, PING,
WINDOW_UPDATE, RST_STREAM, GOAWAY, HEADERS + CONTINUATION through `hpack`); it is used the way
h11 is: feed it what the socket read (`receive(data)` -> list of events), ask it for what to write
(`data_to_send()`, or send straight from the `out` buffer and delete what went out), and tell it
what the application wants (`open_stream`, `accept`, `refuse`, `send_data`, `end_stream`,
`reset`, `consumed`, `close`).  It never touches a socket.  It interoperates with any HTTP/2
peer (the tests pair it with python-hyper `h2`), but the bulk path is its own: a DATA frame
header is parsed with `struct` and its payload is handed out as a memoryview of the bytes given
to `receive()` as soon as they arrive (no reassembly of a 1 MiB frame, no copy); a `Data` event
is therefore only valid until the buffer passed to `receive()` is reused, and whoever keeps the
bytes longer must copy them.  `send_data` appends a 9-byte header and the payload to `out`, so
many frames (and many streams) leave in one large TLS write; `data_header` is the zero-copy
variant for a caller that read the payload right behind room for the header and sends both
itself (after whatever `out` holds).

Bulk settings, in both directions: SETTINGS_MAX_FRAME_SIZE 1 MiB (fewer frames, fewer events),
a large per-stream initial window, and a connection window of ~1 GiB so that only stream windows
bound what is in flight.  A stream window is reopened only when the application calls
`consumed(stream_id, n)`, i.e. after the bytes went on into the app socket, and only in batches
(a WINDOW_UPDATE once half of the window was consumed): a slow reader behind the tunnel therefore
stops its sender (backpressure end to end), while other streams of the same connection keep
flowing.

A stream is forgotten as soon as it is done (both ends sent END_STREAM, either reset it, or it was
refused), so `open_streams` never counts finished tunnels; frames that were still in flight for a
forgotten stream are ignored (their DATA still counts against, and is credited back to, the
connection window).

Every protocol violation by the peer (bad frames, bad headers, flow-control abuse) surfaces as
one exception, `TunnelProtocolError`; the connection should then be closed after sending whatever
`data_to_send()` holds (a GOAWAY).  Errors confined to one stream reset only that stream
(`StreamReset` event, RST_STREAM to the peer).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

import hpack

MAX_FRAME_SIZE = 1 << 20
STREAM_WINDOW = 4 << 20
CONNECTION_WINDOW = (1 << 30) - 1
MAX_CONCURRENT_STREAMS = 1000
MAX_HEADER_LIST_SIZE = 16384
MAX_HEADER_BLOCK = 65536
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
# settings
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 1, 2, 3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 4, 5, 6

_HEADER = struct.Struct(">HBBBL")  # length (24 bit: 16 + 8), type, flags, stream id
_unpack_header = _HEADER.unpack_from
_U32 = struct.Struct(">L")
_U32x2 = struct.Struct(">LL")
_SETTING = struct.Struct(">HL")


def _frame_header(length: int, ftype: int, flags: int, sid: int) -> bytes:
    return _HEADER.pack(length >> 8, length & 0xFF, ftype, flags, sid)


class TunnelProtocolError(Exception):
    """The peer broke HTTP/2 or the HBONE rules; the connection is unusable."""


class _ConnError(Exception):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code


# -- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamRequested:
    """Server side: the peer asks for a tunnel to `authority` (still unparsed `host:port`)."""

    stream_id: int
    authority: str


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    """Client side: the server answered 200; data may flow."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamRefused:
    """Client side: the server answered with a non-200 status (403, 503, ...)."""

    stream_id: int
    status: int


@dataclass(frozen=True, slots=True)
class Data:
    """Payload for the stream; call `consumed(stream_id, len(data))` once it was delivered.

    `data` may be a view of the buffer given to `receive()`: copy what you keep beyond that.
    """

    stream_id: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed the stream (TCP FIN)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer reset the stream (TCP RST)."""

    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """More may be sent: on `stream_id`, or on every stream when `stream_id` is 0."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class ConnectionEnded:
    """GOAWAY from the peer: streams above `last_stream_id` were never processed."""

    error_code: int
    last_stream_id: int


Event = (
    StreamRequested
    | StreamAccepted
    | StreamRefused
    | Data
    | StreamEnded
    | StreamReset
    | WindowOpened
    | ConnectionEnded
)


def format_authority(ip: str, port: int) -> str:
    """`10.0.0.1:80` or `[fd00::1]:80`."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def parse_authority(authority: str) -> tuple[str, int]:
    """(`ip`, port) from an authority; raises ValueError if it is not `ip:port` / `[v6]:port`."""
    host, sep, port = authority.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"authority {authority!r} is not ip:port")
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    if host.startswith("[") and host.endswith("]"):
        ip = ipaddress.IPv6Address(host[1:-1])
    else:
        ip = ipaddress.IPv4Address(host)
    return str(ip), int(port)


class _Stream:
    __slots__ = (
        "local_closed",
        "recv_window",
        "remote_closed",
        "responded",
        "send_window",
        "unacked",
    )

    def __init__(self, send_window: int) -> None:
        self.send_window = send_window
        self.recv_window = STREAM_WINDOW  # what the peer may still send (as we advertised)
        self.unacked = 0  # consumed bytes not yet given back in a WINDOW_UPDATE
        self.local_closed = False  # we sent END_STREAM
        self.remote_closed = False  # the peer sent END_STREAM
        self.responded = False  # client: the response HEADERS came


class HboneConnection:
    """One HBONE connection, client (`client=True`, opens streams) or server (accepts them)."""

    def __init__(self, client: bool) -> None:
        self.client = client
        self.ended = False  # GOAWAY sent or received, or a protocol error: no new streams
        self.out = bytearray()  # bytes for the peer; send from the front, `del out[:n]`
        self._streams: dict[int, _Stream] = {}
        self._next_sid = 1 if client else 2
        self._last_peer_sid = 0
        self._broken = False
        self._encoder = hpack.Encoder()
        self._decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST_SIZE)
        # peer settings
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_max_frame = DEFAULT_FRAME
        self._peer_max_streams = 1 << 31
        # connection windows
        self._send_conn_window = DEFAULT_WINDOW
        self._recv_conn_window = CONNECTION_WINDOW
        self._conn_unacked = 0
        # input state
        self._preface_left = 0 if client else len(PREFACE)
        self._partial = bytearray()  # an incomplete frame header or non-DATA frame
        self._data_left = 0  # payload bytes of the DATA frame being streamed
        self._data_sid = 0
        self._data_stream: _Stream | None = None
        self._data_end = False
        self._block = bytearray()  # header block waiting for CONTINUATION
        self._block_sid = 0
        self._block_end_stream = False
        out = self.out
        if client:
            out += PREFACE
        settings = (
            (S_MAX_FRAME_SIZE, MAX_FRAME_SIZE),
            (S_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
            (S_MAX_CONCURRENT_STREAMS, MAX_CONCURRENT_STREAMS),
            (S_ENABLE_PUSH, 0),
            (S_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST_SIZE),
        )
        out += _frame_header(6 * len(settings), SETTINGS, 0, 0)
        for key, value in settings:
            out += _SETTING.pack(key, value)
        out += _frame_header(4, WINDOW_UPDATE, 0, 0)
        out += _U32.pack(CONNECTION_WINDOW - DEFAULT_WINDOW)

    # -- input ------------------------------------------------------------------------------

    def receive(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes read from the peer; return what happened.  Raises TunnelProtocolError."""
        if self._broken:
            raise TunnelProtocolError("the connection already failed")
        out: list[Event] = []
        try:
            self._feed(memoryview(data).cast("B"), out)
        except _ConnError as exc:
            self._broken = True
            self._goaway(exc.code)
            raise TunnelProtocolError(f"HTTP/2 protocol error from the peer: {exc}") from None
        return out

    def _feed(self, mv: memoryview, out: list[Event]) -> None:
        n = len(mv)
        i = 0
        if self._preface_left:
            take = min(self._preface_left, n)
            start = len(PREFACE) - self._preface_left
            if mv[:take] != PREFACE[start : start + take]:
                raise _ConnError(PROTOCOL_ERROR, "no HTTP/2 client preface")
            self._preface_left -= take
            i = take
        partial = self._partial
        while i < n:
            if self._data_left:  # streaming the payload of a DATA frame
                take = min(self._data_left, n - i)
                self._data_left -= take
                st = self._data_stream
                if st is not None:
                    out.append(Data(self._data_sid, mv[i : i + take]))
                i += take
                if not self._data_left:
                    self._data_done(out)
                continue
            if partial:
                have = len(partial)
                if have < 9:
                    take = min(9 - have, n - i)
                    partial += mv[i : i + take]
                    i += take
                    if len(partial) < 9:
                        return
                    if self._start_frame(partial, 0, out):  # unpadded DATA: stream it
                        partial.clear()
                        continue
                need = 9 + (partial[0] << 16 | partial[1] << 8 | partial[2]) - len(partial)
                take = min(need, n - i)
                partial += mv[i : i + take]
                i += take
                if take < need:
                    return
                frame = bytes(partial)
                partial.clear()
                self._frame(frame, out)
                continue
            if n - i < 9:
                partial += mv[i:]
                return
            if self._start_frame(mv, i, out):
                i += 9
                continue
            length = mv[i] << 16 | mv[i + 1] << 8 | mv[i + 2]
            if n - i < 9 + length:
                partial += mv[i:]
                return
            self._frame(mv[i : i + 9 + length], out)
            i += 9 + length

    def _start_frame(self, buf: memoryview | bytearray, i: int, out: list[Event]) -> bool:
        """Check a frame header at buf[i:]; True if it starts an unpadded DATA frame (streamed)."""
        hi, lo, ftype, flags, sid = _unpack_header(buf, i)
        length = hi << 8 | lo
        if length > MAX_FRAME_SIZE:
            raise _ConnError(FRAME_SIZE_ERROR, f"frame of {length} bytes")
        if ftype != DATA or flags & PADDED or self._block_sid:
            return False
        sid &= 0x7FFFFFFF
        st = self._data_frame(sid, length, out)
        self._data_sid = sid
        self._data_stream = st
        self._data_end = bool(flags & END_STREAM)
        self._data_left = length
        if not length:
            self._data_done(out)
        return True

    def _data_frame(self, sid: int, length: int, out: list[Event]) -> _Stream | None:
        """Flow control for an incoming DATA frame; the live stream it is for, or None."""
        if not sid:
            raise _ConnError(PROTOCOL_ERROR, "DATA on stream 0")
        self._recv_conn_window -= length
        if self._recv_conn_window < 0:
            raise _ConnError(FLOW_CONTROL_ERROR, "connection window exceeded")
        st = self._streams.get(sid)
        if st is None or st.remote_closed:
            if st is None and sid > self._last_peer_sid and (sid & 1) != self.client:
                raise _ConnError(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            self._credit(length, None)  # a forgotten stream: give the connection window back
            return None
        if self.client and not st.responded:
            raise _ConnError(PROTOCOL_ERROR, f"DATA before the response on stream {sid}")
        st.recv_window -= length
        if st.recv_window < 0:
            self._credit(length, None)
            self._stream_error(sid, FLOW_CONTROL_ERROR)
            out.append(StreamReset(sid, FLOW_CONTROL_ERROR))
            return None
        return st

    def _data_done(self, out: list[Event]) -> None:
        st = self._data_stream
        self._data_stream = None
        if st is not None and self._data_end:
            self._remote_end(self._data_sid, st, out)

    def _remote_end(self, sid: int, st: _Stream, out: list[Event]) -> None:
        st.remote_closed = True
        out.append(StreamEnded(sid))
        if st.local_closed:
            del self._streams[sid]

    def _frame(self, frame: memoryview | bytes, out: list[Event]) -> None:
        """One complete non-streamed frame (header included)."""
        hi, lo, ftype, flags, sid = _unpack_header(frame, 0)
        length = hi << 8 | lo
        sid &= 0x7FFFFFFF
        body = memoryview(frame)[9 : 9 + length]
        if self._block_sid and ftype != CONTINUATION:
            raise _ConnError(PROTOCOL_ERROR, "header block interrupted")
        if ftype == DATA:  # padded
            st = self._data_frame(sid, length, out)
            payload = self._unpad(body, flags)
            if st is not None:
                self._credit(length - len(payload), sid)
                if payload:
                    out.append(Data(sid, payload))
                if flags & END_STREAM:
                    self._remote_end(sid, st, out)
        elif ftype == HEADERS:
            self._headers(sid, flags, body)
            if flags & END_HEADERS:
                self._end_block(out)
        elif ftype == CONTINUATION:
            if not self._block_sid or sid != self._block_sid:
                raise _ConnError(PROTOCOL_ERROR, "unexpected CONTINUATION")
            self._add_block(body)
            if flags & END_HEADERS:
                self._end_block(out)
        elif ftype == SETTINGS:
            self._settings(sid, flags, body, out)
        elif ftype == WINDOW_UPDATE:
            self._window_update(sid, body, out)
        elif ftype == PING:
            if sid or length != 8:
                raise _ConnError(PROTOCOL_ERROR if sid else FRAME_SIZE_ERROR, "bad PING")
            if not flags & ACK:
                self.out += _frame_header(8, PING, ACK, 0)
                self.out += body
        elif ftype == RST_STREAM:
            if not sid or length != 4:
                raise _ConnError(PROTOCOL_ERROR if not sid else FRAME_SIZE_ERROR, "bad RST")
            if sid not in self._streams and self._idle(sid):
                raise _ConnError(PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
            if self._streams.pop(sid, None) is not None:
                out.append(StreamReset(sid, _U32.unpack_from(body)[0]))
        elif ftype == GOAWAY:
            if sid or length < 8:
                raise _ConnError(PROTOCOL_ERROR, "bad GOAWAY")
            last, code = _U32x2.unpack_from(body)
            self.ended = True
            out.append(ConnectionEnded(code, last & 0x7FFFFFFF))
        elif ftype == PRIORITY:
            if not sid or length != 5:
                raise _ConnError(PROTOCOL_ERROR, "bad PRIORITY")
        elif ftype == PUSH_PROMISE:
            raise _ConnError(PROTOCOL_ERROR, "PUSH_PROMISE although push is disabled")
        # unknown frame types are ignored (RFC 9113 section 4.1)

    def _idle(self, sid: int) -> bool:
        if (sid & 1) == self.client:  # ours
            return sid >= self._next_sid
        return sid > self._last_peer_sid

    @staticmethod
    def _unpad(body: memoryview, flags: int) -> memoryview:
        if not flags & PADDED:
            return body
        if not body:
            raise _ConnError(PROTOCOL_ERROR, "padded frame without pad length")
        pad = body[0]
        if pad >= len(body):
            raise _ConnError(PROTOCOL_ERROR, "padding longer than the frame")
        return body[1 : len(body) - pad]

    def _headers(self, sid: int, flags: int, body: memoryview) -> None:
        if not sid:
            raise _ConnError(PROTOCOL_ERROR, "HEADERS on stream 0")
        block = self._unpad(body, flags)
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                raise _ConnError(FRAME_SIZE_ERROR, "short priority block")
            block = block[5:]
        self._block_sid = sid
        self._block_end_stream = bool(flags & END_STREAM)
        self._block.clear()
        self._add_block(block)

    def _add_block(self, part: memoryview) -> None:
        self._block += part
        if len(self._block) > MAX_HEADER_BLOCK:
            raise _ConnError(PROTOCOL_ERROR, "header block too large")

    def _end_block(self, out: list[Event]) -> None:
        sid, end_stream = self._block_sid, self._block_end_stream
        self._block_sid = 0
        try:
            headers = self._decoder.decode(bytes(self._block), raw=False)
        except (hpack.HPACKError, UnicodeDecodeError, ValueError) as exc:
            raise _ConnError(COMPRESSION_ERROR, f"bad header block: {exc}") from None
        self._block.clear()
        fields: dict[str, str] = {}
        for raw_name, raw_value in headers:
            name, value = str(raw_name), str(raw_value)
            if name in fields and name.startswith(":"):
                fields[":invalid"] = name
            fields.setdefault(name, value)
        st = self._streams.get(sid)
        if st is None:
            if (sid & 1) == self.client or not self._idle(sid):
                return  # trailers or a response on a stream that is already gone
            self._request(sid, fields, end_stream, out)
        elif self.client and not st.responded:
            self._response(sid, st, fields, end_stream, out)
        else:  # trailers: HBONE has none
            self._stream_error(sid, PROTOCOL_ERROR)
            out.append(StreamReset(sid, PROTOCOL_ERROR))

    def _request(self, sid: int, fields: dict[str, str], ended: bool, out: list[Event]) -> None:
        if self.client:
            raise _ConnError(PROTOCOL_ERROR, "server-initiated stream")
        self._last_peer_sid = sid
        if self.ended or len(self._streams) >= MAX_CONCURRENT_STREAMS:
            self._send_rst(sid, REFUSED_STREAM)
            return
        st = self._streams[sid] = _Stream(self._peer_initial_window)
        st.remote_closed = ended
        method = fields.get(":method")
        authority = fields.get(":authority")
        if ":invalid" in fields or any(k.lower() != k for k in fields):
            self.refuse(sid, 400)
        elif method != "CONNECT":
            self.refuse(sid, 405)
        elif not authority or ":protocol" in fields or ended:
            self.refuse(sid, 400)
        else:
            out.append(StreamRequested(sid, authority))

    def _response(
        self, sid: int, st: _Stream, fields: dict[str, str], ended: bool, out: list[Event]
    ) -> None:
        status = fields.get(":status", "")
        if len(status) != 3 or not status.isdigit():
            self._stream_error(sid, PROTOCOL_ERROR)
            out.append(StreamRefused(sid, 502))
            return
        code = int(status)
        if 100 <= code < 200:
            if ended:
                self._stream_error(sid, PROTOCOL_ERROR)
                out.append(StreamRefused(sid, 502))
            return  # informational
        st.responded = True
        if code == 200:
            out.append(StreamAccepted(sid))
            if ended:
                self._remote_end(sid, st, out)
            return
        # Refused: the stream is done either way.
        if ended and not st.local_closed:
            self.out += _frame_header(0, DATA, END_STREAM, sid)
        elif not ended:
            self._send_rst(sid, CANCEL)
        self._streams.pop(sid, None)
        out.append(StreamRefused(sid, code))

    def _settings(self, sid: int, flags: int, body: memoryview, out: list[Event]) -> None:
        if sid:
            raise _ConnError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if body:
                raise _ConnError(FRAME_SIZE_ERROR, "SETTINGS ack with a payload")
            return
        if len(body) % 6:
            raise _ConnError(FRAME_SIZE_ERROR, "SETTINGS length")
        for off in range(0, len(body), 6):
            key, value = _SETTING.unpack_from(body, off)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnError(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                if delta:
                    for st in self._streams.values():
                        st.send_window += delta
                        if st.send_window > MAX_WINDOW:
                            raise _ConnError(FLOW_CONTROL_ERROR, "stream window too large")
                    out.append(WindowOpened(0))
            elif key == S_MAX_FRAME_SIZE:
                if not DEFAULT_FRAME <= value < 1 << 24:
                    raise _ConnError(PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
                self._peer_max_frame = value
            elif key == S_MAX_CONCURRENT_STREAMS:
                self._peer_max_streams = value
            elif key == S_HEADER_TABLE_SIZE:
                self._encoder.header_table_size = value
            elif key == S_ENABLE_PUSH and value > 1:
                raise _ConnError(PROTOCOL_ERROR, "bad SETTINGS_ENABLE_PUSH")
        self.out += _frame_header(0, SETTINGS, ACK, 0)

    def _window_update(self, sid: int, body: memoryview, out: list[Event]) -> None:
        if len(body) != 4:
            raise _ConnError(FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        inc = _U32.unpack_from(body)[0] & 0x7FFFFFFF
        if not sid:
            if not inc:
                raise _ConnError(PROTOCOL_ERROR, "zero connection window increment")
            self._send_conn_window += inc
            if self._send_conn_window > MAX_WINDOW:
                raise _ConnError(FLOW_CONTROL_ERROR, "connection window too large")
            out.append(WindowOpened(0))
            return
        st = self._streams.get(sid)
        if st is None:
            if self._idle(sid):
                raise _ConnError(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return
        if not inc or st.send_window + inc > MAX_WINDOW:
            self._stream_error(sid, PROTOCOL_ERROR if not inc else FLOW_CONTROL_ERROR)
            out.append(StreamReset(sid, PROTOCOL_ERROR if not inc else FLOW_CONTROL_ERROR))
            return
        st.send_window += inc
        out.append(WindowOpened(sid))

    def _stream_error(self, sid: int, code: int) -> None:
        if self._streams.pop(sid, None) is not None or not self._idle(sid):
            self._send_rst(sid, code)

    # -- output -----------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Everything queued for the peer (and forget it).  Or send from `out` directly."""
        data = bytes(self.out)
        self.out.clear()
        return data

    def _send_headers(self, sid: int, headers: list[tuple[str, str]], flags: int) -> None:
        block = self._encoder.encode(headers)
        limit = self._peer_max_frame
        out = self.out
        if len(block) <= limit:
            out += _frame_header(len(block), HEADERS, flags | END_HEADERS, sid)
            out += block
            return
        out += _frame_header(limit, HEADERS, flags, sid)
        out += block[:limit]
        for start in range(limit, len(block), limit):
            part = block[start : start + limit]
            last = END_HEADERS if start + limit >= len(block) else 0
            out += _frame_header(len(part), CONTINUATION, last, sid)
            out += part

    def _send_rst(self, sid: int, code: int) -> None:
        self.out += _frame_header(4, RST_STREAM, 0, sid)
        self.out += _U32.pack(code)

    def _goaway(self, code: int) -> None:
        self.ended = True
        self.out += _frame_header(8, GOAWAY, 0, 0)
        self.out += _U32x2.pack(self._last_peer_sid, code)

    def open_stream(self, authority: str) -> int:
        """Client: send a CONNECT for `authority`; returns the stream id."""
        sid = self._next_sid
        self._next_sid += 2
        self._streams[sid] = _Stream(self._peer_initial_window)
        self._send_headers(sid, [(":method", "CONNECT"), (":authority", authority)], 0)
        return sid

    def accept(self, stream_id: int) -> None:
        """Server: answer 200; the tunnel is open."""
        if stream_id in self._streams:
            self._send_headers(stream_id, [(":status", "200")], 0)

    def refuse(self, stream_id: int, status: int) -> None:
        """Server: answer `status` (403 not allowed, 503 cannot connect) and end the stream."""
        if self._streams.pop(stream_id, None) is not None:
            self._send_headers(stream_id, [(":status", str(status))], END_STREAM)

    def send_window(self, stream_id: int) -> int:
        """How many payload bytes `send_data` takes now (0: wait for WindowOpened)."""
        st = self._streams.get(stream_id)
        if st is None or st.local_closed:
            return 0
        w = st.send_window
        c = self._send_conn_window
        return w if w < c else c

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> None:
        """Send payload; `len(data)` must not exceed `send_window(stream_id)`."""
        st = self._streams.get(stream_id)
        if st is None or st.local_closed:
            return
        n = len(data)
        st.send_window -= n
        self._send_conn_window -= n
        out = self.out
        frame = self._peer_max_frame
        if n <= frame:
            out += _HEADER.pack(n >> 8, n & 0xFF, DATA, 0, stream_id)
            out += data
            return
        view = memoryview(data)
        for start in range(0, n, frame):
            part = view[start : start + frame]
            k = len(part)
            out += _HEADER.pack(k >> 8, k & 0xFF, DATA, 0, stream_id)
            out += part

    @property
    def max_frame(self) -> int:
        """The largest DATA payload the peer accepts in one frame (its SETTINGS_MAX_FRAME_SIZE)."""
        return self._peer_max_frame

    def data_header(self, stream_id: int, n: int) -> bytes:
        """Zero-copy `send_data`: account for `n` payload bytes (at most `send_window` and
        `max_frame`) and return the 9-byte DATA frame header; the caller sends it, immediately
        followed by the payload, after everything `out` holds.  b"" if the stream is gone."""
        st = self._streams.get(stream_id)
        if st is None or st.local_closed:
            return b""
        if n > self._peer_max_frame:
            raise ValueError(f"{n} bytes do not fit one DATA frame ({self._peer_max_frame})")
        st.send_window -= n
        self._send_conn_window -= n
        return _HEADER.pack(n >> 8, n & 0xFF, DATA, 0, stream_id)

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction of the stream (no-op if the stream is gone)."""
        st = self._streams.get(stream_id)
        if st is None or st.local_closed:
            return
        st.local_closed = True
        self.out += _frame_header(0, DATA, END_STREAM, stream_id)
        if st.remote_closed:
            del self._streams[stream_id]

    def reset(self, stream_id: int, error_code: int = CANCEL) -> None:
        """Abort the stream (no-op if it is gone)."""
        if self._streams.pop(stream_id, None) is not None:
            self._send_rst(stream_id, error_code)

    def consumed(self, stream_id: int, n: int) -> None:
        """`n` bytes of this stream's Data reached the app: reopen that much window (batched)."""
        self._credit(n, stream_id)

    def _credit(self, n: int, stream_id: int | None) -> None:
        self._conn_unacked += n
        if self._conn_unacked >= CONNECTION_WINDOW // 2:
            self.out += _frame_header(4, WINDOW_UPDATE, 0, 0)
            self.out += _U32.pack(self._conn_unacked)
            self._recv_conn_window += self._conn_unacked
            self._conn_unacked = 0
        if stream_id is None:
            return
        st = self._streams.get(stream_id)
        if st is None or st.remote_closed:
            return  # nothing more will come on it: no point reopening its window
        st.unacked += n
        if st.unacked >= STREAM_WINDOW // 2:
            self.out += _frame_header(4, WINDOW_UPDATE, 0, stream_id)
            self.out += _U32.pack(st.unacked)
            st.recv_window += st.unacked
            st.unacked = 0

    def close(self, error_code: int = 0) -> None:
        """Send GOAWAY (once)."""
        if not self.ended:
            self._goaway(error_code)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def can_open(self) -> bool:
        """Client: room for one more stream under the peer's MAX_CONCURRENT_STREAMS."""
        return not self.ended and len(self._streams) < self._peer_max_streams
