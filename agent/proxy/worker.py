"""A proxy worker process: one single-threaded epoll loop relaying redirected TCP connections.

    python -m agent.proxy.worker --control-fd N [--worker-id K]
        --config-json '{"proxy": {...}, "redirection": {...}}'

The supervisor makes a SOCK_SEQPACKET socketpair, passes one end as fd N, and speaks JSON over it
(one message per packet, file descriptors with SCM_RIGHTS):

supervisor -> worker
  {"op": "add", "uid": U, "listeners": [{"direction": "outbound", "family": 4}, ...]}
      fds = [netns_fd, listener fd per "listeners" entry].  The worker accepts on those listeners
      (EPOLLEXCLUSIVE, so N workers holding the same listeners do not all wake) and keeps the netns
      fd to create that workload's upstream sockets.  Re-adding a known uid swaps its listeners and
      netns fd and keeps its open connections.
  {"op": "del", "uid": U}
      Stop accepting for U, reset its open connections, close its fds.  A stats message that
      still holds U's final counters follows at once; later ones no longer mention U.
  {"op": "stats"}
      Answered at once with a stats message.
worker -> supervisor
  {"op": "stats", "worker": K, "active": n, "workloads": {U: {"outbound": C, "inbound": C}}}
      C = {"connections_opened", "connections_closed", "connect_failures", "bytes_received",
      "bytes_sent"}, cumulative since the workload was added (bytes_received: client -> server,
      bytes_sent: server -> client, bytes of open connections included).  "active" counts open
      relays, connecting ones included.  Sent every second when anything changed; a message the
      control socket cannot take right now is dropped (the next one is cumulative anyway).
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
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from agent.config import ProxyConfig, RedirectionConfig, parse_config
from agent.proxy.relay import PipePool, Relay
from agent.proxy.sockets import open_home_netns, original_dst, upstream_socket

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

Handler = Callable[[int, int], None]


class DirStats:
    """Counters of one workload and direction; open relays are in `relays`."""

    __slots__ = ("bytes_received", "bytes_sent", "closed", "failures", "relays")

    def __init__(self) -> None:
        self.closed = 0  # connected relays that ended
        self.failures = 0
        self.bytes_received = 0  # of ended relays
        self.bytes_sent = 0
        self.relays: set[Relay] = set()

    def snapshot(self) -> dict[str, int]:
        opened, rx, tx = self.closed, self.bytes_received, self.bytes_sent
        for r in self.relays:
            if not r.connecting:
                opened += 1
                rx += r.up_half.nbytes
                tx += r.down_half.nbytes
        return {
            "connections_opened": opened,
            "connections_closed": self.closed,
            "connect_failures": self.failures,
            "bytes_received": rx,
            "bytes_sent": tx,
        }


class _Listening:
    __slots__ = ("direction", "fd", "sock")

    def __init__(self, sock: socket.socket, direction: str) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.direction = direction


class Workload:
    __slots__ = ("listeners", "netns_fd", "stats", "uid")

    def __init__(self, uid: str, netns_fd: int) -> None:
        self.uid = uid
        self.netns_fd = netns_fd
        self.listeners: list[_Listening] = []
        self.stats = {"outbound": DirStats(), "inbound": DirStats()}


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
        self.pool = PipePool()
        self.home_fd = open_home_netns()
        self.running = True
        self.last_stats: dict[str, Any] | None = None
        self.own_ports = {redirection_cfg.outbound_port, redirection_cfg.inbound_port}
        control.setblocking(False)
        self.ep.register(control.fileno(), EPOLLIN)
        self.handlers[control.fileno()] = self._on_control

    # -- loop -------------------------------------------------------------------------------

    def run(self) -> None:
        poll = self.ep.poll
        handlers = self.handlers
        stale = self.stale
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
        for wl in self.workloads.values():
            for lst in wl.listeners:
                lst.sock.close()
            for st in wl.stats.values():
                for r in st.relays:
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
        stats = wl.stats[lst.direction]
        inbound = lst.direction == "inbound"
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
                    log.warning("accept on %s %s: %s", wl.uid, lst.direction, exc)
                    return
                self._proxy(wl, stats, client, peer, inbound)

        return on_accept

    def _proxy(
        self, wl: Workload, stats: DirStats, client: socket.socket, peer: Any, inbound: bool
    ) -> None:
        try:
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
            stats.failures += 1
            _reset(client)
            return
        err = up.connect_ex(dst)
        if err and err != errno.EINPROGRESS:
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
                owner=stats,
            )
        except OSError as exc:  # out of pipes / fds
            log.warning("%s: cannot relay: %s", wl.uid, exc)
            stats.failures += 1
            up.close()
            _reset(client)
            return
        relay.started_at = time.monotonic()
        on_event = relay.on_event
        self.handlers[relay.fd_down] = on_event
        self.handlers[relay.fd_up] = on_event
        stats.relays.add(relay)
        relay.start()

    def _relay_done(self, relay: Relay) -> None:
        stats: DirStats = relay.owner  # type: ignore[assignment]
        handlers = self.handlers
        handlers.pop(relay.fd_down, None)
        handlers.pop(relay.fd_up, None)
        self.stale.add(relay.fd_down)
        self.stale.add(relay.fd_up)
        stats.relays.discard(relay)
        if relay.connect_failed:
            stats.failures += 1
        else:
            stats.closed += 1
            stats.bytes_received += relay.up_half.nbytes
            stats.bytes_sent += relay.down_half.nbytes

    def _sweep(self, now: float) -> None:
        connect_timeout = self.proxy_cfg.connect_timeout
        idle_timeout = self.proxy_cfg.idle_timeout
        for wl in self.workloads.values():
            for st in wl.stats.values():
                for r in list(st.relays):
                    if r.connecting:
                        if now - r.started_at >= connect_timeout:
                            r.connect_failed = True
                            r.abort()
                        continue
                    total = r.up_half.nbytes + r.down_half.nbytes
                    if total != r.idle_mark:
                        r.idle_mark = total
                        r.idle_since = now
                    elif now - r.idle_since >= idle_timeout:
                        r.close()

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
                else:
                    raise ValueError(f"unknown op {op!r}")
            except (ValueError, KeyError, TypeError, OSError) as exc:
                log.warning("control message %r: %s", data[:200], exc)
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
        netns_fd = fds[0]
        directions = [spec["direction"] for spec in specs]
        if any(d not in ("outbound", "inbound") for d in directions):
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
        for sock, direction in zip(socks, directions, strict=True):
            lst = _Listening(sock, direction)
            wl.listeners.append(lst)
            self.handlers[lst.fd] = self._acceptor(wl, lst)
            self.ep.register(lst.fd, EPOLLIN | EPOLLEXCLUSIVE)

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
        for st in wl.stats.values():
            for r in list(st.relays):
                r.abort()
        os.close(wl.netns_fd)
        wl.netns_fd = -1
        self._send_stats(only_if_changed=False)
        del self.workloads[uid]

    def snapshot(self) -> dict[str, Any]:
        active = 0
        workloads: dict[str, Any] = {}
        for uid, wl in self.workloads.items():
            workloads[uid] = {d: st.snapshot() for d, st in wl.stats.items()}
            active += sum(len(st.relays) for st in wl.stats.values())
        return {"op": "stats", "worker": self.worker_id, "active": active, "workloads": workloads}

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
