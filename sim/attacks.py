"""Hostile peers, an innocent client and a process watch: the parts of the limits suite.

The attacks of issue 8, each a plain function that acts from inside a network namespace (its
sockets are made there, `agent.netns.entered`) against one address, and returns what it saw:

- `hold_connections`: many TCP connections that never send a byte (a TLS handshake flood on a
  tunnel port, a connection flood on a plaintext one); how many the far side reset;
- `HboneAttacker`: an authenticated HTTP/2 peer (a valid workload certificate) on a tunnel
  port that misbehaves: PINGs or SETTINGS by the thousand (read or not), HEADERS + RST_STREAM
  pairs (Rapid Reset), endless CONTINUATION frames, a header block left open, streams stuffed
  with bytes for an app that never reads; `until_closed` says how the server ended it (its GOAWAY
  code) and when;
- `slowloris`: an HTTP/1.1 request head sent a byte at a time; the status line it got back;
- `Acceptor`: a server in a pod that counts the connections it accepts and never reads them (the
  app behind the proxy: a refused client must not become a connect here).

The innocent client runs as its own process, so an attack in this process takes no CPU from it:
`python -m sim.attacks probe HOST PORT SECONDS` (inside the client pod, `Pod.popen` or
`ip netns exec`) connects, sends a line to an echo server, reads it back and closes, again and
again, and prints one JSON object: the latencies in ms and the failures.  `percentile` reads
them.  `python -m sim.attacks hold HOST PORT COUNT SECONDS [--mark M] [--source IP]` holds
silent connections from the pod it runs in (`hold_connections`, a Held as JSON): a load with
descriptors of its own.
`ProcessWatch` samples one process (a proxy worker) while an attack runs: peak RSS (VmHWM after
clearing it, and sampled VmRSS), peak descriptors and CPU seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import select
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hpack

from agent.linux import LINGER_RESET
from agent.tunnel.frames import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    frame_header,
    rst_stream,
    settings_frame,
)

MB = 1024 * 1024


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of `values`, nearest rank; 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def _socket(netns_fd: int, mark: int = 0, source: str = "") -> socket.socket:
    """A TCP socket made in `netns_fd`, marked with `mark` (past the pod's own redirection, as a
    proxy's sockets are), bound to `source` (an address of that namespace) if given."""
    from agent.netns import entered  # pyroute2 comes with it: not for the probe process

    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    with entered(netns_fd):
        sock = socket.socket(family, socket.SOCK_STREAM)
    if mark:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    if source:
        sock.bind((source, 0))
    return sock


# -- connections that say nothing ---------------------------------------------------------------


@dataclass
class Held:
    """What `hold_connections` saw."""

    kept: int = 0  # connections still open at the end
    reset: int = 0  # connections the far side reset or closed (as soon as it accepted, or later)
    failed: int = 0  # connects that never completed (refused, timed out)


def hold_connections(
    netns_fd: int,
    addr: tuple[str, int],
    count: int,
    hold: float,
    mark: int = 0,
    source: str = "",
) -> Held:
    """Open `count` TCP connections to `addr` that never send a byte, keep them `hold` seconds,
    and count the ones the far side ended; all are closed (reset) afterwards."""
    held = Held()
    socks: list[socket.socket] = []
    live: list[socket.socket] = []  # connected, and not reset at once
    pending: dict[int, socket.socket] = {}
    poller = select.epoll()
    try:
        for _ in range(count):
            sock = _socket(netns_fd, mark, source)
            socks.append(sock)
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            err = sock.connect_ex(addr)
            if err and err != errno.EINPROGRESS:
                held.failed += 1
                continue
            pending[sock.fileno()] = sock
            poller.register(sock.fileno(), select.EPOLLOUT)
            if len(pending) >= 512:
                _settle(poller, pending, live, held, 0.0)
        deadline = time.monotonic() + 10
        while pending and time.monotonic() < deadline:
            _settle(poller, pending, live, held, 0.1)
        held.failed += len(pending)
        time.sleep(hold)
        for sock in live:
            try:
                ended = sock.recv(1) == b""
            except BlockingIOError:
                ended = False
            except OSError:
                ended = True
            if ended:
                held.reset += 1
            else:
                held.kept += 1
    finally:
        poller.close()
        for sock in socks:
            sock.close()
    return held


def _settle(
    poller: select.epoll,
    pending: dict[int, socket.socket],
    live: list[socket.socket],
    held: Held,
    timeout: float,
) -> None:
    for fd, _ev in poller.poll(timeout):
        sock = pending.pop(fd)
        poller.unregister(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err in (errno.ECONNRESET, errno.EPIPE):
            held.reset += 1
        elif err:
            held.failed += 1
        else:
            live.append(sock)


# -- the app: counts what reaches it ------------------------------------------------------------


class Acceptor:
    """A server inside a namespace that accepts, counts and holds connections, never reading
    (what a slow or stuck app is to the proxy); `close()` ends it and them."""

    def __init__(self, netns_fd: int, addr: tuple[str, int], rcvbuf: int = 0) -> None:
        from agent.netns import entered

        with entered(netns_fd):
            self.sock = socket.create_server(addr, backlog=4096)
        if rcvbuf:  # inherited by accepted sockets: small kernel buffers, bytes stay in the proxy
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.accepted = 0
        self.held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self.held.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        for conn in self.held:
            conn.close()


# -- an authenticated, misbehaving HTTP/2 peer --------------------------------------------------


@dataclass
class Ended:
    """How the server ended an attacker's connection."""

    goaway: int | None = None  # the error code of its GOAWAY (0xb: ENHANCE_YOUR_CALM)
    seconds: float = 0.0  # from the connection's start until it closed
    closed: bool = False  # False: still open when the wait ran out


class HboneAttacker:
    """A TLS 1.3 + HTTP/2 client to a tunnel port with a valid workload certificate (so the
    proxy lets it in), which then sends whatever it is told to."""

    def __init__(
        self,
        netns_fd: int,
        addr: tuple[str, int],
        chain_pem: bytes,
        key_pem: bytes,
        mark: int = 0,
        source: str = "",
    ) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.set_alpn_protocols(["h2"])
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "c.pem").write_bytes(chain_pem)
            (Path(tmp) / "k.pem").write_bytes(key_pem)
            ctx.load_cert_chain(Path(tmp) / "c.pem", Path(tmp) / "k.pem")
        raw = _socket(netns_fd, mark, source)
        raw.settimeout(10)
        raw.connect(addr)
        self.tls = ctx.wrap_socket(raw)
        self.encoder = hpack.Encoder()
        self.sid = 1
        self.started = time.monotonic()
        self.ended = Ended()  # what the server sent so far says
        self._unparsed = b""
        self.send(PREFACE + settings_frame([]))

    def send(self, data: bytes) -> bool:
        """False once the server closed the connection."""
        try:
            self.tls.sendall(data)
        except OSError:
            return False
        return True

    def connect_block(self, authority: str) -> bytes:
        return bytes(self.encoder.encode([(":method", "CONNECT"), (":authority", authority)]))

    def next_sid(self) -> int:
        sid, self.sid = self.sid, self.sid + 2
        return sid

    def pings(self, count: int, batch: int = 500, read: bool = True) -> int:
        """`count` PINGs, `batch` per write; with `read`, what the server sends is read (and
        dropped) between batches.  The PINGs sent before the server closed."""
        return self._flood(frame_header(8, PING, 0, 0) + bytes(8), count, batch, read)

    def settings(self, count: int, batch: int = 500, read: bool = True) -> int:
        return self._flood(settings_frame([(3, 100)]), count, batch, read)

    def _flood(self, frame: bytes, count: int, batch: int, read: bool) -> int:
        sent = 0
        while sent < count:
            n = min(batch, count - sent)
            if not self.send(frame * n):
                break
            sent += n
            if read and not self._drain():
                break
        return sent

    def _drain(self) -> bool:
        """Read what waits; False once the server closed."""
        self.tls.setblocking(False)
        try:
            while True:
                try:
                    data = self.tls.recv(1 << 16)
                except (ssl.SSLWantReadError, BlockingIOError):
                    return True
                except OSError:
                    data = b""
                if not data:
                    return False
                self._unparsed = _goaways(self._unparsed + data, self.ended)
        finally:
            self.tls.setblocking(True)

    def requests(self, authority: str, count: int, batch: int = 500, read: bool = False) -> int:
        """CONNECT requests for `authority` (one the server refuses: its answers pile up when
        they are not read); the requests sent before the server closed."""
        block = self.connect_block(authority)
        sent = 0
        while sent < count:
            chunk = bytearray()
            for _ in range(min(batch, count - sent)):
                chunk += frame_header(len(block), HEADERS, END_HEADERS, self.next_sid()) + block
            if not self.send(bytes(chunk)):
                break
            sent += min(batch, count - sent)
            if read and not self._drain():
                break
        return sent

    def rapid_reset(self, authority: str, pairs: int, batch: int = 100) -> int:
        """HEADERS (CONNECT `authority`) + RST_STREAM pairs; the pairs sent before the end."""
        block = self.connect_block(authority)
        sent = 0
        while sent < pairs:
            chunk = bytearray()
            for _ in range(min(batch, pairs - sent)):
                sid = self.next_sid()
                chunk += frame_header(len(block), HEADERS, END_HEADERS, sid) + block
                chunk += rst_stream(sid, 8)
            if not self.send(bytes(chunk)):
                break
            sent += min(batch, pairs - sent)
            if not self._drain():
                break
        return sent

    def continuations(self, authority: str, count: int, batch: int = 10_000) -> int:
        """A HEADERS frame without END_HEADERS, then empty CONTINUATION frames."""
        block = self.connect_block(authority)
        sid = self.next_sid()
        if not self.send(frame_header(len(block), HEADERS, 0, sid) + block):
            return 0
        empty = frame_header(0, CONTINUATION, 0, sid)
        sent = 0
        while sent < count:
            n = min(batch, count - sent)
            if not self.send(empty * n):
                break
            sent += n
        return sent

    def open_header_block(self, authority: str) -> None:
        """Start a header block and never finish it."""
        block = self.connect_block(authority)
        self.send(frame_header(3, HEADERS, 0, self.next_sid()) + block[:3])

    def stuff(self, authority: str, streams: int, per_stream: int) -> int:
        """Open `streams` CONNECT streams to an app that never reads and send `per_stream`
        bytes on each, without waiting for any WINDOW_UPDATE: keep `streams * per_stream`
        within the connection window and `per_stream` within the stream window (the server
        holds what the app does not take); the DATA bytes sent.  The connection stays open."""
        block = self.connect_block(authority)
        sids = [self.next_sid() for _ in range(streams)]
        opening = b"".join(frame_header(len(block), HEADERS, END_HEADERS, sid) + block
                           for sid in sids)  # fmt: skip
        if not self.send(opening):
            return 0
        time.sleep(0.2)  # the 200s come back; data before them is fine for the server too
        self._drain()
        chunk = 16384
        payload = frame_header(chunk, DATA, 0, 0)[:5]  # length/type/flags; the sid follows
        body = bytes(chunk)
        sent = 0
        for offset in range(0, per_stream, chunk):
            frames = b"".join(payload + sid.to_bytes(4, "big") + body for sid in sids)
            if not self.send(frames):
                break
            sent += chunk * len(sids)
            if offset % (1 * MB) == 0 and not self._drain():
                break
        return sent

    def until_closed(self, timeout: float) -> Ended:
        """Read until the server closes (or `timeout`): its GOAWAY's code, and how long after
        the connection was made."""
        ended = self.ended
        end = time.monotonic() + timeout
        self.tls.settimeout(0.2)
        while time.monotonic() < end:
            try:
                data = self.tls.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if not data:
                ended.closed = True
                break
            self._unparsed = _goaways(self._unparsed + data, ended)
        ended.seconds = time.monotonic() - self.started
        return ended

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.tls.close()


def _goaways(buf: bytes, ended: Ended) -> bytes:
    """Walk the frames in `buf`, noting a GOAWAY's code; returns the incomplete tail."""
    i = 0
    while len(buf) - i >= 9:
        length = int.from_bytes(buf[i : i + 3], "big")
        if len(buf) - i < 9 + length:
            break
        if buf[i + 3] == GOAWAY and length >= 8:
            ended.goaway = int.from_bytes(buf[i + 13 : i + 17], "big")
        i += 9 + length
    return buf[i:]


# -- a slow request head ------------------------------------------------------------------------


def slowloris(
    netns_fd: int,
    addr: tuple[str, int],
    interval: float,
    timeout: float,
    mark: int = 0,
    source: str = "",
) -> tuple[str, float]:
    """Send a request head a byte every `interval` seconds until the server answers or closes
    (or `timeout`): its status line ("" for none) and the seconds it took."""
    head = b"GET / HTTP/1.1\r\nHost: slow\r\nX-Filler: " + b"x" * 4096 + b"\r\n\r\n"
    sock = _socket(netns_fd, mark, source)
    start = time.monotonic()
    try:
        sock.settimeout(5)
        sock.connect(addr)
        sock.setblocking(False)
        for byte in head:
            if time.monotonic() - start > timeout:
                break
            with contextlib.suppress(BlockingIOError):
                got = sock.recv(4096)
                return got.split(b"\r\n", 1)[0].decode(errors="replace"), time.monotonic() - start
            try:
                sock.send(bytes([byte]))
            except OSError:
                break
            time.sleep(interval)
        sock.settimeout(2)
        with contextlib.suppress(OSError):
            got = sock.recv(4096)
            return got.split(b"\r\n", 1)[0].decode(errors="replace"), time.monotonic() - start
    except OSError:
        pass
    finally:
        sock.close()
    return "", time.monotonic() - start


# -- measuring ----------------------------------------------------------------------------------


@dataclass
class Watched:
    """What `ProcessWatch` saw of one process."""

    peak_rss_mb: float = 0.0
    peak_fds: int = 0
    cpu_seconds: float = 0.0
    rss_mb: float = 0.0  # at the end
    samples: list[float] = field(default_factory=list)  # RSS over time, MB


def rss_mb(pid: int) -> float:
    return _status(pid).get("VmRSS", 0) / 1024


def _status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[key] = int(value.split()[0])
    return out


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class ProcessWatch:
    """Sample a process every `every` seconds between `start()` and `stop()`."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        self.pid = pid
        self.every = every
        self.seen = Watched()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._cpu0 = 0.0

    def start(self) -> ProcessWatch:
        with contextlib.suppress(OSError):  # peak RSS from here on (Linux 4.0: clear_refs 5)
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        self._cpu0 = _cpu(self.pid)
        self._thread.start()
        return self

    def _run(self) -> None:
        seen = self.seen
        while not self._stop.wait(self.every):
            rss = rss_mb(self.pid)
            seen.samples.append(rss)
            seen.peak_rss_mb = max(seen.peak_rss_mb, rss)
            seen.peak_fds = max(seen.peak_fds, _fds(self.pid))

    def stop(self) -> Watched:
        self._stop.set()
        self._thread.join(5)
        seen = self.seen
        seen.peak_rss_mb = max(seen.peak_rss_mb, _status(self.pid).get("VmHWM", 0) / 1024)
        seen.peak_fds = max(seen.peak_fds, _fds(self.pid))
        seen.cpu_seconds = _cpu(self.pid) - self._cpu0
        seen.rss_mb = rss_mb(self.pid)
        return seen

    def __enter__(self) -> ProcessWatch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Probed:
    """An innocent client's round trips: latencies (ms) and failures."""

    latencies: list[float]
    failures: int

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 99)

    @classmethod
    def parse(cls, output: str) -> Probed:
        body: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
        return cls([float(x) for x in body["latencies"]], int(body["failures"]))


def probe_argv(host: str, port: int, seconds: float, pause: float = 0.01) -> list[str]:
    """The innocent client's command line (run it inside its pod)."""
    return [sys.executable, "-m", "sim.attacks", "probe", host, str(port), str(seconds),
            "--pause", str(pause)]  # fmt: skip


def _probe(host: str, port: int, seconds: float, pause: float) -> dict[str, Any]:
    latencies: list[float] = []
    failures = 0
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.monotonic()
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(2)
                sock.connect((host, port))
                sock.sendall(b"innocent\n")
                got = b""
                while len(got) < 9:
                    chunk = sock.recv(64)
                    if not chunk:
                        raise ConnectionError("closed")
                    got += chunk
            latencies.append((time.monotonic() - start) * 1000)
        except OSError:
            failures += 1
        time.sleep(pause)
    return {"latencies": [round(x, 3) for x in latencies], "failures": failures}


@contextlib.contextmanager
def opened_fds(limit: int) -> Iterator[None]:
    """Raise this process's open-file limit to at least `limit` for the block (root)."""
    import resource

    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(limit, before[0])
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, before[1])))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sim.attacks", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    probe = sub.add_parser("probe", help="an innocent client's round trips to an echo server")
    probe.add_argument("host")
    probe.add_argument("port", type=int)
    probe.add_argument("seconds", type=float)
    probe.add_argument("--pause", type=float, default=0.01)
    hold = sub.add_parser("hold", help="hold silent connections open (`hold_connections`)")
    hold.add_argument("host")
    hold.add_argument("port", type=int)
    hold.add_argument("count", type=int)
    hold.add_argument("seconds", type=float)
    hold.add_argument("--mark", type=lambda text: int(text, 0), default=0)
    hold.add_argument("--source", default="")
    args = parser.parse_args(argv)
    if args.command == "hold":
        netns_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
        try:
            held = hold_connections(netns_fd, (args.host, args.port), args.count, args.seconds,
                                    args.mark, args.source)  # fmt: skip
        finally:
            os.close(netns_fd)
        print(json.dumps(held.__dict__), flush=True)
        return 0
    print(json.dumps(_probe(args.host, args.port, args.seconds, args.pause)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
