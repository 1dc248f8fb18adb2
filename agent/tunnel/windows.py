"""Flow control for the HBONE core: Ferry's HTTP/2 settings and what it keeps per stream.

Sized for bulk, in both directions: SETTINGS_MAX_FRAME_SIZE 1 MiB (fewer frames, fewer events)
and a large per-stream initial window.  The windows are also the bounds on what a peer can make
us hold for an app that does not read (`Bounds.stream_window` per stream, default 4 MiB;
`Bounds.connection_window` for all streams of a connection, default 16 MiB; `limits:` in the
config), so they are sized to the buffers we are willing to hold.  The core reopens a stream
window only when the application calls `consumed(stream_id, n)`, i.e. after the bytes went on
into the app socket, and only in batches (a WINDOW_UPDATE once half of the window was consumed):
a slow reader behind the tunnel therefore stops its sender (backpressure end to end), while
other streams of the same connection keep flowing.  The connection window is given back the same
way, in quarters, so that one bulk stream never waits for it.

`StreamState` is one stream as the core sees it: both windows, the consumed bytes not yet given
back, which side half-closed, and whether the response went (server) or came (client).
"""

from __future__ import annotations

from agent.tunnel.floods import Bounds
from agent.tunnel.frames import (
    S_ENABLE_PUSH,
    S_INITIAL_WINDOW_SIZE,
    S_MAX_CONCURRENT_STREAMS,
    S_MAX_FRAME_SIZE,
    S_MAX_HEADER_LIST_SIZE,
)

MAX_FRAME_SIZE = 1 << 20
MAX_HEADER_LIST_SIZE = 16384


def settings(bounds: Bounds) -> tuple[tuple[int, int], ...]:
    """What the core announces, client and server alike."""
    return (
        (S_MAX_FRAME_SIZE, MAX_FRAME_SIZE),
        (S_INITIAL_WINDOW_SIZE, bounds.stream_window),
        (S_MAX_CONCURRENT_STREAMS, bounds.streams_per_connection),
        (S_ENABLE_PUSH, 0),
        (S_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST_SIZE),
    )


class StreamState:
    """One open stream of an `HboneConnection`."""

    __slots__ = (
        "local_closed",
        "recv_window",
        "remote_closed",
        "responded",
        "send_window",
        "unacked",
    )

    def __init__(self, send_window: int, recv_window: int) -> None:
        self.send_window = send_window  # what we may still send (the peer's initial window)
        self.recv_window = recv_window  # what the peer may still send (as we advertised)
        self.unacked = 0  # consumed bytes not yet given back in a WINDOW_UPDATE
        self.local_closed = False  # we sent END_STREAM
        self.remote_closed = False  # the peer sent END_STREAM
        self.responded = False  # the response HEADERS came (client) or went (server)
