"""Property tests of the authorization engine: the indexed engine decides what a naive, linear
reading of Istio's semantics decides; DENY wins; adding a DENY never allows more; order of rules
and policies never changes a decision."""

from __future__ import annotations

import ipaddress
import random
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.policy.authz import AuthorizationPolicy, Condition, Operation, Rule, Source
from agent.policy.authz_engine import WorkloadAuthz
from agent.policy.facts import Facts, HttpFacts, JwtFacts

TD = "cluster.local"
SPIFFE = "spiffe://"
PRINCIPALS = ["cluster.local/ns/a/sa/x", "cluster.local/ns/a/*", "*", "*/sa/y"]
NAMESPACES = ["a", "b", "*"]
BLOCKS = ["10.0.0.0/8", "10.1.0.0/16", "192.168.0.1"]
REQUEST_PRINCIPALS = ["iss/sub", "*", "other/*"]
PORTS = ["80", "443"]
METHODS = ["GET", "POST", "*"]
PATHS = ["/a", "/a*", "*b", "*"]
HEADER_VALUES = ["1", "*", "2*"]


def values(vocabulary: list[str], min_size: int = 0) -> st.SearchStrategy[tuple[str, ...]]:
    return st.lists(st.sampled_from(vocabulary), min_size=min_size, max_size=2, unique=True).map(
        tuple
    )


SOURCE_VOCABULARY = {
    "principals": PRINCIPALS,
    "not_principals": PRINCIPALS,
    "request_principals": REQUEST_PRINCIPALS,
    "not_request_principals": REQUEST_PRINCIPALS,
    "namespaces": NAMESPACES,
    "not_namespaces": NAMESPACES,
    "ip_blocks": BLOCKS,
    "not_ip_blocks": BLOCKS,
}
OPERATION_VOCABULARY = {
    "ports": PORTS,
    "not_ports": PORTS,
    "methods": METHODS,
    "not_methods": METHODS,
    "paths": PATHS,
    "not_paths": PATHS,
}


def sparse(vocabulary: dict[str, list[str]]) -> st.SearchStrategy[dict[str, tuple[str, ...]]]:
    """One or two fields set, each to one or two values: sparse enough to match sometimes."""
    field = st.sampled_from(sorted(vocabulary)).flatmap(
        lambda name: st.lists(
            st.sampled_from(vocabulary[name]), min_size=1, max_size=2, unique=True
        ).map(lambda v: (name, tuple(v)))
    )
    return st.lists(field, min_size=1, max_size=2, unique_by=lambda f: f[0]).map(dict)


sources = sparse(SOURCE_VOCABULARY).map(lambda fields: Source(**fields))
operations = sparse(OPERATION_VOCABULARY).map(lambda fields: Operation(**fields))
conditions = st.one_of(
    st.builds(Condition, st.just("source.ip"), values(BLOCKS), values(BLOCKS)),
    st.builds(
        Condition, st.just("request.headers[x]"), values(HEADER_VALUES), values(HEADER_VALUES)
    ),
).filter(lambda c: bool(c.values or c.not_values))
rules = st.builds(
    Rule,
    sources=st.lists(sources, max_size=2).map(tuple),
    operations=st.lists(operations, max_size=2).map(tuple),
    conditions=st.lists(conditions, max_size=2).map(tuple),
)
policies = st.lists(
    st.builds(
        AuthorizationPolicy,
        name=st.just("p"),
        namespace=st.just("ns"),
        action=st.sampled_from(["ALLOW", "DENY", "AUDIT"]),
        rules=st.lists(rules, max_size=3).map(tuple),
    ),
    max_size=4,
).map(
    lambda ps: [AuthorizationPolicy(f"p{i}", "ns", (), p.action, p.rules) for i, p in enumerate(ps)]
)

http_facts = st.builds(
    HttpFacts,
    method=st.sampled_from(["GET", "POST"]),
    path=st.sampled_from(["/a", "/ab", "/b", "/xb"]),
    host=st.just("h"),
    headers=st.sampled_from([{}, {"x": "1"}, {"x": ""}, {"x": "22"}]),
    jwt=st.sampled_from([None, JwtFacts("iss/sub", (), "", {}), JwtFacts("other/s", (), "", {})]),
)
facts = st.builds(
    Facts,
    source_principal=st.sampled_from(
        ["", "spiffe://cluster.local/ns/a/sa/x", "spiffe://cluster.local/ns/b/sa/y"]
    ),
    source_ip=st.sampled_from(["10.1.2.3", "10.2.0.1", "192.168.0.1", "172.16.0.1"]),
    destination_ip=st.just("10.9.0.1"),
    destination_port=st.sampled_from([80, 443, 8080]),
    http=st.none() | http_facts,
)


# --- the oracle: Istio's semantics read literally, rule by rule, no index -----------------------


def text_match(value: str, pattern: str, star_present: bool = False) -> bool:
    if pattern == "*":
        return star_present or value != ""
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def principal_match(value: str, pattern: str) -> bool:
    return value.startswith(SPIFFE) and text_match(value[len(SPIFFE) :], pattern)


def namespace_match(value: str, pattern: str) -> bool:
    return re.fullmatch(pattern.replace("*", ".*"), value) is not None  # Istio's regex, literally


def ip_match(value: str, pattern: str) -> bool:
    return ipaddress.ip_address(value) in ipaddress.ip_network(pattern, strict=False)


Field = tuple[object | None, tuple[str, ...], tuple[str, ...], object]


def field_holds(
    value: object | None, positive: tuple[str, ...], negative: tuple[str, ...], match: object
) -> bool:
    test = match  # a (value, pattern) -> bool
    assert callable(test)
    if positive and (value is None or not any(test(value, p) for p in positive)):
        return False
    return not (negative and value is not None and any(test(value, p) for p in negative))


def source_holds(s: Source, f: Facts, l4: bool) -> bool:
    namespace = f.source_principal.split("/")[4] if f.source_principal else None
    jwt = f.http.jwt if f.http else None
    checks = [
        (f.source_principal or None, s.principals, s.not_principals, principal_match),
        (namespace, s.namespaces, s.not_namespaces, namespace_match),
        (f.source_ip, s.ip_blocks, s.not_ip_blocks, ip_match),
    ]
    if not l4:
        request_principal = (jwt.principal or None) if jwt else None
        checks.append(
            (request_principal, s.request_principals, s.not_request_principals, text_match)
        )
    return all(field_holds(*check) for check in checks)


def operation_holds(o: Operation, f: Facts, l4: bool) -> bool:
    port = str(f.destination_port)
    if not field_holds(port, o.ports, o.not_ports, lambda v, p: v == p):
        return False
    if l4 or f.http is None:
        return True
    present = lambda v, p: text_match(v, p, star_present=True)  # noqa: E731
    return field_holds(f.http.method, o.methods, o.not_methods, present) and field_holds(
        f.http.path, o.paths, o.not_paths, text_match
    )


def condition_holds(c: Condition, f: Facts, l4: bool) -> bool:
    if c.key == "source.ip":
        return field_holds(f.source_ip, c.values, c.not_values, ip_match)
    if l4 or f.http is None:
        return True
    present = lambda v, p: text_match(v, p, star_present=True)  # noqa: E731
    return field_holds(f.http.headers.get("x"), c.values, c.not_values, present)


def uses_http(rule: Rule) -> bool:
    return (
        any(s.request_principals or s.not_request_principals for s in rule.sources)
        or any(o.methods or o.not_methods or o.paths or o.not_paths for o in rule.operations)
        or any(c.key.startswith("request.") for c in rule.conditions)
    )


def rule_holds(rule: Rule, action: str, f: Facts) -> bool:
    l4 = f.http is None
    if l4 and action == "ALLOW" and uses_http(rule):
        return False  # Envoy drops it on a TCP chain
    return (
        (not rule.sources or any(source_holds(s, f, l4) for s in rule.sources))
        and (not rule.operations or any(operation_holds(o, f, l4) for o in rule.operations))
        and all(condition_holds(c, f, l4) for c in rule.conditions)
    )


def oracle(policies: list[AuthorizationPolicy], f: Facts) -> tuple[bool, tuple[str, ...]]:
    def matching(action: str) -> list[str]:
        return [
            p.ref
            for p in policies
            if p.action == action and any(rule_holds(r, action, f) for r in p.rules)
        ]

    audit = tuple(matching("AUDIT"))
    if matching("DENY"):
        return False, audit
    if not any(p.action == "ALLOW" for p in policies):
        return True, audit
    return bool(matching("ALLOW")), audit


def engine(policies: list[AuthorizationPolicy]) -> WorkloadAuthz:
    return WorkloadAuthz(policies, trust_domain=TD)


@settings(max_examples=150, deadline=None)
@given(policies, st.lists(facts, min_size=1, max_size=5))
def test_engine_agrees_with_a_literal_reading_of_the_semantics(
    ps: list[AuthorizationPolicy], cases: list[Facts]
) -> None:
    compiled = engine(ps)
    for f in cases:
        verdict = compiled.decide(f)
        assert (verdict.allowed, verdict.audit) == oracle(ps, f)


@settings(max_examples=150, deadline=None)
@given(policies, rules, facts)
def test_a_deny_never_allows_more_and_a_matching_deny_wins(
    ps: list[AuthorizationPolicy], rule: Rule, f: Facts
) -> None:
    before = engine(ps).decide(f).allowed
    deny = AuthorizationPolicy("zz-deny", "ns", (), "DENY", (rule,))
    after = engine([*ps, deny]).decide(f)
    assert not (after.allowed and not before)
    everything = AuthorizationPolicy("zz-all", "ns", (), "DENY", (Rule(),))
    assert engine([*ps, everything]).decide(f).allowed is False


@settings(max_examples=150, deadline=None)
@given(policies, st.lists(facts, min_size=1, max_size=5), st.randoms(use_true_random=False))
def test_order_of_rules_and_policies_does_not_change_decisions(
    ps: list[AuthorizationPolicy], cases: list[Facts], rnd: random.Random
) -> None:
    shuffled = [
        AuthorizationPolicy(
            p.name, p.namespace, p.selector, p.action, tuple(rnd.sample(p.rules, len(p.rules)))
        )
        for p in rnd.sample(ps, len(ps))
    ]
    original, reordered = engine(ps), engine(shuffled)
    for f in cases:
        assert original.decide(f).allowed == reordered.decide(f).allowed
        assert set(original.decide(f).audit) == set(reordered.decide(f).audit)


# --- the index: many rules keyed by port, exact principal, exact namespace or IP block ---------

PEERS = ["cluster.local/ns/a/sa/x", "cluster.local/ns/b/sa/y", "cluster.local/ns/a/sa/z"]
keyed_sources = st.one_of(
    st.builds(Source, principals=values(PEERS, 1)),
    st.builds(Source, namespaces=values(["a", "b"], 1)),
    st.builds(Source, ip_blocks=values(BLOCKS, 1)),
    st.builds(Source, namespaces=st.just(("a*",))),  # not indexable: scanned
    st.builds(  # principal prefixes, found by the namespace they pin
        Source,
        principals=values(["cluster.local/ns/a/*", "cluster.local/ns/a/sa/z*", "other/ns/b/*"], 1),
    ),
    st.builds(Source, principals=values(PEERS, 1), ip_blocks=values(BLOCKS, 1)),
)
keyed_rules = st.builds(
    Rule,
    sources=st.lists(keyed_sources, max_size=2).map(tuple),
    operations=st.lists(st.builds(Operation, ports=values(PORTS, 1)), max_size=1).map(tuple),
)
keyed_policies = st.lists(
    st.builds(
        AuthorizationPolicy,
        name=st.just("p"),
        namespace=st.just("ns"),
        action=st.sampled_from(["ALLOW", "DENY"]),
        rules=st.lists(keyed_rules, min_size=1, max_size=12).map(tuple),
    ),
    min_size=1,
    max_size=3,
).map(
    lambda ps: [AuthorizationPolicy(f"p{i}", "ns", (), p.action, p.rules) for i, p in enumerate(ps)]
)
l4_facts = st.builds(
    Facts,
    source_principal=st.sampled_from(["", *(SPIFFE + p for p in PEERS)]),
    source_ip=st.sampled_from(["10.1.2.3", "10.2.0.1", "192.168.0.1", "172.16.0.1"]),
    destination_ip=st.just("10.9.0.1"),
    destination_port=st.sampled_from([80, 443, 8080]),
)


@settings(max_examples=300, deadline=None)
@given(keyed_policies, st.lists(l4_facts, min_size=1, max_size=8))
def test_the_index_finds_what_a_scan_finds(
    ps: list[AuthorizationPolicy], cases: list[Facts]
) -> None:
    compiled = engine(ps)
    for f in cases:
        verdict = compiled.decide(f)
        assert verdict.allowed == oracle(ps, f)[0]
        if verdict.policy:  # the reported rule is the first that matches, in policy order
            first = next(
                (p.ref, i)
                for p in ps
                if p.action == verdict.action
                for i, r in enumerate(p.rules)
                if rule_holds(r, p.action, f)
            )
            assert (verdict.policy, verdict.rule) == first
