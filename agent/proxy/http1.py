"""HTTP/1.1 inspection, sans I/O: request heads out for a decision, every byte passed on as is.

`Http1Inspector` sits on one proxied connection whose workload port has HTTP policies.  The owner
feeds it what the client sent (`client_data`) and what the server sent (`server_data`); both
return events, in order, from one set, and the owner handles them the same way whichever call
produced them:

    RequestHead   a request head, complete; decide, then call `allow(request_id, ...)` (returns
                  the bytes to send upstream: the head, re-serialized only when headers or the
                  path change, and whatever of its body already came) or `deny(request_id,
                  reply)` (returns the reply to write to the client now, or b"" when earlier
                  responses are still on their way: it then comes later as LocalReply); deny
                  closes the connection
    Forward       bytes to pass on untouched, `to_server` says which way (request bodies of
                  allowed requests, responses); `data` may be a view of the bytes that were fed
                  (feed `bytes`, as `recv` returns them: a view keeps them alive; a reused
                  bytearray must stay unchanged until the view was written out)
    LocalReply    the reply of a denied request, now that the responses before it went out:
                  write it to the client, then close
    Opaque        the server accepted an Upgrade (101) or a CONNECT (2xx): send `to_server` (client
                  bytes held meanwhile), then relay both directions raw (splice); stop feeding
    ProtocolError a malformed request (or response): write `reply` (a 400, or b"" when the client
                  cannot be answered cleanly any more) and close

Requests are decided in order, all before the next `client_data` (LocalProtocolError
otherwise): a read that carries several pipelined requests yields a RequestHead for each, and
the inspector holds each request's bytes (its head and as much of its body as came in that read)
until the owner decided it.  Body bytes that arrive once their request was allowed go out at once
as Forward events, zero copy, whatever the size: nothing is buffered beyond one read.  `deny`
ends the connection: the rest of the event list it came in is void, everything the client sends
afterwards is dropped, and the reply waits until the server answered the requests allowed before
it (HTTP/1.1 answers in order).  What follows a request with `Connection: close` is dropped too;
empty lines between requests are skipped.  After an Upgrade or CONNECT request the client's
further bytes are held (at most MAX_HELD) until the server answers: 101 / 2xx make the
connection Opaque; anything else (a refused upgrade) and inspection goes on with the held bytes
as the next request.

How it parses.  httptools, the Python binding of llhttp, checks every request head and body and
reads the response heads.  llhttp is Node.js's HTTP parser, maintained by the Node.js project
(security fixes included), C at gigabytes per second, strict by default (no bare LF, no
obs-fold, no Content-Length together with Transfer-Encoding, no duplicate Content-Length, strict
chunk syntax) and built for a stream: pipelined messages and chunked bodies are parsed as the
bytes come, never reassembled.  h11, the sans-IO model for this module's shape, is pure Python
(a regular expression and Python objects per line), many times llhttp's microsecond per head,
and this inspector is on the per-request hot path.  httptools does not say where in the input a
message ends, so the inspector frames messages itself with strict scanners and makes llhttp
confirm every boundary (`agent.proxy.http1_framing`): two parsers that disagree on where a
request ends are what request smuggling is made of, and any disagreement is a ProtocolError.
On top of llhttp, requests are refused (400) for: versions other than 1.0/1.1, a request line
with more than two spaces, HTTP/1.1 without exactly one Host, a Transfer-Encoding other than a
single `chunked` or in HTTP/1.0, an Upgrade or CONNECT request with a body, a fragment or
userinfo in the target, heads over `max_head` bytes (limits.request_header_bytes).  Responses
are framed the same way, with the rules of RFC 9112 section 6.3 (HEAD, 1xx, 204, 304 have no
body; no length means until the server closes); a malformed response ends the connection.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple

import httptools

from agent.proxy.http1_framing import (
    MAX_HEAD,
    Body,
    Callbacks,
    Head,
    Malformed,
    check_end,
    feed,
    feed_body,
    framing,
    retarget,
    rewrite,
)
from agent.proxy.responses import BAD_REQUEST_REPLY

MAX_HELD = 64 * 1024  # client bytes held while an Upgrade / CONNECT waits for its answer
_READ_FIELDS = frozenset(
    (b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade")
)

# what a request asks for beyond one exchange
_PLAIN, _UPGRADE, _CONNECT = range(3)


class LocalProtocolError(Exception):
    """The owner misused the inspector (decided out of order, fed bytes with a decision
    pending, fed an opaque connection); nothing changed."""


class RequestHead(NamedTuple):
    """A complete request head, waiting for `allow` or `deny` (in `request_id` order)."""

    request_id: int  # 1, 2, ... on this connection
    method: str
    target: str  # as sent: origin-form, absolute-form, authority-form (CONNECT) or "*"
    path: str  # the target's path, without the query (raw, not normalized); "" for CONNECT
    query: str  # without the "?"
    host: str  # the Host header; the authority of an absolute-form or CONNECT target
    headers: tuple[tuple[str, str], ...]  # (lower-case name, value) in order, latin-1 decoded
    version: str  # "1.1" or "1.0"
    keep_alive: bool  # another request may follow this one
    upgrade: str  # lower-case Upgrade protocol of an Upgrade request ("websocket"), else ""


class Forward(NamedTuple):
    """Bytes to pass on untouched: to the server if `to_server`, else to the client.  `data` may
    be a view of the buffer given to `client_data` / `server_data`."""

    data: bytes | memoryview
    to_server: bool


class LocalReply(NamedTuple):
    """The reply to a denied request, after the responses before it: write it, then close."""

    data: bytes


class Opaque(NamedTuple):
    """Upgrade / CONNECT accepted: send `to_server`, then relay both directions raw."""

    to_server: bytes


class ProtocolError(NamedTuple):
    """Malformed traffic (`reason` names it): write `reply` to the client (may be b""), close."""

    reason: str
    reply: bytes


Event = RequestHead | Forward | LocalReply | Opaque | ProtocolError


def _target(method: str, target: str, host: str | None) -> tuple[str, str, str]:
    """(path, query, host) of a request target (RFC 9112 section 3.2)."""
    if "#" in target:
        raise Malformed(f"request target {target[:100]!r} has a fragment")
    if method == "CONNECT":
        if "/" in target or "@" in target:
            raise Malformed(f"CONNECT target {target[:100]!r} is not host:port")
        return "", "", target
    if target.startswith("/"):
        path, _, query = target.partition("?")
        return path, query, host or ""
    if target == "*":
        if method != "OPTIONS":
            raise Malformed(f"target * with method {method}")
        return "*", "", host or ""
    scheme, sep, rest = target.partition("://")
    end = min(k for k in (rest.find("/"), rest.find("?"), len(rest)) if k >= 0)
    authority = rest[:end]
    if not sep or scheme.lower() not in ("http", "https") or not authority or "@" in authority:
        raise Malformed(f"request target {target[:100]!r}")
    path, _, query = rest[end:].partition("?")
    return path or "/", query, authority


def _with_path(head: RequestHead, path: str) -> str:
    """The request target of `head` with `path` in place of its path (query, scheme and
    authority kept)."""
    target = head.target
    end = target.find("?")
    end = len(target) if end < 0 else end
    start = end - len(head.path)
    if not head.path or target[start:end] != head.path:
        raise ValueError(f"request target {target[:100]!r} has no path to replace")
    return target[:start] + path + target[end:]


class _Request:
    """A request being read or waiting for its decision, and its bytes held meanwhile."""

    __slots__ = ("decided", "head", "held", "kind", "raw")

    def __init__(self, head: RequestHead, raw: bytes, kind: int) -> None:
        self.head = head
        self.raw = raw  # the head as it came
        self.kind = kind
        self.held = bytearray()  # body bytes that came before the decision
        self.decided = False


class Http1Inspector:
    """One inspected HTTP/1.1 connection (see the module docstring); request heads of at most
    `max_head` bytes."""

    def __init__(self, max_head: int = MAX_HEAD) -> None:
        self._next_id = 1
        self._queue: deque[_Request] = deque()  # undecided, in order
        self._opaque = False
        # client -> server
        self._req_cb = Callbacks()
        self._req_parser = httptools.HttpRequestParser(self._req_cb)
        self._req_head = Head(max_head)
        self._reading: tuple[_Request, Body] | None = None  # a request body being read
        self._client_open = True  # False: drop what the client sends (denied, closing, error)
        self._held: bytearray | None = None  # what followed an Upgrade / CONNECT request
        # server -> client
        self._resp_cb = Callbacks()
        self._resp_parser = httptools.HttpResponseParser(self._resp_cb)
        self._resp_head = Head()
        self._resp_body: Body | None = None
        self._outstanding: deque[tuple[bool, int]] = deque()  # allowed: (HEAD?, kind)
        self._reply: bytes | None = None  # a denial waiting for the responses before it
        self._server_open = True
        self.on_status: Callable[[None, int], None] | None = None  # told each final status

    @property
    def head_pending(self) -> bool:
        """Part of a request head came, not all of it (a slow client, or a slowloris)."""
        return self._req_head.pending

    # -- client -> server -------------------------------------------------------------------

    def client_data(self, data: bytes | bytearray) -> list[Event]:
        """Feed bytes the client sent; the events they complete."""
        self._check_open()
        if self._queue:
            raise LocalProtocolError(
                f"decide request {self._queue[0].head.request_id} before feeding more bytes"
            )
        events: list[Event] = []
        if not self._client_open:
            return events
        if self._held is None:
            self._client_bytes(data, events)
        elif len(self._held) + len(data) > MAX_HELD:
            reason = f"over {MAX_HELD} bytes sent before the answer to an Upgrade or CONNECT"
            self._client_error(reason, events)
        else:
            self._held += data
        return events

    def _client_bytes(self, data: bytes | bytearray, events: list[Event]) -> None:
        try:
            self._parse_requests(data, events)
        except Malformed as exc:
            self._client_error(str(exc), events)

    def _parse_requests(self, data: bytes | bytearray, events: list[Event]) -> None:
        i = 0
        n = len(data)
        while i < n:
            if self._reading is None:
                raw, i = self._req_head.take(data, i)
                if raw is None:
                    return
                req = self._request(raw)
                events.append(req.head)
                if self._reading is not None:
                    continue
            else:
                req, body = self._reading
                end = body.feed(data, i)
                feed_body(self._req_parser, self._req_cb, data, i, end, body.done)
                if req.decided:
                    events.append(Forward(memoryview(data)[i:end], True))
                else:
                    req.held += data[i:end]
                i = end
                if not body.done:
                    return
                self._reading = None
            if req.kind != _PLAIN:  # what follows waits for the server's answer
                self._held = bytearray(data[i:])
                return
            if not req.head.keep_alive:
                self._client_open = False
                return

    def _request(self, raw: bytes) -> _Request:
        """Parse and check a request head; it waits for its decision."""
        cb = self._req_cb
        cb.reset()
        parser = self._req_parser
        upgrading = feed(parser, raw)
        if not cb.head_done:
            raise Malformed("llhttp did not end the head at CRLF CRLF")
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise Malformed(f"HTTP version {version}")
        line = raw[: raw.index(b"\r\n")]
        if line.count(b" ") != 2:
            raise Malformed(f"request line {line[:100]!r}")
        method = parser.get_method().decode()
        headers = []
        hosts = []
        length = codings = b""
        connection = upgrade = ""
        for name, value in cb.headers:
            lower = name.lower()
            text = value.decode("latin-1")
            headers.append((lower.decode(), text))
            if lower in _READ_FIELDS:
                if lower == b"host":
                    hosts.append(text)
                elif lower == b"content-length":
                    length = value
                elif lower == b"transfer-encoding":
                    codings = codings + b"," + value if codings else value
                elif lower == b"connection":
                    connection += "," + text.lower()
                else:
                    upgrade = text.lower()
        if len(hosts) > 1 or (not hosts and version == "1.1"):
            raise Malformed(f"HTTP/{version} request with {len(hosts)} Host headers")
        if codings and version == "1.0":
            raise Malformed("Transfer-Encoding in an HTTP/1.0 request")
        body = framing(length, codings, request=True)
        target = cb.url.decode("latin-1")
        path, query, host = _target(method, target, hosts[0] if hosts else None)
        kind = _CONNECT if method == "CONNECT" else _UPGRADE if upgrading else _PLAIN
        if kind == _PLAIN:
            check_end(cb, body is None)
        else:
            if body is not None:
                raise Malformed(f"{method} request asking to switch protocols has a body")
            # llhttp stays paused after an upgrade: a refused one goes on with a fresh parser
            self._req_parser = httptools.HttpRequestParser(cb)
        tokens = {t.strip() for t in connection.split(",")} if connection else ()
        # RFC 9112 section 9.3 (llhttp forgets it once the message completed)
        keep_alive = "close" not in tokens if version == "1.1" else "keep-alive" in tokens
        head = RequestHead(
            self._next_id,
            method,
            target,
            path,
            query,
            host,
            tuple(headers),
            version,
            keep_alive,
            upgrade if kind == _UPGRADE else "",
        )
        self._next_id += 1
        req = _Request(head, raw, kind)
        self._queue.append(req)
        if body is not None:
            self._reading = (req, body)
        return req

    def _client_error(self, reason: str, events: list[Event]) -> None:
        """Malformed client bytes: forget undecided requests; a 400 unless the client is owed
        a response or an allowed request is half sent (then the connection just closes)."""
        reading = self._reading
        clean = not self._outstanding and (reading is None or not reading[0].decided)
        self._queue.clear()
        self._client_open = self._server_open = False
        self._held = None
        events[:] = [e for e in events if not isinstance(e, RequestHead)]
        events.append(ProtocolError(reason, BAD_REQUEST_REPLY if clean else b""))

    # -- decisions --------------------------------------------------------------------------

    def allow(
        self,
        request_id: int,
        remove_headers: Sequence[str] = (),
        set_headers: Sequence[tuple[str, str]] = (),
        path: str = "",
    ) -> bytes:
        """Let the request go: the bytes to send upstream now (its head, with `remove_headers`
        dropped and `set_headers` replacing same-named fields, `path` (if given) instead of the
        target's path, its query kept, and its body so far).  ValueError for a field that is
        not valid or that frames the message (FRAMING_HEADERS), or a path that is not valid."""
        req = self._undecided(request_id)
        raw = req.raw
        if path and path != req.head.path:
            raw = retarget(raw, _with_path(req.head, path))
        if remove_headers or set_headers:
            raw = rewrite(raw, remove_headers, set_headers)
        self._queue.popleft()
        req.decided = True
        self._outstanding.append((req.head.method == "HEAD", req.kind))
        if not req.held:
            return raw
        raw += req.held
        req.held = bytearray()
        return raw

    def deny(self, request_id: int, reply: bytes) -> bytes:
        """Refuse the request: `reply` if it can go to the client now, else b"" (it comes as
        LocalReply after the responses before it).  Close the connection after the reply; what
        the client sent after this request is dropped."""
        self._undecided(request_id)
        self._queue.clear()
        self._client_open = False
        self._held = None
        self._reading = None
        if self._outstanding:
            self._reply = reply
            return b""
        self._server_open = False
        return reply

    def _undecided(self, request_id: int) -> _Request:
        self._check_open()
        if not self._queue:
            raise LocalProtocolError(f"request {request_id} is not waiting for a decision")
        req = self._queue[0]
        if req.head.request_id != request_id:
            raise LocalProtocolError(
                f"decide request {req.head.request_id} before request {request_id}"
            )
        return req

    # -- server -> client -------------------------------------------------------------------

    def server_data(self, data: bytes | bytearray) -> list[Event]:
        """Feed bytes the server sent; the events they complete (mostly one Forward)."""
        self._check_open()
        events: list[Event] = []
        if not self._server_open:
            return events
        try:
            self._parse_responses(data, events)
        except Malformed as exc:
            self._client_open = self._server_open = False
            self._queue.clear()
            # the requests a refused upgrade let through in this read cannot be decided now
            events[:] = [e for e in events if not isinstance(e, RequestHead)]
            events.append(ProtocolError(f"response: {exc}", b""))
        return events

    def _parse_responses(self, data: bytes | bytearray, events: list[Event]) -> None:
        i = start = 0  # data[start:i] is parsed and not yet in a Forward event
        n = len(data)
        view = memoryview(data)
        while i < n:
            body = self._resp_body
            if body is None:
                raw, i = self._resp_head.take(data, i)
                if raw is None:
                    break
                kind = self._outstanding[0][1] if self._outstanding else _PLAIN
                status = self._response(raw, kind)
                if self.on_status is not None and (status >= 200 or status == 101):
                    self.on_status(None, status)
                if self._opaque:
                    early = bytes(self._held or b"")
                    self._held = None
                    events += (Forward(view[start:], False), Opaque(early))
                    return
                if status >= 200 and kind != _PLAIN and self._held is not None:
                    # the server refused to switch: the client's bytes are HTTP again
                    if start < i:
                        events.append(Forward(view[start:i], False))
                    start = i
                    held, self._held = self._held, None
                    self._client_bytes(held, events)
                    if not self._server_open:
                        return
                if status < 200 or self._resp_body is not None:
                    continue
            else:
                end = body.feed(data, i)
                feed_body(self._resp_parser, self._resp_cb, data, i, end, body.done)
                i = end
                if not body.done:
                    break
                self._resp_body = None
            if self._outstanding:  # a final response ended
                self._outstanding.popleft()
            if not self._outstanding and self._reply is not None:
                if start < i:
                    events.append(Forward(view[start:i], False))
                events.append(LocalReply(self._reply))
                self._server_open = False
                return
        if start < n:
            events.append(Forward(view[start:], False))

    def _response(self, raw: bytes, kind: int) -> int:
        """Parse a response head (to a request of `kind`) and set its framing; its status."""
        cb = self._resp_cb
        cb.reset()
        parser = self._resp_parser
        upgrading = feed(parser, raw)
        if not cb.head_done:
            raise Malformed("llhttp did not end the head at CRLF CRLF")
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise Malformed(f"HTTP version {version}")
        status: int = parser.get_status_code()
        if status == 101 or (kind == _CONNECT and 200 <= status < 300):
            if status == 101 and kind != _UPGRADE:
                raise Malformed("101 Switching Protocols to a request that did not ask for it")
            self._opaque = True
            return status
        if upgrading:
            raise Malformed(f"llhttp switched protocols on status {status}")
        if self._outstanding and self._outstanding[0][0] and status >= 200:
            # a response to HEAD has no body, which llhttp cannot be told: a fresh parser
            self._resp_parser = httptools.HttpResponseParser(cb)
            return status
        if status < 200 or status == 204 or status == 304:
            self._resp_body = None
        else:
            length = codings = b""
            for name, value in cb.headers:
                if len(name) == 14 or len(name) == 17:  # the only names that frame a body
                    lower = name.lower()
                    if lower == b"content-length":
                        length = value
                    elif lower == b"transfer-encoding":
                        codings = codings + b"," + value if codings else value
            self._resp_body = framing(length, codings, request=False)
        check_end(cb, self._resp_body is None)
        return status

    def _check_open(self) -> None:
        if self._opaque:
            raise LocalProtocolError("the connection is opaque (Opaque event): relay it raw")
