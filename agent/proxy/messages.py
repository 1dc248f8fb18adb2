"""Supervisor <-> worker messages: one typed definition, one encoding (pure).

The supervisor and each worker process talk over a SOCK_SEQPACKET socketpair: one datagram is one
UTF-8 JSON object `{"op": <name>, ...fields}`, file descriptors travel as SCM_RIGHTS.  Every
message is a frozen dataclass below; `encode` and `decode` are the only way in and out, and
`decode` checks every field against its annotation, so a malformed datagram is a `MessageError`
naming the field and the value, never a half-read dict.

supervisor -> worker (each with a `seq`; the worker answers every one with `Done(seq, error)`
once it has acted on it, so the supervisor can pass a worker's failure back to the agent):
    AddWorkload      fds = [netns, one listener per `listeners` entry]; re-adding a known uid
                     swaps its listeners and netns and keeps its open connections
    RemoveWorkload   stop accepting, reset its connections, close its fds
    Relabel          a workload's new labels: its policy is compiled again and the
                     connections it no longer allows are closed; the rest stays
    SetCertificate   the workload's chain and key (never logged: `repr` hides the key)
    SetTrust         the trust domain and the bundle of roots peers must chain to
    UpdateDirectory  one chunk of a versioned directory change (agent.directory)
    UpdatePolicy     one slice of the policy set in force; the last one applies it
    Drain            the proxy was upgraded (agent.proxy.handoff): stop accepting (answered
                     then), serve what is open, exit once nothing is
    StatsRequest     answered at once with Stats
worker -> supervisor:
    Done             the outcome of one message (error None: applied)
    Stats            cumulative counters per workload and flow, what the worker has applied
                     (directory version and size, certificate expiry per workload), the work
                     it shed per workload and bound (`Shed`); also sent every second when
                     something changed
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from agent.directory import DirectoryUpdate
from agent.telemetry.counters import TelemetryStats
from agent.wire import WireError, from_json, to_json

Direction = Literal["outbound", "inbound", "tunnel"]
Mode = Literal["permissive", "strict"]
# what a worker gets
WORKER_SECTIONS = ("proxy", "limits", "redirection", "identity", "policy", "telemetry")
COUNTERS = (
    "connections_opened",
    "connections_closed",
    "connect_failures",
    "bytes_received",
    "bytes_sent",
)


class MessageError(ValueError):
    """A datagram on the worker channel is not a valid message."""


@dataclass(frozen=True)
class ListenerSpec:
    direction: Direction
    family: Literal[4, 6]


@dataclass(frozen=True)
class AddWorkload:
    OP: ClassVar[str] = "add"
    seq: int
    uid: str
    identity: str
    mode: Mode
    ips: tuple[str, ...]
    listeners: tuple[ListenerSpec, ...]
    namespace: str = ""  # with labels: what policy selectors match
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def fds_expected(self) -> int:
        return 1 + len(self.listeners)


@dataclass(frozen=True)
class RemoveWorkload:
    OP: ClassVar[str] = "del"
    seq: int
    uid: str


@dataclass(frozen=True)
class Relabel:
    OP: ClassVar[str] = "relabel"
    seq: int
    uid: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SetCertificate:
    OP: ClassVar[str] = "cert"
    seq: int
    uid: str
    chain_pem: str
    key_pem: str = field(repr=False)
    not_after: float


@dataclass(frozen=True)
class SetTrust:
    OP: ClassVar[str] = "trust"
    seq: int
    trust_domain: str
    bundle_pem: str


@dataclass(frozen=True)
class UpdateDirectory:
    OP: ClassVar[str] = "directory"
    seq: int
    update: DirectoryUpdate


@dataclass(frozen=True)
class UpdatePolicy:
    """One slice of the policy set in force (agent.control.protocol.PolicyChunk, forwarded)."""

    OP: ClassVar[str] = "policy"
    seq: int
    version: int
    last: bool
    text: str


@dataclass(frozen=True)
class Drain:
    OP: ClassVar[str] = "drain"
    seq: int


@dataclass(frozen=True)
class StatsRequest:
    OP: ClassVar[str] = "stats?"


@dataclass(frozen=True)
class Done:
    OP: ClassVar[str] = "done"
    seq: int
    worker: int
    error: str | None = None


@dataclass(frozen=True)
class Flow:
    """Counters of one workload's traffic in one direction, security and peer identity."""

    direction: Literal["outbound", "inbound"]
    security: Literal["mtls", "plaintext"]
    peer_identity: str  # "" when unknown (plaintext, or refused before authentication)
    connections_opened: int = 0
    connections_closed: int = 0
    connect_failures: int = 0
    bytes_received: int = 0  # client -> server
    bytes_sent: int = 0  # server -> client
    denied: dict[str, int] = field(default_factory=dict)  # decide.Reason -> connections

    @property
    def denied_total(self) -> int:
        return sum(self.denied.values())


@dataclass(frozen=True)
class Decision:
    """How often one policy decided one way for one workload (cumulative)."""

    policy: str  # "<namespace>/<name>", "" when no policy decided
    action: str  # ALLOW | DENY | AUDIT | RATELIMIT | JWT | "" (no policy)
    decision: str  # allow | deny
    count: int


@dataclass(frozen=True)
class HandshakeFailure:
    """Tunnel TLS handshakes of one workload that failed for one reason (cumulative)."""

    uid: str
    direction: str  # inbound (our :15008) | outbound (our dial)
    reason: str  # agent.tunnel.handshake_failure.REASONS
    count: int


@dataclass(frozen=True)
class TunnelCounters:
    handshakes: int = 0  # completed, both roles, cumulative
    pooled_connections: int = 0  # client connections in the pool now
    streams: int = 0  # open now
    handshake_failures: tuple[HandshakeFailure, ...] = ()


@dataclass(frozen=True)
class Shed:
    """Work refused (or a connection cut off) for one workload at one bound (cumulative)."""

    limit: str  # the `limits:` key that was reached (docs/limits.md)
    count: int
    last_peer: str  # who hit it last: a peer identity, or an IP
    last_at: float  # unix time of the last one


@dataclass(frozen=True)
class Applied:
    """What a worker has applied, for `agent status` to compare with what the agent sent."""

    directory_version: int = 0
    directory_entries: int = 0
    directory_rejected: int = 0
    trust_domain: str = ""
    certificates: dict[str, float] = field(default_factory=dict)  # uid -> not_after
    policy_version: int = 0


@dataclass(frozen=True)
class Stats:
    OP: ClassVar[str] = "stats"
    worker: int
    active: int  # open relays and streams, connecting ones included
    flows: dict[str, tuple[Flow, ...]]  # uid -> flows
    tunnel: TunnelCounters
    applied: Applied
    decisions: dict[str, tuple[Decision, ...]] = field(default_factory=dict)  # uid -> counts
    shed: dict[str, tuple[Shed, ...]] = field(default_factory=dict)  # uid -> by bound
    telemetry: TelemetryStats = field(default_factory=TelemetryStats)  # requests, durations

    def totals(self, uid: str, direction: str) -> dict[str, int]:
        """One workload's counters in one direction, summed over its flows."""
        out = dict.fromkeys(COUNTERS, 0)
        for flow in self.flows.get(uid, ()):
            if flow.direction == direction:
                for key in COUNTERS:
                    out[key] += getattr(flow, key)
        return out


ToWorker = (
    AddWorkload
    | RemoveWorkload
    | Relabel
    | SetCertificate
    | SetTrust
    | UpdateDirectory
    | UpdatePolicy
    | Drain
    | StatsRequest
)
FromWorker = Done | Stats
Message = ToWorker | FromWorker

_BY_OP: dict[str, type[Any]] = {
    cls.OP: cls
    for cls in (
        AddWorkload,
        RemoveWorkload,
        Relabel,
        SetCertificate,
        SetTrust,
        UpdateDirectory,
        UpdatePolicy,
        Drain,
        StatsRequest,
        Done,
        Stats,
    )
}


def encode(message: Message) -> bytes:
    body = {"op": message.OP, **to_json(message)}
    return json.dumps(body, separators=(",", ":")).encode()


def decode(data: bytes) -> Message:
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply
        raise MessageError(f"not a JSON message: {data[:80]!r}") from None
    if not isinstance(body, dict):
        raise MessageError(f"message is not an object: {data[:80]!r}")
    op = body.pop("op", None)
    cls = _BY_OP.get(op) if isinstance(op, str) else None
    if cls is None:
        raise MessageError(f"unknown op {op!r}")
    try:
        message: Message = from_json(cls, body, op)
    except WireError as exc:
        raise MessageError(str(exc)) from None
    return message
