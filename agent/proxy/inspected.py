"""A relay that reads HTTP: for connections to a port whose policy needs request facts.

`Relay` (splice) never sees a byte; this one does, for the connections that must be decided
per request (a workload port with HTTP rules, a RequestAuthentication or an HTTP rate limit).
It sits where `Relay` would, between the accepted client socket and the upstream socket in the
workload's netns, with the same surface for the worker (`on_event`, `start`, `abort`, `close`,
`connecting`, `bytes_up` / `bytes_down`, `done`, `owner`, the idle and connect marks).

What it does with the bytes, by state:

    SNIFF   the first client bytes say what the traffic is: HTTP/1.x (`looks_like_http1`) goes
            to HTTP1, the HTTP/2 preface (h2c with prior knowledge, gRPC) to H2; anything else,
            or a server that speaks first (a database greeting), is decided once at L4
            (`l4_allowed()`, the policy's TCP semantics) and relayed raw
    HTTP1   an `Http1Inspector` frames requests and responses; each request head is decided
            (`decide(head) -> Allowed | Denied`): allowed heads go upstream (rewritten when the
            JWT rule changes headers), a denial is answered locally (403/401/429, connection
            closed after it); bodies stream through in both directions, never buffered beyond a
            read; an accepted Upgrade or CONNECT turns the connection OPAQUE
    H2      an `Http2Inspector` terminates the client's HTTP/2 and originates its own to the
            server; each stream is decided from its headers, a denied gRPC call answered with
            grpc-status 7 / 16 / 8, other requests with 403 / 401 / 429
    OPAQUE  bytes both ways, untouched

Backpressure: a direction whose queue holds more than HIGH bytes stops reading its source until
the queue drains, so memory per connection stays bounded by about 2 x (HIGH + one read).
Half-close is kept (EOF becomes shutdown(SHUT_WR) once the queue is out); errors reset both ends.

Slow heads (slowloris): `head_since` is when the client's bytes left a request head incomplete
(the first bytes while sniffing, an HTTP/1 head, an HTTP/2 header block), 0 while none is; the
worker's sweep calls `expire_head()` once that is limits.request_header_timeout ago: HTTP/1 (and
sniffing) clients get 408 and the connection is closed, HTTP/2 clients GOAWAY
ENHANCE_YOUR_CALM.  Heads are at most `max_head` bytes (limits.request_header_bytes), HTTP/2
frames within `bounds` (`agent.tunnel.floods`).  A connection ended at a bound says which in
`shed` (a `limits:` key) for the worker to count.
"""

from __future__ import annotations

import collections
import contextlib
import select
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.linux import LINGER_RESET
from agent.proxy.http1 import (
    Forward,
    Http1Inspector,
    LocalReply,
    Opaque,
    ProtocolError,
    RequestHead,
)
from agent.proxy.http2 import ConnectionEnded, Http2Inspector, StreamHead
from agent.proxy.request_policy import Allowed, Denied
from agent.proxy.responses import REQUEST_TIMEOUT_REPLY, http1_reply
from agent.proxy.sniff import looks_like_h2_preface, looks_like_http1
from agent.tunnel.floods import DEFAULT, Bounds

if TYPE_CHECKING:
    from agent.telemetry.recorder import RequestLog

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP
READ = 65536
HIGH = 1 << 20
SNIFF, HTTP1, H2, OPAQUE = range(4)

WatchFn = Callable[[int, int, int], None]


def _is_h2_settings(data: bytes) -> bool:
    """Whether `data` starts like an HTTP/2 server's first frame (SETTINGS on stream 0)."""
    return len(data) >= 9 and data[3] == 4 and data[5:9] == b"\x00\x00\x00\x00"


class _Queue:
    """Bytes waiting for one socket."""

    __slots__ = ("bytes", "chunks", "eof", "shut")

    def __init__(self) -> None:
        self.chunks: collections.deque[bytes | memoryview] = collections.deque()
        self.bytes = 0
        self.eof = False  # the source ended: shut the destination once the queue is out
        self.shut = False

    def put(self, data: bytes | memoryview) -> None:
        if data:
            self.chunks.append(data)
            self.bytes += len(data)

    def send(self, sock: socket.socket) -> int:
        """Send as much as the socket takes; the bytes sent."""
        sent = 0
        chunks = self.chunks
        while chunks:
            head = chunks[0]
            try:
                n = sock.send(head)
            except BlockingIOError:
                break
            sent += n
            if n < len(head):
                chunks[0] = memoryview(head)[n:]
                break
            chunks.popleft()
        self.bytes -= sent
        return sent


class InspectedRelay:
    def __init__(
        self,
        down: socket.socket,
        up: socket.socket,
        *,
        decide: Callable[[str, str, str, str, tuple[tuple[str, str], ...]], Allowed | Denied],
        l4_allowed: Callable[[], bool],
        connecting: bool,
        watch: WatchFn,
        done: Callable[[InspectedRelay], None],
        owner: Any = None,
        bounds: Bounds = DEFAULT,
        max_head: int = 65536,
        requests: RequestLog | None = None,
    ) -> None:
        self.bounds, self.max_head = bounds, max_head
        self.requests = requests  # telemetry: each request's decision, status and time
        self.down, self.up = down, up
        self.fd_down, self.fd_up = down.fileno(), up.fileno()
        self.decide, self.l4_allowed = decide, l4_allowed
        self.connecting = connecting
        self.watch, self.done, self.owner = watch, done, owner
        self.state = SNIFF
        self.sniffed = b""
        self.early = b""  # server bytes that came before the client's first ones
        self.inspector: Http1Inspector | None = None
        self.h2: Http2Inspector | None = None
        self.to_up, self.to_down = _Queue(), _Queue()
        self.closing = False  # a local reply is the last thing the client gets
        self.closed = self.reset = self.connect_failed = False
        self.mask_down = self.mask_up = 0
        self.bytes_up = self.bytes_down = 0
        self.started_at = 0.0
        self.idle_mark = -1
        self.idle_since = 0.0
        self.head_since = 0.0  # when a request head was left incomplete (0: none is)
        self.shed = ""  # the bound (a `limits:` key) it was ended at, if any

    # -- the worker's interface -------------------------------------------------------------

    def start(self) -> None:
        self._update()

    def on_event(self, fd: int, events: int) -> None:
        if self.closed:
            return
        try:
            if fd == self.fd_up:
                if self.connecting:
                    if self.up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        self.connect_failed = True
                        self.abort()
                        return
                    self.connecting = False
                if events & EPOLLERR:
                    raise ConnectionResetError("upstream error")
                if events & (EPOLLIN | EPOLLHUP) and not self.to_down.eof:
                    self._from_up()
            else:
                if events & EPOLLERR:
                    raise ConnectionResetError("client error")
                if events & (EPOLLIN | EPOLLHUP) and not self.to_up.eof:
                    self._from_down()
            self._update()
        except OSError:
            self.abort()

    def expire_head(self) -> None:
        """The client took limits.request_header_timeout for a head: 408 (HTTP/2: GOAWAY),
        then close."""
        if self.closed:
            return
        self.shed = "request_header_timeout"
        self.head_since = 0.0
        try:
            if self.h2 is not None:
                self._h2_events(self.h2.expire(self.shed))
            else:
                self._reply(REQUEST_TIMEOUT_REPLY)
            self._update()
        except OSError:
            self.abort()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.requests is not None:
            self.requests.ended()
        if self.mask_down:
            self.watch(self.fd_down, self.mask_down, 0)
        if self.mask_up:
            self.watch(self.fd_up, self.mask_up, 0)
        self.mask_down = self.mask_up = 0
        self.down.close()
        self.up.close()
        self.done(self)

    def abort(self) -> None:
        if self.closed:
            return
        self.reset = True
        for sock in (self.down, self.up):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        self.close()

    # -- client -> server -------------------------------------------------------------------

    def _from_down(self) -> None:
        data = self.down.recv(READ)
        if not data:
            self.to_up.eof = True
            if self.state == SNIFF:
                if not self.sniffed:  # closed without a byte: nothing to decide on
                    self.close()
                    return
                self._opaque_if_allowed()
            return
        if self.closing:
            return  # after a local reply, nothing more is read into the server
        if self.state == SNIFF:
            self.sniffed += data
            h2, http = looks_like_h2_preface(self.sniffed), looks_like_http1(self.sniffed)
            if h2:
                self.state = H2
                self.h2 = Http2Inspector(self.bounds, time.monotonic, self.max_head)
                if self.requests is not None:
                    self.h2.on_status = self.requests.responded
            elif http:
                self.state, self.inspector = HTTP1, Http1Inspector(self.max_head)
                if self.requests is not None:
                    self.inspector.on_status = self.requests.responded
            elif h2 is None or http is None:
                self._head_pending(True)
                return  # more bytes needed to tell
            else:
                self._opaque_if_allowed()
                return
            data, self.sniffed = self.sniffed, b""
            if self.early:  # what the server sent before: now it can be read
                early, self.early = self.early, b""
                if self.h2 is not None:
                    self._h2_events(self.h2.server_data(early))
                else:
                    self.to_down.put(early)
        if self.state == OPAQUE:
            self.to_up.put(data)
            self._head_pending(False)
        elif self.h2 is not None:
            self._h2_events(self.h2.client_data(data))
            self._head_pending(self.h2.pending_header_block)
        else:
            assert self.inspector is not None
            self._handle(self.inspector.client_data(data))
            inspector = self.inspector
            self._head_pending(inspector is not None and inspector.head_pending)

    def _head_pending(self, pending: bool) -> None:
        """Start the request head clock at the first read that leaves a head incomplete."""
        if not pending:
            self.head_since = 0.0
        elif not self.head_since:
            self.head_since = time.monotonic()

    def _opaque_if_allowed(self) -> None:
        """Not HTTP/1 (or the server spoke first): the L4 decision, then raw bytes."""
        if not self.l4_allowed():
            raise ConnectionRefusedError("denied at L4")
        self.state = OPAQUE
        self.head_since = 0.0
        self.to_up.put(self.sniffed)
        self.to_down.put(self.early)
        self.sniffed = self.early = b""

    def _handle(self, events: list[Any]) -> None:
        inspector = self.inspector
        assert inspector is not None
        for event in events:
            match event:
                case RequestHead():
                    path = event.path or event.target
                    verdict = self.decide(event.method, path, event.query, event.host,
                                          event.headers)  # fmt: skip
                    traced = () if self.requests is None else self.requests.decided(
                        None, event.method, path, event.host, event.headers, verdict)  # fmt: skip
                    if isinstance(verdict, Denied):
                        reply = http1_reply(verdict.denial, head=event.method == "HEAD")
                        self._reply(inspector.deny(event.request_id, reply))
                        return  # the rest of these events are void
                    set_headers = verdict.set_headers + traced if traced else verdict.set_headers
                    self.to_up.put(inspector.allow(event.request_id, verdict.remove_headers,
                                                   set_headers, verdict.path))  # fmt: skip
                case Forward(data=data, to_server=to_server):
                    (self.to_up if to_server else self.to_down).put(data)
                case LocalReply(data=data):
                    self._reply(data)
                case Opaque(to_server=held):
                    self.to_up.put(held)
                    self.state = OPAQUE
                    self.inspector = None
                case ProtocolError(reply=reply):
                    self._reply(reply)
                    return

    def _h2_events(self, events: list[StreamHead | ConnectionEnded]) -> None:
        h2 = self.h2
        assert h2 is not None
        for event in events:
            if isinstance(event, StreamHead):
                path = event.path or event.target
                verdict = self.decide(event.method, path, event.query, event.authority,
                                      event.headers)  # fmt: skip
                traced = (
                    ()
                    if self.requests is None
                    else self.requests.decided(
                        event.stream_id, event.method, path, event.authority, event.headers, verdict
                    )
                )
                if isinstance(verdict, Denied):
                    h2.deny(event.stream_id, verdict.denial)
                else:
                    h2.allow(event.stream_id, verdict.remove_headers,
                             verdict.set_headers + traced if traced else verdict.set_headers,
                             verdict.path)  # fmt: skip
            else:
                self.closing = True  # write out the GOAWAYs, then close
                self.shed = self.shed or event.limit
        self.to_up.put(h2.data_for_server())
        self.to_down.put(h2.data_for_client())
        if self.closing and not self.to_down.bytes:
            self.to_down.put(b"")

    def _reply(self, data: bytes) -> None:
        """A local answer: the last bytes the client gets; close once it is out."""
        if data:
            self.to_down.put(data)
            self.closing = True

    # -- server -> client -------------------------------------------------------------------

    def _from_up(self) -> None:
        data = self.up.recv(READ)
        if not data:
            self.to_down.eof = True
            return
        if self.state == SNIFF:
            if _is_h2_settings(self.early + data):
                self.early += data  # an HTTP/2 server greets first: wait for the client
                return
            self._opaque_if_allowed()  # a server that speaks first (a database): not HTTP
        if self.state == OPAQUE:
            self.to_down.put(data)
        elif self.h2 is not None:
            self._h2_events(self.h2.server_data(data))
        else:
            assert self.inspector is not None
            self._handle(self.inspector.server_data(data))

    # -- writing ----------------------------------------------------------------------------

    def _flush_up(self) -> None:
        if self.connecting:
            return
        self.bytes_up += self.to_up.send(self.up)
        if self.to_up.eof and not self.to_up.bytes and not self.to_up.shut:
            self.up.shutdown(socket.SHUT_WR)
            self.to_up.shut = True

    def _flush_down(self) -> None:
        self.bytes_down += self.to_down.send(self.down)
        if self.h2 is not None and not self.to_down.bytes:
            self.h2.client_drained()
        if self.to_down.eof and not self.to_down.bytes and not self.to_down.shut:
            self.down.shutdown(socket.SHUT_WR)
            self.to_down.shut = True

    def _update(self) -> None:
        if self.closed:
            return
        self._flush_up()
        self._flush_down()
        up, down = self.to_up, self.to_down
        if self.closing and not down.bytes:
            self.close()
            return
        if up.shut and down.shut:
            self.close()
            return
        m = 0 if up.eof or self.closing or up.bytes > HIGH else EPOLLIN
        if down.bytes:
            m |= EPOLLOUT
        if m != self.mask_down:
            self.watch(self.fd_down, self.mask_down, m)
            self.mask_down = m
        if self.connecting:
            m = EPOLLOUT
        else:
            m = 0 if down.eof or down.bytes > HIGH else EPOLLIN
            if up.bytes:
                m |= EPOLLOUT
        if m != self.mask_up:
            self.watch(self.fd_up, self.mask_up, m)
            self.mask_up = m
