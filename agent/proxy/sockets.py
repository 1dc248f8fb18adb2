"""Proxy sockets created inside a pod's network namespace.

A socket belongs for its whole life to the namespace that was current for the creating thread, so
the listeners (opened once per workload, usually by the supervisor) and every upstream socket
(opened per connection, by a worker) are created with the thread switched into the pod netns.
That keeps the pod's own IP on every packet the proxy sends, exactly like ztunnel's in-pod mode.

Every proxy socket carries `SO_MARK = cfg.mark`, which the pod's redirection rules skip, so the
proxy's own upstream connections are never redirected back to it.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from agent.config import RedirectionConfig
from agent.linux import setns
from agent.proxy.handoff import pick_inherited

# agent.netns (and with it pyroute2, ~20 MB per process) is imported only where `entered` is used:
# workers switch namespaces with a bare setns(2) and stay small.

Direction = Literal["outbound", "inbound", "tunnel"]
Family = Literal[4, 6]

SO_ORIGINAL_DST = 80  # SOL_IP; the same number as IP6T_SO_ORIGINAL_DST under SOL_IPV6
SOL_IP = getattr(socket, "SOL_IP", 0)
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
IP_BIND_ADDRESS_NO_PORT = 24
SO_MARK = getattr(socket, "SO_MARK", 36)
LISTEN_BACKLOG = 4096

_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # family (host order, skipped), port, addr, zero
_SOCKADDR_IN6 = struct.Struct("!2xHI16sI")  # family, port, flowinfo, addr, scope id

_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}


@dataclass(frozen=True)
class Listener:
    """One listening socket in a pod netns: redirected `direction` traffic of one IP family."""

    direction: Direction
    family: Family
    sock: socket.socket


def _listen_addresses(cfg: RedirectionConfig) -> list[tuple[Direction, Family, str, int]]:
    """Where a workload's listeners are bound: (direction, family, host, port)."""
    addrs: list[tuple[Direction, Family, str, int]] = [
        ("outbound", 4, "127.0.0.1", cfg.outbound_port),
        ("inbound", 4, "0.0.0.0", cfg.inbound_port),
    ]
    # The tunnel listener: mTLS from other proxies; the redirection rules never touch its port.
    addrs.append(("tunnel", 4, "0.0.0.0", cfg.tunnel_port))
    if cfg.ipv6:
        addrs += [
            ("outbound", 6, "::1", cfg.outbound_port),
            ("inbound", 6, "::", cfg.inbound_port),
            ("tunnel", 6, "::", cfg.tunnel_port),
        ]
    return addrs


def _listener(family: Family, host: str, port: int, mark: int) -> socket.socket:
    sock = socket.socket(_FAMILY[family], socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        # SO_REUSEADDR only: with SO_REUSEPORT any process in the pod running as the same user
        # (root) could bind the same port and take a share of the redirected connections.  The
        # workers share these very sockets through SCM_RIGHTS instead.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == 6:
            sock.setsockopt(SOL_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def open_listeners(
    netns_fd: int, cfg: RedirectionConfig, inherited: Sequence[Listener] = ()
) -> list[Listener]:
    """Open the outbound (loopback), inbound and tunnel (wildcard) listeners inside `netns_fd`.

    IPv4 failures raise (after closing whatever was opened).  IPv6 listeners are skipped when
    `cfg.ipv6` is false or the namespace has no IPv6 (EAFNOSUPPORT, EADDRNOTAVAIL).  A listener
    of `inherited` (handed over by the proxy this one replaces, in this very namespace) that is
    bound where one of them would be is used instead of a new socket; the caller closes the
    inherited ones that are not in the result.
    """
    from agent.netns import entered

    wanted = _listen_addresses(cfg)
    offered = [(lst.direction, lst.family, *lst.sock.getsockname()[:2]) for lst in inherited]
    picks = pick_inherited(wanted, offered)
    listeners: list[Listener] = []
    try:
        with entered(netns_fd):
            for (direction, family, host, port), pick in zip(wanted, picks, strict=True):
                if pick is not None:
                    listeners.append(inherited[pick])
                    continue
                try:
                    sock = _listener(family, host, port, cfg.mark)
                except OSError as exc:
                    if family == 6 and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                        continue
                    raise
                listeners.append(Listener(direction, family, sock))
    except BaseException:
        for listener in listeners:
            if not any(listener is mine for mine in inherited):
                listener.sock.close()
        raise
    return listeners


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The destination the client asked for before REDIRECT rewrote it (SO_ORIGINAL_DST; the
    eBPF backend's getsockopt program answers it too).  A connection that was never NATed (the
    eBPF backend's sk_lookup hands it over unchanged; conntrack has no entry) is addressed to
    where the client asked: its local address."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, _SOCKADDR_IN6.size)
            port, _flow, addr, _scope = _SOCKADDR_IN6.unpack_from(raw)
            return socket.inet_ntop(socket.AF_INET6, addr), port
        raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOPROTOOPT):
            raise
        host, port = sock.getsockname()[:2]
        return host, port
    port, addr = _SOCKADDR_IN.unpack_from(raw)
    return socket.inet_ntop(socket.AF_INET, addr), port


def _make_upstream(family: int, mark: int, bind_to: tuple[str, int] | None) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if bind_to is not None:
            if family == socket.AF_INET6:
                sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
            else:
                sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
            if bind_to[1] == 0:
                # Choose the port at connect() time, per 4-tuple: many connections from one
                # client IP then do not exhaust the ephemeral range of that address.
                sock.setsockopt(SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind(bind_to)
    except BaseException:
        sock.close()
        raise
    return sock


def upstream_socket(
    netns_fd: int,
    family: int,
    mark: int,
    bind_to: tuple[str, int] | None,
    *,
    home_fd: int | None = None,
) -> socket.socket:
    """A nonblocking, marked, TCP_NODELAY socket living in `netns_fd`, not yet connected.

    `family` is 4, 6, AF_INET or AF_INET6.  With `bind_to` the socket is transparent
    (IP_TRANSPARENT / IPV6_TRANSPARENT) and bound to that address, so a connection to the app
    carries the original client's IP (inbound delivery).

    Without `home_fd` the thread switches with `entered` (safe anywhere).  A single-threaded
    caller that never leaves its own namespace may pass an fd on it
    (`agent.linux.open_thread_netns()`) to switch back with a bare setns(2) and skip reopening
    /proc/thread-self/ns/net each time.
    """
    af = socket.AF_INET6 if family in (6, socket.AF_INET6) else socket.AF_INET
    if home_fd is None:
        from agent.netns import entered

        with entered(netns_fd):
            return _make_upstream(af, mark, bind_to)
    setns(netns_fd)
    try:
        return _make_upstream(af, mark, bind_to)
    finally:
        setns(home_fd)
