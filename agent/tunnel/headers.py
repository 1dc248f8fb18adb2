"""HBONE header blocks: reassembly, HPACK-decoded fields and the rules of the CONNECT exchange.

`HeaderBlock` collects a HEADERS frame and its CONTINUATION frames (nothing else may come in
between, RFC 9113 section 6.10), bounded in bytes and in frames (`Bounds.header_block_bytes`,
`Bounds.header_block_frames` of `agent.tunnel.floods`: empty CONTINUATION frames cost nothing
to send and something to handle).  The complete block is decoded with `hpack` into one dict,
the first value of each name; a pseudo-header that comes twice is recorded under `:invalid` so
that the request is refused rather than half-read.

A request opens a tunnel when it is an HTTP/2 CONNECT (RFC 9113 section 8.5): `:method CONNECT`
and an `:authority`, lowercase names, no `:protocol` (extended CONNECT is not HBONE) and no
END_STREAM (a tunnel that is closed before it opens carries nothing).  Anything else is refused
with a status, 405 for another method and 400 for the rest.  A response is its `:status`, three
digits; a response without one is treated by the core as a failed tunnel (502).
"""

from __future__ import annotations

import hpack

from agent.tunnel.floods import DEFAULT, Bounds
from agent.tunnel.frames import (
    COMPRESSION_ERROR,
    END_STREAM,
    FRAME_SIZE_ERROR,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    ConnError,
    unpad,
)


class HeaderBlock:
    """The header block being received; `sid` is 0 while there is none."""

    __slots__ = ("bounds", "buf", "end_stream", "frames", "sid")

    def __init__(self, bounds: Bounds = DEFAULT) -> None:
        self.bounds = bounds
        self.sid = 0
        self.end_stream = False  # the HEADERS frame carried END_STREAM
        self.frames = 0  # CONTINUATION frames so far
        self.buf = bytearray()

    def start(self, sid: int, flags: int, body: memoryview) -> None:
        """A HEADERS frame: its fragment, without padding and priority fields."""
        if not sid:
            raise ConnError(PROTOCOL_ERROR, "HEADERS on stream 0")
        fragment = unpad(body, flags)
        if flags & PRIORITY_FLAG:
            if len(fragment) < 5:
                raise ConnError(FRAME_SIZE_ERROR, "HEADERS too short for its priority fields")
            fragment = fragment[5:]
        self.sid = sid
        self.end_stream = bool(flags & END_STREAM)
        self.frames = 0
        self.buf.clear()
        self._add(fragment)

    def add(self, sid: int, body: memoryview) -> None:
        """A CONTINUATION frame."""
        if not self.sid or sid != self.sid:
            raise ConnError(PROTOCOL_ERROR, f"CONTINUATION on stream {sid} without HEADERS")
        self.frames += 1
        self.bounds.check_continuations(self.frames)
        self._add(body)

    def _add(self, fragment: memoryview) -> None:
        self.buf += fragment
        most = self.bounds.header_block_bytes
        if len(self.buf) > most:
            raise ConnError(PROTOCOL_ERROR, f"header block over {most} bytes", "header_block_bytes")

    def take(self) -> bytes:
        """The complete block (END_HEADERS came); `sid` is 0 again."""
        self.sid = 0
        block = bytes(self.buf)
        self.buf.clear()
        return block


def decode(decoder: hpack.Decoder, block: bytes) -> dict[str, str]:
    """The fields of a header block; a bad block is a connection error (COMPRESSION_ERROR)."""
    try:
        headers = decoder.decode(block, raw=False)
    except (hpack.HPACKError, UnicodeDecodeError, ValueError) as exc:
        raise ConnError(COMPRESSION_ERROR, f"bad header block: {exc}") from None
    fields: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name, value = str(raw_name), str(raw_value)
        if name in fields and name.startswith(":"):
            fields[":invalid"] = name
        fields.setdefault(name, value)
    return fields


def request_refusal(fields: dict[str, str], ended: bool) -> int:
    """0 if the request asks for a tunnel, else the status to refuse it with."""
    if ":invalid" in fields or any(k.lower() != k for k in fields):
        return 400
    if fields.get(":method") != "CONNECT":
        return 405
    if not fields.get(":authority") or ":protocol" in fields or ended:
        return 400
    return 0


def response_status(fields: dict[str, str]) -> int:
    """The `:status` of a response; 0 if it is missing or not three digits."""
    status = fields.get(":status", "")
    return int(status) if len(status) == 3 and status.isdigit() else 0
