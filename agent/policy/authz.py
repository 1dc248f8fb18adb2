"""AuthorizationPolicy: its model, and the engine that decides over `Facts` for one workload (pure).

The model (`AuthorizationPolicy`, `Rule`, `Source`, `Operation`, `Condition`) is plain data that
`agent.policy.documents` builds from validated YAML; empty tuples are fields not set.

`WorkloadAuthz(policies, trust_domain=...)` takes the AuthorizationPolicies that select one
workload (`agent.policy.compile.compile_for` picks them: its namespace's and the root
namespace's) and compiles them once; `decide(facts)` then answers with a `Verdict`.  Istio's
semantics (see the policy-semantics note, sections 1.2-1.13):

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

Matching (1.6-1.12): strings are exact, `prefix*`, `*suffix`, or `*` (non-empty; present for
headers, hosts and methods); hosts compare case-insensitively, port included; paths are the
normalized path (`agent.policy.facts.normalize_path`), with `{*}`/`{**}` templates; principals
`<td>/ns/<ns>/sa/<sa>` compare with "spiffe://" prepended, and a principal written with trust
domain `cluster.local` means the configured trust domain; namespaces and service accounts are
read from the peer's SPIFFE ID (Ferry's are always `spiffe://td/ns/<ns>/sa/<sa>`, checked by
`agent.identity.spiffe`, so a namespace is the segment after `/ns/`); `remoteIpBlocks` and
`remote.ip` are the source IP (Ferry sees the client directly: no trusted proxies, no
X-Forwarded-For); JWT claims may be strings or lists of strings, nested with `[a][b]`, and the
`scope` and `permission` claims are split on spaces.

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

Cost.  Rules are indexed, per action and for L4 and HTTP separately, by destination port (rules
without a port restriction in their own list), then by the first selective source field: exact
principals in a dict, namespaces (exact, or pinned by principal prefixes such as
`td/ns/foo/*`) in a dict, IP blocks in per-prefix-length tables; rules with none of these
(suffix or `*` principals, negative fields only, no `from`) are scanned.  A rule found through
its port and key does not test them again.  A decision looks at the candidates of its port and
peer only, so 1,000 rules each naming their own peer or port cost about what one rule costs.
Verdicts of rules are built once; a decision allocates only when AUDIT policies match.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, ClassVar, Generic, Literal, TypeAlias, TypeVar

from agent.policy.facts import Facts

SPIFFE = "spiffe://"
CLUSTER_LOCAL = "cluster.local"
SPACE_DELIMITED_CLAIMS = frozenset({"scope", "permission"})

T = TypeVar("T")
Match = Callable[[T], bool]
Predicate = Callable[[Facts], bool]
Address = tuple[int, int]  # (IP version, address as an integer)


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


# --- the engine --------------------------------------------------------------------------------


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


# --- facts, parsed once per distinct value ----------------------------------------------------


@lru_cache(maxsize=4096)
def parse_ip(text: str) -> Address | None:
    """ "10.0.0.1" -> (4, 167772161); IPv4-mapped IPv6 counts as IPv4; None if not an address."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.version, int(address)


@lru_cache(maxsize=16384)
def parse_block(block: str) -> tuple[int, int, int]:
    """ "10.1.0.0/16" -> (4, 16, 0x0A01): version, host bits, network address >> host bits."""
    network = ipaddress.ip_network(block, strict=False)
    shift = network.max_prefixlen - network.prefixlen
    return network.version, shift, int(network.network_address) >> shift


@lru_cache(maxsize=4096)
def identity_of(principal: str) -> tuple[str, str, str] | None:
    """ "spiffe://td/ns/n/sa/s" -> ("td", "n", "s"); None for "" or anything else."""
    parts = principal.split("/")
    if len(parts) == 7 and parts[:2] == ["spiffe:", ""] and parts[3] == "ns" and parts[5] == "sa":
        return parts[2], parts[4], parts[6]
    return None


# --- matchers: one compiled function per value list --------------------------------------------


def _always(_: str) -> bool:
    return True


def _non_empty(value: str) -> bool:
    return value != ""


def string_matcher(
    patterns: Iterable[str], *, star_means_present: bool = False, fold_case: bool = False
) -> Match[str]:
    """Istio's string patterns: `*` (any non-empty value; any value at all, even empty, with
    `star_means_present`, as Envoy's present_match for headers, hosts and methods), `*suffix`,
    `prefix*` (both match the bare affix too), else exact.  `fold_case` for hosts."""
    exact: set[str] = set()
    prefixes: list[str] = []
    suffixes: list[str] = []
    for pattern in patterns:
        pattern = pattern.lower() if fold_case else pattern
        if pattern == "*":
            return _always if star_means_present else _non_empty
        if pattern.startswith("*"):
            suffixes.append(pattern[1:])
        elif pattern.endswith("*"):
            prefixes.append(pattern[:-1])
        else:
            exact.add(pattern)
    starts, ends, values = tuple(prefixes), tuple(suffixes), frozenset(exact)
    if not starts and not ends and not fold_case:
        return values.__contains__

    def match(value: str) -> bool:
        if fold_case:
            value = value.lower()
        return value in values or value.startswith(starts) or value.endswith(ends)

    return match


def with_trust_domain(principal: str, trust_domain: str) -> str:
    """A policy principal written with trust domain `cluster.local` names the local trust domain
    (Istio's trust-domain aliasing with no configured aliases); others stay as written."""
    parts = principal.split("/")
    if len(parts) == 5 and parts[0] == CLUSTER_LOCAL:
        return "/".join([trust_domain, *parts[1:]])
    return principal


def principal_matcher(patterns: Iterable[str], trust_domain: str) -> Match[str]:
    """Principals `<td>/ns/<ns>/sa/<sa>` against SPIFFE IDs: exact and `prefix*` with "spiffe://"
    prepended, `*suffix` as "spiffe://" + anything + suffix, `*` any non-empty ID."""
    exact: set[str] = set()
    prefixes: list[str] = []
    suffixes: list[str] = []
    for pattern in patterns:
        pattern = with_trust_domain(pattern, trust_domain)
        if pattern == "*":
            return _non_empty
        if pattern.startswith("*"):
            suffixes.append(pattern[1:])
        elif pattern.endswith("*"):
            prefixes.append(SPIFFE + pattern[:-1])
        else:
            exact.add(SPIFFE + pattern)
    starts, ends, values = tuple(prefixes), tuple(suffixes), frozenset(exact)
    if not starts and not ends:
        return values.__contains__
    size = len(SPIFFE)

    def match(value: str) -> bool:
        return (
            value in values
            or value.startswith(starts)
            or (value.startswith(SPIFFE) and value[size:].endswith(ends))
        )

    return match


def namespace_matcher(patterns: Iterable[str]) -> Match[str]:
    """Namespaces: Istio turns every `*` into `.*` (anywhere in the value), else exact."""
    exact = frozenset(p for p in patterns if "*" not in p)
    globs = [
        re.compile(".*".join(re.escape(part) for part in p.split("*")))
        for p in patterns
        if "*" in p
    ]
    if not globs:
        return exact.__contains__
    return lambda v: v in exact or any(g.fullmatch(v) for g in globs)


def _template(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\{\*\*\}|\{\*\})", pattern)
    return re.compile(
        "".join(
            "[^/]+" if part == TEMPLATE_ONE else ".*" if part == TEMPLATE_ANY else re.escape(part)
            for part in parts
        )
    )


def path_matcher(patterns: Iterable[str]) -> Match[str]:
    """Paths: string patterns as `string_matcher` (`*` non-empty), plus URI templates where `{*}`
    is one segment and `{**}` any rest."""
    patterns = list(patterns)
    templates = [_template(p) for p in patterns if is_path_template(p)]
    strings = string_matcher(p for p in patterns if not is_path_template(p))
    if not templates:
        return strings
    return lambda v: strings(v) or any(t.fullmatch(v) for t in templates)


class CidrTable(Generic[T]):
    """IP blocks -> items, looked up by address: one dict per (version, prefix length), so a
    lookup costs one dict probe per distinct prefix length, not one test per block."""

    __slots__ = ("_tables",)

    def __init__(self, entries: Iterable[tuple[str, T]] = ()) -> None:
        tables: dict[tuple[int, int], dict[int, list[T]]] = {}
        for block, item in entries:
            version, shift, key = parse_block(block)
            tables.setdefault((version, shift), {}).setdefault(key, []).append(item)
        self._tables = {
            version: tuple((shift, t) for (v, shift), t in sorted(tables.items()) if v == version)
            for version in (4, 6)
        }

    def find(self, address: Address) -> Iterator[list[T]]:
        """The items of every block containing `address`, one list per block."""
        version, value = address
        for shift, table in self._tables[version]:
            items = table.get(value >> shift)
            if items is not None:
                yield items

    def __contains__(self, address: Address) -> bool:
        return any(True for _ in self.find(address))


def _blocks(values: Iterable[str]) -> Match[Address]:
    table: CidrTable[None] = CidrTable((value, None) for value in values)
    return table.__contains__


def _any_element(match: Match[str]) -> Match[tuple[str, ...]]:
    return lambda values: any(match(v) for v in values)


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


def claim_values(claims: Mapping[str, Any], path: Sequence[str]) -> tuple[str, ...] | None:
    """The string values of a (nested) claim: a string is one value, a list gives its strings;
    `scope` and `permission` strings are split on spaces; anything else has no values."""
    value: Any = claims
    for name in path:
        if not isinstance(value, Mapping) or name not in value:
            return None
        value = value[name]
    if isinstance(value, str):
        if len(path) == 1 and path[0] in SPACE_DELIMITED_CLAIMS:
            return tuple(part for part in value.split(" ") if part)
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return None


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
class _Parts:
    """A rule's clauses by origin; None: the part is absent (or always holds in this mode)."""

    sources: Clause | None
    operations: Clause | None
    conditions: tuple[Clause, ...]


@dataclass(frozen=True, slots=True, eq=False)
class _Compiled:
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
class _Compiler:
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
            *_field(_source_ip, _blocks, s.ip_blocks, s.not_ip_blocks),
            *_field(_source_ip, _blocks, s.remote_ip_blocks, s.not_remote_ip_blocks),
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
        predicates = _field(_port, _port_set, o.ports, o.not_ports)
        if self.http:
            predicates += [
                *_field(_host, _host_matcher, o.hosts, o.not_hosts),
                *_field(_method, _present_matcher, o.methods, o.not_methods),
                *_field(_path, path_matcher, o.paths, o.not_paths),
            ]
        return tuple(predicates)

    def condition(self, c: Condition) -> list[Predicate]:
        key, values, not_values = c.key, c.values, c.not_values
        if key in ("source.ip", "remote.ip"):
            return _field(_source_ip, _blocks, values, not_values)
        if key == "destination.ip":
            return _field(_destination_ip, _blocks, values, not_values)
        if key == "destination.port":
            return _field(_port, _port_set, values, not_values)
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
            return _field(_audiences, _list_matcher, values, not_values)
        header = header_of(key)
        if header is not None:
            return _field(_header(header), _present_matcher, values, not_values)
        path = claim_path_of(key)
        if path is None:  # documents.check_condition_key refuses every other key
            raise ValueError(f"unknown attribute {key!r}")
        return _field(_claim(path), _list_matcher, values, not_values)

    def rule(self, rule: Rule) -> _Parts:
        """The clauses of a rule.  An alternative left without predicates matches everything, so
        its clause is dropped (that is how HTTP-only fields vanish from L4 DENY rules)."""

        def clause(alternatives: Clause) -> Clause | None:
            return alternatives if alternatives and all(alternatives) else None

        return _Parts(
            clause(tuple(self.source(s) for s in rule.sources)),
            clause(tuple(self.operation(o) for o in rule.operations)),
            tuple(((p,),) for c in rule.conditions for p in self.condition(c)),
        )


def _port_set(values: tuple[str, ...]) -> Match[int]:
    return frozenset(int(v) for v in values).__contains__


def _host_matcher(values: tuple[str, ...]) -> Match[str]:
    return string_matcher(values, star_means_present=True, fold_case=True)


def _present_matcher(values: tuple[str, ...]) -> Match[str]:
    return string_matcher(values, star_means_present=True)


def _list_matcher(values: tuple[str, ...]) -> Match[tuple[str, ...]]:
    return _any_element(string_matcher(values))


# --- where a rule can match: ports, peers ------------------------------------------------------

Ports = frozenset[int] | None  # None: every port


def _narrow(ports: Ports, other: Ports) -> Ports:
    if ports is None:
        return other
    return ports if other is None else ports & other


def _condition_ports(rule: Rule) -> Ports:
    ports: Ports = None
    for c in rule.conditions:
        if c.key == "destination.port" and c.values:
            ports = _narrow(ports, frozenset(int(v) for v in c.values))
    return ports


def _operation_ports(operation: Operation) -> Ports:
    return frozenset(int(p) for p in operation.ports) if operation.ports else None


def rule_ports(rule: Rule) -> Ports:
    """The ports a rule can match on (None: any)."""
    ports: Ports = None
    if rule.operations and all(o.ports for o in rule.operations):
        ports = frozenset(int(p) for o in rule.operations for p in o.ports)
    return _narrow(ports, _condition_ports(rule))


def http_ports(rule: Rule) -> Ports:
    """The ports on which the rule's HTTP-only attributes can matter (empty: none): the rule's
    ports if its `from` or `when` use them, else the ports of the operations that do."""
    if any(getattr(s, n) for s in rule.sources for n in HTTP_SOURCE_FIELDS) or any(
        is_http_condition(c.key) for c in rule.conditions
    ):
        return rule_ports(rule)
    ports: set[int] = set()
    for operation in rule.operations:
        if any(getattr(operation, n) for n in HTTP_OPERATION_FIELDS):
            narrowed = _narrow(_operation_ports(operation), _condition_ports(rule))
            if narrowed is None:
                return None
            ports |= narrowed
    return frozenset(ports)


PeerKey = tuple[str, tuple[str, ...]]  # ("principal" | "namespace" | "ip", values)
KEY_FIELDS = {"principal": "principals", "namespace": "namespaces", "ip": "ip_blocks"}


def _prefix_namespace(principal: str) -> str | None:
    """The namespace a principal prefix pins: "td/ns/foo/*" and "td/ns/foo/sa/web-*" -> "foo"."""
    parts = principal.split("/")
    pinned = len(parts) >= 4 and parts[1] == "ns" and "*" not in parts[2]
    if pinned and principal.endswith("*") and not principal.startswith("*"):
        return parts[2]
    return None


def _peer_key(source: Source, trust_domain: str) -> PeerKey | None:
    """How to find a source from the peer: its exact principals, else the namespaces its
    principal prefixes pin, else its exact namespaces, else its IP blocks; None when it has
    none of these (it is scanned)."""
    principals = [with_trust_domain(p, trust_domain) for p in source.principals]
    if principals and not any(p.startswith("*") or p.endswith("*") for p in principals):
        return "principal", tuple(SPIFFE + p for p in principals)
    pinned = [_prefix_namespace(p) for p in principals]
    if pinned and None not in pinned:
        return "namespace", tuple(dict.fromkeys(n for n in pinned if n is not None))
    if source.namespaces and not any("*" in n for n in source.namespaces):
        return "namespace", source.namespaces
    if source.ip_blocks:
        return "ip", source.ip_blocks
    return None


def _peer_keys(rule: Rule, trust_domain: str) -> list[PeerKey] | None:
    """One key per source; None if the rule has no `from` or a source without a key."""
    keys = [_peer_key(source, trust_domain) for source in rule.sources]
    if not keys or None in keys:
        return None
    return [key for key in keys if key is not None]


def _key_proves_from(rule: Rule, keys: list[PeerKey] | None, http: bool) -> bool:
    """True if finding the rule under its key proves its `from`: one source, made only of the
    keyed field (request principals do not count at L4, where they are dropped)."""
    if keys is None or len(rule.sources) != 1:
        return False
    source = rule.sources[0]
    if not http:
        source = replace(source, request_principals=(), not_request_principals=())
    name = KEY_FIELDS[keys[0][0]]
    return bool(getattr(source, name)) and source == Source(**{name: getattr(source, name)})


def _port_proves_to(rule: Rule, http: bool) -> bool:
    """True if finding the rule under a port proves its `to`: every operation is only `ports`
    (HTTP fields do not count at L4, where they are dropped)."""
    return bool(rule.operations) and all(
        o.ports
        and not o.not_ports
        and not (http and any(getattr(o, name) for name in HTTP_OPERATION_FIELDS))
        for o in rule.operations
    )


@dataclass(frozen=True, slots=True)
class _Shape:
    """A rule compiled for one mode (L4 or HTTP), and how the index may find it."""

    parts: _Parts
    ports: Ports
    keys: list[PeerKey] | None
    key_proves_from: bool
    port_proves_to: bool


@lru_cache(maxsize=16384)
def _shape(rule: Rule, namespace: str, trust_domain: str, http: bool) -> _Shape:
    """Compile one rule (of a policy in `namespace`) for one mode.  Cached: rules are frozen
    data, so every workload a policy selects, and every new version of a policy set that keeps
    the rule, reuses the compiled predicates."""
    keys = _peer_keys(rule, trust_domain)
    return _Shape(
        _Compiler(namespace, trust_domain, http).rule(rule),
        rule_ports(rule),
        keys,
        _key_proves_from(rule, keys, http),
        _port_proves_to(rule, http),
    )


@dataclass(eq=False)
class _Entry:
    """One rule of one workload's policies in one mode: where it stands and what it says."""

    order: int  # position among all rules of the workload: the first match is reported
    policy: str
    verdict: Verdict
    shape: _Shape
    variants: dict[tuple[bool, bool], _Compiled] = field(default_factory=dict)

    def compiled(self, from_known: bool, to_known: bool) -> _Compiled:
        """The rule without the clauses its bucket already proves (one object per variant)."""
        variant = self.variants.get((from_known, to_known))
        if variant is None:
            parts = self.shape.parts
            clauses = [
                clause
                for clause in (
                    None if from_known else parts.sources,
                    None if to_known else parts.operations,
                    *parts.conditions,
                )
                if clause is not None
            ]
            variant = _Compiled(self.order, self.policy, tuple(clauses), self.verdict)
            self.variants[from_known, to_known] = variant
        return variant


def _append(rules: list[_Compiled], rule: _Compiled) -> None:
    if not rules or rules[-1] is not rule:  # two keys of one rule in one list: listed once
        rules.append(rule)


def _scan(rules: Sequence[_Compiled], facts: Facts, best: _Compiled | None) -> _Compiled | None:
    """The first matching rule of `rules` (sorted by order) if it comes before `best`."""
    for rule in rules:
        if best is not None and rule.order >= best.order:
            return best
        if rule.matches(facts):
            return rule
    return best


class _Peers:
    """The rules of one port bucket (or of the rules for every port), by how the peer finds
    them; every list is sorted by order.  An attribute is None when it holds nothing."""

    __slots__ = ("general", "ips", "namespaces", "principals")

    def __init__(self, entries: Iterable[_Entry], port_bucket: bool) -> None:
        principals: dict[str, list[_Compiled]] = {}
        namespaces: dict[str, list[_Compiled]] = {}
        ips: list[tuple[str, _Compiled]] = []
        general: list[_Compiled] = []
        for entry in entries:
            shape = entry.shape
            to_known = port_bucket and shape.port_proves_to
            if shape.keys is None:
                general.append(entry.compiled(False, to_known))
                continue
            rule = entry.compiled(shape.key_proves_from, to_known)
            for kind, values in shape.keys:
                for value in values:
                    if kind == "principal":
                        _append(principals.setdefault(value, []), rule)
                    elif kind == "namespace":
                        _append(namespaces.setdefault(value, []), rule)
                    else:
                        ips.append((value, rule))
        self.principals = principals or None
        self.namespaces = namespaces or None
        self.ips = CidrTable(ips) if ips else None
        self.general = general or None

    def candidates(self, facts: Facts) -> Iterator[list[_Compiled]]:
        """Lists (each sorted by order) holding every rule that can match this peer."""
        if self.principals is not None:
            rules = self.principals.get(facts.source_principal)
            if rules is not None:
                yield rules
        if self.namespaces is not None:
            identity = identity_of(facts.source_principal)
            rules = self.namespaces.get(identity[1]) if identity else None
            if rules is not None:
                yield rules
        if self.ips is not None:
            address = parse_ip(facts.source_ip)
            if address is not None:
                yield from self.ips.find(address)
        if self.general is not None:
            yield self.general

    def first(self, facts: Facts, best: _Compiled | None) -> _Compiled | None:
        """`candidates`, scanned for the first match (written out: this is the hot path)."""
        if self.principals is not None:
            rules = self.principals.get(facts.source_principal)
            if rules is not None:
                best = _scan(rules, facts, best)
        if self.namespaces is not None:
            identity = identity_of(facts.source_principal)
            rules = self.namespaces.get(identity[1]) if identity else None
            if rules is not None:
                best = _scan(rules, facts, best)
        if self.ips is not None:
            address = parse_ip(facts.source_ip)
            if address is not None:
                for rules in self.ips.find(address):
                    best = _scan(rules, facts, best)
        if self.general is not None:
            best = _scan(self.general, facts, best)
        return best


class _Index:
    """The rules of one action for L4 or HTTP: by destination port, then by peer."""

    __slots__ = ("_any_port", "_by_port")

    def __init__(self, entries: Sequence[_Entry]) -> None:
        by_port: dict[int, list[_Entry]] = {}
        for entry in entries:
            for port in entry.shape.ports or ():
                by_port.setdefault(port, []).append(entry)
        self._by_port = {port: _Peers(group, True) for port, group in by_port.items()}
        any_port = [entry for entry in entries if entry.shape.ports is None]
        self._any_port = _Peers(any_port, False) if any_port else None

    def first(self, facts: Facts) -> _Compiled | None:
        """The first rule (in policy order) that matches."""
        peers = self._by_port.get(facts.destination_port)
        best = peers.first(facts, None) if peers is not None else None
        return best if self._any_port is None else self._any_port.first(facts, best)

    def matching(self, facts: Facts) -> tuple[str, ...]:
        """The policies with a rule that matches, in policy order (a policy's rules are
        consecutive in the order, so any matching rule places its policy)."""
        found: dict[str, int] = {}
        for peers in (self._by_port.get(facts.destination_port), self._any_port):
            for rules in peers.candidates(facts) if peers is not None else ():
                for rule in rules:
                    if rule.policy not in found and rule.matches(facts):
                        found[rule.policy] = rule.order
        return tuple(sorted(found, key=found.__getitem__))


def _index(entries: Sequence[_Entry]) -> _Index | None:
    return _Index(entries) if entries else None


@dataclass(frozen=True, slots=True)
class _Tables:
    deny: _Index | None
    allow: _Index | None
    audit: _Index | None


ACTION_VERDICT = {"ALLOW": (True, "allowed_by_policy"), "DENY": (False, "denied_by_policy")}


class WorkloadAuthz:
    """The AuthorizationPolicies of one workload, compiled; immutable, shared by reference."""

    __slots__ = ("_has_allow", "_http", "_http_all", "_http_ports", "_l4", "policies")

    def __init__(self, policies: Sequence[AuthorizationPolicy], *, trust_domain: str) -> None:
        """`policies` in the order their matches are reported (root namespace first)."""
        self.policies = tuple(p.ref for p in policies)
        self._has_allow = any(p.action == "ALLOW" for p in policies)
        entries: dict[tuple[bool, str], list[_Entry]] = {
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
                    shape = _shape(rule, policy.namespace, trust_domain, http and uses_http)
                    entry = _Entry(order, policy.ref, verdict, shape)
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
