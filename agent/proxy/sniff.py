"""Which inspector a proxied connection's first bytes call for: HTTP/1.x, HTTP/2 or none (pure).

`agent.proxy.inspected` holds a connection's first client bytes until these answer.
`looks_like_http1`: a method llhttp accepts, a space, and a first line ending in ` HTTP/1.1` or
` HTTP/1.0` and CRLF within MAX_HEAD bytes, for `agent.proxy.http1`.  `looks_like_h2_preface`:
the HTTP/2 client connection preface, as h2c with prior knowledge and gRPC begin, for
`agent.proxy.http2`.  Both answer None while the bytes so far could still match (more bytes
needed); traffic that matches neither gets the L4 decision.  These checks only choose: the
target and the headers are not looked at here; the chosen inspector parses strictly and refuses
what is malformed.
"""

from __future__ import annotations

from agent.proxy.http1_framing import MAX_HEAD

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
METHODS = frozenset(  # what llhttp accepts as an HTTP method
    b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH"
    b" SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY"
    b" SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE QUERY".split()
)
_LONGEST_METHOD = max(map(len, METHODS))


def looks_like_http1(first: bytes) -> bool | None:
    """Whether a connection starting with `first` speaks HTTP/1.x (None: need more bytes)."""
    space = first.find(b" ", 0, _LONGEST_METHOD + 1)
    if space < 0:
        if len(first) > _LONGEST_METHOD or not any(m.startswith(first) for m in METHODS):
            return False
        return None
    if first[:space] not in METHODS:
        return False
    eol = first.find(b"\n", space, MAX_HEAD)
    if eol < 0:
        return None if len(first) < MAX_HEAD else False
    return first[:eol].endswith((b" HTTP/1.1\r", b" HTTP/1.0\r"))


def looks_like_h2_preface(first: bytes) -> bool | None:
    """Whether a connection starting with `first` is HTTP/2 with prior knowledge (h2c, gRPC)."""
    if len(first) < len(H2_PREFACE):
        return None if H2_PREFACE.startswith(first) else False
    return first.startswith(H2_PREFACE)
