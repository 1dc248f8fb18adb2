"""Flood bounds of the HBONE core: what a peer may make us queue, or do for nothing.

A peer can keep to RFC 9113 and still make a connection queue replies it never reads, or burn CPU
on frames that do nothing.  Like nghttp2 and Envoy, the core (`agent.tunnel.hbone`) counts such
frames in plain integers and asks the functions here whether a bound was passed; past one, they
raise `ConnError(ENHANCE_YOUR_CALM)`, which the core answers with GOAWAY ENHANCE_YOUR_CALM (0xb)
and `TunnelProtocolError`, so the connection ends within one read of the bound.

| attack                              | bound                                                    |
| ----------------------------------- | -------------------------------------------------------- |
| PING / SETTINGS flood, unread       | MAX_OUTBOUND_CONTROL replies queued (PING and SETTINGS   |
| replies, refused-stream flood       | acks, RST_STREAMs and refusals the peer caused) until    |
|                                     | the owner reports them sent (`drained()`); nghttp2's     |
|                                     | max_outbound_ack, Envoy's max_outbound_control_frames    |
| SETTINGS with many entries          | MAX_SETTINGS_ENTRIES per frame (nghttp2's max_settings)  |
| Rapid Reset (CVE-2023-44487)        | streams reset by the peer before we answered them: half  |
|                                     | of max(PREMATURE_RESET_STREAMS, streams it opened)       |
|                                     | (Envoy's premature-reset heuristic, without the clock)   |
| CONTINUATION flood (CVE-2024-27316) | MAX_CONTINUATIONS frames per header block (nghttp2),     |
|                                     | MAX_HEADER_BLOCK bytes                                   |
| empty DATA, PRIORITY, unknown types | MAX_IDLE_FRAMES in a row that carry nothing (also PING   |
|                                     | acks we never asked for, header blocks for closed        |
|                                     | streams); Envoy's empty-payload and PRIORITY limits      |
| huge control frames                 | MAX_CONTROL_FRAME bytes, refused before being buffered   |
| header block never completed        | HEADER_BLOCK_TIMEOUT seconds; the core has no clock, it  |
|                                     | says `pending_header_block` and its owner, which has     |
|                                     | one, closes the connection                               |

Legitimate peers stay far below every bound: HBONE sends one small header block per stream,
acks a handful of SETTINGS, and reads what it is sent.
"""

from __future__ import annotations

from agent.tunnel.frames import ENHANCE_YOUR_CALM, ConnError

MAX_OUTBOUND_CONTROL = 1000
MAX_SETTINGS_ENTRIES = 32
PREMATURE_RESET_STREAMS = 500
MAX_CONTINUATIONS = 8
MAX_IDLE_FRAMES = 100
MAX_HEADER_BLOCK = 65536
MAX_CONTROL_FRAME = MAX_HEADER_BLOCK + 6 + 256  # a whole header block, priority fields, padding
HEADER_BLOCK_TIMEOUT = 10.0


def idle_frame(before: int, what: str) -> int:
    """The number of idle frames in a row, with one more after `before` of them."""
    if before >= MAX_IDLE_FRAMES:
        raise ConnError(ENHANCE_YOUR_CALM, f"{before + 1} {what} (or other idle frames) in a row")
    return before + 1


def check_replies(replies: int) -> None:
    if replies > MAX_OUTBOUND_CONTROL:
        raise ConnError(
            ENHANCE_YOUR_CALM,
            f"{replies} replies (acks, resets, refusals) queued for a peer that does not read"
            f" them (at most {MAX_OUTBOUND_CONTROL})",
        )


def check_premature_resets(premature: int, opened: int) -> None:
    """`premature` of the `opened` streams of the peer were reset by it before our answer."""
    if premature * 2 >= max(PREMATURE_RESET_STREAMS, opened):
        raise ConnError(
            ENHANCE_YOUR_CALM,
            f"{premature} of {opened} streams reset by the peer before the response (Rapid Reset)",
        )


def check_settings(entries: int) -> None:
    if entries > MAX_SETTINGS_ENTRIES:
        raise ConnError(
            ENHANCE_YOUR_CALM,
            f"{entries} SETTINGS entries in one frame (at most {MAX_SETTINGS_ENTRIES})",
        )


def check_continuations(frames: int) -> None:
    if frames > MAX_CONTINUATIONS:
        raise ConnError(
            ENHANCE_YOUR_CALM,
            f"{frames} CONTINUATION frames for one header block (at most {MAX_CONTINUATIONS})",
        )


def check_control_frame(ftype: int, length: int) -> None:
    if length > MAX_CONTROL_FRAME:
        raise ConnError(
            ENHANCE_YOUR_CALM,
            f"frame of type {ftype} and {length} bytes (at most {MAX_CONTROL_FRAME})",
        )
