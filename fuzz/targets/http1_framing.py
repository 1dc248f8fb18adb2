"""Where an HTTP/1.1 head and a chunked body end (`agent.proxy.http1_framing`), read by read.

Input: the reads of a head followed by a chunked body.  Contract: `Head.take` and `Body.feed`
raise nothing but `Malformed`; a head is at most MAX_HEAD bytes and ends in CRLF CRLF; and
however the bytes are cut into reads, the head, where the body ends and whether the bytes are
malformed come out the same (the proxy reads a socket: a smuggler controls the cuts).
"""

from __future__ import annotations

from agent.proxy.http1_framing import MAX_HEAD, Head, Malformed, framing
from fuzz.harness import main
from fuzz.inputs import join, reads

Outcome = tuple[bytes | None, int, bool] | str


def _frame(pieces: list[bytes]) -> Outcome:
    """(the head, how many bytes the head and body took, whether the body ended), or
    "malformed"."""
    head_reader, body, head = Head(), framing(b"", b"chunked", request=True), None
    assert body is not None
    used = 0
    try:
        for piece in pieces:
            i = 0
            if head is None and piece:
                head, i = head_reader.take(piece, 0)
            if head is not None and i < len(piece) and not body.done:
                i = body.feed(piece, i)
            used += i
            if body.done:
                break
    except Malformed:
        return "malformed"
    assert head is None or (len(head) <= MAX_HEAD and head.endswith(b"\r\n\r\n")), head
    return head, used, body.done


def check(data: bytes) -> None:
    pieces = reads(data)
    whole = _frame([b"".join(pieces)])
    assert _frame(pieces) == whole, (_frame(pieces), whole)


def seeds() -> dict[str, bytes]:
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"5;name=value\r\nhello\r\n10\r\n" + bytes(range(16)) + b"\r\n0\r\nTrailer: t\r\n\r\n"
    return {
        "whole": head + body,
        "cut-everywhere": join([head[:10], head[10:], body[:3], body[3:20], body[20:]]),
        "empty-lines-first": join([b"\r\n\r\n", head + b"0\r\n\r\n"]),
        "pipelined-after": head + body + b"GET / HTTP/1.1\r\n\r\n",
        "hex-sizes": head + b"fF\r\n" + b"x" * 255 + b"\r\n0\r\n\r\n",
        "bad-size": head + b"-1\r\n\r\n",
        "bare-cr": head + b"5\rx\r\nhello\r\n0\r\n\r\n",
        "no-crlf-after-data": head + b"2\r\nhello\r\n",
        "cr-cut": join([head + b"2\r", b"\nok\r", b"\n0\r\n\r", b"\n"]),
    }


if __name__ == "__main__":
    main(check)
