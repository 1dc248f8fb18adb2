"""The tunnel over real sockets: a TLS+HBONE connection (`TunnelConn`) and its `TunnelStream`s.

Driven by the proxy worker's level-triggered epoll loop, like `agent.proxy.relay.Relay`: each
object gets `on_event(fd, events)` for its fd and reports the interest it wants through
`host.watch(fd, old_mask, new_mask)`.  The `Host` (the worker) decides policy (which streams to
accept, where to connect, what to count); these classes only move bytes.

TunnelConn: TCP connect (client) -> TLS 1.3 handshake -> peer identity check -> HBONE.  TLS runs
over memory BIOs (`SSLContext.wrap_bio`), not over the socket: through an `SSLSocket`, OpenSSL
issues one write() per 16 KiB record and two read()s per record, and those syscalls were most of the
proxy's CPU in bulk transfers.  Here one recv takes up to READ_CHUNK of ciphertext from the socket
(up to READ_ROUNDS times per wakeup), the records are decrypted (one `read` call each, no syscall)
into one preallocated buffer, and the whole batch is fed to the sans-IO core in one call; DATA
payloads come back as views of that buffer and go straight to the app sockets.  Nothing is left
hidden from level-triggered epoll: what stays in the incoming BIO is an incomplete record, which
needs more bytes from the socket anyway.  Writes collect in the core's `out` buffer (frames of every
stream), are encrypted in one `write` into the outgoing BIO, and its ciphertext leaves in one send;
bulk DATA (reads of SMALL_WRITE and more) skips `out`: a stream reads its app socket into the shared
app buffer behind 9 bytes left for the frame header and encrypts header + payload straight from
there (`write_frames`, after whatever `out` held, so the order is kept); what the socket does not
take waits in `tx` for EPOLLOUT.  Streams do not send themselves: they ask for `flush_soon()`, and
the host flushes each such connection once per batch of epoll events, so many small responses share
one TLS write.  While `tx` holds more than OUT_HIGH bytes the connection is congested and its
streams stop reading their app sockets; they resume when it drains.

TunnelStream: app socket <-> one HBONE stream.  App bytes are read only while the stream's send
window is open and the connection is not congested (so a slow tunnel stops the app).  Tunnel
bytes are written straight to the app socket; only what it cannot take is copied and kept, and
the window is reopened (`consumed`) only for delivered bytes (so a slow app stops the sender).
EOF becomes END_STREAM and END_STREAM becomes shutdown(SHUT_WR) once pending bytes are out:
half-close both ways.  An app reset becomes RST_STREAM and an RST_STREAM an app reset (SO_LINGER
0).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import select
import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any, Protocol

from agent.tunnel.hbone import (
    ConnectionEnded,
    Data,
    Event,
    HboneConnection,
    StreamAccepted,
    StreamEnded,
    StreamRefused,
    StreamRequested,
    StreamReset,
    TunnelProtocolError,
    WindowOpened,
)
from agent.tunnel.tls import TunnelTLSError, peer_identity

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP
READ_CHUNK = 1 << 20
READ_ROUNDS = 8  # socket reads per readiness event, at most (fairness between connections)
OUT_HIGH = 4 << 20
SMALL_WRITE = 16384  # app reads below this are framed into `out` (batched with other streams)
_LINGER_RESET = struct.pack("ii", 1, 0)

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
    reads."""

    def __init__(self, size: int = READ_CHUNK) -> None:
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
    ) -> None:
        self.host = host
        self.bufs = bufs
        self.sock: socket.socket = sock
        self.fd = sock.fileno()
        self.ctx = ctx
        self.tls: ssl.SSLObject | None = None
        self.incoming = ssl.MemoryBIO()  # ciphertext from the peer, not yet decrypted
        self.outgoing = ssl.MemoryBIO()  # ciphertext OpenSSL produced, not yet taken
        self.tx: collections.deque[memoryview] = collections.deque()  # ciphertext to send
        self.tx_bytes = 0
        self.client = client
        self.trust_domain = trust_domain
        self.expected_identity = expected_identity
        self.owner = owner  # free for the host (workload, pool key)
        self.peer_identity = ""
        self.peer_ip = ""
        self.state = CONNECTING if client else HANDSHAKE
        self.core: HboneConnection | None = None
        self.streams: dict[int, TunnelStream] = {}
        self.queued: list[TunnelStream] = []  # client streams waiting for the handshake
        self.blocked: set[TunnelStream] = set()
        self.congested = False
        self.flush_pending = False
        self.mask = 0
        self.retired = False  # take no new streams (cert rotated, GOAWAY)
        self.started_at = now
        self.idle_since = now
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
        """Client: tunnel `stream` to `authority` (queued until the handshake is done)."""
        stream.authority = authority
        if self.state == OPEN and self.core is not None:
            self._open(stream)
            self.flush_soon()
        else:
            self.queued.append(stream)

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
        core = self.core
        if core is None or self.state == CLOSED:
            return
        out = core.out
        if out:
            tls = self.tls
            assert tls is not None
            try:
                tls.write(out)  # memory BIO: all of it, as records of 16 KiB
            except ssl.SSLError as exc:
                self.fail(f"TLS write: {exc}")
                return
            out.clear()
        if not self._send_tx():
            return
        pending = self.tx_bytes
        self._set_mask(EPOLLIN | EPOLLOUT if pending else EPOLLIN)
        was = self.congested
        self.congested = pending > OUT_HIGH
        if was and not self.congested:
            self._wake()

    def write_frames(self, frames: memoryview) -> None:
        """Encrypt `frames` (complete HTTP/2 frames) after what the core holds; sent at the next
        flush.  Marks the connection congested while too much ciphertext waits."""
        core, tls = self.core, self.tls
        if core is None or tls is None or self.state == CLOSED:
            return
        try:
            if core.out:
                tls.write(core.out)
                core.out.clear()
            tls.write(frames)
        except ssl.SSLError as exc:
            self.fail(f"TLS write: {exc}")
            return
        if self.tx_bytes + self.outgoing.pending > OUT_HIGH:
            self.congested = True  # until a flush drains it

    def close(self) -> None:
        """Graceful: GOAWAY, then close (streams still open are reset)."""
        if self.state == CLOSED:
            return
        if self.core is not None and self.tls is not None:
            self.core.close()
            with contextlib.suppress(ssl.SSLError):
                self.tls.write(self.core.out)
            self.core.out.clear()
            self._send_tx()
        self.fail("closed")

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
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.sock.close()
        self.host.tunnel_closed(self, reason)

    def forget(self, stream: TunnelStream) -> None:
        if self.streams.get(stream.sid) is stream:
            del self.streams[stream.sid]
        with contextlib.suppress(ValueError):
            self.queued.remove(stream)
        self.blocked.discard(stream)
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
            self.tls = self.ctx.wrap_bio(
                self.incoming, self.outgoing, server_side=not self.client, server_hostname=None
            )
        except (ssl.SSLError, OSError) as exc:
            self.fail(f"TLS setup: {exc}")
            return
        self.state = HANDSHAKE

    def _send_tx(self) -> bool:
        """Take what OpenSSL produced and send as much ciphertext as the socket takes (one send
        for many records).  False if the connection failed."""
        tx = self.tx
        outgoing = self.outgoing
        send = self.sock.send
        if outgoing.pending:
            chunk = outgoing.read()
            if not tx:  # the usual case: nothing waits before it, so no queueing
                try:
                    n = send(chunk)
                except BlockingIOError:
                    n = 0
                except OSError as exc:
                    self.fail(f"send: {exc}")
                    return False
                if n < len(chunk):
                    tx.append(memoryview(chunk)[n:])
                    self.tx_bytes += len(chunk) - n
                return True
            tx.append(memoryview(chunk))
            self.tx_bytes += len(chunk)
        while tx:
            head = tx[0]
            try:
                n = send(head)
            except BlockingIOError:
                break
            except OSError as exc:
                self.fail(f"send: {exc}")
                return False
            self.tx_bytes -= n
            if n < len(head):
                tx[0] = head[n:]
                break
            tx.popleft()
        return True

    def _handshake(self) -> None:
        if self.state != HANDSHAKE:
            return
        tls = self.tls
        assert tls is not None
        try:
            n = self.sock.recv_into(self.bufs.rx_view)
        except BlockingIOError:
            n = -1
        except OSError as exc:
            self.fail(f"TLS handshake: {exc}")
            return
        if n > 0:
            self.incoming.write(self.bufs.rx_view[:n])
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            if not n:
                self.fail("TLS handshake: peer closed the connection")
            elif self._send_tx():
                self._set_mask(EPOLLIN | EPOLLOUT if self.tx_bytes else EPOLLIN)
            return
        except ssl.SSLError as exc:
            self._send_tx()  # the alert, if any
            self.fail(f"TLS handshake: {exc}")
            return
        try:
            identity = peer_identity(tls, self.trust_domain).uri
        except TunnelTLSError as exc:
            self.fail(f"peer identity: {exc}")
            return
        if self.expected_identity and identity != self.expected_identity:
            self.fail(f"peer is {identity!r}, expected {self.expected_identity!r}")
            return
        self.peer_identity = identity
        self.state = OPEN
        self.core = HboneConnection(client=self.client)
        self.host.tunnel_ready(self)
        if self.state != OPEN:
            return
        queued, self.queued = self.queued, []
        for stream in queued:
            if not stream.closed:
                self._open(stream)
        self.flush()
        if self.state == OPEN and self.incoming.pending:
            self._read()

    def _open(self, stream: TunnelStream) -> None:
        assert self.core is not None
        sid = self.core.open_stream(stream.authority)
        stream.sid = sid
        self.streams[sid] = stream

    def _read(self) -> None:
        sock = self.sock
        tls = self.tls
        assert tls is not None
        incoming = self.incoming
        rx = self.bufs.rx_view
        view = self.bufs.tls_view
        cap = len(view)
        core = self.core
        assert core is not None
        # The C object's methods, not the `ssl.SSLObject` wrappers: one Python frame less per
        # record.  `pending` (decrypted bytes OpenSSL still holds) and the incoming BIO tell
        # when every complete record was read, so no call ends in SSLWantReadError (an exception
        # with a formatted message: more than a small record costs to decrypt).
        sslobj: Any = getattr(tls, "_sslobj", tls)  # _ssl._SSLSocket (same read, pending)
        tls_read: Callable[[int, memoryview], int] = sslobj.read
        tls_pending: Callable[[], int] = sslobj.pending
        for _ in range(READ_ROUNDS):
            # One recv takes many TLS records from the socket at once ...
            try:
                n = sock.recv_into(rx)
            except BlockingIOError:
                n = -1
            except OSError as exc:
                self.fail(f"recv: {exc}")
                return
            if n > 0:
                incoming.write(rx[:n])
            elif n == 0:
                incoming.write_eof()
            # ... and they are decrypted (one record per read call) into one large buffer that
            # the HBONE core parses in one go.
            closed = False
            while True:
                pos = 0
                while pos < cap:
                    if pos and not incoming.pending and not tls_pending():
                        break  # all read, and the last record was complete
                    try:
                        m = tls_read(cap - pos, view[pos:])
                    except ssl.SSLWantReadError:
                        break
                    except ssl.SSLEOFError:
                        closed = True
                        break
                    except ssl.SSLError as exc:
                        self.fail(f"recv: {exc}")
                        return
                    if not m:
                        closed = True
                        break
                    pos += m
                if pos:
                    try:
                        events = core.receive(view[:pos])
                    except TunnelProtocolError as exc:
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
        if core.out or self.outgoing.pending:  # SETTINGS/PING acks, window updates, resets
            self.flush_soon()

    def _dispatch(self, events: list[Event]) -> None:
        streams = self.streams
        for ev in events:
            if isinstance(ev, Data):
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
                self.host.tunnel_request(self, ev.stream_id, ev.authority)
            elif isinstance(ev, ConnectionEnded):
                self.retired = True
                for sid, s in list(streams.items()):
                    if sid > ev.last_stream_id:
                        s.conn_lost()
                if not self.streams:
                    self.close()
                    return
            if self.state == CLOSED:
                return

    def _wake(self) -> None:
        blocked, self.blocked = self.blocked, set()
        for s in blocked:
            s.update()


class TunnelStream:
    """One tunnelled TCP connection: an app socket and one HBONE stream of `conn`."""

    __slots__ = (
        "accepted",
        "app",
        "app_connecting",
        "app_shut",
        "authority",
        "bufs",
        "closed",
        "conn",
        "connect_failed",
        "fd",
        "idle_mark",
        "idle_since",
        "in_eof",
        "mask",
        "out_eof",
        "owner",
        "pending",
        "refused_status",
        "reset",
        "sid",
        "started_at",
        "to_app",
        "to_tunnel",
    )

    def __init__(
        self,
        conn: TunnelConn,
        app: socket.socket,
        *,
        sid: int = 0,
        app_connecting: bool = False,
        owner: Any = None,
        now: float = 0.0,
    ) -> None:
        self.conn = conn
        self.bufs = conn.bufs
        self.app = app
        self.fd = app.fileno()
        self.sid = sid
        self.authority = ""
        self.app_connecting = app_connecting
        self.accepted = False
        self.out_eof = False  # app EOF -> END_STREAM sent
        self.in_eof = False  # END_STREAM received
        self.app_shut = False  # ... and passed on as shutdown(SHUT_WR)
        self.pending: collections.deque[memoryview] = collections.deque()
        self.mask = 0
        self.closed = False
        self.reset = False
        self.connect_failed = False
        self.refused_status = 0
        self.to_app = 0
        self.to_tunnel = 0
        self.owner = owner  # free for the host (flow counters)
        self.started_at = now
        self.idle_mark = -1
        self.idle_since = now
        if sid:
            conn.streams[sid] = self

    # Relay-compatible view for the worker's counters: up = client -> server.
    @property
    def connecting(self) -> bool:
        return not self.accepted

    @property
    def bytes_up(self) -> int:
        return self.to_tunnel if self.conn.client else self.to_app

    @property
    def bytes_down(self) -> int:
        return self.to_app if self.conn.client else self.to_tunnel

    # -- driven by the worker ---------------------------------------------------------------

    def on_event(self, fd: int, events: int) -> None:
        if self.closed:
            return
        conn = self.conn
        try:
            if self.app_connecting:
                err = self.app.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self.connect_failed = True
                    core = conn.core
                    if core is not None:
                        core.refuse(self.sid, 503)
                    self._finish(abort=True)
                    conn.flush_soon()
                    return
                self.app_connecting = False
                self.accepted = True
                if conn.core is not None:
                    conn.core.accept(self.sid)
                self._drain()
            else:
                if events & EPOLLERR:
                    err = self.app.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    raise OSError(err or errno.ECONNRESET, "app socket error")
                if events & EPOLLOUT:
                    self._drain()
                if events & (EPOLLIN | EPOLLHUP) and not self.closed:
                    self._read()
        except OSError:
            self.abort(reset_peer=True)
            conn.flush_soon()
            return
        conn.flush_soon()
        self.update()

    # -- driven by the connection -----------------------------------------------------------

    def accepted_by_peer(self) -> None:
        self.accepted = True
        self.update()

    def refused(self, status: int) -> None:
        self.refused_status = status
        self.connect_failed = True
        self._finish(abort=True)

    def deliver(self, data: bytes | memoryview) -> None:
        """Tunnel payload for the app; `data` may be a view of the TLS read buffer, so what the
        app socket cannot take now is copied."""
        if self.closed:
            return
        if self.pending or self.app_connecting:
            self.pending.append(memoryview(bytes(data)))
            self.update()
            return
        try:
            n = self.app.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self.abort(reset_peer=True)
            return
        if n:
            self.to_app += n
            core = self.conn.core
            if core is not None:
                core.consumed(self.sid, n)
        if n < len(data):
            self.pending.append(memoryview(bytes(data[n:])))
            self.update()

    def peer_ended(self) -> None:
        self.in_eof = True
        if not self.pending and not self.app_connecting:
            try:
                self._shut_app()
            except OSError:
                self.abort(reset_peer=True)
                return
            self._maybe_done()

    def conn_lost(self) -> None:
        if self.closed:
            return
        if not self.accepted:
            self.connect_failed = True
        self._finish(abort=True)

    def abort(self, reset_peer: bool) -> None:
        if self.closed:
            return
        if reset_peer and self.sid and self.conn.core is not None:
            self.conn.core.reset(self.sid)
        self._finish(abort=True)

    def close(self) -> None:
        """Idle or shutdown: reset the stream, close the app socket gracefully."""
        if self.closed:
            return
        if self.sid and self.conn.core is not None:
            self.conn.core.reset(self.sid)
        self._finish(abort=False)

    def update(self) -> None:
        if self.closed:
            return
        m = 0
        if self.app_connecting:
            m = EPOLLOUT
        else:
            conn = self.conn
            if self.accepted and not self.out_eof:
                core = conn.core
                if conn.congested or core is None or core.send_window(self.sid) <= 0:
                    conn.blocked.add(self)
                else:
                    m = EPOLLIN
            if self.pending:
                m |= EPOLLOUT
        if m != self.mask:
            self.conn.host.watch(self.fd, self.mask, m)
            self.mask = m

    # -- internals --------------------------------------------------------------------------

    def _read(self) -> None:
        if not self.accepted or self.out_eof:
            return
        conn = self.conn
        core = conn.core
        if core is None or conn.congested:
            return
        window = core.send_window(self.sid)
        if window <= 0:
            return
        # The payload lands right behind room for its DATA frame header, and header + payload
        # are encrypted in one go from this buffer (no copy into the core's `out`).
        view = self.bufs.app_view
        cap = min(window, len(view) - 9, core.max_frame)
        try:
            n = self.app.recv_into(view[9:], cap)
        except BlockingIOError:
            return
        if n == 0:
            self.out_eof = True
            core.end_stream(self.sid)
            self._maybe_done()
            return
        self.to_tunnel += n
        if n < SMALL_WRITE:  # small: share one TLS record with the other streams' output
            core.send_data(self.sid, view[9 : 9 + n])
            if len(core.out) > OUT_HIGH:
                conn.congested = True  # until a flush drains it
            return
        header = core.data_header(self.sid, n)
        if header:
            view[:9] = header
            conn.write_frames(view[: 9 + n])

    def _drain(self) -> None:
        pending = self.pending
        core = self.conn.core
        send = self.app.send
        while pending:
            chunk = pending[0]
            try:
                n = send(chunk)
            except BlockingIOError:
                break
            self.to_app += n
            if core is not None:
                core.consumed(self.sid, n)
            if n < len(chunk):
                pending[0] = chunk[n:]
                break
            pending.popleft()
        if not pending and self.in_eof and not self.app_shut:
            self._shut_app()
            self._maybe_done()

    def _shut_app(self) -> None:
        if not self.app_shut:
            self.app.shutdown(socket.SHUT_WR)
            self.app_shut = True

    def _maybe_done(self) -> None:
        if self.out_eof and self.app_shut and not self.closed:
            self._finish(abort=False)

    def _finish(self, abort: bool) -> None:
        self.closed = True
        if self.mask:
            self.conn.host.watch(self.fd, self.mask, 0)
            self.mask = 0
        if abort:
            self.reset = True
            with contextlib.suppress(OSError):
                self.app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.app.close()
        self.pending.clear()
        conn = self.conn
        conn.forget(self)
        conn.host.stream_done(self)
