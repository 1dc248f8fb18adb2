"""Full-duplex TCP relay that never copies payload into Python: splice(2) through a pipe.

Each direction owns a pipe.  Bytes go `source socket -> pipe -> destination socket` with
`os.splice(..., SPLICE_F_MOVE | SPLICE_F_NONBLOCK)`, so the kernel moves pages and Python only
sees byte counts.

`Relay` is the decision core.  It is driven by readiness events (`on_event(fd, events)`, epoll
bits) and tells its owner which epoll interest it wants on each of its two fds through the
`watch(fd, old_mask, new_mask)` callback (0 means "do not watch"; a level-triggered loop should
then unregister the fd, otherwise EPOLLHUP would be reported on every wait).  `interest()` returns
the same information as a dict.  The owner is told once, through `done(relay)`, that the relay has
closed both sockets.  Tests drive it with socketpairs and a fake watch.

Rules, per direction (source -> pipe -> destination):
* read the source only while the pipe is empty: a pipe that could not drain means the destination
  is full, so the source is not read (backpressure) until the destination is writable again and
  the pipe empties; memory per connection is bounded by the pipe size;
* EOF on the source: once the pipe has drained, shutdown(SHUT_WR) the destination (half-close);
  when both directions have been shut, close everything;
* any error (ECONNRESET, EPIPE, EPOLLERR, an unexpected EPOLLHUP) aborts: both sockets are closed
  with SO_LINGER 0, so the other side sees a reset too.

The upstream side may still be connecting (`connecting=True`): the client side is read into the
pipe meanwhile, and the upstream is watched for EPOLLOUT; SO_ERROR then decides between running
and `connect_failed` (abort).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
from collections.abc import Callable

from agent.linux import LINGER_RESET

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
DEFAULT_PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

WatchFn = Callable[[int, int, int], None]
DoneFn = Callable[["Relay"], None]


class PipePool:
    """Recycles empty pipes so that a new connection costs no pipe2/fcntl/close syscalls."""

    def __init__(self, size: int = DEFAULT_PIPE_SIZE, keep: int = 256) -> None:
        self.size = size
        self.keep = keep
        self._free: list[tuple[int, int, int]] = []

    def get(self) -> tuple[int, int, int]:
        """(read fd, write fd, capacity in bytes)."""
        if self._free:
            return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            capacity = fcntl.fcntl(w, F_SETPIPE_SZ, self.size)
        except OSError:  # EPERM above pipe-max-size / user limits: keep the default
            capacity = 65536
        return r, w, capacity

    def put(self, r: int, w: int, capacity: int, empty: bool) -> None:
        """Give a pipe back; a pipe that may still hold bytes is closed, never reused."""
        if empty and len(self._free) < self.keep:
            self._free.append((r, w, capacity))
        else:
            os.close(r)
            os.close(w)

    def close(self) -> None:
        for r, w, _ in self._free:
            os.close(r)
            os.close(w)
        self._free.clear()


_default_pool = PipePool()


def _no_watch(fd: int, old: int, new: int) -> None:
    pass


def _no_done(relay: Relay) -> None:
    pass


class _Half:
    """One direction: src socket -> pipe -> dst socket."""

    __slots__ = ("cap", "dst", "dst_fd", "eof", "nbytes", "pending", "r", "shut", "src_fd", "w")

    def __init__(self, src_fd: int, dst: socket.socket, pipe: tuple[int, int, int]) -> None:
        self.src_fd = src_fd
        self.dst = dst
        self.dst_fd = dst.fileno()
        self.r, self.w, self.cap = pipe
        self.pending = 0  # bytes sitting in the pipe
        self.eof = False  # EOF read from src
        self.shut = False  # dst has been shutdown(SHUT_WR)
        self.nbytes = 0  # bytes delivered to dst


class Relay:
    """Relay between `down` (the accepted client socket) and `up` (the upstream socket).

    Both sockets must be nonblocking.  Call `start()` once, then `on_event(fd, events)` for each
    epoll event on `fd_down` or `fd_up`.  Byte counters: `bytes_up` (client -> server, Istio's
    bytes_received) and `bytes_down` (server -> client, bytes_sent).
    """

    __slots__ = (
        "closed",
        "connect_failed",
        "connecting",
        "done",
        "down",
        "down_half",
        "fd_down",
        "fd_up",
        "idle_mark",
        "idle_since",
        "mask_down",
        "mask_up",
        "owner",
        "pool",
        "reset",
        "started_at",
        "up",
        "up_half",
        "watch",
    )

    def __init__(
        self,
        down: socket.socket,
        up: socket.socket,
        *,
        connecting: bool = False,
        watch: WatchFn = _no_watch,
        done: DoneFn = _no_done,
        pool: PipePool | None = None,
        owner: object = None,
    ) -> None:
        self.down = down
        self.up = up
        self.fd_down = down.fileno()
        self.fd_up = up.fileno()
        self.pool = _default_pool if pool is None else pool
        self.up_half = _Half(self.fd_down, up, self.pool.get())  # client -> server
        try:
            self.down_half = _Half(self.fd_up, down, self.pool.get())  # server -> client
        except OSError:
            h = self.up_half
            self.pool.put(h.r, h.w, h.cap, True)
            raise
        self.connecting = connecting
        self.connect_failed = False
        self.closed = False
        self.reset = False
        self.mask_down = 0
        self.mask_up = 0
        self.watch = watch
        self.done = done
        self.owner = owner  # free for the caller (the worker keeps its per-workload stats here)
        self.started_at = 0.0  # free for the caller (connect deadline)
        self.idle_mark = -1  # free for the caller (idle sweep)
        self.idle_since = 0.0

    # -- public -----------------------------------------------------------------------------

    @property
    def bytes_up(self) -> int:
        return self.up_half.nbytes

    @property
    def bytes_down(self) -> int:
        return self.down_half.nbytes

    def interest(self) -> dict[int, int]:
        """Current wanted epoll mask per fd (empty once closed)."""
        if self.closed:
            return {}
        return {self.fd_down: self.mask_down, self.fd_up: self.mask_up}

    def start(self) -> None:
        self._update()

    def on_event(self, fd: int, events: int) -> None:
        if self.closed:
            return
        try:
            if fd == self.fd_up:
                if self.connecting:
                    if not self._finish_connect():
                        return
                    events &= ~EPOLLOUT  # the writable event was the connect completing
                    self._drain(self.up_half)
                if events & (EPOLLERR | EPOLLHUP) and not self._hangup(self.up_half, events):
                    return
                if events & EPOLLIN:
                    self._pump(self.down_half)
                if events & EPOLLOUT:
                    self._drain(self.up_half)
            else:
                if events & (EPOLLERR | EPOLLHUP) and not self._hangup(self.down_half, events):
                    return
                if events & EPOLLIN:
                    self._pump(self.up_half)
                if events & EPOLLOUT:
                    self._drain(self.down_half)
        except OSError:
            self.abort()
            return
        self._update()

    def close(self) -> None:
        """Close both sockets gracefully (FIN; RST if unread bytes remain).  Idempotent."""
        if self.closed:
            return
        self.closed = True
        for h in (self.up_half, self.down_half):
            self.pool.put(h.r, h.w, h.cap, h.pending == 0)
        self.down.close()
        self.up.close()
        self.done(self)

    def abort(self) -> None:
        """Close both sockets with a reset (SO_LINGER 0)."""
        if self.closed:
            return
        self.reset = True
        for sock in (self.down, self.up):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        self.close()

    # -- decisions --------------------------------------------------------------------------

    def _finish_connect(self) -> bool:
        err = self.up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.connect_failed = True
            self.abort()
            return False
        self.connecting = False
        return True

    def _hangup(self, into_this: _Half, events: int) -> bool:
        """EPOLLERR/EPOLLHUP on the socket that `into_this` writes to; False if aborted.

        A HUP is expected only once we shut that socket's write side ourselves and its peer
        sent FIN too: then it just means "read to EOF".  Anything else is a reset.
        """
        if events & EPOLLERR or not into_this.shut:
            self.abort()
            return False
        return True

    def _pump(self, h: _Half) -> None:
        """Source readable: fill the (empty) pipe, then push it on."""
        if h.eof or h.pending:
            return
        try:
            n = os.splice(h.src_fd, h.w, h.cap, flags=SPLICE_FLAGS)
        except BlockingIOError:
            return
        if n == 0:
            h.eof = True
        else:
            h.pending = n
        self._drain(h)

    def _drain(self, h: _Half) -> None:
        """Destination writable (or fresh bytes): empty the pipe as far as it goes."""
        if h is self.up_half and self.connecting:
            return  # neither write nor shutdown() a socket still connecting
        if h.pending:
            try:
                n = os.splice(h.r, h.dst_fd, h.pending, flags=SPLICE_FLAGS)
            except BlockingIOError:
                return
            h.pending -= n
            h.nbytes += n
            if h.pending:
                return
        if h.eof and not h.shut:
            h.dst.shutdown(socket.SHUT_WR)
            h.shut = True

    def _update(self) -> None:
        if self.closed:
            return
        up, dn = self.up_half, self.down_half
        if up.shut and dn.shut:
            self.close()
            return
        # fd_down: read client while its pipe is empty; write while server->client bytes wait.
        m = 0 if up.eof or up.pending else EPOLLIN
        if dn.pending:
            m |= EPOLLOUT
        if m != self.mask_down:
            self.watch(self.fd_down, self.mask_down, m)
            self.mask_down = m
        if self.connecting:
            m = EPOLLOUT
        else:
            m = 0 if dn.eof or dn.pending else EPOLLIN
            if up.pending:
                m |= EPOLLOUT
        if m != self.mask_up:
            self.watch(self.fd_up, self.mask_up, m)
            self.mask_up = m
