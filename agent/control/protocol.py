"""The agent <-> proxy control protocol, as a core with no I/O.

Transport (see docs/protocol.md): a SOCK_SEQPACKET unix socket, `<state-dir>/control.sock`,
served by the agent.  One datagram is one UTF-8 JSON object; an `add_workload` datagram carries
exactly one file descriptor (the workload's network namespace) as SCM_RIGHTS.  Every message the
agent sends is answered by exactly one `ack`, in order.

    proxy -> agent   {"type": "hello", "version": 1, "proxy_version": "0.1.0", "pid": 42}
    agent -> proxy   {"type": "add_workload", "uid": "...", "workload": {...}}   + netns fd
    agent -> proxy   {"type": "del_workload", "uid": "..."}
    agent -> proxy   {"type": "snapshot_sent"}
    proxy -> agent   {"type": "ack", "error": null | "what went wrong"}

After `hello` the agent sends one `add_workload` per enrolled workload, then `snapshot_sent`; the
proxy then drops every workload it holds that the snapshot did not name.  Later adds and dels are
incremental.  Either side may restart: the proxy reconnects with backoff and gets a new snapshot.

`encode`/`decode` turn messages into datagrams and back, raising `ProtocolError` on anything
malformed.  `ProxySession` is the proxy's state machine: fed the agent's messages in order, it
says what to do (add, delete, drop stale) and enforces the ordering rules above.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from agent.workloads import EnrollmentError, Workload

PROTOCOL_VERSION = 1
MAX_DATAGRAM = 64 * 1024


class ProtocolError(ValueError):
    """The peer sent something this protocol does not allow."""


@dataclass(frozen=True)
class Hello:
    proxy_version: str
    pid: int
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class AddWorkload:
    workload: Workload


@dataclass(frozen=True)
class DelWorkload:
    uid: str


@dataclass(frozen=True)
class SnapshotSent:
    pass


@dataclass(frozen=True)
class Ack:
    error: str | None = None


Message = Hello | AddWorkload | DelWorkload | SnapshotSent | Ack


def encode(message: Message) -> bytes:
    body: dict[str, Any]
    match message:
        case Hello(proxy_version=pv, pid=pid, version=version):
            body = {"type": "hello", "version": version, "proxy_version": pv, "pid": pid}
        case AddWorkload(workload=w):
            body = {"type": "add_workload", "uid": w.uid, "workload": w.to_json()}
        case DelWorkload(uid=uid):
            body = {"type": "del_workload", "uid": uid}
        case SnapshotSent():
            body = {"type": "snapshot_sent"}
        case Ack(error=error):
            body = {"type": "ack", "error": error}
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) > MAX_DATAGRAM:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    return data


def decode(data: bytes) -> Message:
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"not a JSON message: {data[:80]!r}") from exc
    if not isinstance(body, dict):
        raise ProtocolError(f"message is not an object: {data[:80]!r}")
    kind = body.get("type")
    try:
        if kind == "hello":
            version = int(body["version"])
            if version != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"unsupported protocol version {version} (this side speaks {PROTOCOL_VERSION})"
                )
            return Hello(proxy_version=str(body["proxy_version"]), pid=int(body["pid"]))
        if kind == "add_workload":
            workload = Workload.from_json(body["workload"])
            if workload.uid != body["uid"]:
                raise ProtocolError(f"add_workload uid {body['uid']!r} != {workload.uid!r}")
            return AddWorkload(workload)
        if kind == "del_workload":
            return DelWorkload(uid=str(body["uid"]))
        if kind == "snapshot_sent":
            return SnapshotSent()
        if kind == "ack":
            error = body.get("error")
            return Ack(error=None if error is None else str(error))
    except (KeyError, TypeError, ValueError, EnrollmentError) as exc:
        if isinstance(exc, ProtocolError):
            raise
        raise ProtocolError(f"malformed {kind} message: {exc}") from exc
    raise ProtocolError(f"unknown message type {kind!r}")


def fds_expected(message: Message) -> int:
    """How many SCM_RIGHTS descriptors a message must carry."""
    return 1 if isinstance(message, AddWorkload) else 0


@dataclass(frozen=True)
class Add:
    workload: Workload


@dataclass(frozen=True)
class Remove:
    uids: tuple[str, ...]


Action = Add | Remove


@dataclass
class ProxySession:
    """The proxy's view of one connection to the agent.

    `held` is what the proxy currently serves (it survives reconnects: pass it into the next
    session).  `receive` returns the actions to perform for one agent message; the caller acks
    after performing them (with the error text if they failed).
    """

    held: set[str] = field(default_factory=set)
    in_snapshot: bool = True
    snapshot: set[str] = field(default_factory=set)

    def receive(self, message: Message) -> list[Action]:
        match message:
            case AddWorkload(workload=w):
                if self.in_snapshot:
                    self.snapshot.add(w.uid)
                self.held.add(w.uid)
                return [Add(w)]
            case DelWorkload(uid=uid):
                self.held.discard(uid)
                self.snapshot.discard(uid)
                return [Remove((uid,))]
            case SnapshotSent():
                if not self.in_snapshot:
                    raise ProtocolError("snapshot_sent received twice on one connection")
                self.in_snapshot = False
                stale = tuple(sorted(self.held - self.snapshot))
                self.held -= set(stale)
                return [Remove(stale)] if stale else []
        raise ProtocolError(f"the agent may not send {type(message).__name__}")
