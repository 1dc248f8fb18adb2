"""The agent's connected proxies: snapshots on (re)connect, broadcasts, acks, broken links.

`ProxyHub` accepts proxies on `<state-dir>/control.sock` (SOCK_SEQPACKET, see
`agent.control.channel`).  For each connection it waits for the proxy's `hello`, then, holding the
agent's state lock so no enrollment changes meanwhile, sends the snapshot
(`agent_session.snapshot_messages` over the agent's current state, opening each workload's netns
fd to attach to its `add_workload`; a namespace that is gone is left out, the next reconcile
forgets it).  Only then does the link join the broadcast list, so it misses nothing and gets
nothing twice.

A request is one message and its ack, paired by the link's lock and checked by its
`AgentSession`; an ack that does not come within `ACK_TIMEOUT` breaks the link.  Broadcasts
(`add_workload`, `del_workload`, `send_certificate`, `send_directory`) go to every link in turn and
return how many proxies acked; a link that breaks (closed, timed out, protocol violation) is
dropped and not counted, since it gets a full snapshot when it reconnects.  A proxy that refuses
(an ack with an error) raises `ProxyRefused`, which the enrollment turns into a rollback.
Between requests each link is polled for EOF, so a proxy that goes away while idle is noticed.

The directory travels as versioned chunks (`publishing.DirectoryChange`).  Each link remembers
the directory version its proxy acked; `send_directory` gives a proxy at the change's base only
the delta, any other proxy the whole directory as a reset, and answers a proxy that refuses a
delta (it missed a version) with the reset.  The snapshot ends with the whole directory and the
policy.

The policy travels whole, as versioned slices (`control.protocol.policy_chunks`): `send_policy`
(called under the state lock, like every broadcast that a snapshot must not miss) gives every
proxy every slice of the new version.  A proxy that refuses a policy (it could not validate it:
a version skew, say) keeps its link, since dropping it would only bring the same refusal in the
next snapshot and cut the proxy off from workload updates; the refusal is logged and kept on the
link for `agent status`, and the proxy's own status shows the version it enforces.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.agent_session import AgentSession, ProxyRefused, Snapshot, snapshot_messages
from agent.control.channel import CONTROL_SOCKET, AsyncChannel, ChannelClosed
from agent.control.protocol import (
    AddWorkload,
    DelWorkload,
    DirectoryChunk,
    Message,
    PolicyChunk,
    ProtocolError,
    WorkloadCertificate,
    policy_chunks,
)
from agent.directory import DirectoryUpdate
from agent.netns import NetnsError, open_netns
from agent.publishing import DirectoryChange
from agent.workloads import Mode, Workload

log = logging.getLogger("ferry.agent")
ACK_TIMEOUT = 10.0
HELLO_TIMEOUT = 5.0
IDLE_POLL = 0.5
BROKEN = (ChannelClosed, ProtocolError, OSError, TimeoutError)


@dataclass
class ProxyLink:
    """One connected proxy; `lock` keeps each message paired with its ack."""

    channel: AsyncChannel
    session: AgentSession = field(default_factory=AgentSession)
    connected_at: float = field(default_factory=time.time)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    directory_version: int = -1  # what the proxy acked; -1: nothing yet
    policy_version: int = -1  # the last policy version the proxy acked; -1: none yet
    policy_error: str = ""  # why the proxy refused the last policy sent ("" : it did not)

    @property
    def pid(self) -> int | None:
        return self.session.pid

    async def receive_hello(self) -> None:
        async with asyncio.timeout(HELLO_TIMEOUT):
            message, fds = await self.channel.recv()
        _close_all(fds)
        self.session.receive(message)

    async def request(self, message: Message, fds: tuple[int, ...] = ()) -> None:
        """Send one message and wait for its ack (hold `lock`)."""
        await self.channel.send(self.session.send(message), fds)
        async with asyncio.timeout(ACK_TIMEOUT):  # not wait_for: in Python 3.11 it can swallow
            reply, extra = await self.channel.recv()  # a cancellation that meets the reply
        _close_all(extra)
        self.session.receive(reply)


class ProxyHub:
    def __init__(self, snapshot: Callable[[], Snapshot], state_lock: asyncio.Lock) -> None:
        self.snapshot = snapshot
        self.state_lock = state_lock
        self.links: list[ProxyLink] = []
        self._handlers: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------- broadcasts
    async def add_workload(self, workload: Workload, mode: Mode) -> int:
        """Hand a workload (with a fresh fd on its netns per proxy) to every proxy."""
        return await self._broadcast(AddWorkload(workload, mode), workload.netns)

    async def del_workload(self, uid: str) -> int:
        return await self._broadcast(DelWorkload(uid))

    async def send_certificate(self, certificate: WorkloadCertificate) -> int:
        return await self._broadcast(certificate)

    async def send_directory(self, change: DirectoryChange) -> int:
        """Bring every proxy to `change.version`: the delta where the proxy is at its base, the
        whole directory otherwise or when the proxy refuses the delta."""
        started = time.monotonic()
        acked = 0
        for link in list(self.links):
            try:
                async with link.lock:
                    if link.directory_version == change.base:
                        try:
                            await self._send_chunks(link, change.delta())
                        except ProxyRefused as exc:
                            log.warning(
                                "proxy pid %s refused directory %d -> %d (%s); sending all of it",
                                link.pid,
                                change.base,
                                change.version,
                                exc,
                            )
                            await self._send_chunks(link, change.full())
                    else:
                        await self._send_chunks(link, change.full())
                acked += 1
            except (*BROKEN, ProxyRefused) as exc:
                log.warning("dropping proxy pid %s: %s", link.pid, exc)
                self.drop(link)
        log.info("directory version %d (%d entries, %d upserted, %d removed) reached %d "
                 "proxy(ies) in %.1f ms", change.version, len(change.entries),
                 len(change.upserts), len(change.removals), acked,
                 (time.monotonic() - started) * 1e3)  # fmt: skip
        return acked

    @staticmethod
    async def _send_chunks(link: ProxyLink, chunks: list[DirectoryUpdate]) -> None:
        for chunk in chunks:
            await link.request(DirectoryChunk(chunk))
        link.directory_version = chunks[-1].version

    async def send_policy(self, version: int, text: str) -> int:
        """Give every proxy policy `version` (the PolicySet JSON `text`); how many acked it."""
        chunks = policy_chunks(version, text)
        acked = 0
        for link in list(self.links):
            try:
                async with link.lock:
                    if await self._send_policy_chunks(link, chunks):
                        acked += 1
            except BROKEN as exc:
                log.warning("dropping proxy pid %s: %s", link.pid, exc)
                self.drop(link)
        return acked

    @staticmethod
    async def _send_policy_chunks(link: ProxyLink, chunks: list[PolicyChunk]) -> bool:
        """Send one version's slices (hold `link.lock`); False when the proxy refused them."""
        try:
            for chunk in chunks:
                await link.request(chunk)
        except ProxyRefused as exc:
            link.policy_error = str(exc)
            log.error("%s; it keeps enforcing policy version %d", exc, link.policy_version)
            return False
        link.policy_version, link.policy_error = chunks[-1].version, ""
        return True

    async def _broadcast(self, message: Message, netns: str | None = None) -> int:
        acked = 0
        for link in list(self.links):
            fd = open_netns(netns) if netns is not None else None
            try:
                async with link.lock:
                    await link.request(message, (fd,) if fd is not None else ())
                acked += 1
            except BROKEN as exc:
                log.warning("dropping proxy pid %s: %s", link.pid, exc)
                self.drop(link)
            finally:
                if fd is not None:
                    os.close(fd)
        return acked

    # ------------------------------------------------------------ connections
    def listen(self, state_dir: Path) -> socket.socket:
        path = state_dir / CONTROL_SOCKET
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(16)
        sock.setblocking(False)
        return sock

    async def accept_forever(self, control: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(control)
            task = asyncio.create_task(self.connect(conn), name="proxy-link")
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def connect(self, sock: socket.socket) -> None:
        """Greet one proxy, send it the snapshot, then watch it until it goes away."""
        link = ProxyLink(AsyncChannel(sock))
        try:
            await link.receive_hello()
        except BROKEN as exc:
            log.warning("rejected proxy connection: %s", exc)
            link.channel.close()
            return
        async with self.state_lock, link.lock:
            snapshot = self.snapshot()
            try:
                sent = await self._send_snapshot(link, snapshot)
            except (*BROKEN, ProxyRefused) as exc:
                log.warning("snapshot to proxy pid %s failed: %s", link.pid, exc)
                link.channel.close()
                return
            self.links.append(link)
        hello = link.session.hello
        log.info(
            "proxy pid %s (version %s) connected; sent snapshot of %d workload(s)",
            link.pid,
            hello.proxy_version if hello is not None else "?",
            sent,
        )
        await self._watch(link)

    async def _send_snapshot(self, link: ProxyLink, snapshot: Snapshot) -> int:
        fds: dict[str, int] = {}
        try:
            reachable = []
            for workload, mode in snapshot.workloads:
                try:
                    fds[workload.uid] = open_netns(workload.netns)
                except (OSError, NetnsError):
                    continue  # gone: the next reconcile forgets it
                reachable.append((workload, mode))
            messages = snapshot_messages(
                Snapshot(
                    reachable,
                    snapshot.trust,
                    snapshot.certificates,
                    snapshot.directory,
                    snapshot.policy,
                )
            )
            policy = [m for m in messages if isinstance(m, PolicyChunk)]
            for message in messages:
                if isinstance(message, PolicyChunk):
                    if message is policy[0]:
                        await self._send_policy_chunks(link, policy)
                    continue
                fd = fds.get(message.workload.uid) if isinstance(message, AddWorkload) else None
                await link.request(message, (fd,) if fd is not None else ())
                if isinstance(message, DirectoryChunk):
                    link.directory_version = message.update.version
        finally:
            _close_all(fds.values())
        return len(reachable)

    async def _watch(self, link: ProxyLink) -> None:
        """Notice a proxy that goes away while idle: poll for EOF between requests."""
        while link in self.links:
            await asyncio.sleep(IDLE_POLL)
            if link.lock.locked():
                continue  # a request is reading from the socket right now
            try:
                alive = bool(link.channel.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
            except BlockingIOError:
                continue
            except OSError:
                alive = False
            if not alive:
                log.warning("proxy pid %s disconnected", link.pid)
                self.drop(link)

    def drop(self, link: ProxyLink) -> None:
        if link in self.links:
            self.links.remove(link)
        link.channel.close()

    def close(self) -> None:
        for link in list(self.links):
            self.drop(link)

    def status(self) -> list[dict[str, Any]]:
        return [
            {
                "pid": link.pid,
                "version": link.session.hello.proxy_version if link.session.hello else None,
                "since": link.connected_at,
                "policy_version": link.policy_version,
                "policy_error": link.policy_error,
            }
            for link in self.links
        ]


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        os.close(fd)
