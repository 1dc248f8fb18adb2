"""What the HBONE core (`agent.tunnel.hbone`) reports: events from the peer, and its two errors.

`HboneConnection.receive()` returns a list of these events, in wire order.  Errors are split as in
h11: `TunnelProtocolError` is the peer's fault (the core queued a GOAWAY with `code`; close the
connection once that is sent), `LocalProtocolError` the caller's (a bug: nothing was sent, the
state is unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass


class TunnelProtocolError(Exception):
    """The peer broke HTTP/2 or the HBONE rules, or flooded us; the connection is unusable.

    `code` is the HTTP/2 error code of the GOAWAY queued for the peer (0xb ENHANCE_YOUR_CALM for
    a flood); `limit` names the bound a flood passed (a `limits:` key), else it is ""."""

    def __init__(self, msg: str, code: int, limit: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.limit = limit


class LocalProtocolError(Exception):
    """The caller asked the core for something HTTP/2 forbids (more than the send window, a
    stream beyond the peer's limit or after GOAWAY); nothing was queued."""


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
