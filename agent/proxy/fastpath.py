"""The same-node fast path, proxy side: the two apps' sends go into the proxy's sockets in the
kernel, and the worker is out of the byte path.

A same-node connection that policy lets through without inspection (`decide.Local`, no HTTP
facts needed) is relayed with `JoinedRelay` when the eBPF backend's maps are pinned in the state
dir and `redirection.kernel_fastpath` is on.  It starts as the splice `Relay`: client app C ->
the proxy's `down` socket -> `up` -> server app S, and back.

What the kernel does (bpf/ferry.c).  `sockops` puts C (its connection to the outbound listener)
and S (the app's end of the proxy's delivery) into the `apps` SOCKHASH and counts, in
`app_state`, the bytes each sends the ordinary way.  The sk_msg program of `apps` runs on each
of their sends.

The offer.  Once `up` is connected, `FastPath.offer` puts `down` and `up` into the `legs`
SOCKHASH (by socket cookie) and writes a join for each app into `joins`, keyed by the app
socket's 4-tuple as the app sees it (the peer of `down`, and of `up`): the proxy socket that
carries its bytes on (C's: `up`, S's: `down`) and how many of its bytes the proxy has written
there so far.  While the worker relays, it keeps that count current (`FastPath.progress`).

The switch.  On an app's send, when the proxy has written on every byte the app sent before
(`relayed == passed`), the kernel switches that app socket for good: this send and every later
one are pushed straight into the proxy's other socket, in the app's own system call, behind
everything the worker wrote there.  Nothing can overtake: the worker's bytes were all written
first, and the app's later bytes enter the same send queue after them.  Until the counts agree
(the worker is still behind), sends go the ordinary way and the worker carries them.

What the worker still sees.  An app's FIN travels the ordinary way, after its last byte went
into the other socket, so the relay reads EOF on `down` (or `up`) and shuts the other socket,
exactly as before, and closes both when both are done.  A revocation, an idle sweep or an abort
closes the proxy's sockets, which takes them out of `legs`: a switched app's next send finds no
target and fails (fail closed), and the app sees the close.  The counters (`bytes_up`,
`bytes_down`, and the idle sweep that compares them) read what the proxy's sockets sent, from
TCP_INFO and the send queue, which counts the kernel's bytes too.  Without the pinned maps
(another backend, or the agent has not loaded them yet), or when the offer fails, the relay
stays spliced.

Backpressure.  A switched app's send waits for room in the proxy's socket as a send on that
socket would: a blocking app blocks, a nonblocking app gets EAGAIN (its own socket stays
writable, so it retries).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
import termios
from dataclasses import dataclass
from pathlib import Path

from agent.proxy.relay import Relay
from agent.redirect import bpf_syscall as sys_bpf

log = logging.getLogger("ferry.proxy")

STATE_DIR_ENV = "FERRY_STATE_DIR"  # set by the supervisor for its workers (it imports no relay)
MAPS_PIN = Path("bpf") / "maps"
SO_COOKIE = 57
SO_NETNS_COOKIE = 71
TCP_INFO_SIZE = 136
TCPI_BYTES_ACKED = 120  # offset of tcpi_bytes_acked in struct tcp_info
_U64 = struct.Struct("=Q")
FLOW_KEY = struct.Struct("=Q16s16sHHI")  # struct flow_key in bpf/ferry.c
JOIN = struct.Struct("=QQ")  # struct join: relayed, target
APP_STATE = struct.Struct("=QQ")  # struct app_state: passed, target


@dataclass
class Offer:
    """The joins offered for one relay: each app's key, and what was last written for it."""

    client: bytes  # C's key (its bytes go on through `up`); b"" when C is not tracked
    server: bytes  # S's key (its bytes go on through `down`); b"" when S is not tracked
    up_cookie: bytes
    down_cookie: bytes
    client_relayed: int  # -1: C is not tracked, nothing offered
    server_relayed: int


class FastPath:
    """The pinned fast-path maps under `state_dir`, if there are any."""

    def __init__(self, state_dir: Path | None) -> None:
        self.maps = None if state_dir is None else state_dir / MAPS_PIN
        self._fds: dict[str, tuple[int, int]] = {}  # name -> (fd, inode of the pin it came from)
        self.offered = 0  # relays offered to the kernel
        self.failed = 0  # offers that failed (the relay stayed spliced)

    @classmethod
    def configured(cls, enabled: bool) -> FastPath:
        """`redirection.kernel_fastpath`; the state dir comes from the supervisor."""
        state_dir = os.environ.get(STATE_DIR_ENV)
        return cls(Path(state_dir) if state_dir and enabled else None)

    @property
    def available(self) -> bool:
        return self.maps is not None and (self.maps / "joins").exists()

    def offer(self, down: socket.socket, up: socket.socket, up_relayed: int,
              down_relayed: int) -> Offer | None:  # fmt: skip
        """Put both proxy sockets into `legs` and offer each tracked app its join; None (nothing
        offered) when there are no maps or neither app is tracked."""
        try:
            legs, joins, apps = self._fd("legs"), self._fd("joins"), self._fd("app_state")
            client = _tracked(apps, _keys(down, down.getpeername(), down.getsockname()))
            server = _tracked(apps, _keys(up, up.getpeername(), up.getsockname()))
            tracked = [client is not None, server is not None]
            if client is None or server is None:
                if not any(tracked):
                    return None
                client, server = client or b"", server or b""
            offer = Offer(client, server, _cookie(up), _cookie(down), -1, -1)
            size = sys_bpf.map_info(legs).value_size
            for sock, cookie in ((down, offer.down_cookie), (up, offer.up_cookie)):
                value = sock.fileno().to_bytes(size, "little")
                sys_bpf.map_update(legs, cookie, value, f"joining {sock.getsockname()}")
            if tracked[0]:
                self._write(joins, client, up_relayed, offer.up_cookie)
                offer.client_relayed = up_relayed
            if tracked[1]:
                self._write(joins, server, down_relayed, offer.down_cookie)
                offer.server_relayed = down_relayed
        except OSError as exc:  # gone, not ours to open (no CAP_BPF), or a socket already shut
            log.debug("fast path: not offered: %s", exc)
            self.failed += 1
            return None
        self.offered += 1
        return offer

    def progress(self, offer: Offer, up_relayed: int, down_relayed: int) -> None:
        """Keep the offer's counts current while the worker still relays."""
        try:
            joins = self._fd("joins")
            if 0 <= offer.client_relayed != up_relayed:
                self._write(joins, offer.client, up_relayed, offer.up_cookie)
                offer.client_relayed = up_relayed
            if 0 <= offer.server_relayed != down_relayed:
                self._write(joins, offer.server, down_relayed, offer.down_cookie)
                offer.server_relayed = down_relayed
        except OSError as exc:  # the maps went away: the apps stay on the ordinary path
            log.debug("fast path: offer not kept current: %s", exc)
            offer.client_relayed = offer.server_relayed = -1

    def withdraw(self, offer: Offer) -> None:
        """Forget both apps' joins and counts (the relay is closing)."""
        try:
            joins, apps = self._fd("joins"), self._fd("app_state")
        except OSError:
            return
        for key in (offer.client, offer.server):
            if key:
                sys_bpf.map_delete(joins, key)
                sys_bpf.map_delete(apps, key)

    def switched(self, offer: Offer) -> int:
        """How many of the offer's two apps the kernel has switched (status and tests)."""
        try:
            apps = self._fd("app_state")
        except OSError:
            return 0
        count = 0
        for key in filter(None, (offer.client, offer.server)):
            value = sys_bpf.map_lookup(apps, key, APP_STATE.size)
            count += value is not None and APP_STATE.unpack(value)[1] != 0
        return count

    def close(self) -> None:
        for fd, _ in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, name: str) -> int:
        """An fd on the pinned map `name`, opened again when the agent pinned a new one."""
        if self.maps is None:
            raise FileNotFoundError("no fast-path maps")
        path = self.maps / name
        inode = os.stat(path).st_ino
        held = self._fds.get(name)
        if held is not None and held[1] == inode:
            return held[0]
        fd = sys_bpf.obj_get(path)
        if held is not None:
            os.close(held[0])
        self._fds[name] = (fd, inode)
        return fd

    @staticmethod
    def _write(joins: int, key: bytes, relayed: int, target: bytes) -> None:
        value = JOIN.pack(relayed, _U64.unpack(target)[0])
        sys_bpf.map_update(joins, key, value, "offering a join")


class JoinedRelay(Relay):
    """A `Relay` whose apps the kernel may switch to the fast path (see the module doc)."""

    __slots__ = ("fastpath", "offer", "sent")

    def __init__(
        self, down: socket.socket, up: socket.socket, fastpath: FastPath, **kw: object
    ) -> None:
        super().__init__(down, up, **kw)  # type: ignore[arg-type]
        self.fastpath = fastpath
        self.offer: Offer | None = None
        self.sent = (0, 0)  # what `up` and `down` sent, as last read (kept after close)

    @property
    def bytes_up(self) -> int:
        return self._sent()[0] if self.offer is not None else self.up_half.nbytes

    @property
    def bytes_down(self) -> int:
        return self._sent()[1] if self.offer is not None else self.down_half.nbytes

    @property
    def offered(self) -> bool:
        return self.offer is not None

    def on_event(self, fd: int, events: int) -> None:
        super().on_event(fd, events)
        if self.offer is not None and not self.closed:
            self.fastpath.progress(self.offer, self.up_half.nbytes, self.down_half.nbytes)

    def _finish_connect(self) -> bool:
        """Connected: offer the joins before the first byte goes up, so the server app cannot
        answer before its join is there."""
        if not super()._finish_connect():
            return False
        self.offer = self.fastpath.offer(self.down, self.up, 0, 0)
        return True

    def close(self) -> None:
        if self.offer is not None and not self.closed:
            self._sent()
            self.fastpath.withdraw(self.offer)
        super().close()

    def _sent(self) -> tuple[int, int]:
        if not self.closed:
            try:
                up = _written(self.up) - 1 - self.up_half.shut  # its SYN, its FIN
                down = _written(self.down) - self.down_half.shut
            except OSError:
                return self.sent
            self.sent = (max(up, 0), max(down, 0))
        return self.sent


def _keys(sock: socket.socket, local: tuple[str, int], remote: tuple[str, int]) -> list[bytes]:
    """The flow keys the app socket at the other end of `sock` (which lives in the app's netns)
    may have, `local` and `remote` as the app sees them: an IPv4 connection's app socket may be
    an IPv6 one (a dual-stack socket, IPv4-mapped addresses)."""
    netns = _U64.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
    v6 = socket.AF_INET6
    if sock.family == v6:
        addrs = [(v6, socket.inet_pton(v6, local[0]), socket.inet_pton(v6, remote[0]))]
    else:
        here, there = socket.inet_aton(local[0]), socket.inet_aton(remote[0])
        mapped = bytes(10) + b"\xff\xff"
        addrs = [(socket.AF_INET, here, there), (v6, mapped + here, mapped + there)]
    return [FLOW_KEY.pack(netns, a, b, local[1], remote[1], int(f)) for f, a, b in addrs]


def _tracked(apps: int, keys: list[bytes]) -> bytes | None:
    """The one of `keys` the kernel tracks (`app_state`), if any."""
    for key in keys:
        if sys_bpf.map_lookup(apps, key, APP_STATE.size) is not None:
            return key
    return None


def _cookie(sock: socket.socket) -> bytes:
    return sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)


def _written(sock: socket.socket) -> int:
    """Sequence space written into `sock`: acknowledged by its peer, or still in its send
    queue (its SYN and FIN included)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    unacked = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    return int(_U64.unpack_from(info, TCPI_BYTES_ACKED)[0]) + int(unacked)
