"""HBONE, sans I/O: HTTP/2 CONNECT tunnels over one (TLS) byte stream; bytes in, events out.

The shape is Istio's HBONE: ALPN `h2`, one HTTP/2 stream per tunnelled TCP connection, a request
`:method CONNECT` with `:authority` = `ip:port` (`[v6]:port`) and no `:scheme` / `:path`; a `200`
response accepts the stream, anything else refuses it.  DATA frames carry the TCP payload,
END_STREAM is a TCP half-close (FIN), RST_STREAM a TCP reset, GOAWAY ends the connection.

`HboneConnection` owns the small HTTP/2 subset HBONE needs (RFC 9113 framing, SETTINGS, PING,
WINDOW_UPDATE, RST_STREAM, GOAWAY, HEADERS + CONTINUATION through `hpack`); it is used the way
h11 is: feed it what the socket read (`receive(data)` -> list of events, `agent.tunnel.events`),
ask it for what to write (`data_to_send()`, or send straight from the `out` buffer and delete
what went out), and tell it what the application wants (`open_stream`, `accept`, `refuse`,
`send_data`, `end_stream`, `reset`, `consumed`, `close`).  It never touches a socket (wire
format: `agent.tunnel.frames`, header rules: `agent.tunnel.headers`).  It interoperates with
any HTTP/2 peer (the tests pair it with python-hyper `h2`), but the bulk path is its own: a DATA
frame header is parsed with `struct` and its payload is handed out as a memoryview of the bytes
given to `receive()` as soon as they arrive (no reassembly of a 1 MiB frame, no copy); a `Data`
event is therefore only valid until the buffer passed to `receive()` is reused, and whoever keeps
the bytes longer must copy them.  `send_data` appends a 9-byte header and the payload to `out`, so
many frames (and many streams) leave in one large TLS write; `data_header` is the zero-copy
variant for a caller that read the payload right behind room for the header and sends both
itself (after whatever `out` holds).

Flow control (`agent.tunnel.windows`): a stream window is reopened only when the application
calls `consumed(stream_id, n)`, i.e. after the bytes went on into the app socket, and only in
batches, so a slow reader behind the tunnel stops its sender while other streams keep flowing.
A stream is forgotten as soon as it is done (both ends sent END_STREAM, either reset it, or it
was refused), so `open_streams` never counts finished tunnels; frames still in flight for it are
ignored (their DATA still counts against, and is credited back to, the connection window).

Errors come in two kinds, as in h11 (`agent.tunnel.events`).  A protocol violation by the peer
(bad frames, bad headers, flow-control abuse, a flood) raises `TunnelProtocolError` from
`receive()` after a GOAWAY was queued; close the connection after sending what `out` holds.
Errors confined to one stream reset only that stream (`StreamReset`, RST_STREAM to the peer).  A
misuse by the caller (`open_stream` beyond the peer's SETTINGS_MAX_CONCURRENT_STREAMS or after
GOAWAY, `send_data` / `data_header` beyond the send window or after `end_stream`, `accept` twice)
raises `LocalProtocolError` and changes nothing: the peer never sees a negative window.

Floods: replies the peer does not read, frames that carry nothing, streams reset before we
answered them, PINGs, SETTINGS, resets and empty frames faster than their rates, and endless
header blocks are counted here and bounded by the `floods.Bounds` the core is made with (its
windows and stream limit too); the owner gives it a clock for the rates (`clock`), reports sent
bytes (`drained()`) and times `pending_header_block`.  A stream the peer resets in the same read
that opened it is reported (StreamRequested, then StreamReset) but `is_open` says it is gone, so
the owner can skip the work of opening it (Rapid Reset).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

import hpack

from agent.tunnel import events, floods, frames, headers
from agent.tunnel.events import Data, Event, LocalProtocolError, TunnelProtocolError
from agent.tunnel.frames import DATA, END_STREAM, PADDED, ConnError, pack_header, unpack_header
from agent.tunnel.windows import MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE, StreamState, settings


class HboneConnection:
    """One HBONE connection, client (`client=True`, opens streams) or server (accepts them),
    within `bounds`; `clock` (seconds, monotonic) enables the frame rates of `bounds`."""

    def __init__(
        self,
        client: bool,
        bounds: floods.Bounds = floods.DEFAULT,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.client = client
        self.bounds = bounds
        self._rates = floods.Rates(bounds, clock)
        self._stream_window = bounds.stream_window
        self._connection_window = bounds.connection_window
        self.ended = False  # GOAWAY sent or received, or a protocol error: no new streams
        self.out = bytearray()  # bytes for the peer; send from the front, `del out[:n]`
        self._streams: dict[int, StreamState] = {}
        self._next_sid = 1 if client else 2
        self._last_peer_sid = 0
        self._broken = False
        self._encoder = hpack.Encoder()
        self._decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST_SIZE)
        # peer settings
        self._peer_initial_window = frames.DEFAULT_WINDOW
        self._peer_max_frame = frames.DEFAULT_FRAME
        self._peer_max_streams = 1 << 31
        # connection windows
        self._send_conn_window = frames.DEFAULT_WINDOW
        self._recv_conn_window = bounds.connection_window
        self._conn_unacked = 0
        # input state
        self._preface_left = 0 if client else len(frames.PREFACE)
        self._partial = bytearray()  # an incomplete frame header or non-DATA frame
        self._data_left = 0  # payload bytes of the DATA frame being streamed
        self._data_sid = 0
        self._data_stream: StreamState | None = None
        self._data_end = False
        self._block = headers.HeaderBlock(bounds)  # a header block waiting for CONTINUATION
        # flood accounting (bounds in agent.tunnel.floods)
        self._replies = 0  # control frames queued in reply to the peer since `drained()`
        self._idle_frames = 0  # frames in a row that carried nothing
        self._peer_opened = 0  # streams the peer opened
        self._premature = 0  # ... and reset before we answered
        if client:
            self.out += frames.PREFACE
        self.out += frames.settings_frame(settings(bounds))
        if bounds.connection_window > frames.DEFAULT_WINDOW:
            self.out += frames.window_update(0, bounds.connection_window - frames.DEFAULT_WINDOW)

    # -- input ------------------------------------------------------------------------------

    def receive(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes read from the peer; return what happened.  Raises TunnelProtocolError."""
        if self._broken:
            raise TunnelProtocolError("the connection already failed", frames.PROTOCOL_ERROR)
        out: list[Event] = []
        self._rates.refill()
        try:
            self._feed(memoryview(data).cast("B"), out)
        except ConnError as exc:
            self._broken = True
            self._goaway(exc.code)
            what = "flood" if exc.code == frames.ENHANCE_YOUR_CALM else "protocol error"
            raise TunnelProtocolError(
                f"HTTP/2 {what} from the peer: {exc}", exc.code, exc.limit
            ) from None
        return out

    def _feed(self, mv: memoryview, out: list[Event]) -> None:
        n = len(mv)
        i = 0
        if self._preface_left:
            preface = frames.PREFACE
            take = min(self._preface_left, n)
            start = len(preface) - self._preface_left
            if mv[:take] != preface[start : start + take]:
                raise ConnError(frames.PROTOCOL_ERROR, "no HTTP/2 client preface")
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
        hi, lo, ftype, flags, sid = unpack_header(buf, i)
        length = hi << 8 | lo
        if ftype != DATA:
            self.bounds.check_control_frame(ftype, length)  # before any of it is buffered
            return False
        if length > MAX_FRAME_SIZE:
            raise ConnError(frames.FRAME_SIZE_ERROR, f"DATA frame of {length} bytes")
        if flags & PADDED or self._block.sid:
            return False
        sid &= 0x7FFFFFFF
        st = self._data_frame(sid, length, out)
        self._data_sid = sid
        self._data_stream = st
        self._data_end = end = bool(flags & END_STREAM)
        self._data_left = length
        if length:
            self._idle_frames = 0
        else:
            if not end:
                self._idle_frames = self._idle(self._idle_frames, "empty DATA frames")
            self._data_done(out)
        return True

    def _data_frame(self, sid: int, length: int, out: list[Event]) -> StreamState | None:
        """Flow control for an incoming DATA frame; the live stream it is for, or None."""
        if not sid:
            raise ConnError(frames.PROTOCOL_ERROR, "DATA on stream 0")
        self._recv_conn_window -= length
        if self._recv_conn_window < 0:
            raise ConnError(frames.FLOW_CONTROL_ERROR, "connection window exceeded")
        st = self._streams.get(sid)
        if st is None or st.remote_closed:
            if st is None and sid > self._last_peer_sid and (sid & 1) != self.client:
                raise ConnError(frames.PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            self._credit(length, None)  # a forgotten stream: give the connection window back
            return None
        if self.client and not st.responded:
            raise ConnError(frames.PROTOCOL_ERROR, f"DATA before the response on stream {sid}")
        st.recv_window -= length
        if st.recv_window < 0:
            self._credit(length, None)
            self._stream_error(sid, frames.FLOW_CONTROL_ERROR)
            out.append(events.StreamReset(sid, frames.FLOW_CONTROL_ERROR))
            return None
        return st

    def _data_done(self, out: list[Event]) -> None:
        st = self._data_stream
        self._data_stream = None
        if st is not None and self._data_end:
            self._remote_end(self._data_sid, st, out)

    def _remote_end(self, sid: int, st: StreamState, out: list[Event]) -> None:
        st.remote_closed = True
        out.append(events.StreamEnded(sid))
        if st.local_closed:
            del self._streams[sid]

    def _frame(self, frame: memoryview | bytes, out: list[Event]) -> None:
        """One complete non-streamed frame (header included)."""
        hi, lo, ftype, flags, sid = unpack_header(frame, 0)
        length = hi << 8 | lo
        sid &= 0x7FFFFFFF
        body = memoryview(frame)[9 : 9 + length]
        block = self._block
        if block.sid and ftype != frames.CONTINUATION:
            raise ConnError(
                frames.PROTOCOL_ERROR, f"header block interrupted by a frame of type {ftype}"
            )
        frames.check_shape(ftype, sid, length)
        idle, self._idle_frames = self._idle_frames, 0  # in a row, unless this one is idle too
        if ftype == DATA:  # padded
            st = self._data_frame(sid, length, out)
            payload = frames.unpad(body, flags)
            if st is not None:
                self._credit(length - len(payload), sid)
                if payload:
                    out.append(Data(sid, payload))
                if flags & END_STREAM:
                    self._remote_end(sid, st, out)
            if not payload and not flags & END_STREAM:
                self._idle_frames = self._idle(idle, "empty DATA frames")
        elif ftype in (frames.HEADERS, frames.CONTINUATION):
            if ftype == frames.HEADERS:
                block.start(sid, flags, body)
            else:
                block.add(sid, body)
            if flags & frames.END_HEADERS:
                self._end_block(out, idle)
            else:
                self._idle_frames = idle  # undecided until the block is complete
        elif ftype == frames.SETTINGS:
            self._settings(flags, body, out)
        elif ftype == frames.WINDOW_UPDATE:
            self._window_update(sid, body, out)
        elif ftype == frames.PING:
            if flags & frames.ACK:
                self._idle_frames = self._idle(idle, "PING acks")  # we send no PINGs
            else:
                self._rates.take(floods.PING)
                self._reply(frames.ping_ack(body))
        elif ftype == frames.RST_STREAM:
            self._rates.take(floods.RESET)
            self._rst_stream(sid, frames.U32.unpack_from(body)[0], out)
        elif ftype == frames.GOAWAY:
            last, code = frames.parse_goaway(body)
            self.ended = True
            out.append(events.ConnectionEnded(code, last))
        elif ftype == frames.PRIORITY:
            self._idle_frames = self._idle(idle, "PRIORITY frames")
        elif ftype == frames.PUSH_PROMISE:
            raise ConnError(frames.PROTOCOL_ERROR, "PUSH_PROMISE although push is disabled")
        else:  # unknown frame types are ignored (RFC 9113 section 4.1)
            self._idle_frames = self._idle(idle, "frames of unknown types")

    def _idle(self, before: int, what: str) -> int:
        """One more frame that carried nothing: counted in a row and against its rate."""
        self._rates.take(floods.EMPTY)
        return self.bounds.idle_frame(before, what)

    def _reply(self, frame: bytes) -> None:
        """Queue a control frame the peer's frames caused; too many unread ones are a flood."""
        self.out += frame
        self._replies += 1
        self.bounds.check_replies(self._replies)

    def _is_idle(self, sid: int) -> bool:
        if (sid & 1) == self.client:  # ours
            return sid >= self._next_sid
        return sid > self._last_peer_sid

    def _rst_stream(self, sid: int, code: int, out: list[Event]) -> None:
        st = self._streams.pop(sid, None)
        if st is None:
            if self._is_idle(sid):
                raise ConnError(frames.PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
            return
        out.append(events.StreamReset(sid, code))
        if not self.client and not st.responded:  # opened and reset before we answered
            self._premature += 1
            self.bounds.check_premature_resets(self._premature, self._peer_opened)

    def _end_block(self, out: list[Event], idle: int) -> None:
        block = self._block
        sid, end_stream = block.sid, block.end_stream
        fields = headers.decode(self._decoder, block.take())
        st = self._streams.get(sid)
        if st is None:
            if self.client and sid & 1 and not self._is_idle(sid):
                # the answer to a stream of ours we already reset or closed: a busy peer answers
                # late, thousands at once after a burst; ending the connection for it would cut
                # every live stream on it (not a flood: at most one per stream we opened)
                self._idle_frames = idle
                return
            if (sid & 1) == self.client or not self._is_idle(sid):
                # trailers or a response on a stream that is already gone
                self._idle_frames = self._idle(idle, "header blocks for closed streams")
                return
            self._request(sid, fields, end_stream, out)
        elif self.client and not st.responded:
            self._response(sid, st, fields, end_stream, out)
        else:  # trailers: HBONE has none
            self._stream_error(sid, frames.PROTOCOL_ERROR)
            out.append(events.StreamReset(sid, frames.PROTOCOL_ERROR))

    def _request(self, sid: int, fields: dict[str, str], ended: bool, out: list[Event]) -> None:
        if self.client:
            raise ConnError(frames.PROTOCOL_ERROR, "server-initiated stream")
        self._last_peer_sid = sid
        self._peer_opened += 1
        self.bounds.check_replies(self._replies)  # refusals by the owner count too
        if self.ended or len(self._streams) >= self.bounds.streams_per_connection:
            self._reply(frames.rst_stream(sid, frames.REFUSED_STREAM))
            return
        st = self._streams[sid] = StreamState(self._peer_initial_window, self._stream_window)
        st.remote_closed = ended
        status = headers.request_refusal(fields, ended)
        if status:
            self.refuse(sid, status)
            self.bounds.check_replies(self._replies)
        else:
            out.append(events.StreamRequested(sid, fields[":authority"]))

    def _response(
        self, sid: int, st: StreamState, fields: dict[str, str], ended: bool, out: list[Event]
    ) -> None:
        code = headers.response_status(fields)
        if not code or (code < 200 and ended):
            self._stream_error(sid, frames.PROTOCOL_ERROR)
            out.append(events.StreamRefused(sid, 502))
            return
        if code < 200:
            return  # informational
        st.responded = True
        if code == 200:
            out.append(events.StreamAccepted(sid))
            if ended:
                self._remote_end(sid, st, out)
            return
        # Refused: the stream is done either way.
        if ended and not st.local_closed:
            self.out += frames.frame_header(0, DATA, END_STREAM, sid)
        elif not ended:
            self._reply(frames.rst_stream(sid, frames.CANCEL))
        self._streams.pop(sid, None)
        out.append(events.StreamRefused(sid, code))

    def _settings(self, flags: int, body: memoryview, out: list[Event]) -> None:
        if flags & frames.ACK:
            if body:
                raise ConnError(frames.FRAME_SIZE_ERROR, "SETTINGS ack with a payload")
            return
        self._rates.take(floods.SETTINGS)
        self.bounds.check_settings(len(body) // 6)
        settings = frames.parse_settings(body)
        window = settings.get(frames.S_INITIAL_WINDOW_SIZE, self._peer_initial_window)
        delta, self._peer_initial_window = window - self._peer_initial_window, window
        if delta:
            for st in self._streams.values():
                st.send_window += delta
                if st.send_window > frames.MAX_WINDOW:
                    raise ConnError(frames.FLOW_CONTROL_ERROR, "stream window too large")
            out.append(events.WindowOpened(0))
        self._peer_max_frame = settings.get(frames.S_MAX_FRAME_SIZE, self._peer_max_frame)
        self._peer_max_streams = settings.get(
            frames.S_MAX_CONCURRENT_STREAMS, self._peer_max_streams
        )
        if frames.S_HEADER_TABLE_SIZE in settings:
            self._encoder.header_table_size = settings[frames.S_HEADER_TABLE_SIZE]
        self._reply(frames.SETTINGS_ACK)

    def _window_update(self, sid: int, body: memoryview, out: list[Event]) -> None:
        inc = frames.U32.unpack_from(body)[0] & 0x7FFFFFFF
        if not sid:
            if not inc:
                raise ConnError(frames.PROTOCOL_ERROR, "zero connection window increment")
            self._send_conn_window += inc
            if self._send_conn_window > frames.MAX_WINDOW:
                raise ConnError(frames.FLOW_CONTROL_ERROR, "connection window too large")
            out.append(events.WindowOpened(0))
            return
        st = self._streams.get(sid)
        if st is None:
            if self._is_idle(sid):
                raise ConnError(frames.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return
        if not inc or st.send_window + inc > frames.MAX_WINDOW:
            code = frames.PROTOCOL_ERROR if not inc else frames.FLOW_CONTROL_ERROR
            self._stream_error(sid, code)
            out.append(events.StreamReset(sid, code))
            return
        st.send_window += inc
        out.append(events.WindowOpened(sid))

    def _stream_error(self, sid: int, code: int) -> None:
        if self._streams.pop(sid, None) is not None or not self._is_idle(sid):
            self._reply(frames.rst_stream(sid, code))

    @property
    def pending_header_block(self) -> bool:
        """A header block waits for CONTINUATION, blocking the connection: the owner (with the
        clock) closes it after `bounds.header_block_timeout`."""
        return self._block.sid != 0

    # -- output -----------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Everything queued for the peer (and forget it).  Or send from `out` directly."""
        data = bytes(self.out)
        self.out.clear()
        return data

    def drained(self) -> None:
        """What was taken from `out` reached the peer's socket: the replies queued until then no
        longer count against `bounds.unread_replies`."""
        self._replies = 0

    def _goaway(self, code: int) -> None:
        self.ended = True
        self.out += frames.goaway(self._last_peer_sid, code)

    def open_stream(self, authority: str) -> int:
        """Client: send a CONNECT for `authority`; returns the stream id.  See `can_open`."""
        if not self.client:
            raise LocalProtocolError("a server cannot open streams")
        if self.ended:
            raise LocalProtocolError("the connection is ending (GOAWAY): open another one")
        if len(self._streams) >= self._peer_max_streams:
            raise LocalProtocolError(
                f"the peer allows {self._peer_max_streams} concurrent streams: wait until one"
                " ends (can_open)"
            )
        sid = self._next_sid
        if sid > 0x7FFFFFFF:
            raise LocalProtocolError("stream ids are used up: open another connection")
        self._next_sid += 2
        self._streams[sid] = StreamState(self._peer_initial_window, self._stream_window)
        self._send_headers(sid, [(":method", "CONNECT"), (":authority", authority)], 0)
        return sid

    def _send_headers(self, sid: int, fields: list[tuple[str, str]], flags: int) -> None:
        block = self._encoder.encode(fields)
        self.out += frames.header_frames(block, sid, flags, self._peer_max_frame)

    def accept(self, stream_id: int) -> None:
        """Server: answer 200; the tunnel is open (no-op if the peer reset the stream)."""
        st = self._unanswered(stream_id, "accept")
        if st is not None:
            st.responded = True
            self._send_headers(stream_id, [(":status", "200")], 0)

    def refuse(self, stream_id: int, status: int) -> None:
        """Server: answer `status` (403 not allowed, 503 cannot connect) and end the stream."""
        if self._unanswered(stream_id, "refuse") is not None:
            del self._streams[stream_id]
            self._replies += 1  # caused by the peer: checked at its next request
            self._send_headers(stream_id, [(":status", str(status))], END_STREAM)

    def _unanswered(self, stream_id: int, what: str) -> StreamState | None:
        if self.client:
            raise LocalProtocolError(f"a client cannot {what} streams")
        st = self._streams.get(stream_id)
        if st is not None and st.responded:
            raise LocalProtocolError(f"cannot {what} stream {stream_id}: it was accepted")
        return st

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
        if st is None:
            return  # reset meanwhile: the bytes have nowhere to go
        n = len(data)
        if st.local_closed or n > st.send_window or n > self._send_conn_window:
            self._cannot_send(stream_id, n)
        st.send_window -= n
        self._send_conn_window -= n
        out = self.out
        frame = self._peer_max_frame
        if n <= frame:
            out += pack_header(n >> 8, n & 0xFF, DATA, 0, stream_id)
            out += data
            return
        view = memoryview(data)
        for start in range(0, n, frame):
            part = view[start : start + frame]
            k = len(part)
            out += pack_header(k >> 8, k & 0xFF, DATA, 0, stream_id)
            out += part

    def _cannot_send(self, stream_id: int, n: int) -> NoReturn:
        if self._streams[stream_id].local_closed:
            raise LocalProtocolError(f"stream {stream_id} already sent END_STREAM")
        raise LocalProtocolError(
            f"{n} bytes exceed the send window of stream {stream_id}"
            f" ({self.send_window(stream_id)} bytes): wait for WindowOpened"
        )

    @property
    def max_frame(self) -> int:
        """The largest DATA payload the peer accepts in one frame (its SETTINGS_MAX_FRAME_SIZE)."""
        return self._peer_max_frame

    def data_header(self, stream_id: int, n: int) -> bytes:
        """Zero-copy `send_data`: account for `n` payload bytes (at most `send_window` and
        `max_frame`) and return the 9-byte DATA frame header; the caller sends it, immediately
        followed by the payload, after everything `out` holds.  b"" if the stream is gone."""
        if n > self._peer_max_frame:
            raise LocalProtocolError(f"{n} bytes do not fit one DATA frame ({self.max_frame})")
        st = self._streams.get(stream_id)
        if st is None:
            return b""
        if st.local_closed or n > st.send_window or n > self._send_conn_window:
            self._cannot_send(stream_id, n)
        st.send_window -= n
        self._send_conn_window -= n
        return pack_header(n >> 8, n & 0xFF, DATA, 0, stream_id)

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction of the stream (no-op if the stream is gone)."""
        st = self._streams.get(stream_id)
        if st is None or st.local_closed:
            return
        st.local_closed = True
        self.out += frames.frame_header(0, DATA, END_STREAM, stream_id)
        if st.remote_closed:
            del self._streams[stream_id]

    def reset(self, stream_id: int, error_code: int = frames.CANCEL) -> None:
        """Abort the stream (no-op if it is gone)."""
        if self._streams.pop(stream_id, None) is not None:
            self.out += frames.rst_stream(stream_id, error_code)

    def consumed(self, stream_id: int, n: int) -> None:
        """`n` bytes of this stream's Data reached the app: reopen that much window (batched)."""
        self._credit(n, stream_id)

    def _credit(self, n: int, stream_id: int | None) -> None:
        self._conn_unacked += n
        if self._conn_unacked >= self._connection_window >> 2:
            self.out += frames.window_update(0, self._conn_unacked)
            self._recv_conn_window += self._conn_unacked
            self._conn_unacked = 0
        if stream_id is None:
            return
        st = self._streams.get(stream_id)
        if st is None or st.remote_closed:
            return  # nothing more will come on it: no point reopening its window
        st.unacked += n
        if st.unacked >= self._stream_window >> 1:
            self.out += frames.window_update(stream_id, st.unacked)
            st.recv_window += st.unacked
            st.unacked = 0

    def close(self, error_code: int = 0) -> None:
        """Send GOAWAY (once)."""
        if not self.ended:
            self._goaway(error_code)

    def shutdown_notice(self) -> None:
        """Server: announce a graceful shutdown (RFC 9113 section 6.8): GOAWAY with the largest
        stream id, so the peer opens no new stream here, while a stream it opened before it saw
        this is still accepted (no race); `close` later sends the real last stream id."""
        if not self.client and not self.ended:
            self.out += frames.goaway(0x7FFFFFFF, frames.NO_ERROR)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def is_open(self, stream_id: int) -> bool:
        """The stream is live (not reset, refused or done both ways)."""
        return stream_id in self._streams

    @property
    def can_open(self) -> bool:
        """Client: room for one more stream under the peer's MAX_CONCURRENT_STREAMS."""
        return (
            not self.ended
            and len(self._streams) < self._peer_max_streams
            and self._next_sid <= 0x7FFFFFFF
        )
