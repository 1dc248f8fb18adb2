"""The agent's side of the control protocol: the pure session core, and the hub over a socketpair.

The session core is checked against the rules (hello first, one ack per message, snapshot_sent
once) and against the proxy's own core, `ProxySession`, which must accept every snapshot it
produces.  The hub is driven over a real SOCK_SEQPACKET socketpair with a scripted proxy.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from agent import proxy_hub
from agent.agent_session import AgentSession, ProxyRefused, Snapshot, snapshot_messages
from agent.control.channel import AsyncChannel, ChannelClosed
from agent.control.protocol import (
    Ack,
    Add,
    AddWorkload,
    DelWorkload,
    DirectoryChunk,
    Hello,
    PolicyChunk,
    ProtocolError,
    ProxySession,
    SnapshotSent,
    TrustBundle,
    WorkloadCertificate,
    policy_chunks,
)
from agent.directory import DirectoryEntry, plan_update
from agent.netns_id import NetnsId
from agent.proxy_hub import ProxyHub
from agent.workloads import Workload, new_workload

OWN_NETNS = "/proc/self/ns/net"  # only an fd is opened on it: nothing is enrolled or changed

EMPTY = plan_update(0, 0, "passthrough", (), (), reset=True)  # a directory of no entries
NO_POLICY = policy_chunks(0, '{"documents":[]}')  # the policy an agent starts with


def workload(name: str, inode: int, netns: str = OWN_NETNS) -> Workload:
    return new_workload(Path(netns), NetnsId(4, inode), "shop", name)


def cert(w: Workload) -> WorkloadCertificate:
    return WorkloadCertificate(w.uid, "CHAIN", "KEY", 1764400000.0)


def test_the_snapshot_is_in_protocol_order_and_the_proxy_core_accepts_it() -> None:
    web, db, gone = workload("web", 1), workload("db", 2), workload("gone", 3)
    trust = TrustBundle("cluster.local", "BUNDLE")
    directory = plan_update(
        4, 0, "passthrough", [DirectoryEntry("10.0.0.1", web.identity("td"), "n")], (), reset=True
    )
    policy = policy_chunks(3, '{"documents":[]}', max_chars=8)
    messages = snapshot_messages(
        Snapshot(
            [(web, "strict"), (db, "permissive")],
            trust,
            [cert(web), cert(gone)],
            directory,
            policy,
        )
    )
    assert messages == [
        AddWorkload(web, "strict"),
        AddWorkload(db, "permissive"),
        trust,
        cert(web),  # the certificate of a workload left out of the snapshot is left out too
        DirectoryChunk(directory[0]),
        *policy,  # the policy in force, after the directory, before snapshot_sent
        SnapshotSent(),
    ]
    assert [c.last for c in policy] == [False, True]
    proxy = ProxySession(held={"netns-4-9"})
    actions = [action for message in messages for action in proxy.receive(message)]
    assert Add(web, "strict") in actions and proxy.held == {web.uid, db.uid}


def test_the_session_enforces_hello_first_and_one_ack_per_message() -> None:
    session = AgentSession()
    with pytest.raises(ProtocolError, match="before its hello"):
        session.send(SnapshotSent())
    with pytest.raises(ProtocolError, match="expected hello, got Ack"):
        session.receive(Ack())
    session.receive(Hello("0.1.0", 42))
    session.send(DelWorkload("netns-4-1"))
    with pytest.raises(ProtocolError, match="DelWorkload still awaits its ack"):
        session.send(DelWorkload("netns-4-2"))
    session.receive(Ack())
    with pytest.raises(ProtocolError, match="an ack for nothing"):
        session.receive(Ack())
    with pytest.raises(ProtocolError, match="expected ack, proxy sent Hello"):
        session.receive(Hello("0.1.0", 42))
    with pytest.raises(ProtocolError, match="may not send Ack"):
        session.send(Ack())
    session.send(SnapshotSent())
    session.receive(Ack())
    with pytest.raises(ProtocolError, match="snapshot_sent sent twice"):
        session.send(SnapshotSent())
    session.send(DelWorkload("netns-4-1"))
    with pytest.raises(ProxyRefused, match=r"proxy \(pid 42\) refused DelWorkload: busy"):
        session.receive(Ack("busy"))
    session.send(DelWorkload("netns-4-1"))  # a refusal answered the message: the next may go


Script = Callable[[AsyncChannel, ProxySession], Coroutine[Any, Any, None]]


async def acking(channel: AsyncChannel, session: ProxySession) -> None:
    """A well-behaved proxy: applies each message to its core and acks it."""
    while True:
        message, fds = await channel.recv()
        for fd in fds:
            os.close(fd)
        session.receive(message)
        await channel.send(Ack())


async def connected(
    hub: ProxyHub, script: Script
) -> tuple[ProxySession, asyncio.Task[None], asyncio.Task[None]]:
    """A proxy (running `script` after its hello) connected to `hub`, snapshot received.
    The proxy's end is closed when its task ends (also when it is cancelled)."""
    agent_end, proxy_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    channel = AsyncChannel(proxy_end)
    await channel.send(Hello("0.1.0", 4242))
    session = ProxySession()

    async def run() -> None:
        try:
            await script(channel, session)
        finally:
            channel.close()

    link = asyncio.create_task(hub.connect(agent_end))
    proxy = asyncio.create_task(run())
    for _ in range(200):
        if hub.links:
            break
        await asyncio.sleep(0.01)
    return session, link, proxy


def test_a_proxy_gets_the_snapshot_then_broadcasts() -> None:
    web = workload("web", 1)
    lock = asyncio.Lock()
    hub = ProxyHub(
        lambda: Snapshot([(web, "permissive")], None, [cert(web)], EMPTY, NO_POLICY), lock
    )

    async def scenario() -> tuple[ProxySession, int, int]:
        session, link, proxy = await connected(hub, acking)
        assert session.held == {web.uid} and not session.in_snapshot
        db = workload("db", 2)
        added = await hub.add_workload(db, "strict")
        removed = await hub.del_workload(web.uid)
        assert hub.status()[0]["pid"] == 4242
        link.cancel()
        proxy.cancel()
        hub.close()
        return session, added, removed

    session, added, removed = asyncio.run(scenario())
    assert (added, removed) == (1, 1)
    assert session.held == {"netns-4-2"}


def test_a_refusing_proxy_raises_and_a_silent_one_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(proxy_hub, "ACK_TIMEOUT", 0.2)
    hub = ProxyHub(lambda: Snapshot([], None, [], EMPTY, NO_POLICY), asyncio.Lock())

    async def refusing_then_silent(channel: AsyncChannel, session: ProxySession) -> None:
        for _ in range(3):  # the snapshot: directory, policy, snapshot_sent
            await channel.recv()
            await channel.send(Ack())
        _add, fds = await channel.recv()
        for fd in fds:
            os.close(fd)
        await channel.send(Ack("cannot open listeners"))
        await channel.recv()  # and never answers again
        await asyncio.sleep(10)

    async def scenario() -> int:
        _session, link, proxy = await connected(hub, refusing_then_silent)
        with pytest.raises(ProxyRefused, match=r"pid 4242\) refused AddWorkload"):
            await hub.add_workload(workload("web", 1), "permissive")
        acked = await hub.del_workload("netns-4-1")
        assert hub.links == []
        link.cancel()
        proxy.cancel()
        return acked

    assert asyncio.run(scenario()) == 0


def test_a_proxy_that_goes_away_while_idle_is_noticed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy_hub, "IDLE_POLL", 0.02)
    hub = ProxyHub(lambda: Snapshot([], None, [], EMPTY, NO_POLICY), asyncio.Lock())

    async def leaves(channel: AsyncChannel, session: ProxySession) -> None:
        for _ in range(3):
            await channel.recv()
            await channel.send(Ack())
        channel.close()

    async def scenario() -> None:
        _session, link, proxy = await connected(hub, leaves)
        await asyncio.wait_for(link, 5)  # `connect` returns once the link is dropped
        assert hub.links == []
        proxy.cancel()

    asyncio.run(scenario())


def test_a_connection_without_hello_is_rejected() -> None:
    hub = ProxyHub(lambda: Snapshot([], None, [], EMPTY, NO_POLICY), asyncio.Lock())

    async def scenario() -> None:
        agent_end, proxy_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        channel = AsyncChannel(proxy_end)
        await channel.send(Ack())
        await hub.connect(agent_end)
        assert hub.links == []
        with pytest.raises(ChannelClosed):
            await channel.recv()
        channel.close()

    asyncio.run(scenario())


def test_policy_versions_reach_every_proxy_and_a_refusal_keeps_the_link() -> None:
    hub = ProxyHub(lambda: Snapshot([], None, [], EMPTY, NO_POLICY), asyncio.Lock())
    received: list[PolicyChunk] = []

    async def refuses_version_2(channel: AsyncChannel, session: ProxySession) -> None:
        while True:
            message, _fds = await channel.recv()
            session.receive(message)
            if isinstance(message, PolicyChunk):
                received.append(message)
                if message.version == 2 and message.last:
                    await channel.send(Ack("policy: unknown field 'spec.newThing'"))
                    continue
            await channel.send(Ack())

    async def scenario() -> list[dict[str, Any]]:
        _session, link, proxy = await connected(hub, refuses_version_2)
        assert hub.status()[0]["policy_version"] == 0  # the snapshot's
        assert await hub.send_policy(1, "x" * 30_000) == 1  # two slices
        first = hub.status()
        assert await hub.send_policy(2, "{}") == 0
        refused = hub.status()
        assert await hub.send_policy(3, "{}") == 1
        after = hub.status()
        link.cancel()
        proxy.cancel()
        hub.close()
        return [first[0], refused[0], after[0]]

    first, refused, after = asyncio.run(scenario())
    assert [(c.version, c.last) for c in received] == [(0, True), (1, False), (1, True),
                                                       (2, True), (3, True)]  # fmt: skip
    assert "".join(c.text for c in received if c.version == 1) == "x" * 30_000
    assert (first["policy_version"], first["policy_error"]) == (1, "")
    assert refused["policy_version"] == 1  # still connected, still enforcing version 1
    assert "refused PolicyChunk: policy: unknown field 'spec.newThing'" in refused["policy_error"]
    assert (after["policy_version"], after["policy_error"]) == (3, "")
