"""Where a worker applies a workload's policy: admission, counting, denial logs, revocation.

The destination proxy decides, for every inbound connection (plaintext, tunnelled or same node)
and, where a port needs request facts, for every request.  The decisions themselves are pure
(`WorkloadPolicy`: `authz.decide`, `rate_limits.check`, `jwt.authenticate`); this module is the
thin part around them that a worker calls:

- `admit_connection(workload, facts, stats)`: authorization at L4, then a connection rate limit;
  False means reset the client (or refuse the tunnel stream).  Every decision is counted per
  (policy, action, decision) on the workload (`ferry_policy_decisions_total`), every denial per
  reason on the flow, and logged once per connection through `DenialLog`.
- `DenialLog`: at most `burst` lines at once and `rate` lines per second on average; what it
  drops is counted and reported with the next line that gets through, so a flood of denials cannot
  flood the log or slow the data path.
- `Guarded` connections: what was admitted under a policy is remembered with its facts; when the
  policy in force changes, `revoked(...)` lists the connections the new policy no longer allows,
  and the worker closes them at once (revocation that takes effect, not only for new
  connections).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from agent.policy.facts import Facts
from agent.policy.ratelimit import BucketStore
from agent.proxy.decide import Reason
from agent.proxy.workload import FlowStats, ServedWorkload

log = logging.getLogger("ferry.proxy.policy")


class DenialLog:
    """A bounded log of denials (token bucket over lines)."""

    def __init__(self, rate: float = 10.0, burst: int = 20,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = float(burst)
        self.stamp = clock()
        self.dropped = 0

    def denied(self, workload: ServedWorkload, facts: Facts, policy: str, rule: int | None,
               reason: str) -> None:  # fmt: skip
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            self.dropped += 1
            return
        self.tokens -= 1
        dropped, self.dropped = self.dropped, 0
        source = facts.source_principal or "plaintext"
        request = f" {facts.http.method} {facts.http.path}" if facts.http is not None else ""
        where = f" by {policy} rule {rule}" if policy and rule is not None else (
            f" by {policy}" if policy else "")  # fmt: skip
        more = f" ({dropped} more denial(s) not logged)" if dropped else ""
        log.warning("denied %s from %s (%s) to %s:%d%s%s: %s%s", workload.uid, source,
                    facts.source_ip, facts.destination_ip, facts.destination_port, request,
                    where, reason, more)  # fmt: skip


@dataclass
class Enforcer:
    buckets: BucketStore | None
    denials: DenialLog
    global_buckets: BucketStore | None = None  # `scope: global` limits (Redis), when configured
    clock: Callable[[], float] = time.monotonic

    def admit_connection(
        self, workload: ServedWorkload, facts: Facts, stats: FlowStats, *, http: bool = False
    ) -> bool:
        """Authorization at L4 (not for a connection whose requests are decided one by one,
        `http`), then a connection rate limit; counts and logs a denial."""
        policy = workload.policy
        if policy is None:
            return True
        if not http and not self.authorized(workload, facts, stats):
            return False
        limits = policy.rate_limits
        if limits is not None and self.buckets is not None:
            limited = limits.check(facts, self.buckets, self.clock(), self.global_buckets)
            if limited.policy:
                workload.count(limited.policy, "RATELIMIT", limited.allowed)
            if not limited.allowed:
                stats.deny(Reason.RATE_LIMITED)
                self.denials.denied(workload, facts, limited.policy, limited.rule,
                                    "connection rate limit")  # fmt: skip
                return False
        return True

    def authorized(self, workload: ServedWorkload, facts: Facts, stats: FlowStats) -> bool:
        """Authorization alone, counted and logged."""
        policy = workload.policy
        if policy is None:
            return True
        verdict = policy.authz.decide(facts)
        workload.count(verdict.policy, verdict.action, verdict.allowed)
        if not verdict.allowed:
            stats.deny(Reason.POLICY_DENIED)
            self.denials.denied(workload, facts, verdict.policy, verdict.rule, verdict.reason)
        return verdict.allowed

    @staticmethod
    def still_allowed(workload: ServedWorkload, facts: Facts) -> bool:
        """Whether the policy in force now allows an admitted connection (no rate limit: a
        connection that got its token keeps it)."""
        policy = workload.policy
        return policy is None or policy.authz.decide(facts).allowed


@dataclass(slots=True)
class Guard:
    """An admitted connection and what it was admitted with."""

    workload: ServedWorkload
    facts: Facts
    spliced: bool  # relayed raw since it was admitted at L4 (its requests never seen)


class Guarded:
    """Connections admitted under a policy, by their relay or stream object."""

    def __init__(self) -> None:
        self._guards: dict[Any, Guard] = {}

    def add(
        self, connection: Any, workload: ServedWorkload, facts: Facts, *, spliced: bool = False
    ) -> None:
        """Guard a connection: `facts` are what it was admitted with (its last allowed request
        when inspected); `spliced` if it was admitted at L4 and relayed raw."""
        self._guards[connection] = Guard(workload, facts, spliced)  # unpoliced too: policy may come

    def discard(self, connection: Any) -> None:
        self._guards.pop(connection, None)

    def revoked(
        self, workloads: Iterable[ServedWorkload] | None = None
    ) -> Iterator[tuple[Any, bool]]:
        """The connections (of `workloads`, or all) the policy in force no longer allows, each
        with whether to close it gracefully: a spliced connection to a port whose policy now
        needs request facts was not seen to break the policy, it just cannot be inspected any
        more; a FIN lets a keep-alive client reconnect (and be inspected) without an error."""
        only = None if workloads is None else {id(w) for w in workloads}
        for connection, guard in list(self._guards.items()):
            if only is not None and id(guard.workload) not in only:
                continue
            if not Enforcer.still_allowed(guard.workload, guard.facts):
                policy = guard.workload.policy
                port = guard.facts.destination_port
                yield connection, guard.spliced and policy is not None and policy.needs_http(port)

    def __len__(self) -> int:
        return len(self._guards)
