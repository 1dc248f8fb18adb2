"""The splice relay's decision core, driven by a tiny epoll loop over real kernel sockets."""

from __future__ import annotations

import errno
import hashlib
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from agent.proxy.relay import EPOLLIN, EPOLLOUT, PipePool, Relay


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(a, b): two ends of one loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    return a, b


class Harness:
    """client <-> [down  Relay  up] <-> server; the relay runs on a real epoll."""

    def __init__(self, *, pool: PipePool | None = None, connect_to: int | None = None) -> None:
        self.client, down = tcp_pair()
        self.ep = select.epoll()
        self.watched: dict[int, int] = {}
        self.history: list[tuple[int, int]] = []
        self.done_calls = 0
        down.setblocking(False)
        if connect_to is None:
            up, self.server = tcp_pair()
            up.setblocking(False)
            connecting = False
        else:
            up = socket.socket()
            up.setblocking(False)
            up.connect_ex(("127.0.0.1", connect_to))
            connecting = True
        self.relay = Relay(
            down, up, connecting=connecting, watch=self.watch, done=self.done, pool=pool
        )
        self.relay.start()

    def watch(self, fd: int, old: int, new: int) -> None:
        assert self.watched.get(fd, 0) == old
        self.history.append((fd, new))
        if new == 0:
            self.ep.unregister(fd)
            del self.watched[fd]
        elif old == 0:
            self.ep.register(fd, new)
            self.watched[fd] = new
        else:
            self.ep.modify(fd, new)
            self.watched[fd] = new

    def done(self, relay: Relay) -> None:
        self.done_calls += 1
        self.watched.clear()  # closed fds left the epoll set by themselves

    def step(self, timeout: float = 0.01) -> None:
        for fd, ev in self.ep.poll(timeout):
            self.relay.on_event(fd, ev)

    def run_until(self, cond: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, "condition not reached"
            self.step()

    def close(self) -> None:
        self.relay.abort()
        self.ep.close()
        self.client.close()
        if hasattr(self, "server"):
            self.server.close()


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.close()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "unexpected EOF"
        buf += chunk
    return buf


def test_starts_reading_both_sides(h: Harness) -> None:
    assert h.relay.interest() == {h.relay.fd_down: EPOLLIN, h.relay.fd_up: EPOLLIN}


def test_round_trip_and_byte_counts(h: Harness) -> None:
    h.client.sendall(b"GET / HTTP/1.0\r\n\r\n")
    h.server.settimeout(5)
    h.run_until(lambda: h.relay.bytes_up == 18)
    assert recv_exact(h.server, 18) == b"GET / HTTP/1.0\r\n\r\n"
    h.server.sendall(b"x" * 1000)
    h.run_until(lambda: h.relay.bytes_down == 1000)
    h.client.settimeout(5)
    assert recv_exact(h.client, 1000) == b"x" * 1000
    assert (h.relay.bytes_up, h.relay.bytes_down) == (18, 1000)
    assert not h.relay.closed


def test_client_half_close_then_server_replies(h: Harness) -> None:
    h.client.sendall(b"request")
    h.client.shutdown(socket.SHUT_WR)
    h.server.settimeout(5)
    h.run_until(lambda: h.relay.up_half.shut)
    assert recv_exact(h.server, 7) == b"request"
    assert h.server.recv(10) == b""  # EOF propagated
    # the other direction still works
    assert h.relay.interest()[h.relay.fd_up] == EPOLLIN
    assert h.relay.interest()[h.relay.fd_down] == 0  # nothing to read or write on client side
    h.server.sendall(b"response")
    h.server.shutdown(socket.SHUT_WR)
    h.run_until(lambda: h.relay.closed)
    h.client.settimeout(5)
    assert recv_exact(h.client, 8) == b"response"
    assert h.client.recv(10) == b""
    assert h.done_calls == 1
    assert not h.relay.reset
    assert (h.relay.bytes_up, h.relay.bytes_down) == (7, 8)


def test_server_half_close_first(h: Harness) -> None:
    h.server.sendall(b"banner")
    h.server.shutdown(socket.SHUT_WR)
    h.client.settimeout(5)
    h.run_until(lambda: h.relay.down_half.shut)
    assert recv_exact(h.client, 6) == b"banner"
    assert h.client.recv(1) == b""
    h.client.sendall(b"late data")
    h.client.close()
    h.server.settimeout(5)
    h.run_until(lambda: h.relay.closed)
    assert recv_exact(h.server, 9) == b"late data"
    assert h.server.recv(1) == b""
    assert h.done_calls == 1 and not h.relay.reset


def test_backpressure_with_slow_reader_keeps_memory_bounded() -> None:
    pool = PipePool(size=256 * 1024)
    h = Harness(pool=pool)
    total = 48 * 1024 * 1024
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()
    sent = threading.Event()

    def sender() -> None:
        for _ in range(total // len(block)):
            h.client.sendall(block)
        h.client.shutdown(socket.SHUT_WR)
        sent.set()

    for _ in range(total // len(block)):
        digest.update(block)
    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    try:
        # The server does not read: the relay must stall, not buffer everything.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            h.step()
            assert h.relay.up_half.pending <= h.relay.up_half.cap
        stalled_at = h.relay.bytes_up
        assert not sent.is_set()
        assert stalled_at < total // 4  # socket buffers only, a few MB at most
        assert h.relay.mask_down & EPOLLIN == 0  # not reading the client any more
        assert h.relay.mask_up & EPOLLOUT  # waiting for the server to drain
        assert (h.relay.fd_down, 0) in h.history or h.relay.mask_down == 0
        # Now read slowly at first, then everything; the relay resumes.
        got = hashlib.sha256()
        received = 0
        h.server.setblocking(False)
        eof = False
        while not eof:
            h.step(0.001)
            assert h.relay.up_half.pending <= h.relay.up_half.cap
            try:
                chunk = h.server.recv(1 << 16 if received < total // 8 else 1 << 20)
            except BlockingIOError:
                continue
            if not chunk:
                eof = True
            got.update(chunk)
            received += len(chunk)
        assert received == total
        assert got.digest() == digest.digest()
        assert h.relay.bytes_up == total
        assert h.relay.up_half.shut
    finally:
        thread.join(10)
        h.close()
        pool.close()


def test_server_reset_resets_client(h: Harness) -> None:
    h.client.sendall(b"hello")
    h.run_until(lambda: h.relay.bytes_up == 5)
    h.server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    h.server.close()
    h.run_until(lambda: h.relay.closed)
    assert h.relay.reset and h.done_calls == 1
    h.client.settimeout(5)
    with pytest.raises(ConnectionResetError):
        while h.client.recv(100):
            pass
    del h.server


def test_client_reset_resets_server(h: Harness) -> None:
    h.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    h.client.close()
    h.run_until(lambda: h.relay.closed)
    assert h.relay.reset
    h.server.settimeout(5)
    with pytest.raises(ConnectionResetError):
        h.server.recv(100)


def test_write_into_reset_peer_aborts(h: Harness) -> None:
    h.server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    h.server.close()
    time.sleep(0.05)
    h.client.sendall(b"into the void")
    h.run_until(lambda: h.relay.closed)
    assert h.relay.reset


def test_connect_then_flush_bytes_read_while_connecting() -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        h = Harness(connect_to=srv.getsockname()[1])
        try:
            assert h.relay.connecting
            assert h.relay.mask_up == EPOLLOUT
            h.client.sendall(b"early")
            h.run_until(lambda: not h.relay.connecting and h.relay.bytes_up == 5)
            server, _ = srv.accept()
            server.settimeout(5)
            assert recv_exact(server, 5) == b"early"
            server.sendall(b"ok")
            h.client.settimeout(5)
            h.run_until(lambda: h.relay.bytes_down == 2)
            assert recv_exact(h.client, 2) == b"ok"
            server.close()
        finally:
            h.close()


def test_connect_refused_resets_client() -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
    h = Harness(connect_to=port)  # nothing listens there any more
    try:
        h.run_until(lambda: h.relay.closed)
        assert h.relay.connect_failed and h.relay.reset
        h.client.settimeout(5)
        with pytest.raises(OSError) as info:
            h.client.recv(1)
        assert info.value.errno == errno.ECONNRESET
    finally:
        h.close()


def test_pipe_pool_reuses_only_empty_pipes() -> None:
    pool = PipePool(size=1 << 20, keep=1)
    r, w, cap = pool.get()
    assert cap >= 65536
    pool.put(r, w, cap, True)
    assert pool.get() == (r, w, cap)
    pool.put(r, w, cap, False)  # may hold bytes: closed
    with pytest.raises(OSError):
        os.fstat(r)
    pool.close()
