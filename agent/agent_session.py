"""The agent's side of one proxy connection, as a core with no I/O (the mirror of `ProxySession`).

The control protocol (`agent.control.protocol`, docs/protocol.md) has one shape on the agent's
side: the proxy speaks first with `hello`; the agent then sends its snapshot and later updates,
one message at a time, and each is answered by exactly one `ack` before the next is sent.

`AgentSession` enforces that ordering: `receive` takes what the proxy sent (a `hello` first and
only once, then only `ack`s, each answering the one outstanding message) and `send` registers a
message before it goes out (never before the hello, never while another awaits its ack,
`snapshot_sent` once).  A violation is a `ProtocolError`; an ack carrying an error is a
`ProxyRefused` naming the proxy and the message.

`snapshot_messages(snapshot)` is the ordered snapshot for a (re)connecting proxy, from plain data:
every reachable workload (`add_workload`, with its netns fd attached by the adapter), the trust
bundle, the certificates of those workloads (a certificate may only follow its workload's add),
the mesh directory (as reset chunks), the policy in force (its `policy` slices, always, also
when it is empty: the proxy must drop a policy an earlier agent sent), and `snapshot_sent`, after
which the proxy drops whatever it held that the snapshot did not name.

This core could live next to `ProxySession` in `agent.control.protocol`; it sits here, with the
proxy hub that drives it, until that module's owner moves it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from agent.control.protocol import (
    Ack,
    AddWorkload,
    DirectoryChunk,
    Hello,
    Message,
    PolicyChunk,
    ProtocolError,
    SnapshotSent,
    TrustBundle,
    WorkloadCertificate,
)
from agent.directory import DirectoryUpdate
from agent.workloads import EnrollmentError, Mode, Workload


class ProxyRefused(EnrollmentError):
    """A proxy answered a message with an error (for instance, it could not open listeners)."""


@dataclass(frozen=True)
class Snapshot:
    """What a (re)connecting proxy must hold: the agent's whole state, as plain data."""

    workloads: Sequence[tuple[Workload, Mode]]  # (workload, resolved mode), enrollment order
    trust: TrustBundle | None
    certificates: Sequence[WorkloadCertificate]
    directory: Sequence[DirectoryUpdate]  # the whole directory, as reset chunks
    policy: Sequence[PolicyChunk]  # the policy in force (`policy_chunks`)


def snapshot_messages(snapshot: Snapshot) -> list[Message]:
    """The snapshot in protocol order; certificates of workloads not in it are left out."""
    messages: list[Message] = [AddWorkload(w, mode) for w, mode in snapshot.workloads]
    if snapshot.trust is not None:
        messages.append(snapshot.trust)
    sent = {w.uid for w, _mode in snapshot.workloads}
    messages += [cert for cert in snapshot.certificates if cert.uid in sent]
    messages += [DirectoryChunk(chunk) for chunk in snapshot.directory]
    messages += snapshot.policy
    messages.append(SnapshotSent())
    return messages


@dataclass
class AgentSession:
    """The ordering rules of one proxy connection, seen from the agent."""

    hello: Hello | None = None
    outstanding: Message | None = None
    snapshot_sent: bool = False

    @property
    def pid(self) -> int | None:
        return None if self.hello is None else self.hello.pid

    def send(self, message: Message) -> Message:
        """Register `message` as the one now awaiting an ack; returns it."""
        if self.hello is None:
            raise ProtocolError("nothing may be sent to a proxy before its hello")
        if self.outstanding is not None:
            raise ProtocolError(
                f"cannot send {type(message).__name__}: "
                f"{type(self.outstanding).__name__} still awaits its ack"
            )
        if isinstance(message, Hello | Ack):
            raise ProtocolError(f"the agent may not send {type(message).__name__}")
        if isinstance(message, SnapshotSent):
            if self.snapshot_sent:
                raise ProtocolError("snapshot_sent sent twice on one connection")
            self.snapshot_sent = True
        self.outstanding = message
        return message

    def receive(self, message: Message) -> Message:
        """Check what the proxy sent: its hello first, then one ack per message sent."""
        if self.hello is None:
            if not isinstance(message, Hello):
                raise ProtocolError(f"expected hello, got {type(message).__name__}")
            self.hello = message
            return message
        if not isinstance(message, Ack):
            raise ProtocolError(f"expected ack, proxy sent {type(message).__name__}")
        answered, self.outstanding = self.outstanding, None
        if answered is None:
            raise ProtocolError("the proxy sent an ack for nothing")
        if message.error:
            raise ProxyRefused(
                f"proxy (pid {self.pid}) refused {type(answered).__name__}: {message.error}"
            )
        return message
