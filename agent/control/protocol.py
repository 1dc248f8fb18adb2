"""The agent <-> proxy control protocol, as a core with no I/O.

Transport (see docs/protocol.md): a SOCK_SEQPACKET unix socket, `<state-dir>/control.sock`,
served by the agent.  One datagram is one UTF-8 JSON object of at most 64 KiB; an `add_workload`
datagram carries exactly one file descriptor (the workload's network namespace) as SCM_RIGHTS.
Every message the agent sends is answered by exactly one `ack`, in order.

    proxy -> agent   {"type": "hello", "version": 2, "proxy_version": "0.1.0", "pid": 42}
    agent -> proxy   {"type": "add_workload", "workload": {...}, "mode": "strict"}  + netns fd
    agent -> proxy   {"type": "del_workload", "uid": "..."}
    agent -> proxy   {"type": "workload_certificate", "uid": "...", "chain_pem": "...",
                      "key_pem": "...", "not_after": 1764400000.0}
    agent -> proxy   {"type": "trust_bundle", "trust_domain": "cluster.local", "bundle_pem": "..."}
    agent -> proxy   {"type": "directory", "update": {"version": 7, "base": 6, "reset": false,
                      "egress": "passthrough", "upserts": [{"ip", "identity", "node"}, ...],
                      "removals": ["10.1.2.4"], "last": true}}
    agent -> proxy   {"type": "policy", "version": 3, "last": true, "text": "<slice of JSON>"}
    agent -> proxy   {"type": "snapshot_sent"}
    proxy -> agent   {"type": "ack", "error": null | "what went wrong"}

`add_workload` carries the workload's resolved `mode` (permissive | strict).  Key material only
ever travels in `workload_certificate`, on this root-only socket; `repr` of that message hides
it, so it cannot reach a log by accident.  The directory travels as versioned deltas cut into
chunks (`agent.directory.DirectoryUpdate`), so any size fits the datagram limit; a chunk the
proxy cannot apply (its base is not the proxy's version) is acked with an error and the agent
sends the whole directory again (`reset`).  Entries are validated one by one: a bad one is
skipped and reported, never the whole update.

After `hello` the agent sends one `add_workload` per enrolled workload, the trust bundle, the
certificates and the directory, then `snapshot_sent`; the proxy then drops every workload it
holds that the snapshot did not name.  Later messages are incremental.  Either side may restart:
the proxy reconnects with backoff and gets a new snapshot.

`encode`/`decode` turn messages into datagrams and back (the typed encoding of `agent.wire`),
raising `ProtocolError` on anything malformed, naming the field.  `ProxySession` is the proxy's
state machine: fed the agent's messages in order, it says what to do (add, delete, drop stale)
and enforces the ordering rules above.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from agent.directory import DirectoryUpdate
from agent.wire import WireError, from_json, to_json
from agent.workloads import Workload

PROTOCOL_VERSION = 2
MAX_DATAGRAM = 64 * 1024


class ProtocolError(ValueError):
    """The peer sent something this protocol does not allow."""


@dataclass(frozen=True)
class Hello:
    TYPE: ClassVar[str] = "hello"
    proxy_version: str
    pid: int
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class AddWorkload:
    TYPE: ClassVar[str] = "add_workload"
    workload: Workload
    mode: Literal["permissive", "strict"] = "permissive"


@dataclass(frozen=True)
class WorkloadCertificate:
    TYPE: ClassVar[str] = "workload_certificate"
    uid: str
    chain_pem: str
    key_pem: str = field(repr=False)
    not_after: float


@dataclass(frozen=True)
class TrustBundle:
    TYPE: ClassVar[str] = "trust_bundle"
    trust_domain: str
    bundle_pem: str


@dataclass(frozen=True)
class DirectoryChunk:
    TYPE: ClassVar[str] = "directory"
    update: DirectoryUpdate


@dataclass(frozen=True)
class PolicyChunk:
    """A slice of the policy in force (the JSON of `agent.policy.compile.PolicySet`), in order;
    the proxy applies version `version` when the `last` slice arrives (`policy_chunks`)."""

    TYPE: ClassVar[str] = "policy"
    version: int
    last: bool
    text: str


def policy_chunks(version: int, text: str, max_chars: int = 24 * 1024) -> list[PolicyChunk]:
    """`text` (ASCII JSON) cut into slices that fit a datagram even when JSON-escaping doubles
    them (at least one slice, so an empty policy moves the version too)."""
    slices = [text[i : i + max_chars] for i in range(0, len(text), max_chars)] or [""]
    return [PolicyChunk(version, i == len(slices) - 1, part) for i, part in enumerate(slices)]


@dataclass(frozen=True)
class DelWorkload:
    TYPE: ClassVar[str] = "del_workload"
    uid: str


@dataclass(frozen=True)
class SnapshotSent:
    TYPE: ClassVar[str] = "snapshot_sent"


@dataclass(frozen=True)
class Ack:
    TYPE: ClassVar[str] = "ack"
    error: str | None = None


Message = (
    Hello
    | AddWorkload
    | DelWorkload
    | SnapshotSent
    | Ack
    | WorkloadCertificate
    | TrustBundle
    | DirectoryChunk
    | PolicyChunk
)
_BY_TYPE: dict[str, type[Any]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        AddWorkload,
        DelWorkload,
        SnapshotSent,
        Ack,
        WorkloadCertificate,
        TrustBundle,
        DirectoryChunk,
        PolicyChunk,
    )
}


def encode(message: Message) -> bytes:
    data = json.dumps({"type": message.TYPE, **to_json(message)}, separators=(",", ":")).encode()
    if len(data) > MAX_DATAGRAM:
        raise ProtocolError(f"{message.TYPE} message of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    return data


def decode(data: bytes) -> Message:
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise ProtocolError(f"not a JSON message: {data[:80]!r}") from exc
    if not isinstance(body, dict):
        raise ProtocolError(f"message is not an object: {data[:80]!r}")
    kind = body.pop("type", None)
    cls = _BY_TYPE.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    try:
        message: Message = from_json(cls, body, kind)
    except WireError as exc:
        raise ProtocolError(f"malformed {exc}") from None
    if isinstance(message, Hello) and message.version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported protocol version {message.version} (this side speaks "
            f"{PROTOCOL_VERSION}): run the same Ferry version for agent and proxy"
        )
    return message


def fds_expected(message: Message) -> int:
    """How many SCM_RIGHTS descriptors a message must carry."""
    return 1 if isinstance(message, AddWorkload) else 0


@dataclass(frozen=True)
class Add:
    workload: Workload
    mode: str


@dataclass(frozen=True)
class Remove:
    uids: tuple[str, ...]


Action = Add | Remove | WorkloadCertificate | TrustBundle | DirectoryChunk | PolicyChunk


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
            case AddWorkload(workload=w, mode=mode):
                if self.in_snapshot:
                    self.snapshot.add(w.uid)
                self.held.add(w.uid)
                return [Add(w, mode)]
            case WorkloadCertificate(uid=uid):
                if uid not in self.held:
                    raise ProtocolError(f"certificate for {uid!r}, which is not a workload here")
                return [message]
            case TrustBundle() | DirectoryChunk() | PolicyChunk():
                return [message]
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
