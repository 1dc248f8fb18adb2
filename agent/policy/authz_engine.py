"""AuthorizationPolicy engine: `WorkloadAuthz` decides over `Facts` for one workload (pure).

`WorkloadAuthz(policies, trust_domain=...)` takes the AuthorizationPolicies that select one
workload (`agent.policy.compile.compile_for` picks them: its namespace's and the root
namespace's) and compiles them once (`agent.policy.authz_index`, per action, for L4 and for HTTP);
`decide(facts)` then answers with a `Verdict` by Istio's semantics (the table in
`agent.policy.authz`): the first matching DENY rule, else the first matching ALLOW rule if an
ALLOW policy applies, with the matching AUDIT policies added.  Verdicts of rules are built once; a
decision allocates only when AUDIT policies match.

L4 and HTTP.  `decide` with `facts.http` None is an L4 decision, made as Envoy does on a TCP
filter chain: an ALLOW rule that uses any HTTP-only attribute (hosts, methods, paths,
requestPrincipals, request.headers, request.auth.*) is dropped, so it never matches at L4 (the
ALLOW policy still exists, so a port left with nothing that matches is denied); in a DENY (or
AUDIT) rule only the HTTP-only attributes are dropped and treated as matching, the safe
sidecar behaviour: a DENY made only of HTTP attributes denies all L4 traffic in its scope.
`needs_http(port)` is true when any rule of any action that can apply on that port uses an
HTTP-only attribute; the proxy inspects HTTP on such ports and decides each request with
`facts.http` set, so on those ports an L4 decision only serves traffic that turns out not to be
HTTP (and must not be used as an early check before the requests are seen).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from agent.policy.authz import (
    NO_ALLOW_MATCH,
    NO_POLICY,
    AuthorizationPolicy,
    Verdict,
    rule_uses_http,
)
from agent.policy.authz_index import Entry, Index, http_ports, rule_shape
from agent.policy.facts import Facts


def _index(entries: Sequence[Entry]) -> Index | None:
    return Index(entries) if entries else None


@dataclass(frozen=True, slots=True)
class _Tables:
    deny: Index | None
    allow: Index | None
    audit: Index | None


ACTION_VERDICT = {"ALLOW": (True, "allowed_by_policy"), "DENY": (False, "denied_by_policy")}


class WorkloadAuthz:
    """The AuthorizationPolicies of one workload, compiled; immutable, shared by reference."""

    __slots__ = ("_has_allow", "_http", "_http_all", "_http_ports", "_l4", "allow_refs", "policies")

    def __init__(self, policies: Sequence[AuthorizationPolicy], *, trust_domain: str) -> None:
        """`policies` in the order their matches are reported (root namespace first)."""
        self.policies = tuple(p.ref for p in policies)
        # what denies a request that no ALLOW rule matched: every ALLOW policy, comma-separated
        self.allow_refs = ",".join(p.ref for p in policies if p.action == "ALLOW")
        self._has_allow = bool(self.allow_refs)
        entries: dict[tuple[bool, str], list[Entry]] = {
            (http, action): [] for http in (False, True) for action in ("ALLOW", "DENY", "AUDIT")
        }
        needs: set[int] = set()
        needs_all = False
        order = 0
        for policy in policies:
            allowed, reason = ACTION_VERDICT.get(policy.action, (True, ""))
            for index, rule in enumerate(policy.rules):
                verdict = Verdict(allowed, policy.ref, index, policy.action, reason)
                uses_http = rule_uses_http(rule)
                for http in (False, True):
                    if not http and uses_http and policy.action == "ALLOW":
                        continue  # Envoy drops the whole rule on a TCP chain
                    # without HTTP fields a rule compiles the same for both modes: compile once
                    shape = rule_shape(rule, policy.namespace, trust_domain, http and uses_http)
                    entry = Entry(order, policy.ref, verdict, shape)
                    entries[http, policy.action].append(entry)
                if uses_http:
                    ports_needing = http_ports(rule)
                    needs_all = needs_all or ports_needing is None
                    needs |= ports_needing or set()
                order += 1
        self._l4, self._http = (
            _Tables(
                _index(entries[http, "DENY"]),
                _index(entries[http, "ALLOW"]),
                _index(entries[http, "AUDIT"]),
            )
            for http in (False, True)
        )
        self._http_all = needs_all
        self._http_ports = frozenset(needs)

    def needs_http(self, port: int) -> bool:
        """True if a rule (any action) that can apply on `port` uses HTTP-only attributes."""
        return self._http_all or port in self._http_ports

    def decide(self, facts: Facts) -> Verdict:
        """Deny if a DENY rule matches; else allow if no ALLOW policy applies or an ALLOW rule
        matches; else deny.  `facts.http` None: an L4 decision (see the module docstring)."""
        if not self.policies:
            return NO_POLICY
        tables = self._l4 if facts.http is None else self._http
        rule = None if tables.deny is None else tables.deny.first(facts)
        if rule is None and self._has_allow:
            rule = None if tables.allow is None else tables.allow.first(facts)
            verdict = NO_ALLOW_MATCH if rule is None else rule.verdict
        else:
            verdict = NO_POLICY if rule is None else rule.verdict
        if tables.audit is not None:
            audit = tables.audit.matching(facts)
            if audit:
                return replace(verdict, audit=audit)
        return verdict
