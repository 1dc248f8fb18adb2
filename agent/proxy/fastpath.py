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
the answer would otherwise hang).  The worker never copies a byte by hand, so none can overtake.

What the worker still sees: a FIN is not data, it stays in the socket and reads as EOF, so the
relay shuts the other leg and closes both when both are done, exactly as before; a revocation,
an idle sweep or an abort closes the sockets, which takes them out of the map.  Joined, the
relay waits on EPOLLRDHUP instead of EPOLLIN: the kernel signals data-ready on a joined socket
for every batch it moves (sk_psock_verdict_data_ready), which would wake the worker each time
for nothing to read; the end (FIN) wakes it with EPOLLRDHUP.  The counters
(`bytes_up`, `bytes_down`, and the idle sweep that compares them) read the legs' TCP_INFO
`tcpi_bytes_received`, which counts what the kernel moved too.  Without the pinned map (another
backend, or the agent has not loaded it yet) or when the join fails, the relay stays spliced.

Experimental, off unless the proxy runs with FERRY_FASTPATH=1, for two reasons measured in
`make bench` (`ferry-fastpath`): the kernel sends a redirected skb out of the other leg from the
psock's kworker, after the FIN behind it has reached the worker, so passing that FIN on at once
can overtake the last bytes (wrk with `Connection: close`: 4-21 errors in ~700 connections);
and that per-skb kworker send (no GSO batching) moves fewer bytes per second than the splice
relay here (about 0.5x direct against splice's 0.55x), though at about 0.01 proxy CPU s/GB and
a third of the splice relay's added latency.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
from pathlib import Path

from agent.proxy.relay import Relay
from agent.redirect import bpf_syscall as sys_bpf

log = logging.getLogger("ferry.proxy")

STATE_DIR_ENV = "FERRY_STATE_DIR"  # set by the supervisor for its workers
ENABLE_ENV = "FERRY_FASTPATH"  # "1": join (experimental, off by default: see the module doc)
JOINED_PIN = Path("bpf") / "maps" / "joined"
SO_COOKIE = 57
TCP_INFO_SIZE = 136
TCPI_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received in struct tcp_info
_U64 = struct.Struct("=Q")
EPOLLIN = select.EPOLLIN
EPOLLRDHUP = select.EPOLLRDHUP


class FastPath:
    """Joins sockets in the pinned `joined` map under `state_dir`, if there is one."""

    def __init__(self, state_dir: Path | None) -> None:
        self.path = None if state_dir is None else state_dir / JOINED_PIN

    @classmethod
    def from_environment(cls) -> FastPath:
        state_dir = os.environ.get(STATE_DIR_ENV)
        enabled = os.environ.get(ENABLE_ENV) == "1"
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
            size = sys_bpf.map_info(fd).value_size
            legs = ((down, up), (up, down))
            for leg, other in legs:
                value = other.fileno().to_bytes(size, "little")
                sys_bpf.map_update(fd, _cookie(leg), value, f"joining {leg.getsockname()}")
        except OSError as exc:
            log.debug("fast path: not joined: %s", exc)
            for leg, _ in ((down, up), (up, down)):
                sys_bpf.map_delete(fd, _cookie(leg))
            return False
        finally:
            os.close(fd)
        for leg in (down, up):
            leg.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)  # queued bytes go now
        return True


class JoinedRelay(Relay):
    """A `Relay` that hands its bytes to the kernel once it safely can (see the module doc)."""

    __slots__ = ("fastpath", "joined", "received")

    def __init__(
        self, down: socket.socket, up: socket.socket, fastpath: FastPath, **kw: object
    ) -> None:
        super().__init__(down, up, **kw)  # type: ignore[arg-type]
        self.fastpath = fastpath
        self.joined = False
        self.received = (0, 0)  # the legs' bytes received, as last read (kept after close)

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


def _bytes_received(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    return int(_U64.unpack_from(info, TCPI_BYTES_RECEIVED)[0])
