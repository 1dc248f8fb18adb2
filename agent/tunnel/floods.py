"""Flood bounds of the HTTP/2 cores: what a peer may make a connection queue, or do for nothing.

A peer can keep to RFC 9113 and still make a connection queue replies it never reads, or burn CPU
on frames that do nothing.  Like nghttp2 and Envoy, the cores (`agent.tunnel.hbone`, and the
inspector's guard in `agent.proxy.http2`) count such frames in plain integers and ask `Bounds`
whether one was passed; past one, it raises `ConnError(ENHANCE_YOUR_CALM)` naming the bound
(`ConnError.limit`, the config key of `limits:`), which the core answers with GOAWAY
ENHANCE_YOUR_CALM (0xb) and `TunnelProtocolError`, so the connection ends within one read of the
bound.  Every bound is a field of `Bounds` (defaults here; `agent.config.LimitsConfig` sets
them), listed with the rest of the proxy's limits in docs/limits.md.

| attack                              | bound                                                    |
| ----------------------------------- | -------------------------------------------------------- |
| PING / SETTINGS flood, unread       | `unread_replies` queued (PING and SETTINGS acks,         |
| replies, refused-stream flood       | RST_STREAMs and refusals the peer caused) until the      |
|                                     | owner reports them sent (`drained()`); nghttp2's         |
|                                     | max_outbound_ack, Envoy's max_outbound_control_frames    |
| PING / SETTINGS / RST_STREAM /      | `ping_rate`, `settings_rate`, `reset_rate`,              |
| empty-frame flood, replies read     | `empty_frame_rate` per second (`Rates`: token buckets    |
|                                     | with one second's worth of burst, on the owner's clock)  |
| SETTINGS with many entries          | `settings_entries` per frame (nghttp2's max_settings)    |
| Rapid Reset (CVE-2023-44487)        | streams reset by the peer before we answered them: half  |
|                                     | of max(`rapid_reset_streams`, streams it opened)         |
|                                     | (Envoy's premature-reset heuristic, without the clock)   |
| CONTINUATION flood (CVE-2024-27316) | `header_block_frames` CONTINUATIONs per header block     |
|                                     | (nghttp2), `header_block_bytes`                          |
| empty DATA, PRIORITY, unknown types | `empty_frames_in_a_row` that carry nothing (also PING    |
|                                     | acks we never asked for, header blocks for closed        |
|                                     | streams); Envoy's empty-payload and PRIORITY limits      |
| huge control frames                 | `max_control_frame` bytes, refused before being buffered |
| header block never completed        | `header_block_timeout` seconds; the core has no clock    |
|                                     | for it, it says `pending_header_block` and its owner     |
|                                     | closes the connection                                    |

Legitimate peers stay far below every bound: HBONE sends one small header block per stream,
acks a handful of SETTINGS, never PINGs more than a keepalive, and reads what it is sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agent.tunnel.frames import ENHANCE_YOUR_CALM, ConnError

PING, SETTINGS, RESET, EMPTY = range(4)  # the frame kinds `Rates` counts
_RATED = (
    ("ping_rate", "PING frames"),
    ("settings_rate", "SETTINGS frames"),
    ("reset_rate", "RST_STREAM frames"),
    ("empty_frame_rate", "frames that carry nothing"),
)


@dataclass(frozen=True, slots=True)
class Bounds:
    """What one peer may make one HTTP/2 connection hold or do (field names: `limits:` keys)."""

    unread_replies: int = 1000
    settings_entries: int = 32
    rapid_reset_streams: int = 500
    header_block_frames: int = 8
    header_block_bytes: int = 65536
    header_block_timeout: float = 10.0
    empty_frames_in_a_row: int = 100
    ping_rate: int = 100
    settings_rate: int = 100
    reset_rate: int = 1000
    empty_frame_rate: int = 1000
    streams_per_connection: int = 100
    stream_window: int = 4 << 20
    connection_window: int = 16 << 20

    @property
    def max_control_frame(self) -> int:
        """The largest non-DATA frame taken: a whole header block, priority fields, padding."""
        return self.header_block_bytes + 6 + 256

    def idle_frame(self, before: int, what: str) -> int:
        """The number of idle frames in a row, with one more after `before` of them."""
        if before >= self.empty_frames_in_a_row:
            raise ConnError(ENHANCE_YOUR_CALM, f"{before + 1} {what} (or other idle frames) in a"
                            " row", "empty_frames_in_a_row")  # fmt: skip
        return before + 1

    def check_replies(self, replies: int) -> None:
        if replies > self.unread_replies:
            raise ConnError(
                ENHANCE_YOUR_CALM,
                f"{replies} replies (acks, resets, refusals) queued for a peer that does not read"
                f" them (at most {self.unread_replies})",
                "unread_replies",
            )

    def check_premature_resets(self, premature: int, opened: int) -> None:
        """`premature` of the `opened` streams of the peer were reset by it before our answer."""
        if premature * 2 >= max(self.rapid_reset_streams, opened):
            raise ConnError(
                ENHANCE_YOUR_CALM,
                f"{premature} of {opened} streams reset by the peer before the response"
                " (Rapid Reset)",
                "rapid_reset_streams",
            )

    def check_settings(self, entries: int) -> None:
        if entries > self.settings_entries:
            raise ConnError(
                ENHANCE_YOUR_CALM,
                f"{entries} SETTINGS entries in one frame (at most {self.settings_entries})",
                "settings_entries",
            )

    def check_continuations(self, frames: int) -> None:
        if frames > self.header_block_frames:
            raise ConnError(
                ENHANCE_YOUR_CALM,
                f"{frames} CONTINUATION frames for one header block (at most "
                f"{self.header_block_frames})",
                "header_block_frames",
            )

    def check_control_frame(self, ftype: int, length: int) -> None:
        if length > self.max_control_frame:
            raise ConnError(
                ENHANCE_YOUR_CALM,
                f"frame of type {ftype} and {length} bytes (at most {self.max_control_frame})",
                "header_block_bytes",
            )


DEFAULT = Bounds()


class Rates:
    """Frames a peer may send only so often, per connection: one token bucket per kind (PING,
    SETTINGS, RESET, EMPTY), one second's worth of burst, refilled from `clock` when the core
    is fed (`refill`).  Without a clock (a core driven by tests) nothing is rate-limited."""

    __slots__ = ("_clock", "_rates", "_stamp", "_tokens")

    def __init__(self, bounds: Bounds, clock: Callable[[], float] | None) -> None:
        self._rates = tuple(getattr(bounds, key) for key, _ in _RATED)
        self._tokens = [float(rate) for rate in self._rates]
        self._clock = clock
        self._stamp = clock() if clock is not None else 0.0

    def refill(self) -> None:
        clock = self._clock
        if clock is None:
            return
        now = clock()
        elapsed = now - self._stamp
        if elapsed <= 0:
            return
        self._stamp = now
        tokens = self._tokens
        for kind, rate in enumerate(self._rates):
            tokens[kind] = min(rate, tokens[kind] + elapsed * rate)

    def take(self, kind: int) -> None:
        """One frame of `kind`; raises ConnError(ENHANCE_YOUR_CALM) past its rate."""
        if self._clock is None:
            return
        left = self._tokens[kind] - 1
        if left < 0:
            key, what = _RATED[kind]
            raise ConnError(ENHANCE_YOUR_CALM, f"more than {self._rates[kind]} {what} a second",
                            key)  # fmt: skip
        self._tokens[kind] = left
