"""The agent <-> proxy protocol core: encoding, decoding and the proxy's snapshot rules.

The fuzz tests generate *structured* messages (every message type, with valid and hostile field
values), encode them, then mutate the JSON the way a buggy or hostile peer would (a field
dropped, retyped, added; the type renamed; nested values replaced) and check that `decode` either
returns a message of the right type or raises `ProtocolError`, never anything else; and that the
proxy's session, fed any sequence of messages, only ever raises `ProtocolError` and keeps `held`
equal to what the agent added and did not delete.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.control.protocol import (
    Ack,
    Add,
    AddWorkload,
    DelWorkload,
    DirectoryChunk,
    Hello,
    Message,
    ProtocolError,
    ProxySession,
    Remove,
    SnapshotSent,
    TrustBundle,
    WorkloadCertificate,
    decode,
    encode,
)
from agent.directory import DirectoryEntry, DirectoryUpdate, plan_update
from agent.workloads import Workload


def workload(name: str) -> Workload:
    return Workload(f"netns-4-{len(name)}", name, f"/var/run/netns/{name}", 7, "shop", name)


ENTRY = DirectoryEntry("10.1.2.3", "spiffe://cluster.local/ns/a/sa/b", "n1")


@pytest.mark.parametrize(
    "message",
    [
        Hello(proxy_version="0.1.0", pid=42),
        AddWorkload(workload("web")),
        AddWorkload(workload("db"), "strict"),
        DelWorkload("netns-4-3"),
        SnapshotSent(),
        Ack(),
        Ack("listen failed: address in use"),
        WorkloadCertificate("netns-4-3", "CHAIN", "KEY", 1764400000.0),
        TrustBundle("cluster.local", "BUNDLE"),
        DirectoryChunk(DirectoryUpdate(3, 2, False, "refuse", (ENTRY,), ("10.0.0.9",), True)),
        DirectoryChunk(DirectoryUpdate(1, 0, True, "passthrough", last=False)),
    ],
)
def test_round_trip(message: Message) -> None:
    assert decode(encode(message)) == message


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"\xff\xfe", "not a JSON message"),
        (b"[1]", "not an object"),
        (b'{"type":"launch"}', "unknown message type 'launch'"),
        (b'{"type":"hello","version":1,"proxy_version":"x","pid":1}', "unsupported protocol"),
        (b'{"type":"hello","version":2,"proxy_version":"x","pid":"1"}', "hello.pid: '1' is not an"),
        (b'{"type":"add_workload","workload":{"uid":"b"}}', "malformed add_workload"),
        (b'{"type":"add_workload","workload":{"uid":"u","name":"n","netns":"/x",'
         b'"netns_inode":1,"namespace":"a","service_account":"b"},"mode":"open"}',
         "add_workload.mode: 'open' is not one of"),
        (b'{"type":"del_workload"}', "del_workload: missing 'uid'"),
        (b'{"type":"del_workload","uid":"u","extra":1}', "unknown field(s) ['extra']"),
        (b'{"type":"directory","update":{"version":1,"base":0,"reset":true,"egress":"open",'
         b'"upserts":[],"removals":[],"last":true}}', "egress 'open'"),
        (b'{"type":"directory","update":[]}', "directory.update: directory update [] is not"),
        (b'{"type":"workload_certificate","uid":"u"}', "missing 'chain_pem'"),
        (b'{"type":"ack","error":5}', "ack.error: 5 is not a string"),
    ],
)  # fmt: skip
def test_malformed_messages_are_named(data: bytes, needle: str) -> None:
    with pytest.raises(ProtocolError) as err:
        decode(data)
    assert needle in str(err.value)


def test_a_directory_entry_that_fails_validation_is_skipped_not_the_chunk() -> None:
    raw = json.loads(encode(DirectoryChunk(plan_update(1, 0, "passthrough", [ENTRY], (),
                                                       reset=True)[0])))  # fmt: skip
    raw["update"]["upserts"].append({"ip": "10.0.0.x", "identity": "spiffe://a/ns/b/sa/c",
                                     "node": "n1"})  # fmt: skip
    chunk = decode(json.dumps(raw).encode())
    assert isinstance(chunk, DirectoryChunk)
    assert chunk.update.upserts == (ENTRY,)
    assert "'10.0.0.x' is not an IP address" in chunk.update.rejected[0]


def test_a_message_that_does_not_fit_a_datagram_is_refused_on_encode() -> None:
    with pytest.raises(ProtocolError, match="exceeds 65536"):
        encode(TrustBundle("td", "x" * 70_000))


# -- structured fuzzing -----------------------------------------------------------------------

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
hostile = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(),
                                                         max_size=3),
)  # fmt: skip
ips = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str), st.text(max_size=8))
entries = st.builds(DirectoryEntry, ips, st.text(max_size=40), names)
workloads = st.builds(
    Workload, names.map(lambda n: f"netns-4-{n}"), names, names.map(lambda n: f"/run/{n}"),
    st.integers(0, 2**32), names, names, st.sampled_from([None, "strict", "permissive"]),
    st.lists(ips, max_size=3).map(tuple), st.integers(0, 255),
)  # fmt: skip
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, st.text(max_size=10), st.integers(0, 2**31)),
    st.builds(AddWorkload, workloads, st.sampled_from(["permissive", "strict"])),
    st.builds(DelWorkload, names),
    st.just(SnapshotSent()),
    st.builds(Ack, st.one_of(st.none(), st.text(max_size=30))),
    st.builds(
        WorkloadCertificate, names, st.text(max_size=30), st.text(max_size=30), st.floats(0, 2e9)
    ),
    st.builds(TrustBundle, names, st.text(max_size=30)),
    st.builds(
        DirectoryChunk,
        st.builds(
            DirectoryUpdate,
            st.integers(0, 9),
            st.integers(0, 9),
            st.booleans(),
            st.sampled_from(["passthrough", "refuse"]),
            st.lists(entries, max_size=4).map(tuple),
            st.lists(ips, max_size=3).map(tuple),
            st.booleans(),
        ),
    ),
)


def _mutate(body: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    """One hostile change to a message's JSON, anywhere in it."""
    path: list[Any] = []
    node: Any = body
    while isinstance(node, dict | list) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict)
                                        else range(len(node))))  # fmt: skip
        path.append(key)
        node = node[key]
    parent: Any = body
    for key in path[:-1]:
        parent = parent[key]
    action = data.draw(st.sampled_from(["replace", "drop", "add"]))
    if not path or action == "add":
        target = node if isinstance(node, dict) else body
        target[data.draw(st.text(max_size=8))] = data.draw(hostile)
    elif action == "drop" and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(hostile)
    return body


@settings(max_examples=400, deadline=None)
@given(messages, st.data())
def test_decode_of_any_mutated_message_is_a_message_or_a_protocol_error(
    message: Message, data: st.DataObject
) -> None:
    body = _mutate(json.loads(encode(message)), data)
    with contextlib.suppress(ProtocolError):
        decoded = decode(json.dumps(body).encode())
        assert body.get("type") == type(decoded).TYPE


@settings(max_examples=300, deadline=None)
@given(st.lists(messages, max_size=30))
def test_the_session_only_raises_protocol_errors_and_tracks_what_is_held(
    sequence: list[Message],
) -> None:
    session = ProxySession(held={"netns-4-old"})
    added: set[str] = {"netns-4-old"}
    snapshot: set[str] = set()
    in_snapshot = True
    for message in sequence:
        try:
            actions = session.receive(message)
        except ProtocolError:
            continue
        for action in actions:
            match action:
                case Add(workload=w):
                    added.add(w.uid)
                    if in_snapshot:
                        snapshot.add(w.uid)
                case Remove(uids=uids):
                    added -= set(uids)
        if isinstance(message, DelWorkload):
            snapshot.discard(message.uid)
        if isinstance(message, SnapshotSent):
            in_snapshot = False
            assert not (added - snapshot)  # everything not in the snapshot was dropped
        assert session.held == added


# -- the session's rules ----------------------------------------------------------------------


def test_snapshot_drops_what_the_agent_no_longer_holds() -> None:
    web = workload("web")
    session = ProxySession(held={"netns-4-old", web.uid})
    assert session.receive(AddWorkload(web)) == [Add(web, "permissive")]
    assert session.receive(SnapshotSent()) == [Remove(("netns-4-old",))]
    assert session.held == {web.uid}


def test_adds_after_the_snapshot_are_incremental() -> None:
    session = ProxySession()
    session.receive(SnapshotSent())
    a = workload("a")
    session.receive(AddWorkload(a))
    assert session.receive(DelWorkload(a.uid)) == [Remove((a.uid,))]
    with pytest.raises(ProtocolError, match="twice"):
        session.receive(SnapshotSent())


def test_agent_may_not_send_hello_or_ack() -> None:
    with pytest.raises(ProtocolError, match="may not send Hello"):
        ProxySession().receive(Hello("x", 1))
    with pytest.raises(ProtocolError, match="may not send Ack"):
        ProxySession().receive(Ack())


def test_key_material_never_appears_in_repr() -> None:
    message = WorkloadCertificate("netns-4-3", "CHAIN", "-----BEGIN PRIVATE KEY-----", 1.0)
    assert "PRIVATE" not in repr(message)


def test_certificates_only_for_held_workloads() -> None:
    session = ProxySession()
    with pytest.raises(ProtocolError, match="not a workload here"):
        session.receive(WorkloadCertificate("netns-4-9", "C", "K", 1.0))
