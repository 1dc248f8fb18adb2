"""RateLimitPolicy rules and the token bucket (agent.policy.ratelimit), from tables.

The bucket state lives in `MemoryBuckets`, a dictionary over `take_token`, so every value here
is exact: the shared-memory and Redis stores are checked against the same arithmetic in
tests/unit/test_ratelimit_store.py and tests/integration/test_ratelimit_store.py.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.policy.facts import Facts, HttpFacts
from agent.policy.ratelimit import (
    UNLIMITED,
    RateLimitError,
    RateVerdict,
    WorkloadRateLimits,
    parse_bucket,
    parse_duration,
    parse_rules,
    take_token,
)

S = 1_000_000_000  # ns per second
ALICE = "spiffe://td/ns/shop/sa/alice"
BOB = "spiffe://td/ns/shop/sa/bob"
CAROL = "spiffe://td/ns/bank/sa/carol"


class MemoryBuckets:
    """A BucketStore in a dict (one process), recording the keys taken from, in order."""

    def __init__(self) -> None:
        self.state: dict[bytes, tuple[int, int]] = {}
        self.taken: list[bytes] = []

    def take(
        self, key: bytes, max_tokens: int, tokens_per_fill: int, fill_interval: float, now: float
    ) -> tuple[bool, int, float]:
        interval, now_ns = round(fill_interval * S), round(now * S)
        tokens, last = self.state.get(key, (max_tokens * interval, now_ns))
        tokens, last, allowed, remaining, next_token = take_token(
            tokens, last, max_tokens, tokens_per_fill, interval, now_ns
        )
        self.state[key] = (tokens, last)
        self.taken.append(key)
        return allowed, remaining, next_token


def conn(principal: str = ALICE, port: int = 8080, ip: str = "10.0.0.9") -> Facts:
    return Facts(principal, ip, "10.0.0.1", port)


def req(
    principal: str = ALICE, port: int = 8080, method: str = "GET", path: str = "/api/items",
    headers: Mapping[str, str] | None = None, ip: str = "10.0.0.9",
) -> Facts:  # fmt: skip
    return Facts(principal, ip, "10.0.0.1", port, HttpFacts(method, path, "web", headers or {}))


def limits(*rules: dict[str, Any], name: str = "p", trust_domain: str = "td") -> WorkloadRateLimits:
    return WorkloadRateLimits.from_specs([("shop", name, {"rules": list(rules)})],
                                         trust_domain=trust_domain)  # fmt: skip


def rule(match: dict[str, Any] | None = None, key: str = "none", max_tokens: int = 2,
         per_fill: int = 1, interval: str = "1s") -> dict[str, Any]:  # fmt: skip
    raw: dict[str, Any] = {
        "key": key,
        "bucket": {"maxTokens": max_tokens, "tokensPerFill": per_fill, "fillInterval": interval},
    }
    if match is not None:
        raw["match"] = match
    return raw


# ------------------------------------------------------------------------------ bucket math
# (tokens, last, max, per_fill, interval, now) -> (tokens, last, allowed, remaining, next token)
TAKES = [
    pytest.param((3 * S, 0, 3, 1, S, 0), (2 * S, 0, True, 2, 1.0), id="full-bucket"),
    pytest.param((0, 0, 3, 1, S, 0), (0, 0, False, 0, 1.0), id="empty-denied"),
    pytest.param((0, 0, 3, 1, S, S // 2), (S // 2, S // 2, False, 0, 0.5), id="half-refilled"),
    pytest.param((0, 0, 3, 1, S, 100 * S), (2 * S, 100 * S, True, 2, 1.0), id="capped-at-max"),
    pytest.param((S, 0, 3, 1, S, 0), (0, 0, True, 0, 1.0), id="last-token"),
    # burst refill: 10 tokens per second, one every 100 ms
    pytest.param((0, 0, 10, 10, S, S // 10), (0, S // 10, True, 0, 0.1), id="per-fill-10"),
    pytest.param((0, 0, 10, 10, S, S // 20), (S // 2, S // 20, False, 0, 0.05), id="per-fill-half"),
    # 100 ms interval, 1 token per fill: half a token after 50 ms
    pytest.param((0, 0, 5, 1, S // 10, S // 20), (S // 20, S // 20, False, 0, 0.05), id="100ms"),
    # a 1 minute interval: 1/60 token per second
    pytest.param((0, 0, 1, 1, 60 * S, 30 * S), (30 * S, 30 * S, False, 0, 30.0), id="interval-1m"),
    # clock backwards: no refill, last refill time kept
    pytest.param((S, 10 * S, 3, 1, S, 5 * S), (0, 10 * S, True, 0, 1.0), id="clock-backwards"),
    pytest.param((0, 10 * S, 3, 1, S, 5 * S), (0, 10 * S, False, 0, 1.0), id="backwards-empty"),
]


@pytest.mark.parametrize(("before", "after"), TAKES)
def test_take_token(before: tuple[int, ...], after: tuple[Any, ...]) -> None:
    tokens, last, allowed, remaining, next_token = take_token(*before)
    assert (tokens, last, allowed, remaining) == after[:4]
    assert next_token == pytest.approx(after[4])


def test_refill_after_the_clock_went_backwards_counts_from_the_latest_time() -> None:
    state = take_token(S, 10 * S, 3, 1, S, 5 * S)  # backwards: takes the last token
    tokens, last, allowed, *_ = take_token(state[0], state[1], 3, 1, S, 10 * S + S // 2)
    assert (tokens, last, allowed) == (S // 2, 10 * S + S // 2, False)


@given(st.lists(st.integers(min_value=0, max_value=10**7), min_size=1, max_size=60),
       st.integers(min_value=1, max_value=1000))  # fmt: skip
def test_refill_has_no_rounding_drift(steps: list[int], per_fill: int) -> None:
    """Refilling in many small steps gives exactly what one step over the same time gives."""
    interval = 3 * S  # not a multiple of per_fill: a fractional-token rate
    tokens, last = 0, 0
    for step in steps:
        tokens, last, allowed, *_ = take_token(tokens, last, 10**6, per_fill, interval, last + step)
        if allowed:
            tokens += interval  # give the token back, to look at the refill alone
    expected = min(10**6 * interval, sum(steps) * per_fill)
    assert tokens == expected


def test_refill_no_drift_example() -> None:
    tokens, last = 0, 0
    for _ in range(1000):  # 1000 x 1 ms at 1 token per 3 s
        tokens, last, allowed, *_ = take_token(tokens, last, 5, 1, 3 * S, last + 10**6)
        assert not allowed
    assert tokens == 1000 * 10**6  # a third of a token, exactly


# ------------------------------------------------------------------------------- verdicts
def test_verdict_values_through_a_burst_and_refill() -> None:
    rl, store = limits(rule(max_tokens=3)), MemoryBuckets()
    seen = [rl.check(conn(), store, 100.0) for _ in range(4)]
    assert [(v.allowed, v.remaining) for v in seen] == [(True, 2), (True, 1), (True, 0), (False, 0)]
    assert [v.reset_seconds for v in seen] == pytest.approx([1.0, 2.0, 3.0, 3.0])
    assert [v.retry_after for v in seen] == pytest.approx([0.0, 0.0, 1.0, 1.0])
    assert {(v.policy, v.rule, v.limit) for v in seen} == {("shop/p", 0, 3)}
    later = rl.check(conn(), store, 100.25)
    assert not later.allowed
    assert (later.retry_after, later.reset_seconds) == pytest.approx((0.75, 2.75))
    recovered = rl.check(conn(), store, 101.0)
    assert (recovered.allowed, recovered.remaining) == (True, 0)
    assert rl.check(conn(), store, 200.0).remaining == 2  # refilled to the cap, one taken


def test_reset_with_several_tokens_per_fill() -> None:
    rl, store = limits(rule(max_tokens=10, per_fill=5, interval="1s")), MemoryBuckets()
    verdict = rl.check(conn(), store, 0.0)
    assert verdict.remaining == 9
    assert verdict.reset_seconds == pytest.approx(0.2)
    for _ in range(9):
        verdict = rl.check(conn(), store, 0.0)
    assert verdict.remaining == 0
    assert verdict.retry_after == pytest.approx(0.2)
    assert verdict.reset_seconds == pytest.approx(2.0)


def test_no_matching_rule_is_unlimited_and_takes_nothing() -> None:
    rl, store = limits(rule({"ports": [9090]})), MemoryBuckets()
    assert rl.check(conn(port=8080), store, 0.0) is UNLIMITED
    assert RateVerdict(True, "", None, 0, 0, 0.0, 0.0) == UNLIMITED
    assert store.taken == []


# -------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    ("text", "ns"),
    [("100ms", 10**8), ("1s", S), ("1.5s", 3 * S // 2), ("1m", 60 * S), ("1m30s", 90 * S),
     ("1h", 3600 * S), ("250us", 250_000), ("50000000ns", 5 * 10**7), ("2µs", 2000)],
)  # fmt: skip
def test_durations(text: str, ns: int) -> None:
    assert parse_duration(text, "f") == ns


@pytest.mark.parametrize("text", ["", "1", "s", "1x", "1 s", "-1s", "1s1", "0.5ns", "1.s"])
def test_bad_durations_name_the_value(text: str) -> None:
    with pytest.raises(RateLimitError, match=rf"f: {re.escape(repr(text))}|f: expected a duration"):
        parse_duration(text, "f")


def test_bucket_defaults() -> None:
    bucket = parse_bucket({"maxTokens": 5, "fillInterval": "2s"})
    assert (bucket.max_tokens, bucket.tokens_per_fill, bucket.fill_interval_ns) == (5, 1, 2 * S)
    assert (bucket.fill_interval, bucket.fill_rate) == (2.0, 0.5)


BAD_RULES = [
    ({"bucket": {"maxTokens": 1, "fillInterval": "10ms"}},
     r"spec.rules\[0\].bucket.fillInterval: '10ms' is shorter than 50ms"),
    ({"bucket": {"maxTokens": 0, "fillInterval": "1s"}},
     r"spec.rules\[0\].bucket.maxTokens: expected an integer >= 1, got 0"),
    ({"bucket": {"maxTokens": True, "fillInterval": "1s"}}, r"maxTokens: .* got True"),
    ({"bucket": {"maxTokens": 2, "tokensPerFill": 1.5, "fillInterval": "1s"}},
     r"tokensPerFill: expected an integer >= 1, got 1.5"),
    ({"bucket": {"maxTokens": 2}}, r"bucket.fillInterval: required"),
    ({"bucket": {"maxTokens": 2, "fillInterval": "1s", "burst": 3}},
     r"bucket: unknown field 'burst'"),
    ({"bucket": {"maxTokens": 10**10, "fillInterval": "1s"}},
     r"maxTokens 10000000000 x fillInterval '1s' exceeds 9000000000 token-seconds"),
    ({}, r"spec.rules\[0\].bucket: required"),
    ({"key": "source.port", "bucket": {"maxTokens": 1, "fillInterval": "1s"}},
     r"spec.rules\[0\].key: 'source.port' is not one of"),
    ({"key": "request.headers[]", "bucket": {"maxTokens": 1, "fillInterval": "1s"}},
     r"key: 'request.headers\[\]'"),
    ({"scope": "cluster", "bucket": {"maxTokens": 1, "fillInterval": "1s"}},
     r"scope: 'cluster' is not one of 'node', 'global'"),
    ({"match": {"ports": [0]}, "bucket": {"maxTokens": 1, "fillInterval": "1s"}},
     r"match.ports\[0\]: 0 is not a port"),
    ({"match": {"ports": ["80"]}, "bucket": {"maxTokens": 1, "fillInterval": "1s"}},
     r"match.ports\[0\]: '80' is not a port"),
    ({"match": {"paths": ["/a/*/b"]}, "bucket": {"maxTokens": 1, "fillInterval": "1s"}},
     r"match.paths\[0\]: '/a/\*/b': only one leading or trailing"),
    ({"match": {"methods": []}, "bucket": {"maxTokens": 1, "fillInterval": "1s"}},
     r"match.methods: expected a non-empty list"),
    ({"match": {"principals": [""]}, "bucket": {"maxTokens": 1, "fillInterval": "1s"}},
     r"match.principals\[0\]: expected a non-empty string"),
    ({"match": {"hosts": ["a"]}, "bucket": {"maxTokens": 1, "fillInterval": "1s"}},
     r"match: unknown field 'hosts'"),
    ("everything", r"spec.rules\[0\]: expected a mapping, got 'everything'"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "message"), BAD_RULES)
def test_bad_rules_name_the_field_and_value(raw: Any, message: str) -> None:
    with pytest.raises(RateLimitError, match=message):
        parse_rules({"rules": [raw]}, namespace="shop", name="p")


def test_rules_must_be_a_list() -> None:
    with pytest.raises(RateLimitError, match=r"spec.rules: expected a list, got 'x'"):
        parse_rules({"rules": "x"}, namespace="shop", name="p")


def test_parsed_rule() -> None:
    (parsed,) = parse_rules({"rules": [rule({"ports": [80, 81]}, key="request.headers[X-Key]")]},
                            namespace="shop", name="p")  # fmt: skip
    assert (parsed.policy, parsed.index, parsed.ports) == ("shop/p", 0, frozenset({80, 81}))
    assert (parsed.key, parsed.header, parsed.scope) == ("header", "x-key", "node")
    assert parsed.http


# ------------------------------------------------------------------------------- matching
MATCHES = [
    ({}, req(), True),
    ({"ports": [8080]}, req(port=8080), True),
    ({"ports": [8080]}, req(port=9090), False),
    ({"methods": ["GET", "HEAD"]}, req(method="HEAD"), True),
    ({"methods": ["GET"]}, req(method="get"), False),
    ({"methods": ["*"]}, req(method="DELETE"), True),
    ({"paths": ["/api/items"]}, req(path="/api/items"), True),
    ({"paths": ["/api/items"]}, req(path="/api/items/"), False),
    ({"paths": ["/api/*"]}, req(path="/api/x/y"), True),
    ({"paths": ["/api*"]}, req(path="/apix"), True),
    ({"paths": ["/api/*"]}, req(path="/API/x"), False),
    ({"paths": ["*.png"]}, req(path="/img/a.png"), True),
    ({"paths": ["*.png"]}, req(path="/img/a.jpg"), False),
    ({"paths": ["*"]}, req(path="/"), True),
    ({"principals": ["td/ns/shop/sa/alice"]}, req(ALICE), True),
    ({"principals": ["td/ns/shop/sa/alice"]}, req(BOB), False),
    ({"principals": ["td/ns/shop/*"]}, req(BOB), True),
    ({"principals": ["*/sa/carol"]}, req(CAROL), True),
    ({"principals": ["*"]}, req(ALICE), True),
    ({"principals": ["*"]}, req(""), False),  # plaintext has no principal
    ({"principals": ["cluster.local/ns/shop/sa/alice"]}, req(ALICE), True),  # td alias
    ({"principals": ["other/ns/shop/sa/alice"]}, req(ALICE), False),
    ({"namespaces": ["shop"]}, req(BOB), True),
    ({"namespaces": ["shop"]}, req(CAROL), False),
    ({"namespaces": ["ba*"]}, req(CAROL), True),
    ({"namespaces": ["*"]}, req(""), False),
    ({"ports": [8080], "methods": ["POST"]}, req(method="GET"), False),  # fields are ANDed
    ({"namespaces": ["shop"], "paths": ["/api/*"]}, req(BOB, path="/api/1"), True),
]


@pytest.mark.parametrize(("match", "facts", "expected"), MATCHES)
def test_match(match: dict[str, Any], facts: Facts, expected: bool) -> None:
    rl, store = limits(rule(match)), MemoryBuckets()
    if not {"methods", "paths"} & set(match):
        facts = dataclasses.replace(facts, http=None)  # an L4 rule: decided at accept
    verdict = rl.check(facts, store, 0.0)
    assert (verdict.policy == "shop/p") is expected
    assert len(store.taken) == int(expected)


def test_a_rule_on_several_ports_and_mixed_indexes() -> None:
    by_principal = rule({"ports": [80, 81], "principals": ["td/ns/shop/sa/alice"]})
    scanned = rule({"ports": [81], "namespaces": ["sh*"]})
    rl = limits(by_principal, scanned, rule({"namespaces": ["shop"]}))
    assert [rl.check(conn(port=p), MemoryBuckets(), 0.0).rule for p in (80, 81, 82)] == [0, 0, 2]
    store = MemoryBuckets()
    rl.check(conn(port=81), store, 0.0)
    assert sorted(k.split(b"\0")[1] for k in store.taken) == [b"0", b"1", b"2"]
    assert rl.check(conn(CAROL, port=80), store, 0.0) is UNLIMITED


def test_cluster_local_alias_without_a_distinct_trust_domain() -> None:
    match = {"principals": ["cluster.local/ns/shop/sa/alice"]}
    rl = limits(rule(match), trust_domain="cluster.local")
    assert rl.check(conn("spiffe://cluster.local/ns/shop/sa/alice"), MemoryBuckets(), 0).limit == 2
    assert rl.check(conn(ALICE), MemoryBuckets(), 0) is UNLIMITED


def test_l4_rules_count_connections_and_http_rules_count_requests() -> None:
    rl = limits(rule({"ports": [8080]}, max_tokens=1), rule({"paths": ["*"]}, max_tokens=1))
    store = MemoryBuckets()
    assert rl.check(conn(), store, 0.0).rule == 0  # the L4 rule, at accept
    assert rl.check(req(), store, 0.0).rule == 1  # the HTTP rule, per request
    assert not rl.check(conn(), store, 0.0).allowed
    assert not rl.check(req(), store, 0.0).allowed
    assert len(store.taken) == 4


@pytest.mark.parametrize(
    ("match", "key", "http_ports", "l4_ports"),
    [({}, "none", [], [80]),
     ({"ports": [80]}, "source.principal", [], [80]),
     ({"principals": ["*"], "namespaces": ["a"]}, "source.ip", [], [80]),
     ({"ports": [80], "methods": ["GET"]}, "none", [80], [81]),
     ({"ports": [80], "paths": ["/x"]}, "none", [80], [81]),
     ({"ports": [80]}, "request.headers[x-api-key]", [80], [81]),
     ({"paths": ["/x"]}, "none", [80, 81, 1], [])],
)  # fmt: skip
def test_needs_http(match: dict[str, Any], key: str, http_ports: list[int], l4_ports: list[int]
                    ) -> None:  # fmt: skip
    rl = limits(rule(match, key=key))
    assert [rl.needs_http(p) for p in http_ports] == [True] * len(http_ports)
    assert [rl.needs_http(p) for p in l4_ports] == [False] * len(l4_ports)


# ------------------------------------------------------------------------------------- keys
def test_principal_keys_give_each_client_a_bucket() -> None:
    rl, store = limits(rule(key="source.principal", max_tokens=1)), MemoryBuckets()
    assert [rl.check(conn(p), store, 0.0).allowed for p in (ALICE, BOB, ALICE, BOB, "", "")] == [
        True, True, False, False, True, False  # plaintext: one shared bucket
    ]  # fmt: skip


def test_ip_keys() -> None:
    rl, store = limits(rule(key="source.ip", max_tokens=1)), MemoryBuckets()
    got = [rl.check(conn(ip=ip), store, 0.0).allowed for ip in ("10.0.0.1", "fd00::1", "10.0.0.1")]
    assert got == [True, True, False]


def test_header_keys_and_the_absent_header_bucket() -> None:
    rl, store = limits(rule(key="request.headers[X-Api-Key]", max_tokens=1)), MemoryBuckets()
    got = [rl.check(req(headers=h), store, 0.0).allowed
           for h in ({"x-api-key": "a"}, {"x-api-key": "b"}, {"x-api-key": "a"}, {}, {},
                     {"x-api-key": ""})]  # fmt: skip
    assert got == [True, True, False, True, False, False]  # absent and empty share a bucket


def test_key_none_is_one_bucket_for_everyone() -> None:
    rl, store = limits(rule(max_tokens=2)), MemoryBuckets()
    got = [rl.check(conn(p), store, 0.0).allowed for p in (ALICE, BOB, CAROL)]
    assert got == [True, True, False]


def test_a_changed_bucket_starts_full() -> None:
    store = MemoryBuckets()
    old, new = limits(rule(max_tokens=1)), limits(rule(max_tokens=5))
    assert old.check(conn(), store, 0.0).allowed and not old.check(conn(), store, 0.0).allowed
    assert old.check(conn(), store, 0.0).limit == 1
    assert new.check(conn(), store, 0.0).remaining == 4  # a new bucket, not the drained one
    assert limits(rule(max_tokens=1)).check(conn(), store, 0.0).allowed is False  # same rule: same


# ---------------------------------------------------------------- several rules (Envoy's way)
def test_every_matching_rule_must_admit_slowest_first() -> None:
    fast = rule(max_tokens=3, per_fill=10)  # 10/s
    slow = rule({"ports": [8080]}, key="source.principal", max_tokens=1, interval="1m")  # 1/min
    rl, store = limits(fast, slow), MemoryBuckets()
    first = rl.check(conn(), store, 0.0)
    assert (first.allowed, first.rule, first.limit) == (True, 1, 1)  # reported: the slowest
    assert len(store.taken) == 2 and store.taken[0].startswith(b"shop/p\x001\x00")
    second = rl.check(conn(), store, 0.0)
    assert (second.allowed, second.rule) == (False, 1)
    assert len(store.taken) == 3  # denied by the slow bucket: the fast one kept its tokens
    assert rl.check(conn(BOB), store, 0.0).allowed  # bob's own slow bucket; fast: 1 left
    assert rl.check(conn(CAROL), store, 0.0).allowed  # fast: 0 left
    fourth = rl.check(conn("spiffe://td/ns/shop/sa/dave"), store, 0.0)
    assert (fourth.allowed, fourth.rule, fourth.limit) == (False, 0, 3)  # the fast one denies
    assert len(store.taken) == 9  # dave's slow bucket gave a token first (Envoy: no refund)


def test_rules_of_several_policies_all_apply_in_a_fixed_order() -> None:
    spec: dict[str, Any] = {"rules": [rule(max_tokens=1)]}
    named = [("shop", "b", spec), ("root", "a", spec), ("shop", "a", spec)]
    rl = WorkloadRateLimits.from_specs(named)
    store = MemoryBuckets()
    verdict = rl.check(conn(), store, 0.0)
    assert verdict.policy == "root/a"  # equal fill rates: by namespace, then name
    assert [k.split(b"\0")[0] for k in store.taken] == [b"root/a", b"shop/a", b"shop/b"]
    assert not rl.check(conn(), store, 0.0).allowed


def test_global_rules_use_the_global_store_when_there_is_one() -> None:
    rl = limits(rule(max_tokens=5), {**rule({"ports": [8080]}, max_tokens=1), "scope": "global"})
    local, remote = MemoryBuckets(), MemoryBuckets()
    assert rl.check(conn(), local, 0.0, global_buckets=remote).allowed
    assert (len(local.taken), len(remote.taken)) == (1, 1)
    rl.check(conn(), local, 0.0)
    assert (len(local.taken), len(remote.taken)) == (3, 1)  # no global store: the local one


def test_a_thousand_principal_rules_are_looked_up_not_scanned() -> None:
    rules = [rule({"principals": [f"td/ns/shop/sa/c{i}"]}, max_tokens=1) for i in range(1000)]
    rl = limits(*rules)
    index = rl._l4[1]
    assert index is not None and len(index.by_principal) == 1000 and not index.rest
    store = MemoryBuckets()
    verdict = rl.check(conn("spiffe://td/ns/shop/sa/c500"), store, 0.0)
    assert (verdict.rule, len(store.taken)) == (500, 1)
