"""HBONE, sans I/O: HTTP/2 CONNECT tunnels over one (TLS) byte stream; bytes in, events out.

The shape is Istio's HBONE: ALPN `h2`, one HTTP/2 stream per tunnelled TCP connection, a request
`:method CONNECT` with `:authority` = `ip:port` (`[v6]:port`) and no `:scheme` / `:path`; a `200`
response accepts the stream, anything else refuses it.  DATA frames carry the TCP payload,
END_STREAM is a TCP half-close (FIN), RST_STREAM a TCP reset, GOAWAY ends the connection.

`HboneConnection` wraps python-hyper `h2` (itself sans-IO) the way h11 is used: feed it what the
socket read (`receive(data)` -> list of events), ask it for what to write (`data_to_send()`), and
tell it what the application wants (`open_stream`, `accept`, `refuse`, `send_data`, `end_stream`,
`reset`, `consumed`, `close`).  It never touches a socket.

Bulk settings, in both directions: SETTINGS_MAX_FRAME_SIZE 1 MiB (fewer frames, fewer events),
a large per-stream initial window, and a connection window of ~1 GiB so that only stream windows
bound what is in flight.  A stream window is reopened only when the application calls
`consumed(stream_id, n)`, i.e. after the bytes went on into the app socket: a slow reader behind
the tunnel therefore stops its sender (backpressure end to end), while other streams of the same
connection keep flowing.

Every protocol violation by the peer (bad frames, bad headers, flow-control abuse) surfaces as
one exception, `TunnelProtocolError`; the connection should then be closed after sending whatever
`data_to_send()` holds (usually a GOAWAY).
"""

from __future__ import annotations

import contextlib
import ipaddress
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack.exceptions
import hyperframe.exceptions

MAX_FRAME_SIZE = 1 << 20
STREAM_WINDOW = 4 << 20
CONNECTION_WINDOW = (1 << 30) - 1
MAX_CONCURRENT_STREAMS = 1000
MAX_HEADER_LIST_SIZE = 16384

_Settings = h2.settings.SettingCodes


class TunnelProtocolError(Exception):
    """The peer broke HTTP/2 or the HBONE rules; the connection is unusable."""


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
    """Payload for the stream; call `consumed(stream_id, len(data))` once it was delivered."""

    stream_id: int
    data: bytes


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

_PEER_ERRORS: tuple[type[Exception], ...] = (
    h2.exceptions.H2Error,
    hyperframe.exceptions.HyperframeError,
    hpack.exceptions.HPACKError,
    UnicodeDecodeError,
    ValueError,
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


class HboneConnection:
    """One HBONE connection, client (`client=True`, opens streams) or server (accepts them)."""

    def __init__(self, client: bool) -> None:
        self.client = client
        config = h2.config.H2Configuration(
            client_side=client, header_encoding="utf-8", validate_inbound_headers=True
        )
        self._h2 = h2.connection.H2Connection(config)
        self._h2.initiate_connection()
        self._h2.update_settings(
            {
                _Settings.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
                _Settings.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                _Settings.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                _Settings.ENABLE_PUSH: 0,
                _Settings.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
            }
        )
        # Accept big frames at once (being lenient before our SETTINGS are acked is harmless).
        self._h2.max_inbound_frame_size = MAX_FRAME_SIZE
        self._h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._refused: set[int] = set()
        self.ended = False

    # -- input ------------------------------------------------------------------------------

    def receive(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes read from the peer; return what happened.  Raises TunnelProtocolError."""
        try:
            h2_events = self._h2.receive_data(data)
        except _PEER_ERRORS as exc:
            self.ended = True
            raise TunnelProtocolError(f"HTTP/2 protocol error from the peer: {exc}") from exc
        out: list[Event] = []
        for ev in h2_events:
            self._translate(ev, out)
        return out

    def _translate(self, ev: Any, out: list[Event]) -> None:
        if isinstance(ev, h2.events.DataReceived):
            sid = ev.stream_id
            padding = ev.flow_controlled_length - len(ev.data)
            if padding:
                self._ack(padding, sid)
            if ev.data:
                out.append(Data(sid, ev.data))
        elif isinstance(ev, h2.events.WindowUpdated):
            out.append(WindowOpened(ev.stream_id))
        elif isinstance(ev, h2.events.StreamEnded):
            if ev.stream_id in self._refused:
                self._refused.discard(ev.stream_id)
            else:
                out.append(StreamEnded(ev.stream_id))
        elif isinstance(ev, h2.events.RequestReceived):
            self._on_request(ev, out)
        elif isinstance(ev, h2.events.ResponseReceived):
            status = _header(ev.headers, ":status")
            sid = ev.stream_id
            if status == "200":
                out.append(StreamAccepted(sid))
            else:
                code = int(status) if status and status.isdigit() else 502
                if ev.stream_ended:
                    self._refused.add(sid)  # swallow the StreamEnded that follows
                    with contextlib.suppress(h2.exceptions.H2Error):
                        self._h2.end_stream(sid)  # close our side too: the stream is done
                else:
                    self._safe_reset(sid, h2.errors.ErrorCodes.CANCEL)
                out.append(StreamRefused(sid, code))
        elif isinstance(ev, h2.events.StreamReset):
            self._refused.discard(ev.stream_id)
            out.append(StreamReset(ev.stream_id, int(ev.error_code or 0)))
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            if _Settings.INITIAL_WINDOW_SIZE in ev.changed_settings:
                out.append(WindowOpened(0))
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.ended = True
            out.append(ConnectionEnded(int(ev.error_code or 0), int(ev.last_stream_id or 0)))
        elif isinstance(ev, h2.events.TrailersReceived):
            self._safe_reset(ev.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            out.append(StreamReset(ev.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR))
        # Pings, settings acks, priority, informational responses: h2 handles them.

    def _on_request(self, ev: h2.events.RequestReceived, out: list[Event]) -> None:
        sid = ev.stream_id
        method = _header(ev.headers, ":method")
        authority = _header(ev.headers, ":authority")
        if method != "CONNECT" or not authority or _header(ev.headers, ":protocol") is not None:
            self.refuse(sid, 405 if method != "CONNECT" else 400)
            return
        if ev.stream_ended:  # a CONNECT that already half-closed before it was accepted
            self.refuse(sid, 400)
            return
        out.append(StreamRequested(sid, authority))

    # -- output -----------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        return self._h2.data_to_send()

    def open_stream(self, authority: str) -> int:
        """Client: send a CONNECT for `authority`; returns the stream id."""
        sid = self._h2.get_next_available_stream_id()
        self._h2.send_headers(sid, [(":method", "CONNECT"), (":authority", authority)])
        return sid

    def accept(self, stream_id: int) -> None:
        """Server: answer 200; the tunnel is open."""
        self._h2.send_headers(stream_id, [(":status", "200")])

    def refuse(self, stream_id: int, status: int) -> None:
        """Server: answer `status` (403 not allowed, 503 cannot connect) and end the stream."""
        try:
            self._h2.send_headers(stream_id, [(":status", str(status))], end_stream=True)
        except h2.exceptions.H2Error:
            self._safe_reset(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)

    def send_window(self, stream_id: int) -> int:
        """How many payload bytes `send_data` takes now (0: wait for WindowOpened)."""
        try:
            return self._h2.local_flow_control_window(stream_id)
        except h2.exceptions.H2Error:
            return 0

    def send_data(self, stream_id: int, data: bytes | memoryview) -> None:
        """Send payload; `len(data)` must not exceed `send_window(stream_id)`."""
        frame = self._h2.max_outbound_frame_size
        n = len(data)
        if n <= frame:
            self._h2.send_data(stream_id, data)
            return
        view = memoryview(data)
        for start in range(0, n, frame):
            self._h2.send_data(stream_id, view[start : start + frame])

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction of the stream (no-op if the stream is gone)."""
        with contextlib.suppress(h2.exceptions.H2Error):
            self._h2.end_stream(stream_id)

    def reset(self, stream_id: int, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Abort the stream (no-op if it is gone)."""
        self._refused.discard(stream_id)
        self._safe_reset(stream_id, error_code)

    def consumed(self, stream_id: int, n: int) -> None:
        """`n` bytes of this stream's Data reached the app: reopen that much window."""
        self._ack(n, stream_id)

    def close(self, error_code: int = 0) -> None:
        """Send GOAWAY (once)."""
        if not self.ended:
            self.ended = True
            with contextlib.suppress(h2.exceptions.H2Error):
                self._h2.close_connection(error_code)

    @property
    def open_streams(self) -> int:
        return int(self._h2.open_outbound_streams + self._h2.open_inbound_streams)

    @property
    def can_open(self) -> bool:
        """Client: room for one more stream under the peer's MAX_CONCURRENT_STREAMS."""
        h = self._h2
        return not self.ended and h.open_outbound_streams < h.remote_settings.max_concurrent_streams

    def _ack(self, n: int, stream_id: int) -> None:
        # A closed stream: only the connection window matters (and it is huge).
        with contextlib.suppress(h2.exceptions.H2Error):
            self._h2.acknowledge_received_data(n, stream_id)

    def _safe_reset(self, stream_id: int, code: int) -> None:
        with contextlib.suppress(h2.exceptions.H2Error):
            self._h2.reset_stream(stream_id, code)


def _header(headers: Any, name: str) -> str | None:
    for key, value in headers or ():
        if key == name:
            return str(value)
    return None
