"""The worker's HBONE side: client tunnels from the pool, server tunnels on :15008, their streams.

`Tunnels` is the `Host` that `agent.tunnel` connections and streams report to, and the part of a
worker that opens and accepts them:

- client: `open_stream` adds a CONNECT stream for an app connection to a pooled connection
  (`agent.proxy.tunnel_pool`, keyed by source workload and destination IP), opening one from the
  source netns (marked) to `<ip>:tunnel_port` when none has room; its server must present the
  identity the directory names for that IP;
- server: `accept` terminates TLS with the workload's certificate and requires a client
  certificate from the trust bundle and domain; each CONNECT is judged by the decision core
  (`decide.admit_stream`) and the workload's policy (`enforce.Enforcer`, 403 when denied) and,
  admitted, connected inside the workload's netns from the tunnel peer's IP (a transparent
  socket), 200 once connected, 503 when that connect fails; a stream to a port whose policy
  decides per request goes through the worker's HTTP inspection (`Loop.inspect`: the stream
  writes into one end of a socketpair, an `InspectedRelay` reads the other), and is accepted at
  once; the worker's `Recorder` has each admitted stream's duration and access log line;
- `sweep` ends connections still connecting or handshaking after the connect timeout and closes
  idle pooled ones; `flush` writes each connection that queued frames once per batch of events;
- `drain` (the proxy was upgraded, `agent.proxy.handoff`): pooled connections take no new
  streams and close with their last one, and every peer is told to open no new stream here (a
  GOAWAY notice, also to connections still handshaking once they are up); `drained` says when
  none is left.

It shares the worker's epoll loop through the `Loop` protocol (handlers by fd, fds that went
stale during the current batch, interest changes).

Bounds (`limits:`, `agent.proxy.admission`): an accepted connection is reset before any TLS
state exists when the worker holds its share of connections or too many handshakes are in
progress (per worker, per source IP); a stream is refused (503) before any socket exists when
the worker or the workload holds its share of connections.  Every connection and stream counts
as one held connection until it ends.  Connections and streams cut off at a flood bound (their
`shed`) are counted against the workload with the peer's identity (or IP).

A connection that ends before its TLS handshake is done (either role) is counted per workload,
direction and reason (`agent.tunnel.handshake_failure`: the text it failed with, mapped to a
bounded set); one refused at a bound before any TLS state exists counts as `shed`.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, Protocol

from agent.config import LimitsConfig, RedirectionConfig
from agent.linux import reset
from agent.policy.facts import Facts
from agent.proxy import decide
from agent.proxy.admission import Admission, bounds_of
from agent.proxy.enforce import Enforcer, Guarded
from agent.proxy.messages import HandshakeFailure, TunnelCounters
from agent.proxy.sockets import upstream_socket
from agent.proxy.tunnel_pool import TunnelPool
from agent.proxy.workload import FlowStats, ServedWorkload
from agent.telemetry.recorder import Recorder
from agent.tunnel.authority import format_authority
from agent.tunnel.connection import CLOSED, Buffers, TunnelConn
from agent.tunnel.handshake_failure import TIMEOUT, reason_of
from agent.tunnel.stream import TunnelStream

log = logging.getLogger("ferry.proxy.worker")

POOL_IDLE = 30.0

Handler = Callable[[int, int], None]


class Loop(Protocol):
    handlers: dict[int, Handler]
    stale: set[int]
    recorder: Recorder

    def watch(self, fd: int, old: int, new: int) -> None: ...

    def inspect(
        self,
        wl: ServedWorkload,
        stats: FlowStats,
        facts: Facts,
        up: socket.socket,
        far: socket.socket,
    ) -> None: ...


class Tunnels:
    def __init__(
        self,
        loop: Loop,
        cfg: RedirectionConfig,
        own_ports: frozenset[int],
        home_fd: int,
        enforcer: Enforcer,
        guarded: Guarded,
        admission: Admission,
        limits: LimitsConfig,
    ) -> None:
        self.loop = loop
        self.admission = admission
        self.bounds = bounds_of(limits)
        self.enforcer = enforcer
        self.guarded = guarded
        self.cfg = cfg
        self.own_ports = own_ports
        self.home_fd = home_fd
        self.trust_domain = ""
        self.bufs = Buffers(budget=limits.buffered_per_worker)
        self.pool: TunnelPool[TunnelConn] = TunnelPool(limits.streams_per_connection)
        self.conns: set[TunnelConn] = set()
        self.handshaking: dict[TunnelConn, str] = {}  # server side, until TLS is done: its IP
        self.handshakes = 0
        self.handshake_failures: dict[tuple[str, str, str], int] = {}  # (uid, direction, reason)
        self.to_flush: list[TunnelConn] = []
        self.draining = False

    # -- client side ------------------------------------------------------------------------

    def open_stream(
        self, wl: ServedWorkload, client: socket.socket, dst: tuple[str, int], expected: str
    ) -> None:
        stats = wl.flow("outbound", "mtls", expected)
        now = time.monotonic()
        key = (wl.uid, dst[0])
        conn = self.pool.find(key)
        if conn is None:
            try:
                conn = self._connect(wl, dst[0], expected, now)
            except (OSError, ssl.SSLError) as exc:
                log.debug("%s: cannot open a tunnel to %s: %s", wl.uid, dst[0], exc)
                stats.failures += 1
                reset(client)
                return
            self.pool.add(key, conn)
            self._track(conn)
        stream = TunnelStream(conn, client, owner=stats, now=now)
        self.loop.handlers[stream.fd] = stream.on_event
        stats.relays.add(stream)
        self.admission.opened(stream, "", 1)  # the app's socket, which the stream reads
        conn.add_stream(stream, format_authority(*dst))

    def _connect(self, wl: ServedWorkload, ip: str, expected: str, now: float) -> TunnelConn:
        assert wl.client_ctx is not None
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sock = upstream_socket(wl.netns_fd, family, self.cfg.mark, None, home_fd=self.home_fd)
        err = sock.connect_ex((ip, self.cfg.tunnel_port))
        if err and err != errno.EINPROGRESS:
            sock.close()
            raise OSError(err, os.strerror(err))
        return TunnelConn(
            self, self.bufs, sock, wl.client_ctx, client=True, trust_domain=self.trust_domain,
            expected_identity=expected, owner=(wl, (wl.uid, ip)), now=now, bounds=self.bounds,
        )  # fmt: skip

    def _track(self, conn: TunnelConn, peer: str = "") -> None:
        """`peer`: the source IP a server-side connection was admitted for."""
        self.conns.add(conn)
        self.admission.opened(conn, peer, 1)
        self.loop.handlers[conn.fd] = conn.on_event
        conn.start()

    # -- server side ------------------------------------------------------------------------

    def accept(self, wl: ServedWorkload, client: socket.socket, peer: Any) -> None:
        verdict = decide.admit_tunnel(wl)
        if isinstance(verdict, decide.Deny):
            wl.flow("inbound", "mtls").deny(verdict.reason)
            reset(client)
            return
        assert wl.server_ctx is not None  # certified: both contexts are built together
        ip = peer[0]
        admission = self.admission
        if not admission.admit(wl, ip, inbound=True, fds=1) or not admission.handshake(wl, ip):
            self._handshake_failed(wl, "inbound", "shed")
            reset(client)
            return
        try:
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = TunnelConn(
                self, self.bufs, client, wl.server_ctx, client=False,
                trust_domain=self.trust_domain, owner=(wl, None), now=time.monotonic(),
                bounds=self.bounds,
            )  # fmt: skip
        except OSError as exc:
            log.debug("%s: tunnel accept: %s", wl.uid, exc)
            admission.handshake_over(ip)
            wl.flow("inbound", "mtls").failures += 1
            reset(client)
            return
        if conn.state == CLOSED:  # the peer was gone already
            admission.handshake_over(ip)
            return
        self.handshaking[conn] = ip
        self._track(conn, ip)

    def tunnel_request(self, conn: TunnelConn, stream_id: int, authority: str) -> None:
        wl: ServedWorkload = conn.owner[0]
        core = conn.core
        assert core is not None
        stats = wl.flow("inbound", "mtls", conn.peer_identity)
        verdict = decide.admit_stream(wl, conn.peer_identity, authority, self.own_ports)
        if isinstance(verdict, decide.Deny):
            stats.deny(verdict.reason)
            core.refuse(stream_id, verdict.status)
            return
        ip, port = verdict.ip, verdict.port
        facts = Facts(conn.peer_identity, conn.peer_ip, ip, port)
        http = wl.policy is not None and wl.policy.needs_http(port)
        if not self.enforcer.admit_connection(wl, facts, stats, http=http):
            core.refuse(stream_id, 403)
            return
        fds = 3 if http else 1  # the upstream socket, and a socketpair to inspect requests
        if not self.admission.admit(wl, conn.peer_identity, inbound=True, fds=fds):
            core.refuse(stream_id, 503)
            return
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        bind_to = (conn.peer_ip, 0) if (":" in conn.peer_ip) == (":" in ip) else None
        pair: tuple[socket.socket, socket.socket] | None = None
        try:  # every descriptor first: a stream that cannot have them costs the app no connect
            up = upstream_socket(wl.netns_fd, family, self.cfg.mark, bind_to, home_fd=self.home_fd)
            if http:  # requests are decided one by one between the stream and the app
                try:
                    pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                except OSError:
                    up.close()
                    raise
        except OSError as exc:
            log.debug("%s: cannot open upstream for %s: %s", wl.uid, authority, exc)
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self.admission.shed(wl, "open_files", conn.peer_identity)
            stats.failures += 1
            core.refuse(stream_id, 503)
            return
        err = up.connect_ex((ip, port))
        if err and err != errno.EINPROGRESS:
            up.close()
            if pair is not None:
                pair[0].close()
                pair[1].close()
            stats.failures += 1
            core.refuse(stream_id, 503)
            return
        app = up
        if pair is not None:
            app, far = pair
            app.setblocking(False)
            far.setblocking(False)
            self.loop.inspect(wl, stats, facts, up, far)  # the stream "connects" at once
        stream = TunnelStream(
            conn, app, sid=stream_id, app_connecting=True, owner=stats, now=time.monotonic()
        )
        self.loop.handlers[stream.fd] = stream.on_event
        stats.relays.add(stream)
        self.admission.opened(stream, conn.peer_identity, fds)
        self.loop.recorder.stream_opened(stream, wl, facts)
        if not http:
            self.guarded.add(stream, wl, facts, spliced=True)
        stream.update()

    # -- host callbacks ---------------------------------------------------------------------

    def watch(self, fd: int, old: int, new: int) -> None:
        self.loop.watch(fd, old, new)

    def flush_soon(self, conn: TunnelConn) -> None:
        self.to_flush.append(conn)

    def tunnel_ready(self, conn: TunnelConn) -> None:
        self.handshakes += 1
        ip = self.handshaking.pop(conn, None)
        if ip is not None:
            self.admission.handshake_over(ip)
        if self.draining:
            self._notice(conn)

    def tunnel_closed(self, conn: TunnelConn, reason: str) -> None:
        wl: ServedWorkload = conn.owner[0]
        key = conn.owner[1]
        log.debug("%s: tunnel %s %s closed: %s", wl.uid, "to" if conn.client else "from",
                  conn.peer_ip, reason)  # fmt: skip
        if conn.core is None and not conn.client:
            wl.flow("inbound", "mtls").deny(decide.Reason.UNKNOWN_PEER)  # never authenticated
        if conn.core is None and conn.bio is not None:  # the TLS handshake had begun
            direction = "outbound" if conn.client else "inbound"
            self._handshake_failed(wl, direction, reason_of(reason))
        ip = self.handshaking.pop(conn, None)
        if ip is not None:
            self.admission.handshake_over(ip)
        if conn.shed:
            self.admission.shed(wl, conn.shed, conn.peer_identity or conn.peer_ip)
        if conn in self.conns:
            self.conns.discard(conn)
            self.admission.closed(conn)
        self.loop.handlers.pop(conn.fd, None)
        self.loop.stale.add(conn.fd)
        if key is not None:
            self.pool.discard(key, conn)

    def _handshake_failed(self, wl: ServedWorkload, direction: str, reason: str) -> None:
        key = (wl.uid, direction, reason)
        self.handshake_failures[key] = self.handshake_failures.get(key, 0) + 1

    def stream_done(self, stream: TunnelStream) -> None:
        stats: FlowStats = stream.owner
        self.loop.handlers.pop(stream.fd, None)
        self.loop.stale.add(stream.fd)
        self.guarded.discard(stream)
        self.admission.closed(stream)
        self.loop.recorder.closed(stream)  # inbound ones: their duration and access log line
        if stream.shed:
            conn = stream.conn
            self.admission.shed(conn.owner[0], stream.shed, conn.peer_identity or conn.peer_ip)
        stats.relays.discard(stream)
        if stream.connect_failed:
            stats.failures += 1
        else:
            stats.closed += 1
            stats.bytes_received += stream.bytes_up
            stats.bytes_sent += stream.bytes_down

    # -- loop duties ------------------------------------------------------------------------

    def flush(self) -> None:
        """One TLS write per tunnel connection that queued frames in this batch of events."""
        to_flush = self.to_flush
        while to_flush:
            batch = to_flush[:]
            to_flush.clear()
            for conn in batch:
                if conn.flush_pending:
                    conn.flush()

    def sweep(self, now: float, connect_timeout: float, idle_timeout: float) -> None:
        for conn in list(self.conns):
            if conn.core is None:
                if now - conn.started_at >= connect_timeout:
                    conn.fail(TIMEOUT)
                continue
            conn.sweep(now)  # an open header block that never completes ends the connection
            if conn.state != CLOSED and not conn.streams and not conn.queued:
                limit = POOL_IDLE if conn.client else max(POOL_IDLE, idle_timeout)
                if conn.retired or now - conn.idle_since >= limit:
                    conn.close()

    def drain(self) -> None:
        """No new streams on our connections; peers are asked to open none on theirs."""
        self.draining = True
        self.pool.retire()
        for conn in self.conns:
            self._notice(conn)

    def _notice(self, conn: TunnelConn) -> None:
        if not conn.client and conn.core is not None:
            conn.core.shutdown_notice()
            conn.flush_soon()

    def drained(self, grace_over: bool) -> bool:
        """No tunnel connection is left.  Call only when no stream is open: once peers had the
        grace time to see the notice (and to send a stream already on its way), the idle
        connections left are closed here."""
        if grace_over:
            for conn in list(self.conns):
                conn.close("the proxy was upgraded")
        return not self.conns

    def drop(self, wl: ServedWorkload | None = None, reason: str = "workload removed") -> None:
        """Fail the connections of `wl` (all of them when None)."""
        for conn in list(self.conns):
            if wl is None or conn.owner[0] is wl:
                conn.fail(reason)

    def counters(self) -> TunnelCounters:
        streams = sum(len(c.streams) + len(c.queued) for c in self.conns)
        failures = tuple(HandshakeFailure(*key, count)
                         for key, count in sorted(self.handshake_failures.items()))  # fmt: skip
        return TunnelCounters(self.handshakes, len(self.pool), streams, failures)
