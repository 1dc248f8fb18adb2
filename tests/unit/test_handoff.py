"""The upgrade handoff core: messages round-trip, the conversation keeps its order on both sides,
a peer that breaks it is refused with the reason, and inherited listeners are adopted only where
they are bound exactly where this proxy's configuration would bind them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.proxy.handoff import (
    HANDOFF_VERSION,
    Draining,
    Handoff,
    HandoffError,
    HandoffMisuse,
    Listeners,
    ListenersSent,
    Message,
    Refused,
    Serving,
    Takeover,
    decode,
    encode,
    fds_expected,
    pick_inherited,
    refusal,
)
from agent.proxy.messages import ListenerSpec

SPECS = (ListenerSpec("outbound", 4), ListenerSpec("inbound", 4), ListenerSpec("tunnel", 6))
MESSAGES: list[Message] = [
    Takeover(42, "0.2.0"),
    Listeners("netns-4-4026531992", SPECS),
    Listeners("netns-4-1", ()),
    ListenersSent(2),
    Refused("handoff protocol version 2 is not 1"),
    Serving(42),
    Draining(17, 30.0),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: Message) -> None:
    assert decode(encode(message)) == message


def converse(*steps: tuple[str, Message, int]) -> tuple[Handoff, Handoff]:
    """Play the steps (sender, message, descriptors) between both sides; return them."""
    sides = {"successor": Handoff("successor"), "predecessor": Handoff("predecessor")}
    for sender, message, fds in steps:
        data = sides[sender].send(message)
        receiver = sides["predecessor" if sender == "successor" else "successor"]
        assert receiver.receive(data, fds) == message
    return sides["successor"], sides["predecessor"]


def test_a_takeover_in_order_ends_done_on_both_sides() -> None:
    successor, predecessor = converse(
        ("successor", Takeover(7, "0.2.0"), 0),
        ("predecessor", Listeners("a", SPECS), 4),
        ("predecessor", Listeners("b", SPECS[:1]), 2),
        ("predecessor", ListenersSent(2), 0),
        ("successor", Serving(7), 0),
        ("predecessor", Draining(3, 30.0), 0),
    )
    assert successor.state == predecessor.state == "done"
    assert successor.handed == predecessor.handed == ["a", "b"]


def test_a_refused_takeover_ends_it() -> None:
    successor, _ = converse(("successor", Takeover(7, "9.0"), 0), ("predecessor", Refused("no"), 0))
    assert successor.state == "done"
    with pytest.raises(HandoffMisuse):
        successor.send(Serving(7))


TAKEOVER = ("successor", Takeover(1, "v"), 0)
HANDED = ("predecessor", ListenersSent(0), 0)
OUT_OF_ORDER = [
    ([], "successor", Serving(1)),  # serving before anything was handed over
    ([TAKEOVER], "successor", Serving(1)),  # ... or before listeners_sent
    ([TAKEOVER], "successor", Takeover(1, "v")),  # twice
    ([], "predecessor", Listeners("a", ())),  # listeners nobody asked for
    ([TAKEOVER, HANDED], "predecessor", Draining(0, 1.0)),  # draining before serving
    ([], "successor", Draining(0, 1.0)),  # the other side's message
    ([TAKEOVER, HANDED, ("successor", Serving(1), 0), ("predecessor", Draining(0, 1.0), 0)],
     "predecessor", Listeners("a", ())),  # after the end
]  # fmt: skip


@pytest.mark.parametrize(("before", "sender", "message"), OUT_OF_ORDER)
def test_a_message_out_of_order_is_refused_on_both_sides(
    before: list[tuple[str, Message, int]], sender: str, message: Message
) -> None:
    """Sent, it is our misuse; received, the peer's fault; either way nothing changes."""
    successor, predecessor = converse(*before)
    me, peer = (successor, predecessor) if sender == "successor" else (predecessor, successor)
    state = me.state
    with pytest.raises(HandoffMisuse):
        me.send(message)
    with pytest.raises(HandoffError, match="may not send"):
        peer.receive(encode(message), fds_expected(message))
    assert me.state == peer.state == state


def asked() -> Handoff:
    successor = Handoff("successor")
    successor.send(Takeover(1, "v"))
    return successor


@pytest.mark.parametrize(
    ("data", "fds", "why"),
    [
        (b"", 0, "closed the handoff"),
        (b"not json", 0, "not a JSON message"),
        (b"[1]", 0, "not an object"),
        (b'{"op":"hello"}', 0, "unknown op 'hello'"),
        (encode(Listeners("a", SPECS)), 1, "carried 1 descriptors, expected 4"),
        (encode(ListenersSent(3)), 0, "says 3 workload(s), 0 came"),
        (encode(ListenersSent(0)), 2, "expected 0"),
        (
            b'{"op":"listeners","uid":"a","listeners":[{"direction":"sideways","family":4}]}',
            2,
            "'sideways' is not one of",
        ),
        (b'{"op":"listeners_sent","workloads":"2"}', 0, "'2' is not an integer"),
    ],
)
def test_a_malformed_or_inconsistent_datagram_names_what_is_wrong(
    data: bytes, fds: int, why: str
) -> None:
    with pytest.raises(HandoffError, match=why.replace("(", r"\(").replace(")", r"\)")):
        asked().receive(data, fds)


def test_the_same_workload_handed_over_twice_is_refused() -> None:
    successor = asked()
    successor.receive(encode(Listeners("a", SPECS[:1])), 2)
    with pytest.raises(HandoffError, match="handed over twice"):
        successor.receive(encode(Listeners("a", SPECS[:1])), 2)


def test_only_the_same_handoff_version_is_taken_over() -> None:
    assert refusal(Takeover(1, "0.2.0")) is None
    why = refusal(Takeover(1, "0.2.0", HANDOFF_VERSION + 1))
    assert why is not None and "cold restart" in why


V4 = [("outbound", 4, "127.0.0.1", 15001), ("inbound", 4, "0.0.0.0", 15006),
      ("tunnel", 4, "0.0.0.0", 15008)]  # fmt: skip
V6 = [("outbound", 6, "::1", 15001), ("inbound", 6, "::", 15006), ("tunnel", 6, "::", 15008)]


@pytest.mark.parametrize(
    ("wanted", "offered", "picks"),
    [
        (V4 + V6, V6 + V4, [3, 4, 5, 0, 1, 2]),  # all of them, whatever the order
        (V4 + V6, V4, [0, 1, 2, None, None, None]),  # IPv6 now on: open those
        (V4, V4 + V6, [0, 1, 2]),  # IPv6 now off: the caller closes the rest
        ([("inbound", 4, "0.0.0.0", 16006)], V4, [None]),  # a port changed: a new listener
        (V4, [V4[0], V4[0]], [0, None, None]),  # one socket serves one address
        (V4, [], [None, None, None]),  # a workload the predecessor did not have
    ],
)
def test_inherited_listeners_are_adopted_only_where_they_are_bound(
    wanted: list[Any], offered: list[Any], picks: list[int | None]
) -> None:
    assert pick_inherited(wanted, offered) == picks


@given(st.sampled_from(MESSAGES), st.data())
def test_decode_takes_any_mutation_or_refuses_it_with_handoff_error(
    message: Message, data: st.DataObject
) -> None:
    body = json.loads(encode(message))
    key = data.draw(st.sampled_from(sorted(body)))
    value = data.draw(st.none() | st.booleans() | st.integers() | st.text(max_size=5)
                      | st.lists(st.integers(), max_size=2))  # fmt: skip
    body[key] = value
    try:
        decoded = decode(json.dumps(body).encode())
    except HandoffError:
        return
    assert body["op"] == type(decoded).OP
