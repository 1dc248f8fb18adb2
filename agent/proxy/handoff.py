"""The proxy upgrade handoff, as a core with no I/O: messages, their order, listener adoption.

A new `agent proxy` takes over from the running one the way Envoy's hot restart does: the
running proxy (the *predecessor*) passes every in-pod listening socket to the new one (the
*successor*) over `<state-dir>/handoff.sock`, both accept on the very same sockets for a moment,
then the predecessor stops accepting and drains what it has open.  A listening socket keeps its
pod's network namespace and its accept queue whichever process holds it, so no connection is
refused, none waits in a queue nobody reads, and none is moved.

Transport: SOCK_SEQPACKET, mode 0600 in the 0700 state dir; one datagram is one JSON object
`{"op": <name>, ...}` in the typed encoding of `agent.wire`; `listeners` carries SCM_RIGHTS
descriptors `[netns, one per listener]`, no other message carries any.

    successor   -> predecessor   takeover        {pid, proxy_version, version}
    predecessor -> successor     listeners       {uid, listeners: [{direction, family}]} + fds
                                 ... one per served workload ...
    predecessor -> successor     listeners_sent  {workloads}       (how many were sent)
              or                 refused         {reason}          (nothing was handed over)
    successor   -> predecessor   serving         {pid}             (snapshot applied, accepting)
    predecessor -> successor     draining        {connections, deadline}

`takeover`: the predecessor stops taking agent messages (so the agent sees one proxy, and no
workload changes between what it hands over and the successor's snapshot), then sends its
listeners.  The successor asks the agent for a snapshot and serves each workload with the
listeners handed over for it (`pick_inherited`; fresh ones where none matches: a changed
configuration), and says `serving` once every worker accepts.  The predecessor then stops
accepting and answers `draining`: from here on the successor is the proxy.  Until `draining`
either side may give up by closing the connection (a timeout, a crash, a snapshot that never
came): the predecessor then takes the agent link back and has never stopped serving (rollback).

`Handoff` checks that order for one side of the conversation, as h11 does for HTTP: `send`
refuses a message this side may not send now (`HandoffMisuse`, our bug), `receive` decodes a
datagram and refuses one the peer may not send now (`HandoffError`, the peer's fault).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from agent.proxy.messages import ListenerSpec
from agent.wire import WireError, from_json, to_json

HANDOFF_SOCKET = "handoff.sock"
HANDOFF_VERSION = 1
MAX_DATAGRAM = 64 * 1024
MAX_FDS = 8  # a netns and its listeners (three directions, two families)

Role = Literal["successor", "predecessor"]


class HandoffError(ValueError):
    """The peer broke the handoff protocol (or sent something malformed)."""


class HandoffMisuse(RuntimeError):
    """This side tried to send a message the protocol does not allow now (a bug)."""


@dataclass(frozen=True)
class Takeover:
    OP: ClassVar[str] = "takeover"
    pid: int
    proxy_version: str
    version: int = HANDOFF_VERSION


@dataclass(frozen=True)
class Listeners:
    OP: ClassVar[str] = "listeners"
    uid: str
    listeners: tuple[ListenerSpec, ...]


@dataclass(frozen=True)
class ListenersSent:
    OP: ClassVar[str] = "listeners_sent"
    workloads: int


@dataclass(frozen=True)
class Refused:
    OP: ClassVar[str] = "refused"
    reason: str


@dataclass(frozen=True)
class Serving:
    OP: ClassVar[str] = "serving"
    pid: int


@dataclass(frozen=True)
class Draining:
    OP: ClassVar[str] = "draining"
    connections: int  # open when the predecessor stopped accepting
    deadline: float  # seconds it keeps serving them at most


Message = Takeover | Listeners | ListenersSent | Refused | Serving | Draining
_BY_OP: dict[str, type[Any]] = {
    cls.OP: cls for cls in (Takeover, Listeners, ListenersSent, Refused, Serving, Draining)
}

START, ASKED, HANDED, SERVING, DONE = "start", "asked", "handed", "serving", "done"
# (state, message) -> (who sends it, next state)
_ORDER: dict[tuple[str, type[Any]], tuple[Role, str]] = {
    (START, Takeover): ("successor", ASKED),
    (ASKED, Listeners): ("predecessor", ASKED),
    (ASKED, ListenersSent): ("predecessor", HANDED),
    (ASKED, Refused): ("predecessor", DONE),
    (HANDED, Serving): ("successor", SERVING),
    (SERVING, Draining): ("predecessor", DONE),
}


def encode(message: Message) -> bytes:
    return json.dumps({"op": message.OP, **to_json(message)}, separators=(",", ":")).encode()


def decode(data: bytes) -> Message:
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise HandoffError(f"not a JSON message: {data[:80]!r}") from None
    if not isinstance(body, dict):
        raise HandoffError(f"message is not an object: {data[:80]!r}")
    op = body.pop("op", None)
    cls = _BY_OP.get(op) if isinstance(op, str) else None
    if cls is None:
        raise HandoffError(f"unknown op {op!r}")
    try:
        message: Message = from_json(cls, body, op)
    except WireError as exc:
        raise HandoffError(str(exc)) from None
    return message


def fds_expected(message: Message) -> int:
    """How many SCM_RIGHTS descriptors a message carries: a netns and each listener."""
    return 1 + len(message.listeners) if isinstance(message, Listeners) else 0


class Handoff:
    """One side of one handoff conversation: what may be sent and received, in which order."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self.state = START
        self.handed: list[str] = []  # uids of the `listeners` messages so far

    def send(self, message: Message) -> bytes:
        self._advance(message, self.role, HandoffMisuse)
        if isinstance(message, Listeners):
            self.handed.append(message.uid)
        return encode(message)

    def receive(self, data: bytes, fds: int) -> Message:
        """Decode one datagram that came with `fds` descriptors (the caller closes them when
        this raises)."""
        if not data:
            raise HandoffError(f"the {self._peer} closed the handoff ({self.state})")
        message = decode(data)
        if fds != fds_expected(message):
            raise HandoffError(f"{message.OP} carried {fds} descriptors, expected "
                               f"{fds_expected(message)}")  # fmt: skip
        if isinstance(message, Listeners) and message.uid in self.handed:
            raise HandoffError(f"listeners of {message.uid!r} handed over twice")
        if isinstance(message, ListenersSent) and message.workloads != len(self.handed):
            raise HandoffError(f"listeners_sent says {message.workloads} workload(s), "
                               f"{len(self.handed)} came")  # fmt: skip
        self._advance(message, self._peer, HandoffError)
        if isinstance(message, Listeners):
            self.handed.append(message.uid)
        return message

    @property
    def _peer(self) -> Role:
        return "predecessor" if self.role == "successor" else "successor"

    def _advance(self, message: Message, sender: Role, error: type[Exception]) -> None:
        step = _ORDER.get((self.state, type(message)))
        if step is None or step[0] != sender:
            raise error(f"the {sender} may not send {message.OP} when the handoff is {self.state}")
        self.state = step[1]


def refusal(takeover: Takeover) -> str | None:
    """Why a predecessor refuses this takeover (None: it hands over)."""
    if takeover.version != HANDOFF_VERSION:
        return (f"handoff protocol version {takeover.version} is not {HANDOFF_VERSION}: stop "
                "this proxy and start the new one (a cold restart)")  # fmt: skip
    return None


Address = tuple[str, int, str, int]  # direction, family, host, port


def pick_inherited(wanted: Sequence[Address], offered: Sequence[Address]) -> list[int | None]:
    """For each listener address a workload needs, the index of the inherited listener bound
    exactly there (each used once), or None: open a new one (the configuration changed)."""
    free = list(enumerate(offered))
    picks: list[int | None] = []
    for address in wanted:
        index = next((i for i, have in free if have == address), None)
        if index is not None:
            free = [(i, have) for i, have in free if i != index]
        picks.append(index)
    return picks
