"""The same-node fast path, proxy side: a relay whose two sockets the kernel joins.

A same-node connection that policy lets through without inspection (`decide.Local`, no HTTP
facts needed) is relayed with `JoinedRelay` when the eBPF backend's `joined` SOCKHASH is pinned
in the state dir.  It starts as the splice `Relay`; as soon as the upstream is connected and
both pipes are empty (nothing held by the worker), `FastPath.join` puts both sockets into the
map crosswise (under each leg's socket cookie, the other leg) and sets SO_RCVLOWAT on each.
From then on the map's stream verdict program (`fastpath` in bpf/ferry.c) sends every skb that
arrives on one leg out of the other, in the kernel: the worker is out of the byte path.

Ordering.  Bytes that reached a leg before the join sit in its receive queue.  The kernel runs a
joined socket's whole receive queue through the verdict, in order, whenever data is ready
(tcp_read_skb); setting SO_RCVLOWAT signals data-ready at once (tcp_set_rcvlowat), so queued
bytes leave first and nothing waits for the next segment (a request whose client then waits for
the answer would otherwise hang).  While the two entries go in, one by one, SO_RCVLOWAT is at
its maximum (HOLD): a leg already in the map whose partner's entry is not there yet would
otherwise run the verdict on arriving bytes, find no partner and drop them.  The worker never
copies a byte by hand, so none can overtake.

What the worker still sees: a FIN is not data, it stays in the socket and reads as EOF, so the
relay shuts the other leg and closes both when both are done, as before, but only once every
byte the ending leg received has been pushed into the other leg (below); a revocation,
an idle sweep or an abort closes the sockets, which takes them out of the map.  Joined, the
relay waits on EPOLLRDHUP instead of EPOLLIN: the kernel signals data-ready on a joined socket
for every batch it moves (sk_psock_verdict_data_ready), which would wake the worker each time
for nothing to read; the end (FIN) wakes it with EPOLLRDHUP.  The counters
(`bytes_up`, `bytes_down`, and the idle sweep that compares them) read the legs' TCP_INFO
`tcpi_bytes_received`, which counts what the kernel moved too.  Without the pinned map (another
backend, or the agent has not loaded it yet) or when the join fails, the relay stays spliced.

Ends.  The verdict queues a redirected skb on the other leg's psock, and the psock's kworker
sends it later (sk_psock_backlog): the FIN behind it can reach the worker first, and shutting
the other leg then would cut the last bytes off (wrk with `Connection: close` saw errors).
Taking a leg out of the map does not help: its psock's queue is purged, not sent.  So on EOF
of leg A the relay compares what A received (`tcpi_bytes_received`) with what leg B accepted
(`tcpi_bytes_acked` plus its send queue, SIOCOUTQ); every byte A received went into B, by the
worker before the join or by the kernel after it, so the two are equal once nothing is in
flight.  Until then the relay waits on the worker's timer (`FastPath.settle`, from SETTLE_FIRST
doubling to SETTLE_MAX), not on epoll; if B accepts nothing for SETTLE_STALL (its peer stopped
reading, or reset), the end is passed on anyway and counted in `FastPath.unflushed`.

Off by default (`redirection.kernel_fastpath`): that per-skb kworker send (no GSO batching)
moves fewer bytes per second than the splice relay here, though at about 0.01 proxy CPU s/GB
and a third of the splice relay's added latency (`make bench`, `ferry-fastpath`).
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import select
import socket
import struct
import termios
import time
from pathlib import Path

from agent.proxy.relay import Relay, _Half
from agent.redirect import bpf_syscall as sys_bpf

log = logging.getLogger("ferry.proxy")

STATE_DIR_ENV = "FERRY_STATE_DIR"  # set by the supervisor for its workers (it imports no relay)
JOINED_PIN = Path("bpf") / "maps" / "joined"
SO_COOKIE = 57
HOLD = 2**31 - 1  # SO_RCVLOWAT while joining: arriving bytes wake no verdict yet
TCP_INFO_SIZE = 136
TCPI_BYTES_ACKED = 120  # offset of tcpi_bytes_acked in struct tcp_info
TCPI_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received in struct tcp_info
FIN = 1  # an ended leg's tcpi_bytes_received counts its peer's FIN
SETTLE_FIRST = 0.001  # seconds: the first look at an ending leg's bytes in flight
SETTLE_MAX = 0.016  # seconds between looks, at most
SETTLE_STALL = 1.0  # seconds the other leg may accept nothing before the end is passed on
_U64 = struct.Struct("=Q")
EPOLLIN = select.EPOLLIN
EPOLLRDHUP = select.EPOLLRDHUP


class FastPath:
    """Joins sockets in the pinned `joined` map under `state_dir`, if there is one."""

    def __init__(self, state_dir: Path | None) -> None:
        self.path = None if state_dir is None else state_dir / JOINED_PIN
        self.settling: set[JoinedRelay] = set()  # ended, waiting for bytes in flight
        self.due = math.inf  # when `settle` should run next (monotonic)
        self.unflushed = 0  # ends passed on with bytes still in flight (SETTLE_STALL)

    @classmethod
    def configured(cls, enabled: bool) -> FastPath:
        """`redirection.kernel_fastpath`; the state dir comes from the supervisor."""
        state_dir = os.environ.get(STATE_DIR_ENV)
        return cls(Path(state_dir) if state_dir and enabled else None)

    @property
    def available(self) -> bool:
        return self.path is not None and self.path.exists()

    def join(self, down: socket.socket, up: socket.socket) -> bool:
        """Put both legs into the map, each under its own cookie pointing at the other, then
        flush what was queued before; False (nothing changed) when there is no map."""
        if self.path is None:
            return False
        try:
            fd = sys_bpf.obj_get(self.path)  # per join: a map made anew is found at once
        except OSError as exc:  # gone, or not ours to open (no CAP_BPF): stay spliced
            log.debug("fast path: %s: %s", self.path, exc)
            return False
        try:
            for leg in (down, up):  # no verdict runs until both entries are in (module doc)
                leg.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, HOLD)
            size = sys_bpf.map_info(fd).value_size
            legs = ((down, up), (up, down))
            for leg, other in legs:
                value = other.fileno().to_bytes(size, "little")
                sys_bpf.map_update(fd, _cookie(leg), value, f"joining {leg.getsockname()}")
        except OSError as exc:
            log.debug("fast path: not joined: %s", exc)
            for leg, _ in ((down, up), (up, down)):
                sys_bpf.map_delete(fd, _cookie(leg))
                leg.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            return False
        finally:
            os.close(fd)
        for leg in (down, up):
            leg.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)  # queued bytes go now
        return True

    def wait(self, relay: JoinedRelay) -> None:
        self.settling.add(relay)
        self.due = min(self.due, relay.settle_at)

    def settle(self, now: float) -> None:
        """Pass on the ends whose bytes have all arrived (the worker's loop calls this once
        `due` has passed)."""
        due = math.inf
        for relay in list(self.settling):
            if relay.closed:
                self.settling.discard(relay)
                continue
            if relay.settle_at <= now:
                relay.settle(now)
            if relay.closed or not relay.waiting:
                self.settling.discard(relay)
            else:
                due = min(due, relay.settle_at)
        self.due = due


class JoinedRelay(Relay):
    """A `Relay` that hands its bytes to the kernel once it safely can (see the module doc)."""

    __slots__ = ("accepted", "fastpath", "joined", "progress_at", "received", "settle_at",
                 "settle_every", "waiting")  # fmt: skip

    def __init__(
        self, down: socket.socket, up: socket.socket, fastpath: FastPath, **kw: object
    ) -> None:
        super().__init__(down, up, **kw)  # type: ignore[arg-type]
        self.fastpath = fastpath
        self.joined = False
        self.received = (0, 0)  # the legs' bytes received, as last read (kept after close)
        self.waiting = False  # an end waits for its bytes in flight (see the module doc)
        self.settle_at = 0.0
        self.settle_every = SETTLE_FIRST
        self.progress_at = 0.0  # when the waiting end's other leg last accepted bytes
        self.accepted = -1  # what it had accepted then

    @property
    def bytes_up(self) -> int:
        return self._received()[0] if self.joined else self.up_half.nbytes

    @property
    def bytes_down(self) -> int:
        return self._received()[1] if self.joined else self.down_half.nbytes

    def on_event(self, fd: int, events: int) -> None:
        if self.joined and events & EPOLLRDHUP:
            events |= EPOLLIN  # the end, reported under the quiet mask
        super().on_event(fd, events)
        if self.joined or self.closed or self.connecting:
            return
        halves = (self.up_half, self.down_half)
        if any(h.pending or h.eof for h in halves):
            return  # the worker holds bytes (or an end): joining now could reorder them
        self.joined = self.fastpath.join(self.down, self.up)
        if self.joined:
            self._update()

    def _update(self) -> None:
        super()._update()
        if self.joined and not self.closed:
            self.mask_down = self._quiet(self.fd_down, self.mask_down)
            self.mask_up = self._quiet(self.fd_up, self.mask_up)

    def _quiet(self, fd: int, mask: int) -> int:
        """`mask` with EPOLLRDHUP for EPOLLIN (see the module doc), applied to `fd`."""
        if not mask & EPOLLIN:
            return mask
        quiet = (mask & ~EPOLLIN) | EPOLLRDHUP
        self.watch(fd, mask, quiet)
        return quiet

    def _drain(self, h: _Half) -> None:
        if self.joined and h.eof and not h.shut and not h.pending and self._in_flight(h):
            if not self.waiting:
                now = time.monotonic()
                self.waiting = True
                self.settle_every = SETTLE_FIRST
                self.settle_at = now + SETTLE_FIRST
                self.progress_at = now
                self.fastpath.wait(self)
            return
        super()._drain(h)

    def settle(self, now: float) -> None:
        """Pass on each end whose bytes have all gone into the other leg; past SETTLE_STALL
        without progress, pass it on anyway (counted)."""
        still = False
        try:
            for h in (self.up_half, self.down_half):
                if not h.eof or h.shut or h.pending:
                    continue
                if self._in_flight(h):
                    accepted = _accepted(h.dst)
                    if accepted != self.accepted:
                        self.accepted = accepted
                        self.progress_at = now
                    if now - self.progress_at < SETTLE_STALL:
                        still = True
                        continue
                    self.fastpath.unflushed += 1
                    log.warning("fast path: an end passed on with bytes still in flight")
                super()._drain(h)
        except OSError:
            self.abort()
            return
        self.waiting = still
        if still:
            self.settle_every = min(self.settle_every * 2, SETTLE_MAX)
            self.settle_at = now + self.settle_every
        self._update()

    def _in_flight(self, h: _Half) -> bool:
        """Bytes that `h`'s source leg received and its destination has not accepted yet."""
        if h is self.up_half:  # the upstream leg, which we connected: its SYN counts as acked
            source, syn = self.down, 1
        else:
            source, syn = self.up, 0
        return _bytes_received(source) - FIN > _accepted(h.dst) - syn

    def close(self) -> None:
        if self.joined and not self.closed:
            self._received()
        super().close()

    def _received(self) -> tuple[int, int]:
        if not self.closed:
            self.received = (_bytes_received(self.down), _bytes_received(self.up))
        return self.received


def _cookie(sock: socket.socket) -> bytes:
    return sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)


def _accepted(sock: socket.socket) -> int:
    """Bytes written into `sock`: acknowledged by its peer, or still in its send queue."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    unacked = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    return int(_U64.unpack_from(info, TCPI_BYTES_ACKED)[0]) + int(unacked)


def _bytes_received(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    return int(_U64.unpack_from(info, TCPI_BYTES_RECEIVED)[0])
