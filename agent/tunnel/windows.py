"""Flow control for the HBONE core: Ferry's HTTP/2 settings and what it keeps per stream.

Sized for bulk, in both directions: SETTINGS_MAX_FRAME_SIZE 1 MiB (fewer frames, fewer events),
a large per-stream initial window (STREAM_WINDOW), and a connection window of ~1 GiB so that
only stream windows bound what is in flight.  The core reopens a stream window only when the
application calls `consumed(stream_id, n)`, i.e. after the bytes went on into the app socket, and
only in batches (a WINDOW_UPDATE once half of the window was consumed): a slow reader behind the
tunnel therefore stops its sender (backpressure end to end), while other streams of the same
connection keep flowing.  The connection window is given back the same way, in halves.

`StreamState` is one stream as the core sees it: both windows, the consumed bytes not yet given
back, which side half-closed, and whether the response went (server) or came (client).
"""

from __future__ import annotations

from agent.tunnel.frames import (
    S_ENABLE_PUSH,
    S_INITIAL_WINDOW_SIZE,
    S_MAX_CONCURRENT_STREAMS,
    S_MAX_FRAME_SIZE,
    S_MAX_HEADER_LIST_SIZE,
)

MAX_FRAME_SIZE = 1 << 20
STREAM_WINDOW = 4 << 20
CONNECTION_WINDOW = (1 << 30) - 1
MAX_CONCURRENT_STREAMS = 1000
MAX_HEADER_LIST_SIZE = 16384
SETTINGS = (  # what the core announces, client and server alike
    (S_MAX_FRAME_SIZE, MAX_FRAME_SIZE),
    (S_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
    (S_MAX_CONCURRENT_STREAMS, MAX_CONCURRENT_STREAMS),
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

    def __init__(self, send_window: int) -> None:
        self.send_window = send_window  # what we may still send (the peer's initial window)
        self.recv_window = STREAM_WINDOW  # what the peer may still send (as we advertised)
        self.unacked = 0  # consumed bytes not yet given back in a WINDOW_UPDATE
        self.local_closed = False  # we sent END_STREAM
        self.remote_closed = False  # the peer sent END_STREAM
        self.responded = False  # the response HEADERS came (client) or went (server)
