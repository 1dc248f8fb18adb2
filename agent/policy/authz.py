"""AuthorizationPolicy: its model and its semantics (pure).

The model (`AuthorizationPolicy`, `Rule`, `Source`, `Operation`, `Condition`) is plain data that
`agent.policy.documents` builds from validated YAML; empty tuples are fields not set.  A decision
answers with a `Verdict`.

`agent.policy.authz_engine.WorkloadAuthz` decides for one workload with Istio's semantics (see
the policy-semantics note, sections 1.2-1.13):

    any DENY rule matches                       -> deny   ("denied_by_policy")
    no ALLOW policy applies                     -> allow  ("no_policy")
    any ALLOW rule matches                      -> allow  ("allowed_by_policy")
    otherwise                                   -> deny   ("no_allow_match", policy "")

AUDIT policies never decide; the ones that match are listed in `Verdict.audit`.  A policy is an
OR of its rules (none: it matches nothing, so `spec: {}` ALLOW allows nothing); a rule is
OR(from) AND OR(to) AND AND(when) (`{}` matches everything); a source or operation ANDs the
fields it sets; a field matches when its value matches one of `values` and none of `notValues`.
An attribute the connection does not have (no mTLS principal, no JWT, no header) fails every
positive match and satisfies every negative one (semantics 1.5).

AuthorizationPolicy is five modules, one concern each; each docstring says how its part works:

- this module: the model, the attribute keys (`header_of`, `claim_path_of`, path templates) and
  which attributes exist only in an HTTP request (`rule_uses_http`, semantics 1.13);
- `agent.policy.authz_match`: how values match (semantics 1.6-1.12): strings, principals,
  namespaces, paths, IP blocks, JWT claims;
- `agent.policy.authz_rules`: a rule compiled to predicates over `Facts`, for L4 or for HTTP;
- `agent.policy.authz_index`: which rules can match a connection, by destination port and peer;
- `agent.policy.authz_engine`: `WorkloadAuthz`, the decision, and L4 against HTTP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Literal, TypeAlias

# --- the model: AuthorizationPolicy as plain data (read by agent.policy.documents) ---------

Action: TypeAlias = Literal["ALLOW", "DENY", "AUDIT"]
Labels: TypeAlias = tuple[tuple[str, str], ...]  # sorted (key, value); () selects every workload


@dataclass(frozen=True, slots=True)
class Source:
    """`rules[].from[].source`: fields set are ANDed; an empty tuple is a field not set."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()
    not_service_accounts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Operation:
    """`rules[].to[].operation`: fields set are ANDed; an empty tuple is a field not set."""

    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Condition:
    """`rules[].when[]`: the attribute `key` matches one of `values` and none of `not_values`."""

    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: any source AND any operation AND every condition.  An empty tuple is a part that
    is absent (validation refuses present-but-empty lists), so `Rule()` matches everything."""

    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()
    conditions: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    """One policy: `namespace`/`name`, the workloads it selects, its action and rules."""

    kind: ClassVar[str] = "AuthorizationPolicy"
    name: str
    namespace: str
    selector: Labels = ()
    action: Action = "ALLOW"
    rules: tuple[Rule, ...] = ()  # none: matches nothing (ALLOW: allows nothing)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


HEADER_KEY = "request.headers"
CLAIMS_KEY = "request.auth.claims"


def header_of(key: str) -> str | None:
    """`request.headers[X-Token]` -> "x-token" (header names are case-insensitive); None if
    `key` is not a well-formed header key."""
    if key.startswith(HEADER_KEY + "[") and key.endswith("]"):
        name = key[len(HEADER_KEY) + 1 : -1]
        if name and "[" not in name and "]" not in name:
            return name.lower()
    return None


def claim_path_of(key: str) -> tuple[str, ...] | None:
    """`request.auth.claims[a][b]` -> ("a", "b") (nested claims, brackets only: `[a.b]` is one
    claim literally named "a.b"); None if `key` is not a well-formed claims key."""
    if not key.startswith(CLAIMS_KEY + "["):
        return None
    names = re.fullmatch(r"(\[[^\[\]]+\])+", key[len(CLAIMS_KEY) :])
    if names is None:
        return None
    return tuple(re.findall(r"\[([^\[\]]+)\]", names.group(0)))


TEMPLATE_ONE = "{*}"
TEMPLATE_ANY = "{**}"


def is_path_template(value: str) -> bool:
    return TEMPLATE_ONE in value or TEMPLATE_ANY in value


HTTP_SOURCE_FIELDS = ("request_principals", "not_request_principals")
HTTP_OPERATION_FIELDS = ("hosts", "not_hosts", "methods", "not_methods", "paths", "not_paths")


def is_http_condition(key: str) -> bool:
    """True for `when` keys that exist only in an HTTP request (semantics 1.13)."""
    return key.startswith((HEADER_KEY, "request.auth."))


def rule_uses_http(rule: Rule) -> bool:
    """True if any part of the rule needs HTTP request attributes (semantics 1.13)."""
    return (
        any(getattr(s, name) for s in rule.sources for name in HTTP_SOURCE_FIELDS)
        or any(getattr(o, name) for o in rule.operations for name in HTTP_OPERATION_FIELDS)
        or any(is_http_condition(c.key) for c in rule.conditions)
    )


# --- the verdict: what a decision answers --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    policy: str  # "<namespace>/<name>" that decided; "" when none (default allow, no match)
    rule: int | None  # index of the matching rule in that policy
    action: str  # "ALLOW" | "DENY" | "" (no policy)
    reason: str  # "denied_by_policy", "no_allow_match", "allowed_by_policy", "no_policy"
    audit: tuple[str, ...] = ()  # AUDIT policies that matched ("ns/name")


NO_POLICY = Verdict(True, "", None, "", "no_policy")
NO_ALLOW_MATCH = Verdict(False, "", None, "ALLOW", "no_allow_match")
