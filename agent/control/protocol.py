"""The agent <-> proxy control protocol, as a core with no I/O.

Transport (see docs/protocol.md): a SOCK_SEQPACKET unix socket, `<state-dir>/control.sock`,
served by the agent.  One datagram is one UTF-8 JSON object; an `add_workload` datagram carries
exactly one file descriptor (the workload's network namespace) as SCM_RIGHTS.  Every message the
agent sends is answered by exactly one `ack`, in order.

    proxy -> agent   {"type": "hello", "version": 1, "proxy_version": "0.1.0", "pid": 42}
    agent -> proxy   {"type": "add_workload", "uid": "...", "workload": {...}}   + netns fd
    agent -> proxy   {"type": "del_workload", "uid": "..."}
    agent -> proxy   {"type": "workload_certificate", "uid": "...", "chain_pem": "...",
                      "key_pem": "...", "not_after": 1764400000.0}
    agent -> proxy   {"type": "trust_bundle", "trust_domain": "cluster.local", "bundle_pem": "..."}
    agent -> proxy   {"type": "directory", "egress": "passthrough",
                      "entries": [{"ip": "10.1.2.3", "identity": "spiffe://...", "node": "a"}]}
    agent -> proxy   {"type": "snapshot_sent"}
    proxy -> agent   {"type": "ack", "error": null | "what went wrong"}

`add_workload` also carries the workload's resolved `mode` (permissive | strict).  Key material
only ever travels in `workload_certificate`, on this root-only socket; `repr` of that message
hides it, so it cannot reach a log by accident.

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

from agent.directory import DirectoryEntry
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
    mode: str = "permissive"


@dataclass(frozen=True)
class WorkloadCertificate:
    uid: str
    chain_pem: str
    key_pem: str = field(repr=False)
    not_after: float


@dataclass(frozen=True)
class TrustBundle:
    trust_domain: str
    bundle_pem: str


@dataclass(frozen=True)
class Directory:
    entries: tuple[DirectoryEntry, ...]
    egress: str = "passthrough"


@dataclass(frozen=True)
class DelWorkload:
    uid: str


@dataclass(frozen=True)
class SnapshotSent:
    pass


@dataclass(frozen=True)
class Ack:
    error: str | None = None


Message = (
    Hello
    | AddWorkload
    | DelWorkload
    | SnapshotSent
    | Ack
    | WorkloadCertificate
    | TrustBundle
    | Directory
)


def encode(message: Message) -> bytes:
    body: dict[str, Any]
    match message:
        case Hello(proxy_version=pv, pid=pid, version=version):
            body = {"type": "hello", "version": version, "proxy_version": pv, "pid": pid}
        case AddWorkload(workload=w, mode=mode):
            body = {"type": "add_workload", "uid": w.uid, "workload": w.to_json(), "mode": mode}
        case WorkloadCertificate(uid=uid, chain_pem=chain, key_pem=key, not_after=not_after):
            body = {
                "type": "workload_certificate",
                "uid": uid,
                "chain_pem": chain,
                "key_pem": key,
                "not_after": not_after,
            }
        case TrustBundle(trust_domain=td, bundle_pem=bundle):
            body = {"type": "trust_bundle", "trust_domain": td, "bundle_pem": bundle}
        case Directory(entries=entries, egress=egress):
            body = {
                "type": "directory",
                "egress": egress,
                "entries": [{"ip": e.ip, "identity": e.identity, "node": e.node} for e in entries],
            }
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
            mode = str(body.get("mode", "permissive"))
            if mode not in ("permissive", "strict"):
                raise ProtocolError(f"add_workload mode {mode!r} is not permissive or strict")
            return AddWorkload(workload, mode)
        if kind == "workload_certificate":
            return WorkloadCertificate(
                uid=str(body["uid"]),
                chain_pem=str(body["chain_pem"]),
                key_pem=str(body["key_pem"]),
                not_after=float(body["not_after"]),
            )
        if kind == "trust_bundle":
            return TrustBundle(str(body["trust_domain"]), str(body["bundle_pem"]))
        if kind == "directory":
            egress = str(body.get("egress", "passthrough"))
            if egress not in ("passthrough", "refuse"):
                raise ProtocolError(f"directory egress {egress!r} is not passthrough or refuse")
            entries = tuple(
                DirectoryEntry(str(e["ip"]), str(e["identity"]), str(e["node"]))
                for e in body["entries"]
            )
            return Directory(entries, egress)
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
    mode: str


@dataclass(frozen=True)
class Remove:
    uids: tuple[str, ...]


Action = Add | Remove | WorkloadCertificate | TrustBundle | Directory


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
            case TrustBundle() | Directory():
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
