"""A worker's control plane: the channel to the supervisor and the state its messages build.

`ControlChannel` is the worker's end of the supervisor socketpair (SOCK_SEQPACKET, see
`agent.proxy.messages`): it reads every pending datagram with its descriptors and decodes it, and
sends replies without ever blocking the data path (a `Stats` the socket cannot take now is
dropped: the next one is cumulative anyway; a `Done` is queued and retried, because the supervisor
waits for it).

`Registry` is what the messages configure: the served workloads (by uid, and by address for the
same-node path), the trust domain and bundle, the TLS contexts built from them, the mesh directory
(`agent.directory.DirectoryTable`, O(1) lookups) and the policy in force
(`agent.proxy.policy_state.PolicyState`), compiled into each workload's `policy`. It only changes
state and builds TLS contexts; the worker registers and drops listeners and ends connections around
it. A message that cannot be applied raises with the reason and leaves the registry as it was.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Iterator

from agent.directory import DirectoryTable
from agent.linux import release_memory
from agent.proxy.messages import (
    AddWorkload,
    Applied,
    Done,
    Message,
    MessageError,
    Relabel,
    SetCertificate,
    SetTrust,
    Stats,
    ToWorker,
    UpdateDirectory,
    UpdatePolicy,
    decode,
    encode,
)
from agent.proxy.policy_state import PolicyState
from agent.proxy.workload import Listening, ServedWorkload
from agent.tunnel.tls import TunnelTLSError, check_bundle, client_context, server_context

log = logging.getLogger("ferry.proxy.worker")

CONTROL_MAX = 1 << 16
MAX_FDS = 64
TRIM_AFTER = 10_000  # directory entries: from this size on, memory is given back per change


class ChannelClosed(Exception):
    """The supervisor is gone."""


class ControlChannel:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self._done: collections.deque[bytes] = collections.deque()

    def datagrams(self) -> Iterator[tuple[ToWorker | MessageError, list[int]]]:
        """Every message waiting now, with its descriptors (the caller closes what it does not
        keep).  Raises ChannelClosed at EOF."""
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(
                    self.sock, CONTROL_MAX, MAX_FDS, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                return
            except OSError as exc:
                raise ChannelClosed(str(exc)) from exc
            if not data and not fds:
                raise ChannelClosed("the supervisor closed the control socket")
            try:
                message = decode(data)
            except MessageError as exc:
                yield exc, fds
                continue
            if isinstance(message, Done | Stats):
                yield MessageError(f"a worker does not take {message.OP!r}"), fds
                continue
            yield message, fds

    def reply(self, done: Done) -> None:
        """Send (or queue) the outcome of one message; the supervisor waits for it."""
        self._done.append(encode(done))
        self.flush()

    def flush(self) -> bool:
        """Send queued replies; True when none is left."""
        while self._done:
            if not self._send(self._done[0]):
                return False
            self._done.popleft()
        return True

    def offer(self, message: Message) -> bool:
        """Send if the socket takes it now (stats); False if it was dropped."""
        return not self._done and self._send(encode(message))

    def _send(self, data: bytes) -> bool:
        try:
            self.sock.send(data)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                raise ChannelClosed(str(exc)) from exc
            log.warning("control send: %s", exc)
            return False
        return True


def normal_ip(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        raise ValueError(f"{ip!r} is not an IP address") from None


class Registry:
    """The workloads, trust, directory and policy one worker serves (see the module doc)."""

    def __init__(self, root_namespace: str, trust_domain: str) -> None:
        self.workloads: dict[str, ServedWorkload] = {}
        self.local: dict[str, ServedWorkload] = {}  # ip -> workload served here
        self.trust_domain = ""
        self.bundle_pem = b""
        self.directory = DirectoryTable(keep_entries=False)  # lookups only
        self.policy = PolicyState(root_namespace, trust_domain)

    def add(
        self, msg: AddWorkload, netns_fd: int, socks: list[socket.socket]
    ) -> tuple[ServedWorkload, list[Listening]]:
        """Serve (or re-serve) a workload; returns it and the listeners it no longer uses.
        Takes ownership of `netns_fd` and `socks` only when it returns."""
        ips = frozenset(normal_ip(ip) for ip in msg.ips)
        for sock in socks:
            if sock.type != socket.SOCK_STREAM:
                raise ValueError(f"add {msg.uid}: fd {sock.fileno()} is not a stream socket")
        wl = self.workloads.get(msg.uid)
        if wl is None:
            wl = self.workloads[msg.uid] = ServedWorkload(msg.uid, netns_fd)
        else:
            os.close(wl.netns_fd)
            wl.netns_fd = netns_fd
        old, wl.listeners = wl.listeners, []
        for sock, spec in zip(socks, msg.listeners, strict=True):
            sock.setblocking(False)
            wl.listeners.append(Listening(sock, spec.direction))
        wl.identity, wl.mode, wl.ips = msg.identity, msg.mode, ips
        wl.namespace, wl.labels = msg.namespace, dict(msg.labels)
        wl.policy = self.policy.for_workload(wl.namespace, wl.labels)
        self._index()
        return wl, old

    def remove(self, uid: str) -> ServedWorkload | None:
        wl = self.workloads.pop(uid, None)
        if wl is not None:
            self._index()
        return wl

    def set_certificate(self, msg: SetCertificate) -> ServedWorkload:
        wl = self.workloads.get(msg.uid)
        if wl is None:
            raise ValueError(f"certificate for unknown workload {msg.uid!r}")
        chain, key = msg.chain_pem.encode(), msg.key_pem.encode()
        if (chain, key) == (wl.chain_pem, wl.key_pem):
            return wl
        contexts = _contexts(chain, key, self.bundle_pem)  # raises before anything changed
        wl.chain_pem, wl.key_pem, wl.not_after = chain, key, msg.not_after
        wl.client_ctx, wl.server_ctx = contexts
        return wl

    def set_trust(self, msg: SetTrust) -> bool:
        """True if the trust changed (and every workload's contexts were rebuilt)."""
        if not msg.trust_domain:
            raise ValueError("trust needs a trust domain")
        bundle = msg.bundle_pem.encode()
        if (msg.trust_domain, bundle) == (self.trust_domain, self.bundle_pem):
            return False  # a snapshot after a reconnect: keep the contexts
        check_bundle(bundle)  # refused even while no workload would use it yet
        built, errors = {}, []
        for uid, wl in self.workloads.items():
            try:
                built[uid] = _contexts(wl.chain_pem, wl.key_pem, bundle)
            except TunnelTLSError as exc:
                errors.append(f"{uid}: {exc}")
        if errors:  # nothing changed: the old trust stays in force
            raise ValueError("; ".join(errors))
        for uid, (client, server) in built.items():
            wl = self.workloads[uid]
            wl.client_ctx, wl.server_ctx = client, server
        self.trust_domain, self.bundle_pem = msg.trust_domain, bundle
        self.policy.set_trust_domain(msg.trust_domain)
        self._recompile()
        return True

    def relabel(self, msg: Relabel) -> ServedWorkload:
        """New labels for a served workload: its policy compiled again (the caller then closes
        what it no longer allows)."""
        wl = self.workloads.get(msg.uid)
        if wl is None:
            raise ValueError(f"relabel of unknown workload {msg.uid!r}")
        wl.labels = dict(msg.labels)
        wl.policy = self.policy.for_workload(wl.namespace, wl.labels)
        return wl

    def update_policy(self, msg: UpdatePolicy) -> bool:
        """Take one policy slice; True when a new version is in force (every workload's policy
        recompiled: the caller then revokes what it no longer allows)."""
        if not self.policy.receive(msg.version, msg.last, msg.text):
            return False
        self._recompile()
        return True

    def _recompile(self) -> None:
        for wl in self.workloads.values():
            wl.policy = self.policy.for_workload(wl.namespace, wl.labels)

    def update_directory(self, msg: UpdateDirectory) -> None:
        if self.directory.receive(msg.update) and self.directory.size >= TRIM_AFTER:
            release_memory()  # decoding a large directory leaves garbage the heap keeps

    def applied(self) -> Applied:
        table = self.directory
        return Applied(
            directory_version=table.version,
            directory_entries=table.size,
            directory_rejected=table.rejected,
            trust_domain=self.trust_domain,
            certificates={
                uid: wl.not_after for uid, wl in sorted(self.workloads.items()) if wl.chain_pem
            },
            policy_version=self.policy.version,
        )

    def _index(self) -> None:
        self.local = {ip: wl for wl in self.workloads.values() for ip in wl.ips}


Contexts = tuple[ssl.SSLContext | None, ssl.SSLContext | None]


def _contexts(chain: bytes, key: bytes, bundle: bytes) -> Contexts:
    """(client, server) TLS contexts of a workload; none until it has a chain and a bundle."""
    if not chain or not bundle:
        return None, None
    return client_context(chain, key, bundle), server_context(chain, key, bundle)
