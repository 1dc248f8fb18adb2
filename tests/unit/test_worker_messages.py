"""Supervisor <-> worker messages: every message round-trips; malformed ones name the field."""

from __future__ import annotations

import pytest

from agent.directory import DirectoryEntry, DirectoryUpdate
from agent.proxy.messages import (
    AddWorkload,
    Applied,
    Done,
    Flow,
    ListenerSpec,
    Message,
    MessageError,
    RemoveWorkload,
    SetCertificate,
    SetTrust,
    Stats,
    StatsRequest,
    TunnelCounters,
    UpdateDirectory,
    decode,
    encode,
)

ENTRY = DirectoryEntry("10.1.2.3", "spiffe://td/ns/a/sa/b", "node-a")
MESSAGES: list[Message] = [
    AddWorkload(
        1,
        "netns-1",
        "spiffe://td/ns/a/sa/b",
        "strict",
        ("10.1.2.3", "fd00::3"),
        (ListenerSpec("outbound", 4), ListenerSpec("tunnel", 6)),
    ),
    AddWorkload(2, "u", "", "permissive", (), ()),
    RemoveWorkload(3, "netns-1"),
    SetCertificate(4, "netns-1", "CHAIN", "KEY", 1764400000.5),
    SetTrust(5, "td", "BUNDLE"),
    UpdateDirectory(6, DirectoryUpdate(7, 6, False, "refuse", (ENTRY,), ("10.0.0.9",), False)),
    StatsRequest(),
    Done(6, 1),
    Done(7, 0, "cannot load the trust bundle"),
    Stats(
        worker=1,
        active=3,
        flows={
            "u": (
                Flow(
                    "outbound",
                    "mtls",
                    "spiffe://td/ns/a/sa/c",
                    4,
                    3,
                    1,
                    100,
                    200,
                    {"egress_refused": 2},
                ),
            )
        },
        tunnel=TunnelCounters(1, 2, 3),
        applied=Applied(7, 1, 0, "td", {"u": 1764400000.0}),
    ),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message: Message) -> None:
    assert decode(encode(message)) == message


def test_the_key_never_shows_in_repr() -> None:
    assert "KEY" not in repr(SetCertificate(1, "u", "CHAIN", "KEY", 0.0))


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"\xff", "not a JSON message"),
        (b"[]", "not an object"),
        (b'{"op":"launch"}', "unknown op 'launch'"),
        (b'{"op":"del","seq":1}', "missing 'uid'"),
        (b'{"op":"del","seq":"1","uid":"u"}', "del.seq: '1' is not an integer"),
        (b'{"op":"del","seq":true,"uid":"u"}', "del.seq: True is not an integer"),
        (b'{"op":"del","seq":1,"uid":"u","extra":1}', "unknown field(s) ['extra']"),
        (b'{"op":"add","seq":1,"uid":"u","identity":"","mode":"open","ips":[],"listeners":[]}',
         "add.mode: 'open' is not one of ['permissive', 'strict']"),
        (b'{"op":"add","seq":1,"uid":"u","identity":"","mode":"strict","ips":"10.0.0.1",'
         b'"listeners":[]}', "add.ips: expected a list"),
        (b'{"op":"add","seq":1,"uid":"u","identity":"","mode":"strict","ips":[],'
         b'"listeners":[{"direction":"sideways","family":4}]}',
         "add.listeners[0].direction: 'sideways' is not one of"),
        (b'{"op":"directory","seq":1,"update":{"version":1}}', "without 'base'"),
    ],
)  # fmt: skip
def test_malformed_messages_name_what_is_wrong(data: bytes, needle: str) -> None:
    with pytest.raises(MessageError) as err:
        decode(data)
    assert needle in str(err.value)


def test_stats_totals_sum_the_flows_of_one_direction() -> None:
    stats = Stats(1, 0, {"u": (Flow("outbound", "mtls", "x", 1, 1, 0, 10, 20),
                               Flow("outbound", "plaintext", "", 2, 1, 1, 5, 5),
                               Flow("inbound", "plaintext", "", 7, 7, 0, 1, 1))},
                  TunnelCounters(), Applied())  # fmt: skip
    assert stats.totals("u", "outbound") == {
        "connections_opened": 3,
        "connections_closed": 2,
        "connect_failures": 1,
        "bytes_received": 15,
        "bytes_sent": 25,
    }
    assert stats.totals("other", "inbound")["connections_opened"] == 0
