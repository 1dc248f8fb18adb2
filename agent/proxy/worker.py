"""A proxy worker process: one single-threaded epoll loop relaying redirected TCP connections.

    python -m agent.proxy.worker --control-fd N [--worker-id K]
        --config-json '{"proxy": {...}, "redirection": {...}}'

The supervisor passes one end of a SOCK_SEQPACKET socketpair as fd N and configures the worker
with the typed messages of `agent.proxy.messages` (workloads with their netns and listener fds,
certificates, trust, directory chunks); `agent.proxy.worker_control` applies them.  Every worker
accepts on the *same* listening sockets (EPOLLEXCLUSIVE, so N workers do not all wake) and keeps
each workload's netns fd to create its upstream sockets in.  EOF on the control socket (the
supervisor died) ends the worker at once; so does the supervisor's death through
PR_SET_PDEATHSIG (SIGKILL; it fires when the *thread* that spawned the worker exits).

Per connection the worker gathers the facts, asks the decision core (`agent.proxy.decide`) and
acts on the answer; it never decides inline:

- outbound accept -> SO_ORIGINAL_DST -> `route_outbound`: `Passthrough` opens a marked upstream
  socket in the source netns and relays with splice (`agent.proxy.relay`); `Local` (a workload
  this proxy serves) connects inside the destination's netns from the source's IP, one relay and
  no TLS with itself, as ztunnel's local path, offered to the kernel's fast path when
  uninspected and the eBPF backend's maps are there (`agent.proxy.fastpath`); `Tunnel` adds a
  CONNECT stream to a pooled HBONE connection (`agent.proxy.tunnel_pool`) whose server must
  present the expected identity; `Refuse` resets the client.
- inbound accept -> `admit_inbound`: an admitted connection is relayed with a transparent socket
  bound to the client's IP, so the app sees its real peer.
- tunnel accept -> `admit_tunnel`, then TLS with the workload's certificate and a required client
  certificate; each CONNECT -> `admit_stream` -> a transparent socket bound to the tunnel peer's
  IP (200 once connected, the decision's status when denied, 503 when the connect fails).

Bounds (`limits:`, `agent.proxy.admission`): each new connection is admitted against the
worker's share of the node's, the workload's and (inbound) the peer's connection bounds first,
and a relay gets its pipes and upstream socket before it connects, so a client refused for want
of room or descriptors never becomes a connect to the app; past the open-file limit a spare
descriptor accepts the waiting client to reset it (counted, not left to spin the loop).  Inspected
connections are held to request head size and time limits (slowloris: 408).  What is refused
is counted per workload and bound (`Stats.shed`) and logged at a bounded rate.

A failed or timed-out connect resets the client and counts a connect failure; a denial counts
under its reason.  The connect timeout covers TCP, TLS and CONNECT; idle connections are closed
after `idle_timeout`, idle pooled tunnels after POOL_IDLE.  A tunnel connection that queued frames
is flushed once after each batch of epoll events (`flush_soon`), so the frames of many streams
leave in one TLS write.  Counters (`agent.proxy.workload`) go to the supervisor as `Stats`.

`Drain` (the proxy was upgraded, `agent.proxy.handoff`): the successor's workers accept on the
very same listening sockets, so this worker stops watching them, accepts what already waits in
their queues (the wake-up may have come here), tells tunnel peers to open no new streams here,
and serves what is open; it exits once nothing is (tunnel connections: after DRAIN_GRACE), or
when the supervisor ends it at `proxy.drain_timeout`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.config import Config, PolicyConfig, parse_config
from agent.directory import DirectoryError
from agent.linux import open_thread_netns, reset, set_pdeathsig
from agent.policy.facts import Facts
from agent.policy.ratelimit import BucketStore
from agent.proxy import decide
from agent.proxy.admission import FDS_PER_RELAY, Admission, bounds_of, open_file_limit
from agent.proxy.enforce import DenialLog, Enforcer, Guarded
from agent.proxy.fastpath import FastPath, JoinedRelay
from agent.proxy.inspected import InspectedRelay
from agent.proxy.messages import (
    WORKER_SECTIONS,
    AddWorkload,
    Done,
    Drain,
    MessageError,
    Relabel,
    RemoveWorkload,
    SetCertificate,
    SetTrust,
    Stats,
    StatsRequest,
    ToWorker,
    UpdateDirectory,
    UpdatePolicy,
)
from agent.proxy.ratelimit_redis import RedisBuckets
from agent.proxy.ratelimit_store import SharedBuckets
from agent.proxy.relay import PipePool, Relay
from agent.proxy.request_policy import Allowed, Denied, RequestChecker
from agent.proxy.sockets import original_dst, upstream_socket
from agent.proxy.tunnels import Tunnels
from agent.proxy.worker_control import ChannelClosed, ControlChannel, Registry
from agent.proxy.workload import FlowStats, Listening, Security, ServedWorkload
from agent.telemetry.recorder import AccessDenials, Recorder
from agent.tunnel.stream import TunnelStream
from agent.tunnel.tls import TunnelTLSError

log = logging.getLogger("ferry.proxy.worker")

EPOLLIN = select.EPOLLIN
EPOLLEXCLUSIVE = getattr(select, "EPOLLEXCLUSIVE", 1 << 28)
ACCEPT_BATCH = 64
DRAIN_GRACE = 1.0  # seconds tunnel peers get to see our GOAWAY notice before idle ones close
MAX_EVENTS = 512
STATS_INTERVAL = 1.0

Handler = Callable[[int, int], None]


class Worker:
    def __init__(
        self,
        control: socket.socket,
        config: Config,
        worker_id: int,
        buckets: BucketStore | None = None,
    ) -> None:
        self.channel = ControlChannel(control)
        self.proxy_cfg = config.proxy
        self.cfg = redirection_cfg = config.redirection
        self.worker_id = worker_id
        self.ep = select.epoll()
        self.handlers: dict[int, Handler] = {}
        self.stale: set[int] = set()
        self.registry = Registry(config.policy.root_namespace, config.identity.trust_domain)
        self.recorder = Recorder(config.telemetry, worker_id)  # metrics, access log, traces
        denials = AccessDenials(self.recorder) if config.telemetry.access_log else DenialLog()
        self.enforcer = Enforcer(buckets, denials, global_buckets(config.policy, buckets))
        self.guarded = Guarded()
        self.requests = RequestChecker(self.enforcer)
        self.pipes = PipePool()
        self.fastpath = FastPath.configured(redirection_cfg.kernel_fastpath)
        self.limits = limits = config.limits
        self.bounds = bounds_of(limits)
        workers = config.proxy.workers or os.cpu_count() or 1
        self.admission = Admission(limits, workers, open_file_limit())
        self.spare_fd = _spare()  # given up to refuse a client when descriptors run out
        self.inspected: set[InspectedRelay] = set()  # for their request head deadlines
        self.home_fd = open_thread_netns()
        self.running = True
        self.draining_since = 0.0  # when `Drain` came (0: serving)
        self.last_stats: Stats | None = None
        self.own_ports = frozenset(
            (redirection_cfg.outbound_port, redirection_cfg.inbound_port,
             redirection_cfg.tunnel_port)
        )  # fmt: skip
        self.tunnels = Tunnels(self, redirection_cfg, self.own_ports, self.home_fd,
                               self.enforcer, self.guarded, self.admission, limits)  # fmt: skip
        self.ep.register(self.channel.fd, EPOLLIN)
        self.handlers[self.channel.fd] = self._on_control

    # -- loop -------------------------------------------------------------------------------

    def run(self) -> None:
        poll = self.ep.poll
        handlers = self.handlers
        stale = self.stale
        tunnels = self.tunnels
        limits = self.limits
        sweep_every = max(0.05, min(
            1.0, self.proxy_cfg.connect_timeout / 4, self.proxy_cfg.idle_timeout / 4,
            limits.request_header_timeout / 4, limits.header_block_timeout / 4,
        ))  # fmt: skip
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
                if tunnels.to_flush:  # one TLS write per tunnel connection per batch of events
                    tunnels.flush()
                stale.clear()
                now = monotonic()
                if self.draining_since and self._drained(now):
                    break
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + sweep_every
                if now >= next_stats:
                    self.recorder.flush()
                    self._send_stats(only_if_changed=True)
                    next_stats = now + STATS_INTERVAL
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self.tunnels.drop(None, "worker exiting")
        for wl in self.registry.workloads.values():
            for lst in wl.listeners:
                lst.sock.close()
            for st in wl.flows.values():
                for r in st.relays:
                    if not isinstance(r, TunnelStream):
                        r.done = _ignore_done
                        r.close()
            os.close(wl.netns_fd)
        self.registry.workloads.clear()
        self.pipes.close()
        self.fastpath.close()
        self.recorder.close()
        self.ep.close()
        os.close(self.home_fd)
        os.close(self.spare_fd)

    def watch(self, fd: int, old: int, new: int) -> None:
        if new == 0:
            self.ep.unregister(fd)
        elif old == 0:
            self.ep.register(fd, new)
        else:
            self.ep.modify(fd, new)

    # -- connections ------------------------------------------------------------------------

    def _acceptor(self, wl: ServedWorkload, lst: Listening) -> Handler:
        accept = lst.sock.accept
        on_client = {
            "outbound": self._outbound,
            "inbound": self._inbound,
            "tunnel": self.tunnels.accept,
        }[lst.direction]

        def on_accept(fd: int, events: int) -> None:
            for _ in range(ACCEPT_BATCH):
                try:
                    client, peer = accept()
                except BlockingIOError:
                    return
                except OSError as exc:
                    if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                        continue
                    if exc.errno in (errno.EMFILE, errno.ENFILE) and self._refuse_one(wl, lst):
                        continue
                    log.warning("accept on %s %s: %s", wl.uid, lst.direction, exc)
                    return
                on_client(wl, client, peer)

        return on_accept

    def _refuse_one(self, wl: ServedWorkload, lst: Listening) -> bool:
        """Out of descriptors: accept one waiting client with the spare one and reset it (a
        refusal, counted), rather than leave the listener readable for the loop to spin on."""
        os.close(self.spare_fd)
        try:
            client, peer = lst.sock.accept()
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                self.spare_fd = _spare()
        self.admission.shed(wl, "open_files", peer[0])
        reset(client)
        if self.spare_fd == client.fileno() or self.spare_fd < 0:
            self.spare_fd = _spare()
        return True

    def _outbound(self, wl: ServedWorkload, client: socket.socket, peer: Any) -> None:
        peer = (decide.app_address(wl, peer[0]), peer[1])
        if not self.admission.admit(wl, peer[0], inbound=False):
            reset(client)
            return
        try:
            client.setblocking(False)
            dst: tuple[str, int] = original_dst(client)
        except OSError as exc:
            log.debug("%s: no original destination for %s: %s", wl.uid, peer, exc)
            wl.flow("outbound", "plaintext").failures += 1
            reset(client)
            return
        reg = self.registry
        route = decide.route_outbound(
            wl, dst[0], dst[1], local=reg.local, directory=reg.directory.identities,
            egress=reg.directory.egress, own_ports=self.own_ports,
        )  # fmt: skip
        match route:
            case decide.Passthrough():
                self._relay(wl, (wl.flow("outbound", "plaintext"),), client, None, dst)
            case decide.Tunnel(identity=expected):
                self.tunnels.open_stream(wl, client, dst, expected)
            case decide.Local(destination=dst_wl, secure=secure):
                security: Security = "mtls" if secure else "plaintext"
                owners = (
                    wl.flow("outbound", security, dst_wl.identity if secure else ""),
                    dst_wl.flow("inbound", security, wl.identity if secure else ""),
                )
                facts = Facts(wl.identity if secure else "", peer[0], dst[0], dst[1])
                if not self.admission.admit(dst_wl, wl.identity or peer[0], inbound=True):
                    reset(client)
                    return
                http = dst_wl.policy is not None and dst_wl.policy.needs_http(dst[1])
                if not self.enforcer.admit_connection(dst_wl, facts, owners[1], http=http):
                    reset(client)
                    return
                self._relay(dst_wl, owners, client, peer[0], dst, facts, http,
                            wl.identity or peer[0], same_node=True)  # fmt: skip
            case decide.Refuse(reason=reason, at_destination=at_destination):
                owner = reg.local[dst[0]] if at_destination else wl
                owner.flow("inbound" if at_destination else "outbound", "plaintext").deny(reason)
                reset(client)

    def _inbound(self, wl: ServedWorkload, client: socket.socket, peer: Any) -> None:
        if not self.admission.admit(wl, peer[0], inbound=True):
            reset(client)
            return
        stats = wl.flow("inbound", "plaintext")
        try:
            client.setblocking(False)
            dst: tuple[str, int] = original_dst(client)
        except OSError as exc:
            log.debug("%s: no original destination for %s: %s", wl.uid, peer, exc)
            stats.failures += 1
            reset(client)
            return
        verdict = decide.admit_inbound(wl, dst[0], dst[1], self.own_ports)
        if isinstance(verdict, decide.Deny):
            stats.deny(verdict.reason)
            reset(client)
            return
        facts = Facts("", peer[0], dst[0], dst[1])
        http = wl.policy is not None and wl.policy.needs_http(dst[1])
        if not self.enforcer.admit_connection(wl, facts, stats, http=http):
            reset(client)
            return
        self._relay(wl, (stats,), client, peer[0], dst, facts, http, peer[0])

    def _relay(
        self,
        wl: ServedWorkload,
        counted: tuple[FlowStats, ...],
        client: socket.socket,
        source_ip: str | None,
        dst: tuple[str, int],
        facts: Facts | None = None,
        http: bool = False,
        inbound_peer: str = "",
        same_node: bool = False,
    ) -> None:
        """Relay `client` to `dst` from inside `wl`'s netns (bound to `source_ip` when given, so
        the app sees its real peer); `counted` count it; `facts`: what an inbound connection was
        admitted with (re-checked when the policy changes); `http`: its requests are decided
        one by one (`InspectedRelay`) instead of spliced; `inbound_peer`: who it was admitted
        for (`Admission.admit`; "" outbound); `same_node`: both ends are served here, so an
        uninspected relay is joined in the kernel when it can be (`agent.proxy.fastpath`).  The
        upstream socket and the pipes come first: a client that cannot have them costs the app
        no connect."""
        try:
            up = upstream_socket(
                wl.netns_fd,
                client.family,
                self.cfg.mark,
                (source_ip, 0) if source_ip is not None else None,
                home_fd=self.home_fd,
            )
        except OSError as exc:
            self._no_room(wl, counted, client, facts, exc)
            return
        try:
            relay: Relay | InspectedRelay
            if http and facts is not None:
                relay = self._inspected(wl, counted, client, up, facts)
            elif same_node and self.fastpath.available:
                relay = JoinedRelay(client, up, self.fastpath, connecting=True,
                                    watch=self.watch, done=self._relay_done, pool=self.pipes,
                                    owner=counted)  # fmt: skip
            else:
                relay = Relay(client, up, connecting=True, watch=self.watch,
                              done=self._relay_done, pool=self.pipes, owner=counted)  # fmt: skip
        except OSError as exc:  # out of pipes / fds
            up.close()
            self._no_room(wl, counted, client, facts, exc)
            return
        relay.started_at = time.monotonic()
        on_event = relay.on_event
        self.handlers[relay.fd_down] = on_event
        self.handlers[relay.fd_up] = on_event
        for stats in counted:
            stats.relays.add(relay)
        self.recorder.opened(relay, wl, client, source_ip, dst, facts)
        self.admission.opened(relay, inbound_peer, FDS_PER_RELAY)
        err = up.connect_ex(dst)
        if err and err != errno.EINPROGRESS:
            relay.connect_failed = True
            relay.abort()  # `_relay_done` counts the failure; the client gets a reset
            return
        if facts is not None and not http:
            self.guarded.add(relay, wl, facts, spliced=True)
        relay.start()

    def _no_room(
        self,
        wl: ServedWorkload,
        counted: tuple[FlowStats, ...],
        client: socket.socket,
        facts: Facts | None,
        exc: OSError,
    ) -> None:
        """No upstream socket or pipes for a client: reset it, count it (shed when the worker
        is out of descriptors)."""
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            peer = wl.identity if facts is None else facts.source_principal or facts.source_ip
            self.admission.shed(wl, "open_files", peer)
        else:
            log.debug("%s: cannot relay: %s", wl.uid, exc)
        _failed(counted, client)

    def _inspected(
        self,
        wl: ServedWorkload,
        counted: tuple[FlowStats, ...],
        client: socket.socket,
        up: socket.socket,
        facts: Facts,
        done: Callable[[InspectedRelay], None] | None = None,
    ) -> InspectedRelay:
        """A relay deciding each request of `client` against `wl`'s policy (the last counter
        of `counted` is the inbound one, where denials count)."""
        stats = counted[-1]

        def decide(method: str, path: str, query: str, host: str,
                   headers: tuple[tuple[str, str], ...]) -> Allowed | Denied:  # fmt: skip
            verdict = self.requests.check(wl, stats, facts, method, path, query, host, headers)
            if isinstance(verdict, Allowed) and verdict.facts is not None:
                self.guarded.add(relay, wl, verdict.facts)  # re-checked on a new policy
            return verdict

        def l4_allowed() -> bool:
            if not self.enforcer.authorized(wl, facts, stats):
                return False
            self.guarded.add(relay, wl, facts)  # not HTTP: its L4 decision is re-checked
            return True

        finish = self._relay_done if done is None else done

        def finished(ended: InspectedRelay) -> None:
            self.inspected.discard(ended)
            if ended.shed:  # a slow head or a flood: counted against the workload
                self.admission.shed(wl, ended.shed, facts.source_principal or facts.source_ip)
            finish(ended)

        relay = InspectedRelay(client, up, decide=decide, l4_allowed=l4_allowed,
                               connecting=True, watch=self.watch, done=finished, owner=counted,
                               bounds=self.bounds, max_head=self.limits.request_header_bytes,
                               requests=self.recorder.requests(wl, facts))  # fmt: skip
        self.inspected.add(relay)
        return relay

    def inspect(
        self,
        wl: ServedWorkload,
        stats: FlowStats,
        facts: Facts,
        up: socket.socket,
        far: socket.socket,
    ) -> None:
        """HTTP inspection for a tunnel stream, which writes into the other end of the
        socketpair `far` is one end of: an `InspectedRelay` carries what comes out of `far` to
        `up` (the app, connecting), deciding each request.  The stream counts the bytes; the
        relay only decides."""
        relay = self._inspected(wl, (stats,), far, up, facts, done=self._inner_done)
        self.handlers[relay.fd_down] = relay.on_event
        self.handlers[relay.fd_up] = relay.on_event
        relay.started_at = time.monotonic()
        relay.start()

    def _inner_done(self, relay: InspectedRelay) -> None:
        for fd in (relay.fd_down, relay.fd_up):
            self.handlers.pop(fd, None)
            self.stale.add(fd)
        self.guarded.discard(relay)

    def _relay_done(self, relay: Relay | InspectedRelay) -> None:
        counted: tuple[FlowStats, ...] = relay.owner  # type: ignore[assignment]
        handlers = self.handlers
        handlers.pop(relay.fd_down, None)
        handlers.pop(relay.fd_up, None)
        self.stale.add(relay.fd_down)
        self.stale.add(relay.fd_up)
        self.guarded.discard(relay)
        self.admission.closed(relay)
        self.recorder.closed(relay)
        for stats in counted:
            stats.relays.discard(relay)
            if relay.connect_failed:
                stats.failures += 1
            else:
                stats.closed += 1
                stats.bytes_received += relay.bytes_up
                stats.bytes_sent += relay.bytes_down

    # -- timers -----------------------------------------------------------------------------

    def _sweep(self, now: float) -> None:
        connect_timeout = self.proxy_cfg.connect_timeout
        idle_timeout = self.proxy_cfg.idle_timeout
        for wl in self.registry.workloads.values():
            for st in wl.flows.values():
                for r in list(st.relays):
                    if r.connecting:
                        if now - r.started_at >= connect_timeout:
                            r.connect_failed = True
                            if not isinstance(r, TunnelStream):
                                r.abort()
                            else:
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
        head_timeout = self.limits.request_header_timeout
        for inspected in [r for r in self.inspected if r.head_since]:
            if now - inspected.head_since >= head_timeout:
                inspected.expire_head()  # slowloris: 408 (HTTP/2: GOAWAY), closed
        self.tunnels.sweep(now, connect_timeout, idle_timeout)
        self.admission.sweep(self.tunnels.bufs.held)

    # -- control ----------------------------------------------------------------------------

    def _on_control(self, fd: int, events: int) -> None:
        try:
            for message, fds in self.channel.datagrams():
                self._apply(message, fds)
            self.channel.flush()
        except ChannelClosed as exc:
            log.debug("control: %s; exiting", exc)
            self.running = False

    def _apply(self, message: ToWorker | MessageError, fds: list[int]) -> None:
        """Act on one supervisor message and answer it; never echoes a certificate message."""
        if isinstance(message, StatsRequest):
            for leftover in fds:
                os.close(leftover)
            self._send_stats(only_if_changed=False)
            return
        seq = -1 if isinstance(message, MessageError) else message.seq
        error: str | None = None
        try:
            match message:
                case MessageError():
                    raise message
                case AddWorkload():
                    self._add(message, fds)  # empties `fds` once it owns them
                case RemoveWorkload(uid=uid):
                    self._remove(uid)
                case Relabel():
                    self._revoke([self.registry.relabel(message)])
                case SetCertificate():
                    self.registry.set_certificate(message)
                    self.tunnels.pool.retire(message.uid)  # open streams go on; new ones: new conn
                case SetTrust():
                    if self.registry.set_trust(message):
                        self.tunnels.trust_domain = message.trust_domain
                        self.tunnels.pool.retire()
                case UpdateDirectory():
                    self.registry.update_directory(message)
                case UpdatePolicy():
                    if self.registry.update_policy(message):
                        self._revoke()
                case Drain():
                    self._drain()
        except (ValueError, OSError, TunnelTLSError, DirectoryError) as exc:
            error = str(exc)
            shown = "certificate" if isinstance(message, SetCertificate) else repr(message)[:200]
            log.warning("control message %s: %s", shown, error)
        finally:
            for leftover in fds:
                os.close(leftover)
        self.channel.reply(Done(seq, self.worker_id, error))

    def _add(self, msg: AddWorkload, fds: list[int]) -> None:
        if len(fds) != msg.fds_expected:
            raise ValueError(f"add {msg.uid}: {len(fds)} fds for {len(msg.listeners)} "
                             "listeners + netns")  # fmt: skip
        socks = [socket.socket(fileno=fd) for fd in fds[1:]]
        try:
            wl, old = self.registry.add(msg, fds[0], socks)
        except BaseException:
            for sock in socks:
                sock.detach()  # the caller closes the raw fds
            raise
        del fds[:]  # owned from here on (fds[0] by the workload, the rest by its listeners)
        self._drop_listeners(old)
        for lst in wl.listeners:
            self.handlers[lst.fd] = self._acceptor(wl, lst)
            self.ep.register(lst.fd, EPOLLIN | EPOLLEXCLUSIVE)

    def _drop_listeners(self, listeners: list[Listening]) -> None:
        for lst in listeners:
            self.handlers.pop(lst.fd, None)
            self.stale.add(lst.fd)
            with contextlib.suppress(OSError):
                self.ep.unregister(lst.fd)
            lst.sock.close()

    def _drain(self) -> None:
        """Stop accepting for good (see the module doc); `run` ends once `_drained`."""
        for wl in self.registry.workloads.values():
            for lst in wl.listeners:
                accept = self.handlers.get(lst.fd)
                with contextlib.suppress(OSError):
                    self.ep.unregister(lst.fd)
                for _ in range(ACCEPT_BATCH):  # batches of ACCEPT_BATCH
                    if accept is None or not _pending(lst.fd):
                        break
                    accept(lst.fd, EPOLLIN)
            self._drop_listeners(wl.listeners)
            wl.listeners = []
        self.tunnels.drain()
        self.draining_since = time.monotonic()

    def _drained(self, now: float) -> bool:
        if any(wl.open_count() for wl in self.registry.workloads.values()):
            return False
        return self.tunnels.drained(now - self.draining_since >= DRAIN_GRACE)

    def _revoke(self, workloads: list[ServedWorkload] | None = None) -> None:
        """Close the connections the policy in force no longer allows (right after a new
        policy version, or a workload's new labels): revocation takes effect at once."""
        for connection, graceful in list(self.guarded.revoked(workloads)):
            self.guarded.discard(connection)
            owner = connection.owner  # the stream's flow, or the relay's flows (inbound last)
            flow = owner if isinstance(owner, FlowStats) else owner[-1]
            flow.deny(decide.Reason.POLICY_REVOKED)
            if not isinstance(connection, TunnelStream):
                connection.close() if graceful else connection.abort()
            else:  # RST_STREAM: the client's proxy resets the client (no half-closed streams)
                connection.abort(reset_peer=True)
                connection.conn.flush_soon()

    def _remove(self, uid: str) -> None:
        wl = self.registry.workloads.get(uid)
        if wl is None:
            return
        self._drop_listeners(wl.listeners)
        wl.listeners = []
        self.tunnels.drop(wl)
        for st in wl.flows.values():
            for r in list(st.relays):
                if not isinstance(r, TunnelStream):
                    r.abort()
                else:
                    r.abort(reset_peer=False)
        self._send_stats(only_if_changed=False)  # its final counters
        self.registry.remove(uid)
        self.recorder.counters.forget(uid)
        os.close(wl.netns_fd)
        wl.netns_fd = -1

    def snapshot(self) -> Stats:
        workloads = self.registry.workloads
        return Stats(
            worker=self.worker_id,
            active=sum(wl.open_count() for wl in workloads.values()),
            flows={uid: wl.records() for uid, wl in workloads.items()},
            tunnel=self.tunnels.counters(),
            applied=self.registry.applied(),
            decisions={uid: wl.decision_records() for uid, wl in workloads.items()},
            shed={uid: wl.shed_records() for uid, wl in workloads.items() if wl.shed},
            telemetry=self.recorder.stats(),
        )

    def _send_stats(self, only_if_changed: bool) -> None:
        snap = self.snapshot()
        if only_if_changed and snap == self.last_stats:
            return
        try:
            if self.channel.offer(snap):
                self.last_stats = snap
        except ChannelClosed:
            self.running = False


def _ignore_done(relay: Relay) -> None:
    pass


def _pending(fd: int) -> bool:
    """A connection waits in this listener's accept queue."""
    probe = select.poll()
    probe.register(fd, select.POLLIN)
    return bool(probe.poll(0))


def _spare() -> int:
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


def _failed(counted: tuple[FlowStats, ...], client: socket.socket) -> None:
    for stats in counted:
        stats.failures += 1
    reset(client)


def global_buckets(cfg: PolicyConfig, node: BucketStore | None) -> BucketStore | None:
    """The Redis buckets of `scope: global` rate limits, when `policy.redis` names a Redis (and
    the node's buckets exist to fall back on)."""
    if not cfg.redis or node is None:
        return None
    return RedisBuckets(cfg.redis, fallback=node, on_failure=cfg.redis_on_failure,
                        timeout=cfg.redis_timeout)  # fmt: skip


def run_worker(
    control: socket.socket,
    config: Config,
    worker_id: int | None = None,
    buckets: BucketStore | None = None,
) -> None:
    """Serve until the control socket reaches EOF (or the supervisor asks us to stop by dying).

    `worker_id` (default: our pid) is echoed in every reply; `buckets`: the node's shared rate
    limit buckets (None: connection and request rate limits are not enforced).
    """
    worker = Worker(control, config, os.getpid() if worker_id is None else worker_id, buckets)
    if threading.current_thread() is threading.main_thread():  # SIGHUP: reopen the access log
        signal.signal(signal.SIGHUP, lambda _signum, _frame: worker.recorder.reopen())
    worker.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agent.proxy.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--config-json", required=True)
    parser.add_argument("--worker-id", type=int, default=None)
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--buckets-fd", type=int, default=None, help="shared rate-limit buckets")
    args = parser.parse_args(argv)
    set_pdeathsig()
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"worker[{args.worker_id if args.worker_id is not None else os.getpid()}] "
        "%(levelname)s %(message)s",
    )
    raw = json.loads(args.config_json)
    cfg = parse_config({key: raw.get(key) for key in WORKER_SECTIONS})
    control = socket.socket(fileno=args.control_fd)
    buckets = None if args.buckets_fd is None else SharedBuckets.attach(args.buckets_fd)
    run_worker(control, cfg, args.worker_id, buckets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
