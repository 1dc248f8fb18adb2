"""Where an HTTP/1.1 message ends, read strictly, and llhttp made to agree (sans I/O).

The framing half of the inspector in `agent.proxy.http1`.  httptools (llhttp) checks every head
and body but does not say where in the input a message ends, so the inspector frames messages
itself with the scanners here and makes llhttp confirm every boundary:

- `Head` collects one head across reads: it skips empty lines before a message and ends the head
  at the first CRLF CRLF (llhttp accepts no other line ending), at most `most` bytes (MAX_HEAD
  by default; limits.request_header_bytes for requests); `pending` while a head is incomplete;
- `framing(content_length, transfer_encoding, request)` says how the body ends (RFC 9112
  section 6): None for no body, else a `Body` that counts Content-Length, scans chunked framing
  strictly (hex sizes of at most 16 digits, every line ending in CRLF and no other CR, a
  chunk-size line within MAX_CHUNK_LINE, trailers within MAX_HEAD) or runs until the close.  A
  request accepts a single `chunked` coding and nothing else; a response without a length runs
  until the server closes;
- `feed` and `feed_body` give llhttp exactly the bytes of one message, and `check_end` demands
  that llhttp began that one message and completed it exactly where the scanner ended it
  (`Callbacks` records what llhttp reported).  Two parsers that disagree on where a request ends
  are what request smuggling is made of: any disagreement raises `Malformed`, which the
  inspector answers with a ProtocolError.

The scanners move an index through the bytes they are given and copy no body byte: only a head
still incomplete at the end of a read and an incomplete chunk-size or trailer line are kept.

`rewrite` re-serializes a request head whose headers the policy changes: every other line stays
as it came, and a field that frames the message (FRAMING_HEADERS) cannot be changed, so the
server reads the framing this module read.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import httptools

MAX_HEAD = 64 * 1024  # a request or response head, CRLF CRLF included
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions
FRAMING_HEADERS = frozenset(("content-length", "transfer-encoding", "connection", "upgrade"))
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_UNSAFE_VALUE = re.compile(r"[\r\n\x00]")
_TARGET = re.compile(r"[\x21-\x7e]+")  # visible ASCII, no space (RFC 9112 section 3.2)
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_CONTENT = re.compile(rb"[^\r\n]")
# how a body ends: a length, the close, or chunked framing (in stages)
_LENGTH, _UNTIL_CLOSE, _SIZE, _DATA, _DATA_END, _TRAILER = range(6)


class Malformed(Exception):
    """The bytes break HTTP/1.1 or Ferry's stricter rules (the inspector answers ProtocolError)."""


class Callbacks:
    """What llhttp reports for one message (httptools calls these during `feed_data`)."""

    __slots__ = ("begun", "completed", "head_done", "headers", "url")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.begun = 0
        self.completed = 0
        self.head_done = False
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:  # afterwards: trailers, passed on unread
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_message_complete(self) -> None:
        self.completed += 1


def feed(
    parser: httptools.HttpRequestParser | httptools.HttpResponseParser, data: bytes | memoryview
) -> bool:
    """Feed llhttp; True if it paused for an upgrade (Upgrade, CONNECT, 101)."""
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        return True
    except httptools.HttpParserError as exc:
        raise Malformed(str(exc) or type(exc).__name__) from None
    return False


def check_end(cb: Callbacks, final: bool) -> None:
    """llhttp must have begun this one message and complete it exactly where Ferry's framing
    ends it: anything else means the two read the message differently (smuggling)."""
    if cb.begun != 1 or cb.completed != final:
        where = "did not end the message at" if final else "ended the message before"
        raise Malformed(f"ambiguous message framing: llhttp {where} the end of its body")


def feed_body(
    parser: httptools.HttpRequestParser | httptools.HttpResponseParser,
    cb: Callbacks,
    data: bytes | bytearray,
    i: int,
    end: int,
    final: bool,
) -> None:
    """Body bytes data[i:end] to llhttp, which must agree on whether the body ended."""
    if feed(parser, memoryview(data)[i:end]):
        raise Malformed("llhttp switched protocols inside a body")
    check_end(cb, final)


class Head:
    """Collects one head across reads: skips empty lines before it, ends at CRLF CRLF."""

    __slots__ = ("buf", "most")

    def __init__(self, most: int = MAX_HEAD) -> None:
        self.buf = bytearray()
        self.most = most

    @property
    def pending(self) -> bool:
        """Part of a head came, not all of it."""
        return bool(self.buf)

    def take(self, data: bytes | bytearray, i: int) -> tuple[bytes | None, int]:
        """(the complete head or None, where the input continues); data[i:] is not empty."""
        buf = self.buf
        most = self.most
        n = len(data)
        if not buf:
            if data[i] == 13 or data[i] == 10:  # empty lines before a message are ignored
                first = _CONTENT.search(data, i)
                if first is None:
                    return None, n
                i = first.start()
            end = data.find(b"\r\n\r\n", i, i + most)
            if end >= 0:
                return bytes(data[i : end + 4]), end + 4
            if n - i >= most:
                raise Malformed(f"head longer than {most} bytes")
            buf += data[i:]
            return None, n
        had = len(buf)
        buf += data[i : i + most - had]
        end = buf.find(b"\r\n\r\n", max(0, had - 3))
        if end < 0:
            if len(buf) >= most:
                raise Malformed(f"head longer than {most} bytes")
            return None, n
        head = bytes(buf[: end + 4])
        buf.clear()
        return head, i + end + 4 - had


class Body:
    """Where a body ends in the raw bytes: a length, chunked framing (strict), or the close."""

    __slots__ = ("done", "left", "line", "stage", "trailers")

    def __init__(self, stage: int, left: int = 0) -> None:
        self.stage = stage
        self.left = left  # _LENGTH: bytes to come; _DATA: bytes of this chunk to come
        self.done = False
        self.line = b""  # an incomplete chunk-size, chunk-end or trailer line
        self.trailers = 0  # trailer bytes so far

    def feed(self, data: bytes | bytearray, i: int) -> int:
        """Consume body bytes from data[i:]; where the body stopped (`done`) or len(data)."""
        if self.stage == _LENGTH:
            take = min(self.left, len(data) - i)
            self.left -= take
            self.done = not self.left
            return i + take
        if self.stage == _UNTIL_CLOSE:
            return len(data)
        return self._chunked(data, i)

    def _chunked(self, data: bytes | bytearray, i: int) -> int:
        n = len(data)
        while i < n:
            if self.stage == _DATA:
                take = min(self.left, n - i)
                i += take
                self.left -= take
                if not self.left:
                    self.stage = _DATA_END
                continue
            j = data.find(b"\n", i, n)
            line = self.line + data[i : n if j < 0 else j + 1]
            limit = MAX_HEAD - self.trailers if self.stage == _TRAILER else MAX_CHUNK_LINE
            if len(line) > limit:
                raise Malformed(f"chunk line or trailers longer than {limit} bytes")
            if j < 0:
                self.line = bytes(line)
                return n
            self.line = b""
            i = j + 1
            if line[-2:] != b"\r\n" or b"\r" in line[:-2]:
                raise Malformed(f"chunked framing line {bytes(line[:40])!r} does not end in CRLF")
            if self.stage == _DATA_END:
                if len(line) != 2:
                    raise Malformed(f"chunk data followed by {bytes(line[:40])!r}, not CRLF")
                self.stage = _SIZE
            elif self.stage == _SIZE:
                size = line[:-2].split(b";", 1)[0]
                if not _HEX.fullmatch(size):
                    raise Malformed(f"chunk size {bytes(size[:40])!r}")
                self.left = int(size, 16)
                self.stage = _DATA if self.left else _TRAILER
            elif len(line) == 2:
                self.done = True
                return i
            else:
                self.trailers += len(line)
        return i


def framing(length: bytes, codings: bytes, request: bool) -> Body | None:
    """The body of a message with these Content-Length and Transfer-Encoding values (b"":
    absent; several Transfer-Encoding fields joined with commas), RFC 9112 section 6."""
    if codings:
        names = [c.strip().lower() for c in codings.split(b",")]
        if request and names != [b"chunked"]:
            raise Malformed(f"Transfer-Encoding {codings!r}: only chunked is accepted")
        return Body(_SIZE if names[-1] == b"chunked" else _UNTIL_CLOSE)
    if length:
        size = int(length)  # llhttp accepted only digits
        return Body(_LENGTH, size) if size else None
    return None if request else Body(_UNTIL_CLOSE)


def retarget(raw: bytes, target: str) -> bytes:
    """The request head with `target` in its request line instead of the one sent."""
    if not _TARGET.fullmatch(target):
        raise ValueError(f"request target {target[:100]!r} is not valid")
    line_end = raw.index(b"\r\n")
    method, _, version = raw[:line_end].split(b" ")
    return b" ".join((method, target.encode(), version)) + raw[line_end:]


def rewrite(raw: bytes, remove: Sequence[str], set_: Sequence[tuple[str, str]]) -> bytes:
    """The head with the `remove` and `set_` fields dropped, then `set_` appended; every other
    line as it came."""
    drop = {name.lower() for name in remove}
    added = []
    for name, value in set_:
        if not _TOKEN.fullmatch(name) or _UNSAFE_VALUE.search(value):
            raise ValueError(f"header {name!r}: {value!r} is not a valid header field")
        drop.add(name.lower())
        added.append(f"{name}: {value}".encode())
    framing = drop & FRAMING_HEADERS
    if framing:
        raise ValueError(f"header {min(framing)!r} frames the message: it cannot be changed")
    lowered = raw.lower()
    if not any(b"\r\n" + name.encode() + b":" in lowered for name in drop):  # only additions
        return raw[:-2] + b"".join(line + b"\r\n" for line in added) + b"\r\n"
    lines = raw[:-4].split(b"\r\n")
    kept = [lines[0]]
    kept += (ln for ln in lines[1:] if ln[: ln.index(b":")].decode().lower() not in drop)
    return b"\r\n".join(kept + added) + b"\r\n\r\n"
