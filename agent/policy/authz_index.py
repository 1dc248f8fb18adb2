"""AuthorizationPolicy index: which rules of one workload can match a connection (pure).

Rules are indexed, per action and for L4 and HTTP separately, by destination port (rules
without a port restriction in their own list), then by the first selective source field: exact
principals in a dict, namespaces (exact, or pinned by principal prefixes such as
`td/ns/foo/*`) in a dict, IP blocks in per-prefix-length tables; rules with none of these
(suffix or `*` principals, negative fields only, no `from`) are scanned.  A rule found through
its port and key does not test them again.  A decision looks at the candidates of its port and
peer only, so 1,000 rules each naming their own peer or port cost about what one rule costs.

`rule_shape` compiles a rule for one mode (`agent.policy.authz_rules`) with what the index needs:
its ports, its peer keys, and whether its key proves its `from` and its port its `to`.  Cached:
rules are frozen data, so every workload and policy-set version that keeps a rule reuses it.  An
`Entry` places a shape among a workload's rules; an `Index` holds the entries of one action in
one mode and finds the first match (`first`) or every matching policy (`matching`, for AUDIT).
`http_ports` tells on which ports a rule's HTTP-only attributes matter.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

from agent.policy.authz import (
    HTTP_OPERATION_FIELDS,
    HTTP_SOURCE_FIELDS,
    Operation,
    Rule,
    Source,
    Verdict,
    is_http_condition,
)
from agent.policy.authz_match import SPIFFE, CidrTable, identity_of, parse_ip, with_trust_domain
from agent.policy.authz_rules import Compiled, Compiler, Parts
from agent.policy.facts import Facts

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

    parts: Parts
    ports: Ports
    keys: list[PeerKey] | None
    key_proves_from: bool
    port_proves_to: bool


@lru_cache(maxsize=16384)
def rule_shape(rule: Rule, namespace: str, trust_domain: str, http: bool) -> _Shape:
    """Compile one rule (of a policy in `namespace`) for one mode.  Cached: rules are frozen
    data, so every workload a policy selects, and every new version of a policy set that keeps
    the rule, reuses the compiled predicates."""
    keys = _peer_keys(rule, trust_domain)
    return _Shape(
        Compiler(namespace, trust_domain, http).rule(rule),
        rule_ports(rule),
        keys,
        _key_proves_from(rule, keys, http),
        _port_proves_to(rule, http),
    )


@dataclass(eq=False)
class Entry:
    """One rule of one workload's policies in one mode: where it stands and what it says."""

    order: int  # position among all rules of the workload: the first match is reported
    policy: str
    verdict: Verdict
    shape: _Shape
    variants: dict[tuple[bool, bool], Compiled] = field(default_factory=dict)

    def compiled(self, from_known: bool, to_known: bool) -> Compiled:
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
            variant = Compiled(self.order, self.policy, tuple(clauses), self.verdict)
            self.variants[from_known, to_known] = variant
        return variant


def _append(rules: list[Compiled], rule: Compiled) -> None:
    if not rules or rules[-1] is not rule:  # two keys of one rule in one list: listed once
        rules.append(rule)


def _scan(rules: Sequence[Compiled], facts: Facts, best: Compiled | None) -> Compiled | None:
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

    def __init__(self, entries: Iterable[Entry], port_bucket: bool) -> None:
        principals: dict[str, list[Compiled]] = {}
        namespaces: dict[str, list[Compiled]] = {}
        ips: list[tuple[str, Compiled]] = []
        general: list[Compiled] = []
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

    def candidates(self, facts: Facts) -> Iterator[list[Compiled]]:
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

    def first(self, facts: Facts, best: Compiled | None) -> Compiled | None:
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


class Index:
    """The rules of one action for L4 or HTTP: by destination port, then by peer."""

    __slots__ = ("_any_port", "_by_port")

    def __init__(self, entries: Sequence[Entry]) -> None:
        by_port: dict[int, list[Entry]] = {}
        for entry in entries:
            for port in entry.shape.ports or ():
                by_port.setdefault(port, []).append(entry)
        self._by_port = {port: _Peers(group, True) for port, group in by_port.items()}
        any_port = [entry for entry in entries if entry.shape.ports is None]
        self._any_port = _Peers(any_port, False) if any_port else None

    def first(self, facts: Facts) -> Compiled | None:
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
