"""Supervisor <-> worker messages (`agent.proxy.messages`, over `agent.wire`): one datagram.

Input: the datagram.  Contract: `decode` raises nothing but `MessageError`, and a message that
decodes encodes again to one that decodes equal (less the directory entries that failed
validation, which are not sent).
"""

from __future__ import annotations

from dataclasses import replace

from agent.directory import DirectoryEntry, DirectoryUpdate
from agent.proxy.messages import (
    AddWorkload,
    Applied,
    Decision,
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
    UpdatePolicy,
    decode,
    encode,
)
from fuzz.harness import main


def _sent(message: Message) -> Message:
    """The message as it encodes: the directory entries that failed validation are not sent."""
    if isinstance(message, UpdateDirectory):
        return replace(message, update=replace(message.update, rejected=()))
    return message


def check(data: bytes) -> None:
    try:
        message = decode(data)
    except MessageError:
        return
    assert decode(encode(message)) == _sent(message), message


def seeds() -> dict[str, bytes]:
    entry = DirectoryEntry("10.1.2.3", "spiffe://td/ns/a/sa/b", "node-a")
    flow = Flow("inbound", "mtls", "spiffe://td/ns/a/sa/c", 4, 3, 1, 100, 200, {"denied": 2})
    messages: dict[str, Message] = {
        "add": AddWorkload(
            1,
            "netns-1",
            "spiffe://td/ns/a/sa/b",
            "strict",
            ("10.1.2.3", "fd00::3"),
            (ListenerSpec("outbound", 4), ListenerSpec("tunnel", 6)),
            "a",
            {"app": "web"},
        ),
        "del": RemoveWorkload(3, "netns-1"),
        "cert": SetCertificate(4, "netns-1", "CHAIN", "KEY", 1764400000.5),
        "trust": SetTrust(5, "td", "BUNDLE"),
        "directory": UpdateDirectory(
            6, DirectoryUpdate(7, 6, False, "refuse", (entry,), ("10.0.0.9",), False)
        ),
        "policy": UpdatePolicy(7, 3, True, '{"documents":[]}'),
        "stats-request": StatsRequest(),
        "done": Done(7, 0, "cannot load the trust bundle"),
        "stats": Stats(
            1,
            3,
            {"u": (flow,)},
            TunnelCounters(1, 2, 3),
            Applied(7, 1, 0, "td", {"u": 1764400000.0}, 2),
            {"u": (Decision("shop/web", "ALLOW", "allow", 9),)},
        ),
    }
    found = {name: encode(message) for name, message in messages.items()}
    return found | {
        "bad-direction": found["add"].replace(b"outbound", b"sideways"),
        "bool-as-int": found["del"].replace(b"3", b"true"),
        "unknown-op": b'{"op":"launch"}',
    }


if __name__ == "__main__":
    main(check)
