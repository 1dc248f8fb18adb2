"""AuthorizationPolicy rules compiled to predicates over `Facts` (pure).

A field of a rule becomes predicates: a getter reads the attribute from `Facts` (None: the
connection does not have it) and a matcher of `agent.policy.authz_match` tests the value.  A
field with `values` adds a positive predicate, one with `notValues` a negative one; a missing
attribute fails every positive predicate and satisfies every negative one (semantics 1.5).

`Compiler(namespace, trust_domain, http).rule(rule)` gives the rule's `Parts`: one clause for its
`from`, one for its `to`, one per `when` predicate, each clause an OR of alternatives, each an
AND of predicates.  At L4 (`http` False) the HTTP-only attributes (semantics 1.13) compile to no
predicate, i.e. they match; an alternative left without predicates matches everything, so its
clause is dropped (see `agent.policy.authz_engine` for what L4 decisions do with that).
`Compiled` is one rule as the index holds it: the clauses it still has to test, and its verdict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from agent.policy.authz import (
    Condition,
    Operation,
    Rule,
    Source,
    Verdict,
    claim_path_of,
    header_of,
)
from agent.policy.authz_match import (
    Address,
    Match,
    blocks,
    claim_values,
    host_matcher,
    identity_of,
    list_matcher,
    namespace_matcher,
    parse_ip,
    path_matcher,
    port_set,
    present_matcher,
    principal_matcher,
    string_matcher,
)
from agent.policy.facts import Facts

T = TypeVar("T")
Predicate = Callable[[Facts], bool]


# --- attribute getters: value or None (the connection does not have it) ------------------------


def _principal(f: Facts) -> str | None:
    return f.source_principal or None


def _namespace(f: Facts) -> str | None:
    identity = identity_of(f.source_principal)
    return identity[1] if identity else None


def _service_account(f: Facts) -> tuple[str, str] | None:
    identity = identity_of(f.source_principal)
    return (identity[1], identity[2]) if identity else None


def _source_ip(f: Facts) -> Address | None:
    return parse_ip(f.source_ip)


def _destination_ip(f: Facts) -> Address | None:
    return parse_ip(f.destination_ip)


def _port(f: Facts) -> int:
    return f.destination_port


def _method(f: Facts) -> str | None:
    return f.http.method if f.http else None


def _path(f: Facts) -> str | None:
    return f.http.path if f.http else None


def _host(f: Facts) -> str | None:
    return (f.http.host or None) if f.http else None


def _request_principal(f: Facts) -> str | None:
    jwt = f.http.jwt if f.http else None
    return (jwt.principal or None) if jwt else None


def _presenter(f: Facts) -> str | None:
    jwt = f.http.jwt if f.http else None
    return (jwt.presenter or None) if jwt else None


def _audiences(f: Facts) -> tuple[str, ...] | None:
    jwt = f.http.jwt if f.http else None
    return (jwt.audiences or None) if jwt else None


def _header(name: str) -> Callable[[Facts], str | None]:
    return lambda f: f.http.headers.get(name) if f.http else None


def _claim(path: tuple[str, ...]) -> Callable[[Facts], tuple[str, ...] | None]:
    def get(f: Facts) -> tuple[str, ...] | None:
        jwt = f.http.jwt if f.http else None
        return claim_values(jwt.claims, path) if jwt else None

    return get


def _present(get: Callable[[Facts], T | None], match: Match[T]) -> Predicate:
    def positive(f: Facts) -> bool:
        value = get(f)
        return value is not None and match(value)

    return positive


def _absent(get: Callable[[Facts], T | None], match: Match[T]) -> Predicate:
    def negative(f: Facts) -> bool:
        value = get(f)
        return value is None or not match(value)

    return negative


def _field(
    get: Callable[[Facts], T | None],
    matcher: Callable[[tuple[str, ...]], Match[T]],
    values: tuple[str, ...],
    not_values: tuple[str, ...],
) -> list[Predicate]:
    """The predicates of one field: value in `values` (if set) and not in `not_values`."""
    predicates = []
    if values:
        predicates.append(_present(get, matcher(values)))
    if not_values:
        predicates.append(_absent(get, matcher(not_values)))
    return predicates


# --- rules -------------------------------------------------------------------------------------


Clause = tuple[tuple[Predicate, ...], ...]  # OR of alternatives, each an AND of predicates


@dataclass(frozen=True, slots=True)
class Parts:
    """A rule's clauses by origin; None: the part is absent (or always holds in this mode)."""

    sources: Clause | None
    operations: Clause | None
    conditions: tuple[Clause, ...]


@dataclass(frozen=True, slots=True, eq=False)
class Compiled:
    """One rule of one policy as predicates: an AND of clauses, each an OR of alternatives, each
    an AND of predicates (from / to alternatives; one clause per `when`)."""

    order: int  # position among all rules of the workload: the first match is reported
    policy: str
    clauses: tuple[Clause, ...]
    verdict: Verdict

    def matches(self, facts: Facts) -> bool:
        for alternatives in self.clauses:
            for predicates in alternatives:
                for predicate in predicates:
                    if not predicate(facts):
                        break
                else:
                    break  # this alternative holds: the clause does
            else:
                return False
        return True


@dataclass(frozen=True)
class Compiler:
    """Turns one policy's rules into predicates, for HTTP (`http`) or for L4."""

    namespace: str  # the policy's: bare service accounts belong to it
    trust_domain: str
    http: bool

    def _principals(self, values: tuple[str, ...]) -> Match[str]:
        return principal_matcher(values, self.trust_domain)

    def source(self, s: Source) -> tuple[Predicate, ...]:
        predicates = [
            *_field(_principal, self._principals, s.principals, s.not_principals),
            *_field(_namespace, namespace_matcher, s.namespaces, s.not_namespaces),
            *_field(_source_ip, blocks, s.ip_blocks, s.not_ip_blocks),
            *_field(_source_ip, blocks, s.remote_ip_blocks, s.not_remote_ip_blocks),
            *_field(_service_account, self._accounts, s.service_accounts, s.not_service_accounts),
        ]
        if self.http:
            predicates += _field(
                _request_principal, string_matcher, s.request_principals, s.not_request_principals
            )
        return tuple(predicates)

    def _accounts(self, values: tuple[str, ...]) -> Match[tuple[str, str]]:
        pairs = frozenset(
            (ns, sa) if sep else (self.namespace, ns)
            for ns, sep, sa in (v.partition("/") for v in values)
        )
        return pairs.__contains__

    def operation(self, o: Operation) -> tuple[Predicate, ...]:
        predicates = _field(_port, port_set, o.ports, o.not_ports)
        if self.http:
            predicates += [
                *_field(_host, host_matcher, o.hosts, o.not_hosts),
                *_field(_method, present_matcher, o.methods, o.not_methods),
                *_field(_path, path_matcher, o.paths, o.not_paths),
            ]
        return tuple(predicates)

    def condition(self, c: Condition) -> list[Predicate]:
        key, values, not_values = c.key, c.values, c.not_values
        if key in ("source.ip", "remote.ip"):
            return _field(_source_ip, blocks, values, not_values)
        if key == "destination.ip":
            return _field(_destination_ip, blocks, values, not_values)
        if key == "destination.port":
            return _field(_port, port_set, values, not_values)
        if key == "source.namespace":
            return _field(_namespace, namespace_matcher, values, not_values)
        if key == "source.principal":
            return _field(_principal, self._principals, values, not_values)
        if not self.http:  # an HTTP-only key, dropped at L4 (treated as matching)
            return []
        if key == "request.auth.principal":
            return _field(_request_principal, string_matcher, values, not_values)
        if key == "request.auth.presenter":
            return _field(_presenter, string_matcher, values, not_values)
        if key == "request.auth.audiences":
            return _field(_audiences, list_matcher, values, not_values)
        header = header_of(key)
        if header is not None:
            return _field(_header(header), present_matcher, values, not_values)
        path = claim_path_of(key)
        if path is None:  # documents.check_condition_key refuses every other key
            raise ValueError(f"unknown attribute {key!r}")
        return _field(_claim(path), list_matcher, values, not_values)

    def rule(self, rule: Rule) -> Parts:
        """The clauses of a rule.  An alternative left without predicates matches everything, so
        its clause is dropped (that is how HTTP-only fields vanish from L4 DENY rules)."""

        def clause(alternatives: Clause) -> Clause | None:
            return alternatives if alternatives and all(alternatives) else None

        return Parts(
            clause(tuple(self.source(s) for s in rule.sources)),
            clause(tuple(self.operation(o) for o in rule.operations)),
            tuple(((p,),) for c in rule.conditions for p in self.condition(c)),
        )
