"""One tunnelled TCP connection: an app socket and one HBONE stream of a `TunnelConn`.

Driven like the connection (`agent.tunnel.connection`): `on_event(fd, events)` for the app socket
from the worker's epoll loop, and the connection's calls when its events concern the stream
(`deliver`, `peer_ended`, `accepted_by_peer`, `refused`, `abort`).

App bytes are read only while the stream's send window is open and the connection is not
congested (so a slow tunnel stops the app).  A small read (below SMALL_WRITE) is framed into the
core's `out` and shares one TLS write with the other streams' output; a large one lands in the
shared app buffer right behind room for its 9-byte DATA frame header and is encrypted from there
(`TunnelConn.write_frames`, no copy).  Tunnel bytes are written straight to the app socket; only
what it cannot take is copied and kept, and the window is reopened (`consumed`) only for delivered
bytes (so a slow app stops the sender).  EOF becomes END_STREAM and END_STREAM becomes
shutdown(SHUT_WR) once pending bytes are out: half-close both ways.  An app reset becomes
RST_STREAM and an RST_STREAM an app reset (SO_LINGER 0).

What a stream keeps for its app is bounded by its window (`Bounds.stream_window`: the peer may
send no more until the app took some), and counted in `held` and in the process's
`Buffers.held`; while that is over `Buffers.budget` (limits.buffered_per_worker), a stream that
holds SHED_HELD bytes or more and gets more is reset (RST_STREAM ENHANCE_YOUR_CALM, `shed` says
why), so apps that do not read cannot take a worker past its budget whatever the peers send.

Server side, a stream starts with a non-blocking connect to the app (`app_connecting`): connected,
it accepts the CONNECT (200); failed, it refuses it (503).  Client side, it waits for the peer's
answer (`accepted_by_peer` / `refused`).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import socket
from typing import Any

from agent.linux import LINGER_RESET
from agent.tunnel.connection import (
    EPOLLERR,
    EPOLLHUP,
    EPOLLIN,
    EPOLLOUT,
    OUT_HIGH,
    TunnelConn,
)
from agent.tunnel.frames import ENHANCE_YOUR_CALM

SMALL_WRITE = 16384  # app reads below this are framed into `out` (batched with other streams)
SHED_HELD = 64 * 1024  # a stream holding this much for its app is reset when over the budget


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
        "held",
        "idle_mark",
        "idle_since",
        "in_eof",
        "mask",
        "out_eof",
        "owner",
        "pending",
        "refused_status",
        "reset",
        "shed",
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
        self.held = 0  # bytes in `pending`
        self.shed = ""  # the bound (a `limits:` key) it was reset for, if any
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
            self._hold(bytes(data))
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
            self._hold(bytes(data[n:]))

    def _hold(self, data: bytes) -> None:
        """Keep what the app did not take yet; reset the stream instead when the process holds
        more than its budget and this stream a good part of it."""
        n = len(data)
        bufs = self.bufs
        if bufs.held + n > bufs.budget and self.held + n >= SHED_HELD:
            self.shed = "buffered_per_worker"
            core = self.conn.core
            if core is not None:
                core.reset(self.sid, ENHANCE_YOUR_CALM)
            self._finish(abort=True)
            return
        self.pending.append(memoryview(data))
        self.held += n
        bufs.held += n
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
            self.held -= n
            self.bufs.held -= n
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
                self.app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        self.app.close()
        self.pending.clear()
        self.bufs.held -= self.held
        self.held = 0
        conn = self.conn
        conn.forget(self)
        conn.host.stream_done(self)
