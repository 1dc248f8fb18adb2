"""What a worker takes on: its share of the node's bounds, and shedding the work past them.

The bounds (`limits:` in the config, docs/limits.md) that concern whole connections are kept
here, per worker process; the per-connection ones live where the bytes are (`agent.tunnel.floods`
for HTTP/2 frames, `agent.tunnel.stream` for bytes held, `agent.proxy.inspected` for request
heads).  The worker asks before it takes a connection on, and tells when one opens and closes:

- `admit(workload, peer, inbound, fds)`: a new connection (a relay, a tunnel stream, a tunnel
  connection) that takes `fds` descriptors (FDS_PER_RELAY for a plaintext relay, one for a
  tunnel stream or connection) is refused when the worker holds its share of
  `connections_per_node` (the node's bound divided equally among the workers), when its
  descriptors would pass the open-file limit (less FD_RESERVE: `open_files`), when the workload
  holds its share of `connections_per_workload`, or (`inbound`: a peer reaching the workload)
  when that peer holds its share of `connections_per_source` or would hold more than
  PEER_FD_SHARE of the worker's descriptors, so one client cannot take the room of all the
  others;
- `handshake(workload, ip)`: a tunnel TLS handshake is refused while `handshakes_per_worker`
  are in progress, or `handshakes_per_source` from that IP; `handshake_over(ip)` when it ends;
- `opened(held, peer, fds)` / `closed(held)`: the connections held (and their peak since the
  last trim) and their descriptors, per inbound peer (`peer`: its IP, or its identity on a
  tunnel; "" for outbound ones).

Refusing is cheap and early: before any upstream socket, pipe or TLS state exists, so a refused
client never becomes a connect to the app.  Every refusal, and every connection or stream the
flood bounds cut off, goes through `shed(workload, limit, peer)`: counted on the workload per
limit with the last peer and time (`ServedWorkload.shed`, reported in `Stats`, shown by `agent
status` and `ferry_proxy_shed_total`), and logged by `ShedLog`: one line when a limit is first
hit, then at most one line per limit every LOG_INTERVAL seconds with the count of the others,
never thousands of identical lines.

`sweep(held)` (the worker calls it every sweep, with the bytes its streams hold for apps) writes
out those counts and gives memory back: once the connections held (handshaking ones too) fell to
half of a peak of TRIM_PEAK or more, or the bytes held to half of a peak of TRIM_BYTES or more,
glibc's malloc_trim returns the freed heap (a flood of handshakes, or of bytes for an app that
does not read, leaves hundreds of MB of free heap otherwise).
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import fields

from agent.config import LimitsConfig
from agent.linux import release_memory
from agent.proxy.messages import Shed
from agent.proxy.workload import ServedWorkload
from agent.tunnel.floods import Bounds

log = logging.getLogger("ferry.proxy.limits")

FDS_PER_RELAY = 6  # client and upstream sockets, and two pipes
FD_RESERVE = 1024  # for listeners, netns fds, the pipe pool, epoll, control, accepts to refuse
PEER_FD_SHARE = 0.75  # of a worker's descriptors one inbound peer may hold: the rest is others'
LOG_INTERVAL = 10.0  # seconds between two log lines about one limit
TRIM_PEAK = 256  # connections: bursts smaller than this are not worth a trim
TRIM_BYTES = 16 << 20  # bytes held for apps: likewise


def bounds_of(limits: LimitsConfig) -> Bounds:
    """The HTTP/2 flood bounds of the `limits:` section (same names)."""
    return Bounds(**{f.name: getattr(limits, f.name) for f in fields(Bounds)})


def open_file_limit() -> int:
    """The process's open-file limit, raised to the hard limit first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    return soft


class ShedLog:
    """One warning when a limit is first hit, then at most one per limit and LOG_INTERVAL."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._quiet_until: dict[str, float] = {}
        self._untold: dict[str, tuple[int, str, str]] = {}  # limit -> (count, workload, peer)

    def shed(self, workload: str, limit: str, peer: str) -> None:
        now = self.clock()
        if now < self._quiet_until.get(limit, 0.0):
            count = self._untold.get(limit, (0, "", ""))[0]
            self._untold[limit] = (count + 1, workload, peer)
            return
        self._quiet_until[limit] = now + LOG_INTERVAL
        key = "the open-file limit, LimitNOFILE" if limit == "open_files" else f"limits.{limit}"
        log.warning("%s: refused work from %s at limit %s (%s, docs/limits.md); more are"
                    " counted, not logged, for %.0f s", workload, peer or "an unknown peer",
                    limit, key, LOG_INTERVAL)  # fmt: skip

    def flush(self) -> None:
        """Log the counts of what was not logged, for the limits whose quiet time is over."""
        if not self._untold:
            return
        now = self.clock()
        for limit in [k for k in self._untold if now >= self._quiet_until[k]]:
            count, workload, peer = self._untold.pop(limit)
            self._quiet_until[limit] = now + LOG_INTERVAL
            log.warning("limit %s: %d more refusal(s) in %.0f s, the last for %s from %s", limit,
                        count, LOG_INTERVAL, workload, peer or "an unknown peer")  # fmt: skip


class Admission:
    """One worker's connection and handshake bounds, and its shedding (see the module doc)."""

    def __init__(
        self,
        limits: LimitsConfig,
        workers: int,
        fd_limit: int,
        wall: Callable[[], float] = time.time,
        trim: Callable[[], None] = release_memory,
    ) -> None:
        workers = max(1, workers)
        self.fd_room = max(FDS_PER_RELAY, fd_limit - FD_RESERVE)
        self.peer_fd_room = int(self.fd_room * PEER_FD_SHARE)
        self.max_connections = -(-limits.connections_per_node // workers)
        if self.fd_room // FDS_PER_RELAY < self.max_connections:
            log.info("the open-file limit (%d) allows about %d plaintext relays in this worker, "
                     "fewer than its share of limits.connections_per_node (%d): raise "
                     "LimitNOFILE", fd_limit, self.fd_room // FDS_PER_RELAY,
                     self.max_connections)  # fmt: skip
        self.max_per_workload = -(-limits.connections_per_workload // workers)
        self.max_per_source = -(-limits.connections_per_source // workers)
        self.max_handshakes = limits.handshakes_per_worker
        self.max_handshakes_per_source = limits.handshakes_per_source
        self.connections = 0  # relays, tunnel streams and tunnel connections held
        self.fds = 0  # ... their descriptors
        self.peer_of: dict[object, tuple[str, int]] = {}  # each: inbound peer ("": none), fds
        self.by_peer: dict[str, tuple[int, int]] = {}  # inbound peer -> connections, fds
        self.handshakes = 0  # tunnel handshakes in progress
        self.by_source: dict[str, int] = {}  # ... per source IP
        self.peak = 0  # of connections (handshaking ones included) since the last trim
        self.peak_bytes = 0  # of bytes held for apps, as last seen by `sweep`
        self.log = ShedLog()
        self.wall = wall
        self.trim = trim

    def admit(
        self, workload: ServedWorkload, peer: str, inbound: bool, fds: int = FDS_PER_RELAY
    ) -> bool:
        """Whether a new connection of `workload` taking `fds` descriptors may be taken on
        (shed if not); `inbound`: `peer` reaches the workload and is held to its share."""
        limit = ""
        if self.connections >= self.max_connections:
            limit = "connections_per_node"
        elif self.fds + fds > self.fd_room:
            limit = "open_files"
        elif workload.open_count() >= self.max_per_workload:
            limit = "connections_per_workload"
        elif inbound:
            count, held = self.by_peer.get(peer, (0, 0))
            if count >= self.max_per_source or held + fds > self.peer_fd_room:
                limit = "connections_per_source"
        if limit:
            self.shed(workload, limit, peer)
            return False
        return True

    def opened(self, held: object, peer: str, fds: int) -> None:
        """`held` (a relay, stream or tunnel connection) is open with `fds` descriptors; `peer`
        as in `admit` ("" for an outbound one)."""
        self.connections += 1
        self.fds += fds
        if self.connections > self.peak:
            self.peak = self.connections
        self.peer_of[held] = (peer, fds)
        if peer:
            count, before = self.by_peer.get(peer, (0, 0))
            self.by_peer[peer] = (count + 1, before + fds)

    def closed(self, held: object) -> None:
        peer, fds = self.peer_of.pop(held)
        self.connections -= 1
        self.fds -= fds
        if peer:
            count, before = self.by_peer.pop(peer)
            if count > 1:
                self.by_peer[peer] = (count - 1, before - fds)

    def handshake(self, workload: ServedWorkload, ip: str) -> bool:
        """Whether a tunnel handshake from `ip` may start (shed if not); `handshake_over`."""
        if self.handshakes >= self.max_handshakes:
            self.shed(workload, "handshakes_per_worker", ip)
            return False
        from_ip = self.by_source.get(ip, 0)
        if from_ip >= self.max_handshakes_per_source:
            self.shed(workload, "handshakes_per_source", ip)
            return False
        self.by_source[ip] = from_ip + 1
        self.handshakes += 1
        return True

    def handshake_over(self, ip: str) -> None:
        self.handshakes -= 1
        left = self.by_source.pop(ip) - 1
        if left:
            self.by_source[ip] = left

    def shed(self, workload: ServedWorkload, limit: str, peer: str) -> None:
        """Count and log work refused (or cut off) for `workload` at `limit`, caused by `peer`."""
        before = workload.shed.get(limit)
        count = 1 if before is None else before.count + 1
        workload.shed[limit] = Shed(limit, count, peer, self.wall())
        self.log.shed(workload.identity or workload.uid, limit, peer)

    def sweep(self, held: int) -> None:
        """Log what was not logged; give memory back once a burst (of connections, or of
        `held` bytes) is over."""
        self.log.flush()
        self.peak_bytes = max(self.peak_bytes, held)
        if (self.peak >= TRIM_PEAK and self.connections <= self.peak // 2) or (
            self.peak_bytes >= TRIM_BYTES and held <= self.peak_bytes // 2
        ):
            self.trim()
            self.peak = self.connections
            self.peak_bytes = held
