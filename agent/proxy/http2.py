"""HTTP/2 inspection with prior knowledge (h2c, gRPC), sans I/O: each stream decided on its own.

`Http2Inspector` terminates the client's HTTP/2 connection and originates its own to the server:
two `h2` connections, a server-side one facing the client and a client-side one facing the
workload, and a table of streams between them.  The owner feeds what the client sent
(`client_data`) and what the server sent (`server_data`), writes out what `data_for_client()` and
`data_for_server()` return after every call, and answers each StreamHead event:

    StreamHead       a request's headers (:method, :path, :authority, fields); call
                     `allow(stream_id, remove_headers, set_headers)` (the request goes upstream on
                     a stream of the server connection) or `deny(stream_id, denial)` (answered
                     here: a gRPC call with a trailers-only response, grpc-status 7 / 16 / 8; any
                     other request with 403 / 401 / 429 and a short body; see
                     `agent.proxy.responses`); other streams are not touched
    ConnectionEnded  the connection is over (a protocol error, a flood, a GOAWAY from either
                     side, `expire()`): write out what `data_for_client()` /
                     `data_for_server()` hold (the GOAWAYs), then close both sockets

Between the two, an allowed stream's HEADERS, DATA, trailers, END_STREAM and RST_STREAM go across
both ways as they come.  Flow control is end to end: DATA from one side is acknowledged to it
(WINDOW_UPDATE) only once it was sent on to the other, so a reader that does not read stops its
writer, and what the inspector holds for a connection is bounded by the windows it announced
(CONNECTION_WINDOW each way; STREAM_WINDOW per stream).  A stream waiting for its decision holds
its DATA the same way; a denied stream's DATA is acknowledged and dropped, and once the reply went
out a request still being sent is cut short with RST_STREAM NO_ERROR (RFC 9113 section 8.1).

Limits towards the client: `bounds.streams_per_connection` streams, `max_header_list` bytes of
headers (enforced by `h2`: exceeding them ends the connection), and the flood bounds of the
HBONE core (`agent.tunnel.floods.Bounds`), counted by `_FloodGuard` on the client's frame headers
before `h2` reads them: PING and SETTINGS replies the client does not read (until
`client_drained()`), PING, SETTINGS, RST_STREAM and empty frames faster than their rates (with
the owner's `clock`), SETTINGS entries, CONTINUATION frames per header block, control frame
sizes, frames in a row that carry nothing (empty DATA, PRIORITY, unknown types, unasked PING
acks), and streams reset by the client before their response (Rapid Reset).  Past a bound the
client gets GOAWAY ENHANCE_YOUR_CALM and the owner ConnectionEnded naming the bound (`limit`).
`pending_header_block` tells the owner, which has the clock, that a header block is waiting for
CONTINUATION (`bounds.header_block_timeout`).

Why `h2` (python-hyper) and not the house core (`agent.tunnel.hbone`): HboneConnection speaks
the CONNECT subset of HTTP/2 that HBONE needs (no request headers beyond :authority, no
responses beyond a status, no trailers); inspecting gRPC needs all of RFC 9113's request and
response semantics, header validation, trailers and informational responses, which `h2` has,
maintained and tested against many peers.  `h2` is slower than the house core's DATA path (it
parses every frame into an object), which the bench shows (streams/s), and it treats a GOAWAY
as the end of the connection: streams in flight are not drained.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from agent.proxy.http1_framing import FRAMING_HEADERS
from agent.proxy.responses import Denial, h2_reply
from agent.tunnel import floods
from agent.tunnel.frames import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    HEADERS,
    INTERNAL_ERROR,
    NO_ERROR,
    PING,
    PREFACE,
    PRIORITY,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    ConnError,
    unpack_header,
)

MAX_HEADER_LIST = 64 * 1024  # default of `max_header_list` (limits.request_header_bytes)
STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 1024 * 1024
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
_UNSAFE_VALUE = re.compile(r"[\r\n\x00]")
_PATH = re.compile(r"/[\x21-\x7e]*")  # an absolute path, visible ASCII
_FRAMING = FRAMING_HEADERS | {"te"}
Fields = list[tuple[bytes, bytes]]
# stream decisions
_UNDECIDED, _ALLOWED, _DENIED = range(3)


class LocalProtocolError(Exception):
    """The owner decided a stream twice; nothing changed."""


class StreamHead(NamedTuple):
    """A request's headers, waiting for `allow` or `deny`."""

    stream_id: int
    method: str
    scheme: str
    authority: str  # :authority, or the host field when there is none
    target: str  # :path as sent
    path: str  # without the query (raw, not normalized)
    query: str  # without the "?"
    headers: tuple[tuple[str, str], ...]  # the regular fields, lower-case names, in order
    grpc: bool  # content-type application/grpc...: denials are gRPC statuses


class ConnectionEnded(NamedTuple):
    """The connection is over (`reason` says why): write out both sides' data, then close.
    `limit` names the flood bound the client passed, if that is why (a `limits:` key)."""

    reason: str
    limit: str = ""


Event = StreamHead | ConnectionEnded


class _GoAway(Exception):
    """Internal: a peer sent GOAWAY; `h2` takes no frame after one, so the connection ends."""


class _Stream:
    """One request and its response, between a client stream and a server stream."""

    __slots__ = (
        "client_ended",
        "decision",
        "fields",
        "grpc",
        "responded",
        "sent_end",
        "sid",
        "to_client",
        "to_client_end",
        "to_server",
        "to_server_end",
        "up",
        "up_sent_end",
    )

    def __init__(self, sid: int, fields: Fields, grpc: bool) -> None:
        self.sid = sid  # on the client connection
        self.up = 0  # on the server connection, once allowed
        self.fields = fields  # the request's header block, for the server
        self.grpc = grpc
        self.decision = _UNDECIDED
        self.responded = False  # response headers went to the client
        self.client_ended = False  # the client's END_STREAM came
        self.sent_end = False  # END_STREAM or RST_STREAM went to the client
        self.up_sent_end = False  # END_STREAM went to the server
        self.to_server = bytearray()  # client DATA not yet sent on (nor acknowledged)
        self.to_server_end: Fields | bool = False  # client trailers, or True: END_STREAM to send
        self.to_client = bytearray()
        self.to_client_end: Fields | bool = False


class _FloodGuard:
    """Counts the client's frames by their 9-byte headers (payloads skipped) against `bounds`
    (`agent.tunnel.floods`); raises ConnError(ENHANCE_YOUR_CALM) past one."""

    __slots__ = ("block", "bounds", "continuations", "idle", "partial", "preface", "rates",
                 "replies", "skip")  # fmt: skip

    def __init__(self, bounds: floods.Bounds, clock: Callable[[], float] | None) -> None:
        self.bounds = bounds
        self.rates = floods.Rates(bounds, clock)
        self.preface = len(PREFACE)  # preface bytes still to come (h2 checks them)
        self.partial = b""  # an incomplete frame header
        self.skip = 0  # payload bytes of the current frame still to come
        self.replies = 0  # PING and SETTINGS acks owed since the owner last drained
        self.idle = 0  # frames in a row that carried nothing
        self.block = False  # a header block waits for CONTINUATION
        self.continuations = 0

    def scan(self, data: bytes) -> None:
        self.rates.refill()
        n = len(data)
        i = min(self.preface, n)
        self.preface -= i
        while i < n:
            if self.skip:
                take = min(self.skip, n - i)
                self.skip -= take
                i += take
                continue
            need = 9 - len(self.partial)
            if n - i < need:
                self.partial += data[i:]
                return
            header = self.partial + data[i : i + need]
            self.partial = b""
            i += need
            hi, lo, ftype, flags, _ = unpack_header(header)
            self.skip = hi << 8 | lo
            self._frame(ftype, flags, self.skip)

    def _frame(self, ftype: int, flags: int, length: int) -> None:
        bounds = self.bounds
        if ftype != DATA:
            bounds.check_control_frame(ftype, length)
        idle = False
        if ftype == HEADERS:
            self.block = not flags & END_HEADERS
            self.continuations = 0
        elif ftype == CONTINUATION:
            self.block = not flags & END_HEADERS
            self.continuations += 1
            bounds.check_continuations(self.continuations)
        elif ftype in (SETTINGS, PING) and not flags & ACK:
            if ftype == SETTINGS:
                self.rates.take(floods.SETTINGS)
                bounds.check_settings(length // 6)
            else:
                self.rates.take(floods.PING)
            self.replies += 1
            bounds.check_replies(self.replies)
        elif ftype in (PING, PRIORITY) or ftype > CONTINUATION:
            idle = True  # a PING ack (we send no PINGs), PRIORITY, an unknown type
        elif ftype == DATA and not length and not flags & END_STREAM:
            idle = True
        elif ftype == RST_STREAM:
            self.rates.take(floods.RESET)
        if idle:
            self.rates.take(floods.EMPTY)
            self.idle = bounds.idle_frame(self.idle, "frames that carry nothing")
        else:
            self.idle = 0


def _config(client_side: bool) -> h2.config.H2Configuration:
    return h2.config.H2Configuration(client_side=client_side, header_encoding=None)


def _connection(
    client_side: bool, streams: int, max_header_list: int
) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(_config(client_side))
    codes = h2.settings.SettingCodes
    conn.local_settings = h2.settings.Settings(
        client=client_side,
        initial_values={
            codes.MAX_CONCURRENT_STREAMS: streams,
            codes.MAX_HEADER_LIST_SIZE: max_header_list,
            codes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            codes.ENABLE_PUSH: 0,
        },
    )
    conn.initiate_connection()
    conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
    return conn


def _status(fields: Iterable[tuple[bytes, bytes]]) -> int:
    for name, value in fields:
        if name == b":status":
            return int(value) if value.isdigit() else 0
    return 0


def _text(value: bytes) -> str:
    return value.decode("latin-1")


def _head(sid: int, fields: Fields) -> StreamHead:
    pseudo: dict[bytes, bytes] = {}
    regular: list[tuple[str, str]] = []
    for name, value in fields:
        if name.startswith(b":"):
            pseudo[name] = value
        else:
            regular.append((_text(name), _text(value)))
    target = _text(pseudo.get(b":path", b""))
    path, _, query = target.partition("?")
    first = dict(reversed(regular))
    authority = pseudo.get(b":authority")
    host = _text(authority) if authority is not None else first.get("host", "")
    content_type = first.get("content-type", "")
    return StreamHead(
        sid,
        _text(pseudo.get(b":method", b"")),
        _text(pseudo.get(b":scheme", b"")),
        host,
        target,
        path,
        query,
        tuple(regular),
        content_type.startswith("application/grpc"),
    )


def _with_path(fields: Fields, path: str) -> Fields:
    """The header block with `path` in `:path`, the query kept."""
    if not _PATH.fullmatch(path):
        raise ValueError(f"path {path[:100]!r} is not valid")
    new = path.encode()
    return [(n, new + v[v.find(b"?") :] if b"?" in v else new) if n == b":path" else (n, v)
            for n, v in fields]  # fmt: skip


def _rewrite(fields: Fields, remove: Iterable[str], set_: Sequence[tuple[str, str]]) -> Fields:
    """The header block without the `remove` and `set_` fields, then `set_` appended."""
    drop = {name.lower() for name in remove}
    added: Fields = []
    for name, value in set_:
        lower = name.lower()
        if not _TOKEN.fullmatch(lower) or _UNSAFE_VALUE.search(value):
            raise ValueError(f"header {name!r}: {value!r} is not a valid header field")
        drop.add(lower)
        added.append((lower.encode(), value.encode()))
    framing = drop & _FRAMING
    if framing:
        raise ValueError(f"header {min(framing)!r} frames the message: it cannot be changed")
    dropped = {name.encode() for name in drop}
    return [(n, v) for n, v in fields if n not in dropped] + added


def _move(
    buf: bytearray,
    end: Fields | bool,
    to: h2.connection.H2Connection,
    to_sid: int,
    source: h2.connection.H2Connection,
    source_sid: int,
) -> bool:
    """Send what `buf` holds on `to_sid` as far as `to`'s windows allow, and reopen the window
    of `source_sid` (0: none) by as much; then `end` (True: END_STREAM on the last DATA frame;
    a header list: trailers) once all of it went.  True if the direction ended."""
    while buf:
        n = min(len(buf), to.local_flow_control_window(to_sid), to.max_outbound_frame_size)
        if n <= 0:
            return False
        last = n == len(buf) and end is True
        to.send_data(to_sid, bytes(buf[:n]), end_stream=last)
        del buf[:n]
        if source_sid:
            source.acknowledge_received_data(n, source_sid)
        if last:
            return True
    if end is True:
        to.end_stream(to_sid)
    elif end:
        to.send_headers(to_sid, end, end_stream=True)
    return bool(end)


class Http2Inspector:
    """One inspected HTTP/2 connection (see the module docstring): within `bounds`, `clock`
    (seconds, monotonic) for their rates, request headers of `max_header_list` bytes."""

    def __init__(
        self,
        bounds: floods.Bounds = floods.DEFAULT,
        clock: Callable[[], float] | None = None,
        max_header_list: int = MAX_HEADER_LIST,
    ) -> None:
        self.bounds = bounds
        streams = bounds.streams_per_connection
        self._client = _connection(False, streams, max_header_list)  # faces the client
        self._server = _connection(True, streams, max_header_list)  # faces the workload
        self._streams: dict[int, _Stream] = {}  # by client stream id
        self._by_up: dict[int, _Stream] = {}  # by server stream id
        self._guard = _FloodGuard(bounds, clock)
        self._opened = 0  # streams the client opened
        self._premature = 0  # ... and reset before their response
        self._ended = False
        self.on_status: Callable[[int, int], None] | None = None  # (stream id, final status)

    # -- output -----------------------------------------------------------------------------

    def data_for_client(self) -> bytes:
        """What to write to the client now (and forget it)."""
        return self._client.data_to_send()

    def data_for_server(self) -> bytes:
        """What to write to the server now (and forget it)."""
        return self._server.data_to_send()

    def client_drained(self) -> None:
        """What `data_for_client()` returned reached the client's socket: the acks queued until
        then no longer count as unread (`bounds.unread_replies`)."""
        self._guard.replies = 0

    @property
    def pending_header_block(self) -> bool:
        """The client left a header block open (awaiting CONTINUATION): close the connection
        if it stays so for `bounds.header_block_timeout`."""
        return self._guard.block

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def expire(self, limit: str) -> list[Event]:
        """The owner's clock says the client took too long (a header block left open): end the
        connection with GOAWAY ENHANCE_YOUR_CALM, naming `limit`."""
        events: list[Event] = []
        if not self._ended:
            self._end(f"{limit}: a header block stayed open", events,
                      client_code=ENHANCE_YOUR_CALM, limit=limit)  # fmt: skip
        return events

    # -- client -> server -------------------------------------------------------------------

    def client_data(self, data: bytes) -> list[Event]:
        """Feed bytes the client sent; the StreamHeads they complete, or ConnectionEnded."""
        events: list[Event] = []
        if self._ended:
            return events
        try:
            self._guard.scan(data)
            for ev in self._client.receive_data(data):
                self._client_event(ev, events)
        except ConnError as exc:
            self._end(f"HTTP/2 flood from the client: {exc}", events, client_code=exc.code,
                      limit=exc.limit)  # fmt: skip
        except h2.exceptions.ProtocolError as exc:  # h2 queued the GOAWAY
            self._end(f"HTTP/2 protocol error from the client: {exc}", events)
        except _GoAway as exc:
            self._end(f"the client sent GOAWAY (code {exc})", events)
        return events

    def _client_event(self, ev: h2.events.Event, events: list[Event]) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            fields: Fields = [(bytes(n), bytes(v)) for n, v in ev.headers]
            head = _head(ev.stream_id, fields)
            self._streams[ev.stream_id] = _Stream(ev.stream_id, fields, head.grpc)
            self._opened += 1
            events.append(head)
            return
        if isinstance(ev, h2.events.WindowUpdated):
            for each in self._streams_for(ev.stream_id):
                self._flush_client(each)
            return
        if isinstance(ev, h2.events.RemoteSettingsChanged):
            for each in list(self._streams.values()):
                self._flush_client(each)
            return
        if isinstance(ev, h2.events.ConnectionTerminated):
            raise _GoAway(ev.error_code)
        sid = getattr(ev, "stream_id", 0)
        st = self._streams.get(sid) if sid else None
        if st is None:
            return
        if isinstance(ev, h2.events.DataReceived):
            pad = ev.flow_controlled_length - len(ev.data)
            if st.decision == _DENIED:
                self._client.acknowledge_received_data(ev.flow_controlled_length, sid)
                return
            if pad:
                self._client.acknowledge_received_data(pad, sid)
            st.to_server += ev.data
        elif isinstance(ev, h2.events.TrailersReceived):
            st.to_server_end = [(bytes(n), bytes(v)) for n, v in ev.headers]
        elif isinstance(ev, h2.events.StreamEnded):
            st.client_ended = True
            if not st.to_server_end:
                st.to_server_end = True
        elif isinstance(ev, h2.events.StreamReset):
            if not st.responded:
                self._premature += 1
                self.bounds.check_premature_resets(self._premature, self._opened)
            if st.up:
                self._reset(self._server, st.up, ev.error_code)
            self._forget(st)
            return
        if st.decision == _ALLOWED:
            self._flush_server(st)
        elif st.decision == _DENIED:
            self._maybe_forget(st)

    def _streams_for(self, sid: int) -> list[_Stream]:
        if not sid:
            return list(self._streams.values())
        st = self._streams.get(sid)
        return [st] if st is not None else []

    # -- decisions --------------------------------------------------------------------------

    def allow(
        self,
        stream_id: int,
        remove_headers: Sequence[str] = (),
        set_headers: Sequence[tuple[str, str]] = (),
        path: str = "",
    ) -> None:
        """Send the request on to the server (with `remove_headers` dropped, `set_headers`
        replacing same-named fields and `path`, if given, instead of the one in `:path`, its
        query kept).  A stream the client reset meanwhile is ignored; one the server cannot take
        now (its MAX_CONCURRENT_STREAMS) is refused with REFUSED_STREAM, which clients retry.
        ValueError for a field that is not valid or frames the message."""
        st = self._undecided(stream_id)
        if st is None:
            return
        fields = st.fields
        if path:
            fields = _with_path(fields, path)
        if remove_headers or set_headers:
            fields = _rewrite(fields, remove_headers, set_headers)
        st.decision = _ALLOWED
        server = self._server
        if server.open_outbound_streams >= server.remote_settings.max_concurrent_streams:
            self._reset(self._client, stream_id, REFUSED_STREAM)
            self._forget(st)
            return
        st.up = server.get_next_available_stream_id()
        self._by_up[st.up] = st
        end = st.to_server_end is True and not st.to_server
        server.send_headers(st.up, fields, end_stream=end)
        st.up_sent_end = end
        self._flush_server(st)

    def deny(self, stream_id: int, denial: Denial) -> None:
        """Answer the request here (see `agent.proxy.responses.h2_reply`); the server never sees
        it.  A stream the client reset meanwhile is ignored."""
        st = self._undecided(stream_id)
        if st is None:
            return
        fields, body = h2_reply(denial, grpc=st.grpc)
        st.decision = _DENIED
        if st.to_server:
            self._client.acknowledge_received_data(len(st.to_server), stream_id)
            st.to_server.clear()
        self._client.send_headers(stream_id, fields, end_stream=not body)
        st.responded = True
        if body:
            st.to_client += body
            st.to_client_end = True
            self._flush_client(st)
        else:
            self._client_done(st)

    def _undecided(self, stream_id: int) -> _Stream | None:
        st = self._streams.get(stream_id)
        if st is not None and st.decision != _UNDECIDED:
            raise LocalProtocolError(f"stream {stream_id} was already decided")
        return st

    # -- server -> client -------------------------------------------------------------------

    def server_data(self, data: bytes) -> list[Event]:
        """Feed bytes the server sent; ConnectionEnded if that ended the connection."""
        events: list[Event] = []
        if self._ended:
            return events
        try:
            for ev in self._server.receive_data(data):
                self._server_event(ev)
        except h2.exceptions.ProtocolError as exc:  # h2 queued the GOAWAY
            self._end(f"HTTP/2 protocol error from the server: {exc}", events, INTERNAL_ERROR, None)
        except _GoAway as exc:
            self._end(f"the server sent GOAWAY (code {exc})", events, NO_ERROR, None)
        return events

    def _server_event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.WindowUpdated):
            targets = list(self._by_up.values()) if not ev.stream_id else []
            if ev.stream_id in self._by_up:
                targets.append(self._by_up[ev.stream_id])
            for each in targets:
                self._flush_server(each)
            return
        if isinstance(ev, h2.events.RemoteSettingsChanged):
            for each in list(self._by_up.values()):
                self._flush_server(each)
            return
        if isinstance(ev, h2.events.ConnectionTerminated):
            raise _GoAway(ev.error_code)
        st = self._by_up.get(getattr(ev, "stream_id", 0))
        if st is None:
            return
        if isinstance(ev, h2.events.ResponseReceived | h2.events.InformationalResponseReceived):
            ended = isinstance(ev, h2.events.ResponseReceived) and ev.stream_ended is not None
            self._client.send_headers(st.sid, ev.headers, end_stream=ended)
            if isinstance(ev, h2.events.ResponseReceived):
                st.responded = True
                if self.on_status is not None:
                    self.on_status(st.sid, _status(ev.headers))
            if ended:
                self._client_done(st)
        elif isinstance(ev, h2.events.DataReceived):
            pad = ev.flow_controlled_length - len(ev.data)
            if pad:
                self._server.acknowledge_received_data(pad, st.up)
            st.to_client += ev.data
            self._flush_client(st)
        elif isinstance(ev, h2.events.TrailersReceived):
            st.to_client_end = [(bytes(n), bytes(v)) for n, v in ev.headers]
        elif isinstance(ev, h2.events.StreamEnded):
            if not st.to_client_end:
                st.to_client_end = True
            self._flush_client(st)
        elif isinstance(ev, h2.events.StreamReset):
            self._reset(self._client, st.sid, ev.error_code)
            self._forget(st)

    # -- moving DATA ------------------------------------------------------------------------

    def _flush_server(self, st: _Stream) -> None:
        """Client -> server, as far as the server's windows allow."""
        if not st.up_sent_end and _move(
            st.to_server, st.to_server_end, self._server, st.up, self._client, st.sid
        ):
            st.up_sent_end = True
        self._maybe_forget(st)

    def _flush_client(self, st: _Stream) -> None:
        """Server (or a denial) -> client, as far as the client's windows allow."""
        if not st.sent_end and _move(
            st.to_client, st.to_client_end, self._client, st.sid, self._server, st.up
        ):
            self._client_done(st)

    def _client_done(self, st: _Stream) -> None:
        """The response ended; a denied request still coming is cut short (RST NO_ERROR)."""
        st.sent_end = True
        if st.decision == _DENIED and not st.client_ended:
            self._reset(self._client, st.sid, NO_ERROR)
            self._forget(st)
            return
        self._maybe_forget(st)

    def _maybe_forget(self, st: _Stream) -> None:
        if st.sent_end and st.client_ended and (st.up_sent_end or st.decision == _DENIED):
            self._forget(st)

    def _forget(self, st: _Stream) -> None:
        """Drop the stream; what it held still counts against the connection windows: credit
        it back."""
        self._streams.pop(st.sid, None)
        if st.to_server:
            self._client.acknowledge_received_data(len(st.to_server), st.sid)
            st.to_server.clear()
        if st.up:
            self._by_up.pop(st.up, None)
            if st.to_client:
                self._server.acknowledge_received_data(len(st.to_client), st.up)
                st.to_client.clear()

    @staticmethod
    def _reset(conn: h2.connection.H2Connection, sid: int, code: int) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError):  # closed both ways already
            conn.reset_stream(sid, code)

    def _end(
        self,
        reason: str,
        events: list[Event],
        client_code: int | None = None,
        server_code: int | None = NO_ERROR,
        limit: str = "",
    ) -> None:
        """The end: GOAWAY with these codes to the sides that have not had one (None)."""
        self._ended = True
        if client_code is not None:
            self._client.close_connection(client_code)
        if server_code is not None:
            self._server.close_connection(server_code)
        self._streams.clear()
        self._by_up.clear()
        events.append(ConnectionEnded(reason, limit))
