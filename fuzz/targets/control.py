"""The agent <-> proxy control protocol (`agent.control.protocol`): one datagram from the agent.

Input: the datagram.  Contract: `decode` raises nothing but `ProtocolError`; a message that
decodes encodes again to one that decodes equal (less the directory entries that failed
validation, which are not sent), or is refused as too large); and the proxy's
session, fed it, raises nothing but `ProtocolError`.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

from agent.control.protocol import (
    AddWorkload,
    DelWorkload,
    DirectoryChunk,
    Hello,
    Message,
    PolicyChunk,
    ProtocolError,
    ProxySession,
    SnapshotSent,
    TrustBundle,
    WorkloadCertificate,
    decode,
    encode,
)
from agent.directory import DirectoryEntry, DirectoryUpdate
from agent.workloads import Workload
from fuzz.harness import main

WEB = Workload(  # an enrolled workload, as the agent sends and stores it
    "netns-4-7",
    "web",
    "/var/run/netns/web",
    7,
    "shop",
    "web",
    "strict",
    ("10.1.0.2", "fd00::2"),
    4,
    (("app", "web"),),
)


def _sent(message: Message) -> Message:
    """The message as it encodes: the directory entries that failed validation are not sent."""
    if isinstance(message, DirectoryChunk):
        return replace(message, update=replace(message.update, rejected=()))
    return message


def check(data: bytes) -> None:
    try:
        message = decode(data)
    except ProtocolError:
        return
    try:
        again = encode(message)
    except ProtocolError:  # larger once re-encoded (escapes): refused, not sent
        return
    assert decode(again) == _sent(message), (message, again)
    with contextlib.suppress(ProtocolError):
        ProxySession(held={"netns-4-7"}).receive(message)


def seeds() -> dict[str, bytes]:
    entry = DirectoryEntry("10.1.0.2", "spiffe://cluster.local/ns/shop/sa/web", "node-a")
    update = DirectoryUpdate(3, 2, False, "refuse", (entry,), ("10.0.0.9", "fd00::9"), True)
    messages: dict[str, Message] = {
        "hello": Hello("0.1.0", 42),
        "add-workload": AddWorkload(WEB, "strict"),
        "del-workload": DelWorkload("netns-4-7"),
        "certificate": WorkloadCertificate(
            "netns-4-7", "-----BEGIN CERTIFICATE-----", "KEY", 1764400000.5
        ),
        "trust-bundle": TrustBundle("cluster.local", "-----BEGIN CERTIFICATE-----"),
        "directory": DirectoryChunk(update),
        "policy": PolicyChunk(3, True, '{"documents":[]}'),
        "snapshot-sent": SnapshotSent(),
    }
    found = {name: encode(message) for name, message in messages.items()}
    return found | {
        "bad-version": b'{"type":"hello","version":1,"proxy_version":"x","pid":1}',
        "bad-entry": found["directory"].replace(b"10.1.0.2", b"10.1.0.x"),
        "not-json": b'{"type":"ack",',
        "nested": b'{"type":"ack","error":[[[[[[[[[[[[[[]]]]]]]]]]]]]]}',
    }


if __name__ == "__main__":
    main(check)
