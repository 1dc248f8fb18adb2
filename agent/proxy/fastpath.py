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
Joins are never taken back: a closed app socket's join ages out of the LRU map, and `sockops`
drops the join under a 4-tuple when a new app socket with that 4-tuple is established (before
it can send), so a stale join never matches.  An app socket the kernel does not track (the fast
path was off when it connected) never looks at its join.

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

Backpressure.  A switched app pushes into the proxy's socket, not its own, so a full proxy
socket would fail a nonblocking app's send with EAGAIN while its own socket stays writable: an
edge-triggered app (nginx) would wait for a wakeup that never comes.  So the proxy gives its two
sockets a fixed send buffer (SNDBUF, SO_SNDBUFFORCE) far above what the kernel lets wait in them
(TARGET_BACKLOG: written minus acknowledged, bpf/ferry.c): past that, the app's sends go the
ordinary way again, where its own socket fills and wakes it as it drains, and the worker carries
them; once the worker has caught up and the reader has made room, the next send switches back.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
import termios
import time
from dataclasses import dataclass
from pathlib import Path

from agent.proxy.relay import Relay
from agent.redirect import bpf_syscall as sys_bpf

log = logging.getLogger("ferry.proxy")

STATE_DIR_ENV = "FERRY_STATE_DIR"  # set by the supervisor for its workers (it imports no relay)
MAPS_PIN = Path("bpf") / "maps"
SO_COOKIE = 57
SO_SNDBUFFORCE = 32
SNDBUF = 8 << 20  # the kernel doubles it: 16 MiB, twice TARGET_BACKLOG (8 MiB) in bpf/ferry.c
SO_NETNS_COOKIE = 71
RECHECK = 1.0  # seconds between looks at whether the agent pinned new maps
TCP_INFO_SIZE = 136
TCPI_BYTES_ACKED = 120  # offset of tcpi_bytes_acked in struct tcp_info
_U64 = struct.Struct("=Q")
FLOW_KEY = struct.Struct("=Q16s16sHHI")  # struct flow_key in bpf/ferry.c
JOIN = struct.Struct("=QQ")  # struct join: relayed, target


@dataclass
class Offer:
    """The joins offered for one relay: each app's key, and the count last written for it."""

    client: bytes  # C's key (its bytes go on through `up`)
    server: bytes  # S's key (its bytes go on through `down`)
    up_cookie: bytes
    down_cookie: bytes
    client_relayed: int = 0
    server_relayed: int = 0


class FastPath:
    """The pinned fast-path maps under `state_dir`, if there are any."""

    def __init__(self, state_dir: Path | None) -> None:
        self.maps = None if state_dir is None else state_dir / MAPS_PIN
        self._fds: dict[str, tuple[int, int]] = {}  # name -> (fd, inode of the pin it came from)
        self._checked: dict[str, float] = {}  # name -> when its pin was last looked at
        self._leg_size = 0  # value size of `legs`

    @classmethod
    def configured(cls, enabled: bool) -> FastPath:
        """`redirection.kernel_fastpath`; the state dir comes from the supervisor."""
        state_dir = os.environ.get(STATE_DIR_ENV)
        return cls(Path(state_dir) if state_dir and enabled else None)

    @property
    def available(self) -> bool:
        return self.maps is not None and (self.maps / "joins").exists()

    def offer(self, down: socket.socket, up: socket.socket) -> Offer | None:
        """Put both proxy sockets into `legs` and offer each app its join (nothing relayed yet);
        None (nothing offered) when there are no maps."""
        try:
            legs, joins = self._fd("legs"), self._fd("joins")
            offer = Offer(
                client=_key(down, down.getpeername(), down.getsockname()),
                server=_key(up, up.getpeername(), up.getsockname()),
                up_cookie=_cookie(up),
                down_cookie=_cookie(down),
            )
            for sock, cookie in ((down, offer.down_cookie), (up, offer.up_cookie)):
                sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SNDBUF)
                value = sock.fileno().to_bytes(self._leg_size, "little")
                sys_bpf.map_update(legs, cookie, value, "offering a proxy socket")
            self._write(joins, offer.client, 0, offer.up_cookie)
            self._write(joins, offer.server, 0, offer.down_cookie)
        except OSError as exc:  # gone, not ours to open (no CAP_BPF), or a socket already shut
            log.debug("fast path: not offered: %s", exc)
            return None
        return offer

    def progress(self, offer: Offer, up_relayed: int, down_relayed: int) -> None:
        """Keep the offer's counts current while the worker still relays."""
        try:
            joins = self._fd("joins")
            if offer.client_relayed != up_relayed:
                self._write(joins, offer.client, up_relayed, offer.up_cookie)
                offer.client_relayed = up_relayed
            if offer.server_relayed != down_relayed:
                self._write(joins, offer.server, down_relayed, offer.down_cookie)
                offer.server_relayed = down_relayed
        except OSError as exc:  # the maps went away: the apps stay on the ordinary path
            log.debug("fast path: offer not kept current: %s", exc)

    def close(self) -> None:
        for fd, _ in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, name: str) -> int:
        """An fd on the pinned map `name`, opened again when the agent pinned a new one (the
        pin is looked at once per RECHECK seconds at most)."""
        if self.maps is None:
            raise FileNotFoundError("no fast-path maps")
        held = self._fds.get(name)
        now = time.monotonic()
        if held is not None and now - self._checked[name] < RECHECK:
            return held[0]
        path = self.maps / name
        inode = os.stat(path).st_ino
        self._checked[name] = now
        if held is not None and held[1] == inode:
            return held[0]
        fd = sys_bpf.obj_get(path)
        if held is not None:
            os.close(held[0])
        self._fds[name] = (fd, inode)
        if name == "legs":
            self._leg_size = sys_bpf.map_info(fd).value_size
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

    def on_event(self, fd: int, events: int) -> None:
        super().on_event(fd, events)
        if self.offer is not None and not self.closed:
            self.fastpath.progress(self.offer, self.up_half.nbytes, self.down_half.nbytes)

    def _finish_connect(self) -> bool:
        """Connected: offer the joins before the first byte goes up, so the server app cannot
        answer before its join is there."""
        if not super()._finish_connect():
            return False
        self.offer = self.fastpath.offer(self.down, self.up)
        return True

    def close(self) -> None:
        if self.offer is not None and not self.closed:
            self._sent()
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


def _key(sock: socket.socket, local: tuple[str, int], remote: tuple[str, int]) -> bytes:
    """The flow key of the app socket at the other end of `sock` (which lives in the app's
    netns), `local` and `remote` as the app sees them (an IPv4 connection of a dual-stack app
    socket is keyed as IPv4 in the kernel too)."""
    netns = _U64.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
    family = sock.family
    here, there = socket.inet_pton(family, local[0]), socket.inet_pton(family, remote[0])
    return FLOW_KEY.pack(netns, here, there, local[1], remote[1], int(family))


def _cookie(sock: socket.socket) -> bytes:
    return sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)


def _written(sock: socket.socket) -> int:
    """Sequence space written into `sock`: acknowledged by its peer, or still in its send
    queue (its SYN and FIN included)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    unacked = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    return int(_U64.unpack_from(info, TCPI_BYTES_ACKED)[0]) + int(unacked)
