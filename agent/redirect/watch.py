"""The loss watch: a pod's lost redirection repaired within a second, not a reconcile period.

Twice a second (`INTERVAL`) the watch samples every enrolled workload cheaply, decides with
`agent.redirect.loss.suspects` whom to look at, and has the backend `apply` their redirection
under the agent's state lock, as the reconcile loop repairs drift.  It samples under that lock
too, so what the agent itself writes (an enrollment's apply, a reconcile repair) is complete
before the watch looks and is never counted as a loss.  `apply` reads what is there
and writes only what differs, so a sample taken right after it tells whether anything was lost
(the fingerprint or the routing moved: a repair, counted and logged) or the change was someone
else's (nothing written: the new fingerprint is the healthy one).  Reading back first, as the
reconcile does, would double the work on the path that counts: 20 pods all flushed at once
are 20 applies, one after the other on the agent's netns thread.  The full reconcile stays the
backstop (and forgets namespaces that are gone: the watch leaves a workload whose namespace it
cannot sample to it).

A sample costs a few syscalls and no namespace switch: when the watch first sees a workload it
enters the namespace once (on the agent's netns thread) and opens there a `Sentinel`:

- a route netlink socket bound to the IPv4/IPv6 route and rule groups (every backend relies on
  Ferry's policy routing): any message waiting on it, or an overflow, means routing changed;
- iptables: raw IPv4 and IPv6 sockets, on which `IPT_SO_GET_INFO` / `IP6T_SO_GET_INFO` give the
  entry count and size of the `nat` and `mangle` tables (legacy iptables sends no netlink
  events; a flush or any rule change moves these numbers);
- nftables: a netfilter netlink socket asking `NFT_MSG_GETGEN`, the ruleset generation, which
  every nftables transaction in the namespace increments (`nft flush ruleset` included);
- eBPF: the namespace's fd, for `BPF_PROG_QUERY` of its sk_lookup programs, and once per tick
  for all pods the programs attached at the cgroup v2 root (the connect, sockops and getsockopt
  hooks every pod shares).

Sockets and the namespace fd hold the namespace: a sentinel is closed as soon as its workload
is no longer enrolled (or its path now names another namespace).  The cost, measured by
`bench/repair.py`, is tens of microseconds of CPU per pod per sample.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

from agent.config import RedirectionConfig
from agent.netns import NetnsExecutor
from agent.redirect import bpf_syscall as sys_bpf
from agent.redirect.backend import RedirectionBackend
from agent.redirect.loss import Fingerprint, Sample, WatchCounts, lost, suspects
from agent.redirect.rules import TABLES
from agent.workloads import Workload

log = logging.getLogger("ferry.agent")

INTERVAL = 0.5  # seconds between samples

_SO_GET_INFO = 64  # IPT_SO_GET_INFO and IP6T_SO_GET_INFO
_GETINFO = struct.Struct("=32sI5I5III")  # struct ipt_getinfo: ..., num_entries, size
_NETLINK_NETFILTER = 12
_NFT_GETGEN = (10 << 8) | 16  # NFNL_SUBSYS_NFTABLES, NFT_MSG_GETGEN
_NLMSG_ERROR = 2
_NLMSG = struct.Struct("=IHHII")
_NFTA_GEN_ID = 1
# RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV4_RULE, RTNLGRP_IPV6_ROUTE, RTNLGRP_IPV6_RULE as a bind mask
_ROUTING_GROUPS = (1 << 6) | (1 << 7) | (1 << 10) | (1 << 18)
_CGROUP_HOOKS = (
    sys_bpf.ATTACH_CGROUP_INET4_CONNECT,
    sys_bpf.ATTACH_CGROUP_INET6_CONNECT,
    sys_bpf.ATTACH_CGROUP_SOCK_OPS,
    sys_bpf.ATTACH_CGROUP_GETSOCKOPT,
)
_libc = ctypes.CDLL(None, use_errno=True)


class Sentinel:
    """The descriptors that watch one workload's namespace (opened inside it, see above)."""

    def __init__(self, backend: str, families: tuple[int, ...], netns: Path) -> None:
        self.backend = backend
        self.families = families
        self.netns_fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        self._sockets: list[socket.socket] = []
        try:
            stat = os.fstat(self.netns_fd)
            self.identity = (stat.st_dev, stat.st_ino)
            self.routing = self._socket(socket.AF_NETLINK, socket.NETLINK_ROUTE)
            self.routing.setblocking(False)
            self.routing.bind((0, _ROUTING_GROUPS))
            self.raw = {
                family: self._socket(
                    socket.AF_INET if family == 4 else socket.AF_INET6, socket.IPPROTO_RAW
                )
                for family in (families if backend == "iptables" else ())
            }
            self.netfilter = None
            if backend == "nftables":
                self.netfilter = self._socket(socket.AF_NETLINK, _NETLINK_NETFILTER)
                self.netfilter.settimeout(1.0)
        except BaseException:
            self.close()
            raise

    def _socket(self, family: int, proto: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_RAW | socket.SOCK_CLOEXEC, proto)
        self._sockets.append(sock)
        return sock

    def sample(self, shared: Fingerprint) -> Sample:
        """The fingerprint now (`shared`: what all pods share), and whether routing changed."""
        if self.backend == "iptables":
            found = [
                n for f in self.families for t in TABLES for n in _table_info(self.raw[f], f, t)
            ]
        elif self.netfilter is not None:
            found = [_generation(self.netfilter)]
        elif self.backend == "ebpf":
            found = _programs(self.netns_fd, sys_bpf.ATTACH_SK_LOOKUP)
        else:
            found = []
        return Sample((*shared, *found), _drained(self.routing))

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        os.close(self.netns_fd)


def _table_info(sock: socket.socket, family: int, table: str) -> tuple[int, int]:
    """(entries, bytes) of an iptables table in the socket's namespace; (-errno, 0) if none."""
    buffer = ctypes.create_string_buffer(table.encode(), _GETINFO.size)
    length = ctypes.c_uint32(_GETINFO.size)
    level = socket.IPPROTO_IP if family == 4 else socket.IPPROTO_IPV6
    if _libc.getsockopt(sock.fileno(), level, _SO_GET_INFO, buffer, ctypes.byref(length)):
        return -ctypes.get_errno(), 0
    *_, entries, size = _GETINFO.unpack(buffer.raw)
    return entries, size


def _generation(sock: socket.socket) -> int:
    """The nftables ruleset generation of the socket's namespace (-errno on an error)."""
    sock.send(_NLMSG.pack(_NLMSG.size + 4, _NFT_GETGEN, 1, 0, 0) + bytes(4))
    try:
        reply = sock.recv(4096)
    except OSError as exc:
        return -(exc.errno or errno.EIO)
    kind = _NLMSG.unpack_from(reply)[1] if len(reply) >= _NLMSG.size else _NLMSG_ERROR
    if kind == _NLMSG_ERROR:
        return -errno.EIO
    at = _NLMSG.size + 4  # nlmsghdr, nfgenmsg, then attributes
    while at + 4 <= len(reply):
        size, kind = struct.unpack_from("=HH", reply, at)
        if kind & 0x3FFF == _NFTA_GEN_ID and size >= 8:
            return int(struct.unpack_from(">I", reply, at + 4)[0])
        at += max(4, (size + 3) & ~3)
    return -errno.EIO


def _programs(fd: int, attach_type: int) -> list[int]:
    try:
        return sorted(sys_bpf.prog_query(fd, attach_type))
    except OSError as exc:
        return [-(exc.errno or errno.EIO)]


def _drained(sock: socket.socket) -> bool:
    """Whether any routing message (or an overflow) came since the last call; reads them all."""
    changed = False
    while True:
        try:
            sock.recv(65536)
        except BlockingIOError:
            return changed
        except OSError:  # ENOBUFS: messages were lost, so something changed
            changed = True
        else:
            changed = True


def _identity(workload: Workload) -> tuple[int, int]:
    return workload.netns_dev, workload.netns_inode


class LossWatch:
    """The loop (see the module doc); `counts` is its part of `agent status`."""

    def __init__(
        self,
        backend_name: str,
        backend: RedirectionBackend,
        cfg: RedirectionConfig,
        executor: NetnsExecutor,
        lock: asyncio.Lock,
        interval: float = INTERVAL,
    ) -> None:
        self.backend_name = backend_name
        self.backend = backend
        self.families = (4, 6) if cfg.ipv6 else (4,)
        self.executor = executor
        self.lock = lock
        self.counts = WatchCounts(interval)
        self._sentinels: dict[str, Sentinel] = {}
        self._healthy: dict[str, Fingerprint] = {}
        self._cgroup_fd: int | None = None

    async def run(self, enrollments: Callable[[], Mapping[str, Workload]]) -> None:
        while True:  # a tick every `interval`, or at once after one that took longer
            started = time.monotonic()
            try:
                await self.tick(enrollments)
            except Exception:  # the next tick tries again; the reconcile loop is the backstop
                log.exception("loss watch: a tick failed")
            await asyncio.sleep(max(0.0, started + self.counts.interval - time.monotonic()))

    async def tick(self, enrollments: Callable[[], Mapping[str, Workload]]) -> None:
        """Sample every workload, read back the suspects, repair what is not ok.

        Sampling and repairs happen under the state lock, so an enrollment, an unenrollment or
        a reconcile repair has finished before the watch looks: a new pod is first sampled
        after its enrollment's apply, and the agent's own writes are never taken for a loss."""
        await self._follow(dict(enrollments()))
        async with self.lock:
            current = dict(enrollments())
            shared = self._shared()
            samples = {
                uid: sentinel.sample(shared)
                for uid, sentinel in self._sentinels.items()
                if uid in current and sentinel.identity == _identity(current[uid])
            }
            self.counts.samples += len(samples)
            for uid in suspects(self._healthy, samples):
                await self._check(current[uid], self._sentinels[uid])

    async def _follow(self, current: Mapping[str, Workload]) -> None:
        """Sentinels for exactly the enrolled workloads, each on its own namespace."""
        for uid in [uid for uid in self._sentinels if uid not in current]:
            self._drop(uid)
        for uid, workload in current.items():
            sentinel = self._sentinels.get(uid)
            wanted = _identity(workload)
            if sentinel is not None and sentinel.identity == wanted:
                continue
            self._drop(uid)
            path = Path(workload.netns)
            opener = partial(Sentinel, self.backend_name, self.families, path)
            try:
                sentinel = await asyncio.to_thread(self.executor.call, path, opener)
            except (OSError, ValueError):  # gone: the reconcile loop forgets it
                continue
            if sentinel.identity != wanted:  # the path names another namespace now
                sentinel.close()
                continue
            self._sentinels[uid] = sentinel

    def _shared(self) -> Fingerprint:
        """What every pod shares: the eBPF programs at the cgroup v2 root."""
        if self.backend_name != "ebpf":
            return ()
        if self._cgroup_fd is None:
            from agent.redirect.cgroup_root import cgroup2_root

            self._cgroup_fd = os.open(cgroup2_root(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return tuple(n for hook in _CGROUP_HOOKS for n in _programs(self._cgroup_fd, hook))

    async def _check(self, workload: Workload, sentinel: Sentinel) -> None:
        """Make one suspect's redirection whole again (called under the state lock).  A sample
        right before `apply` takes in whatever changed since the last tick (routing messages
        included); `apply` writes only what differs, so whether the fingerprint or the routing
        moved between that sample and one right after it says whether anything was lost."""
        before = sentinel.sample(self._shared())
        start = time.monotonic()
        try:
            await asyncio.to_thread(self.backend.apply, Path(workload.netns))
            self.counts.applied += 1
        except Exception as exc:  # retried on the next tick
            self.counts.failures += 1
            self._healthy.pop(workload.uid, None)
            log.error("loss watch: %s/%s: %s", workload.namespace, workload.name, exc)
            return
        after = sentinel.sample(self._shared())
        changed = lost(before, after)
        if not changed:  # nothing of Ferry's was missing: someone else's change
            self._healthy[workload.uid] = after.fingerprint
            return
        self._healthy.pop(workload.uid, None)  # the next tick looks once more
        took = time.monotonic() - start
        name = f"{workload.namespace}/{workload.name}"
        self.counts.repaired(time.time(), name, changed, took)
        log.warning("loss watch: repaired %s (%s lost) in %.0f ms", name, changed, took * 1e3)

    def _drop(self, uid: str) -> None:
        sentinel = self._sentinels.pop(uid, None)
        if sentinel is not None:
            sentinel.close()
        self._healthy.pop(uid, None)

    def close(self) -> None:
        for uid in list(self._sentinels):
            self._drop(uid)
        if self._cgroup_fd is not None:
            os.close(self._cgroup_fd)
            self._cgroup_fd = None
