"""One tunnel connection over a real socket: TCP, TLS 1.3 (`TlsBio`), HBONE (`HboneConnection`).

Driven by the proxy worker's level-triggered epoll loop, like `agent.proxy.relay.Relay`: a
`TunnelConn` gets `on_event(fd, events)` for its socket and reports the interest it wants through
`host.watch(fd, old_mask, new_mask)`.  The `Host` (the worker) decides policy (which streams to
accept, where to connect, what to count); the connection and its streams
(`agent.tunnel.stream.TunnelStream`) only move bytes.

Life: TCP connect (client) -> TLS handshake -> peer identity check (`agent.tunnel.tls`) -> HBONE.
Client streams added before the handshake is done, or while the peer's
SETTINGS_MAX_CONCURRENT_STREAMS is reached, wait in `queued` and are opened as soon as they can.

In: one readiness event reads up to READ_ROUNDS buffers of ciphertext (fairness between
connections); the complete records of each are decrypted into one plaintext buffer
(`Buffers.tls`), fed to the core in one call, and its events are dispatched to the streams: DATA
payloads are views of that buffer and go straight into the app sockets.

Out: streams do not send themselves.  Frames collect in the core's `out` buffer (frames of every
stream) and the stream asks for `flush_soon()`; the host flushes each such connection once per
batch of epoll events, so many small responses share one TLS write and one send.  Bulk DATA skips
`out`: a stream encrypts header + payload straight from the app buffer with `write_frames` (after
whatever `out` held, so the order is kept).  While more than OUT_HIGH bytes of ciphertext wait for
the socket the connection is congested and its streams stop reading their app sockets; they
resume when it drains.

Floods: what the core bounds itself is in `agent.tunnel.floods` (the connection's `Bounds`);
this side adds the parts that need I/O or a clock.  The core gets the monotonic clock for its
frame rates.  Each flush tells the core when the peer has read what was sent
(`TlsBio.delivered` -> `HboneConnection.drained`), so replies a non-reading peer provokes are
bounded; and a header block the peer leaves open for `header_block_timeout` (measured from the
read that left it pending) ends the connection with GOAWAY ENHANCE_YOUR_CALM when the host calls
`sweep(now)`.  A connection ended for passing a bound says which in `shed` (a `limits:` key).
Streams the peer asks for are opened (`Host.tunnel_request`) once the whole read was handled,
and only those the peer did not reset in it: HEADERS + RST_STREAM pairs (Rapid Reset) cost no
connect to the app.  Bytes streams hold for apps that do not read count in `Buffers.held`
against `Buffers.budget` (`agent.tunnel.stream`).
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any, Protocol

from agent.linux import LINGER_RESET
from agent.tunnel.events import (
    ConnectionEnded,
    Data,
    Event,
    StreamAccepted,
    StreamEnded,
    StreamRefused,
    StreamRequested,
    StreamReset,
    TunnelProtocolError,
    WindowOpened,
)
from agent.tunnel.floods import DEFAULT, Bounds
from agent.tunnel.frames import ENHANCE_YOUR_CALM, NO_ERROR
from agent.tunnel.hbone import HboneConnection
from agent.tunnel.tls import TunnelTLSError, peer_identity
from agent.tunnel.tlsbio import TlsBio

if TYPE_CHECKING:
    from agent.tunnel.stream import TunnelStream

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP
READ_CHUNK = 1 << 20
READ_ROUNDS = 8  # socket reads per readiness event, at most (fairness between connections)
OUT_HIGH = 4 << 20

CONNECTING, HANDSHAKE, OPEN, CLOSED = range(4)


class Host(Protocol):
    """What the worker provides to its tunnel connections."""

    def watch(self, fd: int, old: int, new: int) -> None: ...
    def tunnel_ready(self, conn: TunnelConn) -> None: ...
    def tunnel_request(self, conn: TunnelConn, stream_id: int, authority: str) -> None: ...
    def tunnel_closed(self, conn: TunnelConn, reason: str) -> None: ...
    def stream_done(self, stream: TunnelStream) -> None: ...
    def flush_soon(self, conn: TunnelConn) -> None: ...


class Buffers:
    """Per-process scratch buffers (one thread): ciphertext reads, plaintext (decrypted) and app
    reads; and the count of bytes the process's streams hold for apps that do not take them
    (`held`), against `budget` (limits.buffered_per_worker)."""

    def __init__(self, size: int = READ_CHUNK, budget: int = 256 << 20) -> None:
        self.held = 0
        self.budget = budget
        self.rx = bytearray(size)
        self.rx_view = memoryview(self.rx)
        self.tls = bytearray(size)
        self.tls_view = memoryview(self.tls)
        self.app = bytearray(size)
        self.app_view = memoryview(self.app)


class TunnelConn:
    """One TLS + HBONE connection, client or server side."""

    def __init__(
        self,
        host: Host,
        bufs: Buffers,
        sock: socket.socket,
        ctx: ssl.SSLContext,
        *,
        client: bool,
        trust_domain: str,
        expected_identity: str = "",
        owner: Any = None,
        now: float = 0.0,
        bounds: Bounds = DEFAULT,
    ) -> None:
        self.host = host
        self.bounds = bounds
        self.bufs = bufs
        self.sock: socket.socket = sock
        self.fd = sock.fileno()
        self.ctx = ctx
        self.bio: TlsBio | None = None
        self.client = client
        self.trust_domain = trust_domain
        self.expected_identity = expected_identity
        self.owner = owner  # free for the host (workload, pool key)
        self.peer_identity = ""
        self.peer_ip = ""
        self.state = CONNECTING if client else HANDSHAKE
        self.core: HboneConnection | None = None
        self.streams: dict[int, TunnelStream] = {}
        self.queued: list[TunnelStream] = []  # client streams waiting to be opened
        self.blocked: set[TunnelStream] = set()
        self.congested = False
        self.flush_pending = False
        self.mask = 0
        self.retired = False  # take no new streams (cert rotated, GOAWAY)
        self.started_at = now
        self.idle_since = now
        self.header_block_since = 0.0  # when the core's pending header block was first seen
        self.shed = ""  # the bound (a `limits:` key) the peer passed, when it ended for that
        self._requested: list[tuple[int, str]] = []  # (stream, authority) asked for, not opened
        if not client:
            self._wrap()

    # -- public -----------------------------------------------------------------------------

    @property
    def stream_count(self) -> int:
        return len(self.streams) + len(self.queued)

    @property
    def usable(self) -> bool:
        return self.state != CLOSED and not self.retired

    def start(self) -> None:
        self._set_mask(EPOLLOUT if self.state == CONNECTING else EPOLLIN)
        if self.state == HANDSHAKE:
            self._handshake()

    def add_stream(self, stream: TunnelStream, authority: str) -> None:
        """Client: tunnel `stream` to `authority` (queued until it can be opened)."""
        stream.authority = authority
        self.queued.append(stream)
        if self.state == OPEN:
            self._open_queued()

    def on_event(self, fd: int, events: int) -> None:
        if self.state == CLOSED:
            return
        if self.state == CONNECTING:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(f"connect: {errno.errorcode.get(err, err)}")
                return
            self._wrap()
            self._handshake()
            return
        if self.state == HANDSHAKE:
            self._handshake()
            return
        if events & EPOLLOUT:
            self.flush()
            if self.state == CLOSED:
                return
        if events & (EPOLLIN | EPOLLERR | EPOLLHUP):
            self._read()

    def flush_soon(self) -> None:
        """Flush once the host is done with the current batch of events (one TLS write for all
        the streams that produced output meanwhile)."""
        if not self.flush_pending:
            self.flush_pending = True
            self.host.flush_soon(self)

    def flush(self) -> None:
        """Send what the core holds for the peer (as much as the socket takes)."""
        self.flush_pending = False
        core, bio = self.core, self.bio
        if core is None or bio is None or self.state == CLOSED:
            return
        out = core.out
        try:
            if out:
                bio.write(out)  # memory BIO: all of it, as records of 16 KiB
                out.clear()
            bio.send()
        except ssl.SSLError as exc:
            self.fail(f"TLS write: {exc}")
            return
        except OSError as exc:
            self.fail(f"send: {exc}")
            return
        if bio.delivered():
            core.drained()
        pending = bio.tx_bytes
        self._set_mask(EPOLLIN | EPOLLOUT if pending else EPOLLIN)
        was = self.congested
        self.congested = pending > OUT_HIGH
        if was and not self.congested:
            self._wake()

    def write_frames(self, frames: memoryview) -> None:
        """Encrypt `frames` (complete HTTP/2 frames) after what the core holds; sent at the next
        flush.  Marks the connection congested while too much ciphertext waits."""
        core, bio = self.core, self.bio
        if core is None or bio is None or self.state == CLOSED:
            return
        try:
            if core.out:
                bio.write(core.out)
                core.out.clear()
            bio.write(frames)
        except ssl.SSLError as exc:
            self.fail(f"TLS write: {exc}")
            return
        if bio.backlog > OUT_HIGH:
            self.congested = True  # until a flush drains it

    def sweep(self, now: float) -> None:
        """Time limits the core cannot keep (it has no clock); the host calls this now and then.
        A header block left open for `header_block_timeout` ends the connection."""
        since = self.header_block_since
        if since and now - since >= self.bounds.header_block_timeout:
            self.shed = "header_block_timeout"
            self.close(f"header block open for {now - since:.0f} s", ENHANCE_YOUR_CALM)

    def close(self, reason: str = "closed", error_code: int = NO_ERROR) -> None:
        """Graceful: GOAWAY, then close (streams still open are reset)."""
        if self.state == CLOSED:
            return
        core, bio = self.core, self.bio
        if core is not None and bio is not None:
            core.close(error_code)
            with contextlib.suppress(OSError):
                bio.write(core.out)
                bio.send()
            core.out.clear()
        self.fail(reason)

    def fail(self, reason: str) -> None:
        """The connection is gone: fail its streams, close the socket, tell the host."""
        if self.state == CLOSED:
            return
        was_open = self.state == OPEN
        self.state = CLOSED
        self._set_mask(0)
        for stream in [*self.queued, *self.streams.values()]:
            stream.conn_lost()
        self.queued.clear()
        self.streams.clear()
        self.blocked.clear()
        with contextlib.suppress(OSError):
            if not was_open:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        self.sock.close()
        self.host.tunnel_closed(self, reason)

    def forget(self, stream: TunnelStream) -> None:
        if self.streams.get(stream.sid) is stream:
            del self.streams[stream.sid]
        with contextlib.suppress(ValueError):
            self.queued.remove(stream)
        self.blocked.discard(stream)
        if self.queued and self.state == OPEN:
            self._open_queued()  # a stream slot may have opened up
        if not self.streams and not self.queued:
            self.idle_since = time.monotonic()

    # -- internals --------------------------------------------------------------------------

    def _set_mask(self, m: int) -> None:
        if m != self.mask:
            self.host.watch(self.fd, self.mask, m)
            self.mask = m

    def _wrap(self) -> None:
        try:
            self.peer_ip = self.sock.getpeername()[0]
            self.bio = TlsBio(self.sock, self.ctx, server_side=not self.client)
        except OSError as exc:  # ssl.SSLError too
            self.fail(f"TLS setup: {exc}")
            return
        self.state = HANDSHAKE

    def _handshake(self) -> None:
        bio = self.bio
        if self.state != HANDSHAKE or bio is None:
            return
        try:
            done = bio.handshake(self.bufs.rx_view)
        except OSError as exc:  # ssl.SSLError too
            self.fail(f"TLS handshake: {exc}")
            return
        if not done:
            self._set_mask(EPOLLIN | EPOLLOUT if bio.tx_bytes else EPOLLIN)
            return
        try:
            identity = peer_identity(bio.tls, self.trust_domain).uri
        except TunnelTLSError as exc:
            self.fail(f"peer identity: {exc}")
            return
        if self.expected_identity and identity != self.expected_identity:
            self.fail(f"peer is {identity!r}, expected {self.expected_identity!r}")
            return
        self.peer_identity = identity
        self.state = OPEN
        self.core = HboneConnection(self.client, self.bounds, time.monotonic)
        self.host.tunnel_ready(self)
        if self.state != OPEN:
            return
        self._open_queued()
        self.flush()
        if self.state == OPEN and bio.incoming.pending:
            self._read()

    def _open_queued(self) -> None:
        """Open queued client streams while the peer takes more (SETTINGS_MAX_CONCURRENT_STREAMS);
        after its GOAWAY they never will."""
        core = self.core
        assert core is not None
        queued = self.queued
        while queued and core.can_open:
            stream = queued.pop(0)
            if not stream.closed:
                stream.sid = sid = core.open_stream(stream.authority)
                self.streams[sid] = stream
                self.flush_soon()
        if queued and core.ended:
            self.queued = []
            for stream in queued:
                stream.conn_lost()

    def _read(self) -> None:
        bio = self.bio
        core = self.core
        assert bio is not None and core is not None
        rx = self.bufs.rx_view
        view = self.bufs.tls_view
        cap = len(view)
        for _ in range(READ_ROUNDS):
            # One recv takes many TLS records from the socket at once ...
            try:
                n = bio.receive(rx)
            except OSError as exc:
                self.fail(f"recv: {exc}")
                return
            # ... and they are decrypted into one large buffer that the core parses in one go.
            while True:
                try:
                    pos, closed = bio.decrypt(view)
                except ssl.SSLError as exc:
                    self.fail(f"recv: {exc}")
                    return
                if pos:
                    try:
                        events = core.receive(view[:pos])
                    except TunnelProtocolError as exc:
                        self.shed = exc.limit
                        self.flush()
                        self.fail(str(exc))
                        return
                    self._dispatch(events)
                    if self.state == CLOSED:
                        return
                if pos < cap or closed:
                    break
            if closed or n == 0:
                self.fail("peer closed the connection")
                return
            if n < len(rx):
                break
        if core.pending_header_block:
            if not self.header_block_since:
                self.header_block_since = time.monotonic()
        else:
            self.header_block_since = 0.0
        if core.out or bio.outgoing.pending:  # SETTINGS/PING acks, window updates, resets
            self.flush_soon()

    def _dispatch(self, events: list[Event]) -> None:
        streams = self.streams
        for ev in events:
            if isinstance(ev, Data):
                s = streams.get(ev.stream_id)
                if s is None and self._requested:  # early data: open what was asked first
                    self._open_requested()
                    s = streams.get(ev.stream_id)
                if s is not None:
                    s.deliver(ev.data)
            elif isinstance(ev, WindowOpened):
                if ev.stream_id == 0:
                    self._wake()
                else:
                    s = streams.get(ev.stream_id)
                    if s is not None and s in self.blocked:
                        self.blocked.discard(s)
                        s.update()
            elif isinstance(ev, StreamEnded):
                s = streams.get(ev.stream_id)
                if s is not None:
                    s.peer_ended()
            elif isinstance(ev, StreamAccepted):
                s = streams.get(ev.stream_id)
                if s is not None:
                    s.accepted_by_peer()
            elif isinstance(ev, StreamRefused):
                s = streams.get(ev.stream_id)
                if s is not None:
                    s.refused(ev.status)
            elif isinstance(ev, StreamReset):
                s = streams.get(ev.stream_id)
                if s is not None:
                    s.abort(reset_peer=False)
            elif isinstance(ev, StreamRequested):
                self._requested.append((ev.stream_id, ev.authority))
            elif isinstance(ev, ConnectionEnded):
                if self._requested:  # asked for before the GOAWAY: they are served
                    self._open_requested()
                self.retired = True
                for sid, s in list(streams.items()):
                    if sid > ev.last_stream_id:
                        s.conn_lost()
                for s in self.queued[:]:
                    s.conn_lost()
                if not self.streams:
                    self.close()
                    return
            if self.state == CLOSED:
                return
        if self._requested:
            self._open_requested()

    def _open_requested(self) -> None:
        """Ask the host to open the streams requested so far that the peer did not reset."""
        requested, self._requested = self._requested, []
        core = self.core
        for sid, authority in requested:
            if self.state != CLOSED and core is not None and core.is_open(sid):
                self.host.tunnel_request(self, sid, authority)

    def _wake(self) -> None:
        blocked, self.blocked = self.blocked, set()
        for s in blocked:
            s.update()
