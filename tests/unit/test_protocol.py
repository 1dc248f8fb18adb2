"""The agent <-> proxy protocol core: encoding, decoding and the proxy's snapshot rules."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.control.protocol import (
    Ack,
    Add,
    AddWorkload,
    DelWorkload,
    Directory,
    DirectoryEntry,
    Hello,
    ProtocolError,
    ProxySession,
    Remove,
    SnapshotSent,
    TrustBundle,
    WorkloadCertificate,
    decode,
    encode,
)
from agent.workloads import Workload


def workload(name: str) -> Workload:
    return Workload(f"/var/run/netns/{name}", name, f"/var/run/netns/{name}", 7, "shop", name)


@pytest.mark.parametrize(
    "message",
    [
        Hello(proxy_version="0.1.0", pid=42),
        AddWorkload(workload("web")),
        DelWorkload("/var/run/netns/web"),
        SnapshotSent(),
        Ack(),
        Ack("listen failed: address in use"),
        AddWorkload(workload("db"), "strict"),
        WorkloadCertificate("/var/run/netns/web", "CHAIN", "KEY", 1764400000.0),
        TrustBundle("cluster.local", "BUNDLE"),
        Directory((DirectoryEntry("10.1.2.3", "spiffe://cluster.local/ns/a/sa/b", "n1"),)),
        Directory((), egress="refuse"),
    ],
)
def test_round_trip(message: object) -> None:
    assert decode(encode(message)) == message  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"\xff\xfe", "not a JSON message"),
        (b"[1]", "not an object"),
        (b'{"type":"launch"}', "unknown message type 'launch'"),
        (b'{"type":"hello","version":2,"proxy_version":"x","pid":1}', "unsupported protocol"),
        (b'{"type":"add_workload","uid":"a","workload":{"uid":"b"}}', "malformed"),
        (b'{"type":"del_workload"}', "malformed del_workload"),
        (b'{"type":"directory","egress":"open","entries":[]}', "egress 'open'"),
        (b'{"type":"workload_certificate","uid":"u"}', "malformed workload_certificate"),
    ],
)
def test_malformed_messages_are_named(data: bytes, needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle):
        decode(data)


@given(st.binary(max_size=256))
def test_decode_never_raises_anything_but_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode(data)


def test_snapshot_drops_what_the_agent_no_longer_holds() -> None:
    session = ProxySession(held={"/var/run/netns/old", "/var/run/netns/web"})
    assert session.receive(AddWorkload(workload("web"))) == [Add(workload("web"), "permissive")]
    assert session.receive(SnapshotSent()) == [Remove(("/var/run/netns/old",))]
    assert session.held == {"/var/run/netns/web"}


def test_adds_after_the_snapshot_are_incremental() -> None:
    session = ProxySession()
    session.receive(SnapshotSent())
    session.receive(AddWorkload(workload("a")))
    assert session.receive(DelWorkload("/var/run/netns/a")) == [Remove(("/var/run/netns/a",))]
    with pytest.raises(ProtocolError, match="twice"):
        session.receive(SnapshotSent())


def test_agent_may_not_send_hello_or_ack() -> None:
    with pytest.raises(ProtocolError, match="may not send Hello"):
        ProxySession().receive(Hello("x", 1))


def test_key_material_never_appears_in_repr() -> None:
    message = WorkloadCertificate("/var/run/netns/web", "CHAIN", "-----BEGIN PRIVATE KEY-----", 1.0)
    assert "PRIVATE" not in repr(message)


def test_certificates_only_for_held_workloads() -> None:
    session = ProxySession()
    with pytest.raises(ProtocolError, match="not a workload here"):
        session.receive(WorkloadCertificate("/var/run/netns/x", "C", "K", 1.0))
