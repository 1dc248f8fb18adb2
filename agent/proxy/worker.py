"""A proxy worker process: one single-threaded epoll loop relaying redirected TCP connections.

    python -m agent.proxy.worker --control-fd N [--worker-id K]
        --config-json '{"proxy": {...}, "redirection": {...}}'

The supervisor makes a SOCK_SEQPACKET socketpair, passes one end as fd N, and speaks JSON over it
(one message per packet, file descriptors with SCM_RIGHTS):

supervisor -> worker
  {"op": "add", "uid": U, "listeners": [{"direction": "outbound"|"inbound"|"tunnel", "family": 4},
   ...], "identity": "spiffe://td/ns/N/sa/S", "mode": "permissive"|"strict",
   "ips": ["10.1.2.3", "fd00::3"]}
      fds = [netns_fd, listener fd per "listeners" entry].  The worker accepts on those listeners
      (EPOLLEXCLUSIVE, so N workers holding the same listeners do not all wake) and keeps the netns
      fd to create that workload's upstream sockets.  Re-adding a known uid swaps its listeners and
      netns fd and keeps its open connections (and its certificate).  identity, mode (default
      permissive) and ips (the pod's addresses: tunnel streams may only ask for these) are
      optional.
  {"op": "cert", "uid": U, "chain_pem": str, "key_pem": str}
      The workload's certificate chain and key (first one or a rotation).  New tunnel connections
      use it; open ones keep going (pooled ones take no new streams).  Key material is never
      logged.
  {"op": "trust", "trust_domain": str, "bundle_pem": str}
      The trust bundle (one or more roots) and the trust domain peers must be in.
  {"op": "directory", "entries": {ip: {"identity": str, "node": str}},
   "egress": "passthrough"|"refuse"}
      The enrolled workloads of the mesh (all nodes) and what to do with other destinations.
  {"op": "del", "uid": U}
      Stop accepting for U, reset its open connections, close its fds.  A stats message that
      still holds U's final counters follows at once; later ones no longer mention U.
  {"op": "stats"}
      Answered at once with a stats message.
worker -> supervisor
  {"op": "stats", "worker": K, "active": n, "workloads": {U: {"outbound": C, "inbound": C}},
   "flows": {U: [{"direction": "outbound"|"inbound", "security": "mtls"|"plaintext",
                  "peer_identity": str, **C, "denied": n}, ...]},
   "tunnel": {"handshakes": n, "pooled_connections": n, "streams": n}}
      C = {"connections_opened", "connections_closed", "connect_failures", "bytes_received",
      "bytes_sent"}, cumulative since the workload was added (bytes_received: client -> server,
      bytes_sent: server -> client, bytes of open connections included).  "workloads" holds the
      totals per direction, "flows" the same split by security and peer identity ("" when
      unknown: plaintext, or refused before the peer was authenticated), with "denied"
      (connections refused by policy: strict mode, egress refuse, tunnel without a valid
      certificate or to an address that is not the workload's).  "tunnel": TLS handshakes
      completed (cumulative, both roles), client connections in the pool and open streams (now).
      "active" counts open relays and streams, connecting ones included.  Sent every second when
      anything changed; a message the control socket cannot take right now is dropped (the next
      one is cumulative anyway).
  {"op": "error", "worker": K, "uid": U | null, "error": text}
      A message could not be applied (its fds are closed).

EOF on the control socket (the supervisor died) ends the worker at once; so does the
supervisor's death through PR_SET_PDEATHSIG (SIGKILL; note it fires when the *thread* that
spawned the worker exits).

Per connection: outbound accept -> SO_ORIGINAL_DST -> upstream socket in the workload netns
(marked) -> nonblocking connect -> splice relay.  Inbound is the same, but the upstream socket is
transparent and bound to the client's IP, so the app sees the real peer.  A failed or timed-out
connect resets the client and counts a connect failure; `connections_opened` counts connections
whose upstream connect succeeded, `connections_closed` those of them that ended.

Same node: an outbound connection to an address of another workload this proxy serves takes one
relay straight to the destination app, connected inside the destination's netns from the
source's IP (ztunnel's local path): no second hop through :15006 and no TLS handshake with
itself.  Both identities are known here, so it counts as mtls (outbound for the source, inbound
for the destination) when both have certificates; without, plaintext, which a strict destination
refuses.

Tunnel (agent.tunnel): an outbound connection to an address in the directory, from a workload
that has a certificate, goes through HBONE instead: a pooled TLS+h2 connection keyed by (source
uid, destination IP), opened from the source netns (marked) to <dst>:tunnel_port, whose server
must present the identity the directory names; one CONNECT stream per client connection (at most
STREAMS_PER_CONN per pooled connection).  The tunnel listener terminates TLS with the destination
workload's certificate, requires a client certificate from the trust bundle and domain, and serves
each CONNECT to one of the workload's own IPs with a transparent socket bound to the tunnel peer's
IP (200 once connected, 403 for a foreign address, 503 when the connect fails).  The connect
timeout covers TCP, TLS and CONNECT.  Idle pooled connections are closed after POOL_IDLE seconds.
A tunnel connection that streams queued frames on is flushed once after each batch of epoll
events (`flush_soon`), so the frames of many streams leave in one TLS write.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import errno
import ipaddress
import json
import logging
import os
import select
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable
from typing import Any

from agent.config import ProxyConfig, RedirectionConfig, parse_config
from agent.proxy.relay import PipePool, Relay
from agent.proxy.sockets import open_home_netns, original_dst, upstream_socket
from agent.tunnel.endpoint import Buffers, TunnelConn, TunnelStream
from agent.tunnel.hbone import format_authority, parse_authority
from agent.tunnel.tls import TunnelTLSError, client_context, server_context

log = logging.getLogger("ferry.proxy.worker")

EPOLLIN = select.EPOLLIN
EPOLLEXCLUSIVE = getattr(select, "EPOLLEXCLUSIVE", 1 << 28)
PR_SET_PDEATHSIG = 1
ACCEPT_BATCH = 64
MAX_EVENTS = 512
STATS_INTERVAL = 1.0
CONTROL_MAX = 1 << 16
MAX_FDS = 64
_LINGER_RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"
STREAMS_PER_CONN = 100
POOL_IDLE = 30.0
DIRECTIONS = ("outbound", "inbound")

Handler = Callable[[int, int], None]


class FlowStats:
    """Counters of one workload, direction, security and peer identity; open ones in `relays`.

    `relays` holds splice `Relay`s and `TunnelStream`s alike: both say whether they are still
    `connecting` and how many bytes went `bytes_up` (client -> server) and `bytes_down`.
    """

    __slots__ = ("bytes_received", "bytes_sent", "closed", "denied", "failures", "relays")

    def __init__(self) -> None:
        self.closed = 0  # connected relays that ended
        self.failures = 0
        self.denied = 0
        self.bytes_received = 0  # of ended relays
        self.bytes_sent = 0
        self.relays: set[Relay | TunnelStream] = set()

    def snapshot(self) -> dict[str, int]:
        opened, rx, tx = self.closed, self.bytes_received, self.bytes_sent
        for r in self.relays:
            if not r.connecting:
                opened += 1
                rx += r.bytes_up
                tx += r.bytes_down
        return {
            "connections_opened": opened,
            "connections_closed": self.closed,
            "connect_failures": self.failures,
            "bytes_received": rx,
            "bytes_sent": tx,
        }


FlowKey = tuple[str, str, str]  # direction, security, peer identity


class _Listening:
    __slots__ = ("direction", "fd", "sock")

    def __init__(self, sock: socket.socket, direction: str) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.direction = direction


class Workload:
    __slots__ = (
        "chain_pem",
        "client_ctx",
        "flows",
        "identity",
        "ips",
        "key_pem",
        "listeners",
        "mode",
        "netns_fd",
        "server_ctx",
        "uid",
    )

    def __init__(self, uid: str, netns_fd: int) -> None:
        self.uid = uid
        self.netns_fd = netns_fd
        self.listeners: list[_Listening] = []
        self.flows: dict[FlowKey, FlowStats] = {}
        self.identity = ""
        self.mode = "permissive"
        self.ips: frozenset[str] = frozenset()
        self.chain_pem = b""
        self.key_pem = b""
        self.client_ctx: ssl.SSLContext | None = None
        self.server_ctx: ssl.SSLContext | None = None

    def flow(self, direction: str, security: str, peer: str = "") -> FlowStats:
        key = (direction, security, peer)
        st = self.flows.get(key)
        if st is None:
            st = self.flows[key] = FlowStats()
        return st


class Worker:
    def __init__(
        self,
        control: socket.socket,
        proxy_cfg: ProxyConfig,
        redirection_cfg: RedirectionConfig,
        worker_id: int,
    ) -> None:
        self.control = control
        self.proxy_cfg = proxy_cfg
        self.cfg = redirection_cfg
        self.worker_id = worker_id
        self.ep = select.epoll()
        self.handlers: dict[int, Handler] = {}
        self.stale: set[int] = set()
        self.workloads: dict[str, Workload] = {}
        self.local: dict[str, Workload] = {}  # ip -> workload served here (same-node path)
        self.pool = PipePool()
        self.home_fd = open_home_netns()
        self.running = True
        self.last_stats: dict[str, Any] | None = None
        self.own_ports = {
            redirection_cfg.outbound_port,
            redirection_cfg.inbound_port,
            redirection_cfg.tunnel_port,
        }
        # tunnel state
        self.trust_domain = ""
        self.bundle_pem = b""
        self.directory: dict[str, str] = {}  # ip -> expected identity
        self.egress = "passthrough"
        self.bufs = Buffers()
        self.tunnel_pool: dict[tuple[str, str], list[TunnelConn]] = {}
        self.conns: set[TunnelConn] = set()
        self.handshakes = 0
        self.to_flush: list[TunnelConn] = []
        control.setblocking(False)
        self.ep.register(control.fileno(), EPOLLIN)
        self.handlers[control.fileno()] = self._on_control

    # -- loop -------------------------------------------------------------------------------

    def run(self) -> None:
        poll = self.ep.poll
        handlers = self.handlers
        stale = self.stale
        to_flush = self.to_flush
        sweep_every = max(
            0.05, min(1.0, self.proxy_cfg.connect_timeout / 4, self.proxy_cfg.idle_timeout / 4)
        )
        monotonic = time.monotonic
        next_sweep = monotonic() + sweep_every
        next_stats = monotonic() + STATS_INTERVAL
        try:
            while self.running:
                timeout = min(next_sweep, next_stats) - monotonic()
                for fd, ev in poll(timeout if timeout > 0 else 0, MAX_EVENTS):
                    if stale and fd in stale:
                        continue
                    h = handlers.get(fd)
                    if h is not None:
                        h(fd, ev)
                while to_flush:  # one TLS write per tunnel connection per batch of events
                    batch = to_flush[:]
                    to_flush.clear()
                    for conn in batch:
                        if conn.flush_pending:
                            conn.flush()
                stale.clear()
                now = monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + sweep_every
                if now >= next_stats:
                    self._send_stats(only_if_changed=True)
                    next_stats = now + STATS_INTERVAL
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        for conn in list(self.conns):
            conn.fail("worker exiting")
        for wl in self.workloads.values():
            for lst in wl.listeners:
                lst.sock.close()
            for st in wl.flows.values():
                for r in st.relays:
                    if isinstance(r, Relay):
                        r.done = _ignore_done
                        r.close()
            os.close(wl.netns_fd)
        self.workloads.clear()
        self.pool.close()
        self.ep.close()
        os.close(self.home_fd)

    def _watch(self, fd: int, old: int, new: int) -> None:
        if new == 0:
            self.ep.unregister(fd)
        elif old == 0:
            self.ep.register(fd, new)
        else:
            self.ep.modify(fd, new)

    # -- connections ------------------------------------------------------------------------

    def _acceptor(self, wl: Workload, lst: _Listening) -> Handler:
        direction = lst.direction
        accept = lst.sock.accept

        def on_accept(fd: int, events: int) -> None:
            for _ in range(ACCEPT_BATCH):
                try:
                    client, peer = accept()
                except BlockingIOError:
                    return
                except OSError as exc:
                    if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                        continue
                    log.warning("accept on %s %s: %s", wl.uid, direction, exc)
                    return
                if direction == "outbound":
                    self._outbound(wl, client, peer)
                elif direction == "inbound":
                    if wl.mode == "strict":
                        wl.flow("inbound", "plaintext").denied += 1
                        _reset(client)
                    else:
                        self._proxy(wl, wl.flow("inbound", "plaintext"), client, peer, True, None)
                else:
                    self._tunnel_accept(wl, client)

        return on_accept

    def _outbound(self, wl: Workload, client: socket.socket, peer: Any) -> None:
        try:
            client.setblocking(False)
            dst = original_dst(client)
        except OSError as exc:
            log.debug("%s: no original destination for %s: %s", wl.uid, peer, exc)
            wl.flow("outbound", "plaintext").failures += 1
            _reset(client)
            return
        local = self.local.get(dst[0])
        if local is not None and local is not wl:
            self._deliver_locally(wl, local, client, peer, dst)
            return
        expected = self.directory.get(dst[0])
        if expected is None:
            if self.egress == "refuse":
                wl.flow("outbound", "plaintext").denied += 1
                _reset(client)
                return
        elif wl.client_ctx is not None:
            self._tunnel_out(wl, client, dst, expected)
            return
        self._proxy(wl, wl.flow("outbound", "plaintext"), client, peer, False, dst)

    def _index_addresses(self) -> None:
        """Rebuild `local`, ip -> workload served here, after workloads or their ips change."""
        self.local = {ip: wl for wl in self.workloads.values() for ip in wl.ips}

    def _deliver_locally(
        self, src: Workload, dst_wl: Workload, client: socket.socket, peer: Any,
        dst: tuple[str, int],
    ) -> None:  # fmt: skip
        """Same-node fast path (as ztunnel does it): one relay from the source app straight to
        the destination app, connected inside the destination's netns from the source's IP.
        Both identities are known to this proxy, so this counts as mutual TLS when both have
        certificates; the destination's mode still applies."""
        secure = src.client_ctx is not None and dst_wl.server_ctx is not None
        if not secure and dst_wl.mode == "strict":
            dst_wl.flow("inbound", "plaintext").denied += 1
            _reset(client)
            return
        security = "mtls" if secure else "plaintext"
        owners = (
            src.flow("outbound", security, dst_wl.identity if secure else ""),
            dst_wl.flow("inbound", security, src.identity if secure else ""),
        )
        self._proxy(dst_wl, owners, client, peer, True, dst)

    def _proxy(
        self,
        wl: Workload,
        owners: FlowStats | tuple[FlowStats, ...],
        client: socket.socket,
        peer: Any,
        inbound: bool,
        dst: tuple[str, int] | None,
    ) -> None:
        """Relay `client` to `dst` from inside `wl`'s netns (bound to the client's IP when
        `inbound`, so the app sees its real peer); `owners` count it."""
        counted = owners if isinstance(owners, tuple) else (owners,)
        try:
            if dst is None:
                client.setblocking(False)
                dst = original_dst(client)
            if dst[1] in self.own_ports and dst == client.getsockname()[:2]:
                raise ConnectionRefusedError(errno.ECONNREFUSED, "connection to the proxy itself")
            up = upstream_socket(
                wl.netns_fd,
                client.family,
                self.cfg.mark,
                (peer[0], 0) if inbound else None,
                home_fd=self.home_fd,
            )
        except OSError as exc:
            log.debug("%s: cannot open upstream for %s: %s", wl.uid, peer, exc)
            for stats in counted:
                stats.failures += 1
            _reset(client)
            return
        err = up.connect_ex(dst)
        if err and err != errno.EINPROGRESS:
            for stats in counted:
                stats.failures += 1
            up.close()
            _reset(client)
            return
        try:
            relay = Relay(
                client,
                up,
                connecting=True,
                watch=self._watch,
                done=self._relay_done,
                pool=self.pool,
                owner=counted,
            )
        except OSError as exc:  # out of pipes / fds
            log.warning("%s: cannot relay: %s", wl.uid, exc)
            for stats in counted:
                stats.failures += 1
            up.close()
            _reset(client)
            return
        relay.started_at = time.monotonic()
        on_event = relay.on_event
        self.handlers[relay.fd_down] = on_event
        self.handlers[relay.fd_up] = on_event
        for stats in counted:
            stats.relays.add(relay)
        relay.start()

    def _relay_done(self, relay: Relay) -> None:
        counted: tuple[FlowStats, ...] = relay.owner  # type: ignore[assignment]
        handlers = self.handlers
        handlers.pop(relay.fd_down, None)
        handlers.pop(relay.fd_up, None)
        self.stale.add(relay.fd_down)
        self.stale.add(relay.fd_up)
        for stats in counted:
            stats.relays.discard(relay)
            if relay.connect_failed:
                stats.failures += 1
            else:
                stats.closed += 1
                stats.bytes_received += relay.up_half.nbytes
                stats.bytes_sent += relay.down_half.nbytes

    # -- tunnel: client side ----------------------------------------------------------------

    def _tunnel_out(
        self, wl: Workload, client: socket.socket, dst: tuple[str, int], expected: str
    ) -> None:
        stats = wl.flow("outbound", "mtls", expected)
        now = time.monotonic()
        try:
            conn = self._pooled(wl, dst[0], expected, now)
        except (OSError, ssl.SSLError) as exc:
            log.debug("%s: cannot open a tunnel to %s: %s", wl.uid, dst[0], exc)
            stats.failures += 1
            _reset(client)
            return
        stream = TunnelStream(conn, client, owner=stats, now=now)
        self.handlers[stream.fd] = stream.on_event
        stats.relays.add(stream)
        conn.add_stream(stream, format_authority(*dst))

    def _pooled(self, wl: Workload, ip: str, expected: str, now: float) -> TunnelConn:
        key = (wl.uid, ip)
        conns = self.tunnel_pool.setdefault(key, [])
        for conn in conns:
            if conn.usable and conn.stream_count < STREAMS_PER_CONN:
                return conn
        assert wl.client_ctx is not None
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sock = upstream_socket(wl.netns_fd, family, self.cfg.mark, None, home_fd=self.home_fd)
        err = sock.connect_ex((ip, self.cfg.tunnel_port))
        if err and err != errno.EINPROGRESS:
            sock.close()
            raise OSError(err, os.strerror(err))
        conn = TunnelConn(
            self,
            self.bufs,
            sock,
            wl.client_ctx,
            client=True,
            trust_domain=self.trust_domain,
            expected_identity=expected,
            owner=(wl, key),
            now=now,
        )
        conns.append(conn)
        self._track(conn)
        return conn

    def _track(self, conn: TunnelConn) -> None:
        self.conns.add(conn)
        self.handlers[conn.fd] = conn.on_event
        conn.start()

    # -- tunnel: server side ----------------------------------------------------------------

    def _tunnel_accept(self, wl: Workload, client: socket.socket) -> None:
        if wl.server_ctx is None:
            wl.flow("inbound", "mtls").denied += 1
            _reset(client)
            return
        try:
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = TunnelConn(
                self,
                self.bufs,
                client,
                wl.server_ctx,
                client=False,
                trust_domain=self.trust_domain,
                owner=(wl, None),
                now=time.monotonic(),
            )
        except OSError as exc:
            log.debug("%s: tunnel accept: %s", wl.uid, exc)
            wl.flow("inbound", "mtls").denied += 1
            _reset(client)
            return
        self._track(conn)

    def tunnel_request(self, conn: TunnelConn, stream_id: int, authority: str) -> None:
        wl: Workload = conn.owner[0]
        core = conn.core
        assert core is not None
        stats = wl.flow("inbound", "mtls", conn.peer_identity)
        try:
            ip, port = parse_authority(authority)
        except ValueError:
            stats.denied += 1
            core.refuse(stream_id, 400)
            return
        if ip not in wl.ips:
            stats.denied += 1
            core.refuse(stream_id, 403)
            return
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        bind_to = (conn.peer_ip, 0) if (":" in conn.peer_ip) == (":" in ip) else None
        try:
            up = upstream_socket(wl.netns_fd, family, self.cfg.mark, bind_to, home_fd=self.home_fd)
        except OSError as exc:
            log.debug("%s: cannot open upstream for %s: %s", wl.uid, authority, exc)
            stats.failures += 1
            core.refuse(stream_id, 503)
            return
        err = up.connect_ex((ip, port))
        if err and err != errno.EINPROGRESS:
            up.close()
            stats.failures += 1
            core.refuse(stream_id, 503)
            return
        stream = TunnelStream(
            conn, up, sid=stream_id, app_connecting=True, owner=stats, now=time.monotonic()
        )
        self.handlers[stream.fd] = stream.on_event
        stats.relays.add(stream)
        stream.update()

    # -- tunnel: host callbacks -------------------------------------------------------------

    def watch(self, fd: int, old: int, new: int) -> None:
        self._watch(fd, old, new)

    def flush_soon(self, conn: TunnelConn) -> None:
        self.to_flush.append(conn)

    def tunnel_ready(self, conn: TunnelConn) -> None:
        self.handshakes += 1

    def tunnel_closed(self, conn: TunnelConn, reason: str) -> None:
        wl: Workload = conn.owner[0]
        key = conn.owner[1]
        log.debug("%s: tunnel %s %s closed: %s", wl.uid, "to" if conn.client else "from",
                  conn.peer_ip, reason)  # fmt: skip
        if conn.core is None and not conn.client:
            wl.flow("inbound", "mtls").denied += 1  # never authenticated
        self.conns.discard(conn)
        self.handlers.pop(conn.fd, None)
        self.stale.add(conn.fd)
        if key is not None:
            conns = self.tunnel_pool.get(key)
            if conns is not None and conn in conns:
                conns.remove(conn)
                if not conns:
                    del self.tunnel_pool[key]

    def stream_done(self, stream: TunnelStream) -> None:
        stats: FlowStats = stream.owner
        self.handlers.pop(stream.fd, None)
        self.stale.add(stream.fd)
        stats.relays.discard(stream)
        if stream.connect_failed:
            stats.failures += 1
        else:
            stats.closed += 1
            stats.bytes_received += stream.bytes_up
            stats.bytes_sent += stream.bytes_down

    # -- timers -----------------------------------------------------------------------------

    def _sweep(self, now: float) -> None:
        connect_timeout = self.proxy_cfg.connect_timeout
        idle_timeout = self.proxy_cfg.idle_timeout
        for wl in self.workloads.values():
            for st in wl.flows.values():
                for r in list(st.relays):
                    if r.connecting:
                        if now - r.started_at >= connect_timeout:
                            if isinstance(r, Relay):
                                r.connect_failed = True
                                r.abort()
                            else:
                                r.connect_failed = True
                                r.abort(reset_peer=True)
                                r.conn.flush()
                        continue
                    total = r.bytes_up + r.bytes_down
                    if total != r.idle_mark:
                        r.idle_mark = total
                        r.idle_since = now
                    elif now - r.idle_since >= idle_timeout:
                        r.close()
                        if isinstance(r, TunnelStream):
                            r.conn.flush()
        for conn in list(self.conns):
            if conn.core is None:
                if now - conn.started_at >= connect_timeout:
                    conn.fail("connect/handshake timeout")
            elif not conn.streams and not conn.queued:
                limit = POOL_IDLE if conn.client else max(POOL_IDLE, idle_timeout)
                if conn.retired or now - conn.idle_since >= limit:
                    conn.close()

    # -- control ----------------------------------------------------------------------------

    def _on_control(self, fd: int, events: int) -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(
                    self.control, CONTROL_MAX, MAX_FDS, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                return
            except OSError as exc:
                log.error("control socket: %s; exiting", exc)
                self.running = False
                return
            if not data and not fds:
                self.running = False  # supervisor gone
                return
            uid: Any = None
            op: Any = None
            try:
                msg = json.loads(data)
                if not isinstance(msg, dict):
                    raise ValueError("message is not a JSON object")
                uid = msg.get("uid")
                op = msg.get("op")
                if op == "add":
                    self._add(msg, fds)  # empties `fds` once it owns them
                elif op == "del":
                    self._del(str(msg["uid"]))
                elif op == "stats":
                    self._send_stats(only_if_changed=False)
                elif op == "cert":
                    self._cert(msg)
                elif op == "trust":
                    self._trust(msg)
                elif op == "directory":
                    self._directory(msg)
                else:
                    raise ValueError(f"unknown op {op!r}")
            except (ValueError, KeyError, TypeError, OSError, TunnelTLSError) as exc:
                # Never echo a cert message: it holds a private key.
                shown = f"op {op!r}" if op in ("cert", "trust") else repr(data[:200])
                log.warning("control message %s: %s", shown, exc)
                self._send({"op": "error", "worker": self.worker_id, "uid": uid, "error": str(exc)})
            finally:
                for leftover in fds:
                    os.close(leftover)

    def _add(self, msg: dict[str, Any], fds: list[int]) -> None:
        uid = msg["uid"]
        specs = msg["listeners"]
        if not isinstance(uid, str) or not isinstance(specs, list):
            raise ValueError("add needs a string uid and a list of listeners")
        if len(fds) != len(specs) + 1:
            raise ValueError(f"add {uid}: {len(fds)} fds for {len(specs)} listeners + netns")
        identity = msg.get("identity", "")
        mode = msg.get("mode", "permissive")
        ips = msg.get("ips", [])
        if not isinstance(identity, str):
            raise ValueError(f"add {uid}: identity {identity!r} is not a string")
        if mode not in ("permissive", "strict"):
            raise ValueError(f"add {uid}: mode {mode!r} is not permissive or strict")
        if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
            raise ValueError(f"add {uid}: ips {ips!r} is not a list of addresses")
        netns_fd = fds[0]
        directions = [spec["direction"] for spec in specs]
        if any(d not in ("outbound", "inbound", "tunnel") for d in directions):
            raise ValueError(f"add {uid}: bad direction in {directions}")
        socks: list[socket.socket] = []
        try:
            for fd in fds[1:]:
                sock = socket.socket(fileno=fd)
                socks.append(sock)
                if sock.type != socket.SOCK_STREAM:
                    raise ValueError(f"add {uid}: fd {fd} is not a stream socket")
                sock.setblocking(False)
        except BaseException:
            for sock in socks:
                sock.detach()  # the caller closes the raw fds
            raise
        del fds[:]  # owned from here on (fds[0] by the workload, the rest by `socks`)
        wl = self.workloads.get(uid)
        if wl is None:
            wl = self.workloads[uid] = Workload(uid, netns_fd)
        else:
            self._drop_listeners(wl)
            os.close(wl.netns_fd)
            wl.netns_fd = netns_fd
        wl.identity = identity
        wl.mode = mode
        wl.ips = frozenset(_normal_ip(ip) for ip in ips)
        self._index_addresses()
        for sock, direction in zip(socks, directions, strict=True):
            lst = _Listening(sock, direction)
            wl.listeners.append(lst)
            self.handlers[lst.fd] = self._acceptor(wl, lst)
            self.ep.register(lst.fd, EPOLLIN | EPOLLEXCLUSIVE)

    def _cert(self, msg: dict[str, Any]) -> None:
        uid = msg["uid"]
        wl = self.workloads.get(uid)
        if wl is None:
            raise ValueError(f"cert for unknown workload {uid!r}")
        chain, key = msg["chain_pem"], msg["key_pem"]
        if not isinstance(chain, str) or not isinstance(key, str):
            raise ValueError(f"cert {uid}: chain_pem and key_pem must be strings")
        old = (wl.chain_pem, wl.key_pem)
        wl.chain_pem, wl.key_pem = chain.encode(), key.encode()
        try:
            self._contexts(wl)
        except TunnelTLSError:
            wl.chain_pem, wl.key_pem = old
            raise
        for (owner, _ip), conns in self.tunnel_pool.items():
            if owner == uid:
                for conn in conns:
                    conn.retired = True  # open streams go on; new ones get a new connection

    def _trust(self, msg: dict[str, Any]) -> None:
        td, bundle = msg["trust_domain"], msg["bundle_pem"]
        if not isinstance(td, str) or not td or not isinstance(bundle, str):
            raise ValueError("trust needs a trust_domain and a bundle_pem string")
        self.trust_domain, self.bundle_pem = td, bundle.encode()
        errors = []
        for wl in self.workloads.values():
            try:
                self._contexts(wl)
            except TunnelTLSError as exc:
                errors.append(f"{wl.uid}: {exc}")
        for conns in self.tunnel_pool.values():
            for conn in conns:
                conn.retired = True
        if errors:
            raise ValueError("; ".join(errors))

    def _contexts(self, wl: Workload) -> None:
        if not wl.chain_pem or not self.bundle_pem:
            return
        wl.client_ctx = client_context(wl.chain_pem, wl.key_pem, self.bundle_pem)
        wl.server_ctx = server_context(wl.chain_pem, wl.key_pem, self.bundle_pem)

    def _directory(self, msg: dict[str, Any]) -> None:
        entries, egress = msg["entries"], msg.get("egress", "passthrough")
        if not isinstance(entries, dict):
            raise ValueError("directory entries must be an object {ip: {identity, node}}")
        if egress not in ("passthrough", "refuse"):
            raise ValueError(f"directory egress {egress!r} is not passthrough or refuse")
        directory: dict[str, str] = {}
        for ip, entry in entries.items():
            identity = entry.get("identity") if isinstance(entry, dict) else None
            if not isinstance(identity, str) or not identity:
                raise ValueError(f"directory entry {ip!r} has no identity")
            directory[_normal_ip(ip)] = identity
        self.directory, self.egress = directory, egress

    def _drop_listeners(self, wl: Workload) -> None:
        for lst in wl.listeners:
            self.handlers.pop(lst.fd, None)
            self.stale.add(lst.fd)
            with contextlib.suppress(OSError):
                self.ep.unregister(lst.fd)
            lst.sock.close()
        wl.listeners.clear()

    def _del(self, uid: str) -> None:
        wl = self.workloads.get(uid)
        if wl is None:
            return
        self._drop_listeners(wl)
        for conn in list(self.conns):
            if conn.owner[0] is wl:
                conn.fail("workload removed")
        for st in wl.flows.values():
            for r in list(st.relays):
                if isinstance(r, Relay):
                    r.abort()
                else:
                    r.abort(reset_peer=False)
        os.close(wl.netns_fd)
        wl.netns_fd = -1
        self._send_stats(only_if_changed=False)
        del self.workloads[uid]
        self._index_addresses()

    def snapshot(self) -> dict[str, Any]:
        active = 0
        workloads: dict[str, Any] = {}
        flows: dict[str, Any] = {}
        for uid, wl in self.workloads.items():
            totals = {d: dict.fromkeys(COUNTERS, 0) for d in DIRECTIONS}
            entries = []
            for (direction, security, peer), st in sorted(wl.flows.items()):
                counters = st.snapshot()
                total = totals[direction]
                for k, v in counters.items():
                    total[k] += v
                entries.append(
                    {
                        "direction": direction,
                        "security": security,
                        "peer_identity": peer,
                        **counters,
                        "denied": st.denied,
                    }
                )
                active += len(st.relays)
            workloads[uid] = totals
            flows[uid] = entries
        streams = sum(len(c.streams) + len(c.queued) for c in self.conns)
        return {
            "op": "stats",
            "worker": self.worker_id,
            "active": active,
            "workloads": workloads,
            "flows": flows,
            "tunnel": {
                "handshakes": self.handshakes,
                "pooled_connections": sum(len(c) for c in self.tunnel_pool.values()),
                "streams": streams,
            },
        }

    def _send_stats(self, only_if_changed: bool) -> None:
        snap = self.snapshot()
        if only_if_changed and snap == self.last_stats:
            return
        if self._send(snap):
            self.last_stats = snap

    def _send(self, msg: dict[str, Any]) -> bool:
        try:
            self.control.send(json.dumps(msg, separators=(",", ":")).encode())
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                self.running = False
            else:
                log.warning("control send: %s", exc)
            return False
        return True


COUNTERS = (
    "connections_opened",
    "connections_closed",
    "connect_failures",
    "bytes_received",
    "bytes_sent",
)


def _normal_ip(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        raise ValueError(f"{ip!r} is not an IP address") from None


def _ignore_done(relay: Relay) -> None:
    pass


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def run_worker(
    control: socket.socket,
    proxy_cfg: ProxyConfig,
    redirection_cfg: RedirectionConfig,
    worker_id: int | None = None,
) -> None:
    """Serve until the control socket reaches EOF (or the supervisor asks us to stop by dying).

    `worker_id` (default: our pid) is echoed in every stats message.
    """
    Worker(
        control, proxy_cfg, redirection_cfg, os.getpid() if worker_id is None else worker_id
    ).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agent.proxy.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--config-json", required=True)
    parser.add_argument("--worker-id", type=int, default=None)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    set_pdeathsig()
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"worker[{args.worker_id if args.worker_id is not None else os.getpid()}] "
        "%(levelname)s %(message)s",
    )
    raw = json.loads(args.config_json)
    cfg = parse_config({"proxy": raw.get("proxy"), "redirection": raw.get("redirection")})
    control = socket.socket(fileno=args.control_fd)
    run_worker(control, cfg.proxy, cfg.redirection, args.worker_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
