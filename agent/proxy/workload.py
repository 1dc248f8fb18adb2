"""A workload as one proxy worker serves it: listeners, netns, TLS contexts and flow counters.

`ServedWorkload` carries the facts the decision core asks about (`identity`, `mode`, `ips`,
`certified`, see `agent.proxy.decide.WorkloadFacts`) and what the worker needs to act: the netns
fd its upstream sockets are made in, its listening sockets, and the client and server TLS contexts
built from its certificate and the trust bundle.

Counting.  Each workload keeps one `FlowStats` per (direction, security, peer identity): how many
connections were opened and closed, failed to connect, or were denied (by reason), and the bytes
of ended connections; the open ones sit in `relays` (splice `Relay`s and `TunnelStream`s alike:
both say whether they are still `connecting` and how many bytes went `bytes_up`, client -> server,
and `bytes_down`).  `flows()` turns them into cumulative `messages.Flow` records, open connections
included.  `shed` counts the work refused for the workload per bound it hit (`limits:` key),
with the last peer and when (`agent.proxy.admission`); `shed_records()` reports them.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any, Literal

from agent.policy.compile import WorkloadPolicy
from agent.proxy.messages import Decision, Direction, Flow, Shed

Security = Literal["mtls", "plaintext"]
FlowKey = tuple[Literal["outbound", "inbound"], Security, str]


class FlowStats:
    """Counters of one workload, direction, security and peer identity; open ones in `relays`."""

    __slots__ = ("bytes_received", "bytes_sent", "closed", "denied", "failures", "relays")

    def __init__(self) -> None:
        self.closed = 0  # connected relays that ended
        self.failures = 0
        self.denied: dict[str, int] = {}
        self.bytes_received = 0  # of ended relays
        self.bytes_sent = 0
        self.relays: set[Any] = set()

    def deny(self, reason: str) -> None:
        self.denied[reason] = self.denied.get(reason, 0) + 1

    def record(self, key: FlowKey) -> Flow:
        opened, rx, tx = self.closed, self.bytes_received, self.bytes_sent
        for r in self.relays:
            if not r.connecting:
                opened += 1
                rx += r.bytes_up
                tx += r.bytes_down
        return Flow(
            direction=key[0],
            security=key[1],
            peer_identity=key[2],
            connections_opened=opened,
            connections_closed=self.closed,
            connect_failures=self.failures,
            bytes_received=rx,
            bytes_sent=tx,
            denied=dict(self.denied),
        )


class Listening:
    """One of the workload's listening sockets, as this worker accepts on it."""

    __slots__ = ("direction", "fd", "sock")

    def __init__(self, sock: socket.socket, direction: Direction) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.direction = direction


class ServedWorkload:
    __slots__ = (
        "chain_pem",
        "client_ctx",
        "decisions",
        "flows",
        "identity",
        "ips",
        "key_pem",
        "labels",
        "listeners",
        "mode",
        "namespace",
        "netns_fd",
        "not_after",
        "policy",
        "server_ctx",
        "shed",
        "uid",
    )

    def __init__(self, uid: str, netns_fd: int) -> None:
        self.uid = uid
        self.netns_fd = netns_fd
        self.listeners: list[Listening] = []
        self.flows: dict[FlowKey, FlowStats] = {}
        self.identity = ""
        self.mode = "permissive"
        self.ips: frozenset[str] = frozenset()
        self.chain_pem = b""
        self.key_pem = b""
        self.not_after = 0.0
        self.client_ctx: ssl.SSLContext | None = None
        self.server_ctx: ssl.SSLContext | None = None
        self.namespace = ""
        self.labels: dict[str, str] = {}
        self.policy: WorkloadPolicy | None = None  # None: no document selects it
        self.decisions: dict[tuple[str, str, str], int] = {}  # (policy, action, decision) -> n
        self.shed: dict[str, Shed] = {}  # limit -> what was refused at it

    @property
    def certified(self) -> bool:
        """Holds a certificate and the trust bundle: can originate and terminate tunnels."""
        return self.client_ctx is not None

    def flow(
        self,
        direction: Literal["outbound", "inbound"],
        security: Security,
        peer: str = "",
    ) -> FlowStats:
        key = (direction, security, peer)
        st = self.flows.get(key)
        if st is None:
            st = self.flows[key] = FlowStats()
        return st

    def count(self, policy: str, action: str, allowed: bool) -> None:
        key = (policy, action, "allow" if allowed else "deny")
        self.decisions[key] = self.decisions.get(key, 0) + 1

    def decision_records(self) -> tuple[Decision, ...]:
        return tuple(Decision(p, a, d, n) for (p, a, d), n in sorted(self.decisions.items()))

    def shed_records(self) -> tuple[Shed, ...]:
        return tuple(self.shed[limit] for limit in sorted(self.shed))

    def records(self) -> tuple[Flow, ...]:
        return tuple(st.record(key) for key, st in sorted(self.flows.items()))

    def open_count(self) -> int:
        return sum(len(st.relays) for st in self.flows.values())
