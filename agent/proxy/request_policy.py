"""One HTTP request against a workload's policy: JWT, then authorization, then rate limits.

The order is Istio's HTTP filter chain (semantics note, CHAIN): `jwt_authn` first (a token that
fails validation is answered 401, an audience mismatch 403, before any authorization runs; no
token passes with no request principal), then RBAC (DENY before ALLOW: 403), then the local rate
limit (429 with `retry-after` and `x-ratelimit-*`).  An allowed request goes on with the header
changes the JWT rule asks for (the token removed unless `forwardOriginalToken`, payload or
claims added as headers), and with the normalized path when it differs from the one sent, as
Envoy forwards it: the backend reads the path that policy decided on.  A target whose path
cannot be normalized (`%00`, not absolute) is a 400.

`RequestChecker.check(workload, base, method, target, path, query, host, headers)` answers
`Allowed` or `Denied` (with the `responses.Denial` to send), counts the decision on the workload
and logs a denial through the enforcer's bounded log.  Shared by the HTTP/1.1 and HTTP/2 paths.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from agent.policy.facts import Facts, HttpFacts, fold_headers, normalize_path
from agent.policy.jwt import is_cors_preflight, www_authenticate
from agent.proxy.decide import Reason
from agent.proxy.enforce import Enforcer
from agent.proxy.responses import BAD_REQUEST, Denial, RateLimitHeaders
from agent.proxy.workload import FlowStats, ServedWorkload


@dataclass(frozen=True, slots=True)
class Allowed:
    remove_headers: tuple[str, ...] = ()
    set_headers: tuple[tuple[str, str], ...] = ()
    facts: Facts | None = None  # what the request was allowed with (None: no policy)
    path: str = ""  # the normalized path to forward, when it differs from the one sent


@dataclass(frozen=True, slots=True)
class Denied:
    denial: Denial


ALLOWED = Allowed()


@dataclass
class RequestChecker:
    enforcer: Enforcer

    def check(
        self,
        workload: ServedWorkload,
        stats: FlowStats,
        base: Facts,
        method: str,
        path: str,
        query: str,
        host: str,
        headers: Sequence[tuple[str, str]],
    ) -> Allowed | Denied:
        policy = workload.policy
        if policy is None:
            return ALLOWED
        normal = path if method == "CONNECT" or path == "*" else normalize_path(path)
        if normal is None:
            stats.deny(Reason.BAD_AUTHORITY)
            return Denied(Denial(BAD_REQUEST, message=f"path {path[:200]!r} is not valid"))
        folded = fold_headers(headers)
        http = HttpFacts(method, normal, host, folded)
        changes: tuple[tuple[str, ...], tuple[tuple[str, str], ...]] = ((), ())
        if policy.jwt is not None and not is_cors_preflight(method, folded):  # as Envoy
            outcome = policy.jwt.authenticate(folded, query, time.time())
            if outcome.status:
                workload.count("", "JWT", False)
                stats.deny(Reason.UNAUTHENTICATED)
                facts = Facts(base.source_principal, base.source_ip, base.destination_ip,
                              base.destination_port, http)  # fmt: skip
                self.enforcer.denials.denied(workload, facts, "", None, outcome.reason)
                challenge = www_authenticate("http", host, normal)
                return Denied(Denial(outcome.status, message=outcome.reason,
                                     www_authenticate=challenge))  # fmt: skip
            http = HttpFacts(method, normal, host, folded, outcome.facts)
            changes = (outcome.remove_headers, outcome.set_headers)
        facts = Facts(base.source_principal, base.source_ip, base.destination_ip,
                      base.destination_port, http)  # fmt: skip
        verdict = policy.authz.decide(facts)
        workload.count(verdict.policy, verdict.action, verdict.allowed)
        if not verdict.allowed:
            stats.deny(Reason.POLICY_DENIED)
            self.enforcer.denials.denied(workload, facts, verdict.policy, verdict.rule,
                                         verdict.reason)  # fmt: skip
            return Denied(Denial(403, denied_by=verdict.policy or policy.authz.allow_refs))
        limits, buckets = policy.rate_limits, self.enforcer.buckets
        if limits is not None and buckets is not None:
            limited = limits.check(facts, buckets, self.enforcer.clock(),
                                   self.enforcer.global_buckets)  # fmt: skip
            if limited.policy:
                workload.count(limited.policy, "RATELIMIT", limited.allowed)
            if not limited.allowed:
                stats.deny(Reason.RATE_LIMITED)
                self.enforcer.denials.denied(workload, facts, limited.policy, limited.rule,
                                             "rate limited")  # fmt: skip
                headers_ = RateLimitHeaders(limited.limit, limited.remaining,
                                            limited.reset_seconds, limited.retry_after)  # fmt: skip
                return Denied(Denial(429, denied_by=limited.policy, rate_limit=headers_))
        return Allowed(changes[0], changes[1], facts, normal if normal != path else "")
