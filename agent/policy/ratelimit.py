"""Rate limits: Ferry's `ferry.dev/v1alpha1` RateLimitPolicy, its rules and the token bucket (pure).

A RateLimitPolicy's `spec.rules[]` each say which traffic they count (`match`), whose traffic
shares a bucket (`key`) and how big and fast the bucket is (`bucket`):

    rules:
    - match: {ports: [8080], methods: [GET], paths: ["/api/*"],
              principals: ["cluster.local/ns/shop/sa/*"], namespaces: [shop]}   # {} = everything
      key: source.principal          # | source.ip | request.headers[x-api-key] | none (default)
      bucket: {maxTokens: 100, tokensPerFill: 10, fillInterval: 1s}             # tokensPerFill: 1
      scope: node                    # | global (Redis, when the proxy has it configured)

Matching follows Istio's AuthorizationPolicy operations: the fields that are set are ANDed, a
field matches when any of its values does; strings are exact, `abc*` prefix, `*abc` suffix, `*`
any non-empty value; methods and paths are case-sensitive; `principals` are written
`<trust-domain>/ns/<ns>/sa/<sa>` and compared with the mTLS peer's SPIFFE ID without `spiffe://`
(`cluster.local/...` also matches the mesh's own trust domain, as Istio's aliasing does);
`namespaces` is the peer's `/ns/<ns>/` segment.  Plaintext traffic has no principal, so it
matches neither list.  Ports are the destination (workload) port.

L4 and HTTP rules.  A rule with `methods`, `paths` or a `request.headers[...]` key needs request
facts: it counts HTTP requests (one token per HTTP/1.1 request or HTTP/2 stream) and makes its
ports HTTP-inspected (`needs_http`).  Every other rule is L4: it counts new connections, at accept
time, and never causes HTTP parsing; on an inspected port it still counts connections, not
requests (write `paths: ["*"]` to count requests).  `check(facts, ...)` applies the L4 rules when
`facts.http` is None and the HTTP rules otherwise, so nothing is counted twice.

Several matching rules: all must admit, as Envoy's local rate limit does with descriptors
(`LocalRateLimiterImpl::requestAllowed`): every matching rule, of every policy selecting the
workload, is a descriptor that matched; their buckets are consumed from the slowest fill rate
to the fastest (ties: policy namespace/name, then rule index), and the first bucket that is empty
denies; buckets consumed before it keep the token they gave (Envoy does not refund either; the
slowest-first order makes that rare).  The reason to follow Envoy rather than "first rule
decides": a policy that limits a whole namespace and another that limits one client must both
hold, and operators who bring Envoy's `local_ratelimit` configuration expect that.  The verdict
reports the denying bucket, or, when admitted, the slowest bucket (Envoy's choice for the
`x-ratelimit-*` headers).

Keys.  The bucket key is the rule's identity (policy, rule index, bucket parameters: a changed
bucket starts full, as Envoy's rebuilt filter does) plus the key value: the peer's SPIFFE ID
("" for plaintext: all plaintext clients share one bucket), the source IP, the request header's
value (absent header: the empty value, one shared bucket), or nothing (one bucket per rule).

The token bucket is Envoy's current timer-less one: it starts full (`maxTokens`), refills
continuously at `tokensPerFill / fillInterval` tokens per second, capped at `maxTokens`, computed
lazily on access; each admitted connection or request takes one token.  `take_token` does the
arithmetic in integers: tokens are counted in token-nanoseconds (tokens x fillInterval in ns), so
`elapsed_ns x tokensPerFill` is an exact refill with no rounding drift however often it is called;
a clock that goes backwards refills nothing and never moves the bucket's time back.
`maxTokens x fillInterval` is bounded (`MAX_TOKEN_NS`, 9e9 token-seconds, e.g. 9e9 tokens per
second or 2.5e6 per hour) so the state fits a 64-bit slot in shared memory and stays exact in
Redis' Lua doubles.

Verdict values (for 429 answers and DRAFT_VERSION_03 `x-ratelimit-*` headers): `limit` is
maxTokens; `remaining` the whole tokens left; `reset_seconds` the time until the bucket is full
again (the draft's "seconds until the quota resets"; Envoy instead reports the time to the next
token there, which is our `retry_after`); `retry_after` the time until one token is available
(0 when one is).  Both are floats; whoever renders headers rounds them up.

Bucket state lives behind `BucketStore` (the node's shared memory,
`agent.proxy.ratelimit_store`, or Redis for `scope: global`); this module decides and computes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, Protocol

from agent.policy.facts import Facts

NS_PER_SECOND = 1_000_000_000
MIN_FILL_INTERVAL_NS = 50_000_000  # Envoy's documented minimum (50 ms)
MAX_TOKEN_NS = 9 * 10**18  # maxTokens x fillInterval_ns: < 2**63 (shm), < 2**53 microseconds (Lua)
KeyKind = Literal["source.principal", "source.ip", "header", "none"]
Scope = Literal["node", "global"]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|h|m|s)")
_UNIT_NS = {"ns": 1, "us": 10**3, "µs": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9,
            "h": 3600 * 10**9}  # fmt: skip
_HEADER_KEY = re.compile(r"request\.headers\[([!#$%&'*+\-.^_`|~0-9A-Za-z]+)\]")
_RULE_FIELDS = frozenset({"match", "key", "bucket", "scope"})
_MATCH_FIELDS = frozenset({"ports", "methods", "paths", "principals", "namespaces"})
_BUCKET_FIELDS = frozenset({"maxTokens", "tokensPerFill", "fillInterval"})
_DEFAULT_TRUST_DOMAIN = "cluster.local"


class RateLimitError(ValueError):
    """A RateLimitPolicy spec that cannot be enforced; the message names the field and value."""


class BucketStore(Protocol):
    """Where token buckets live.  `take` refills the bucket named `key` (creating it full),
    takes one token if there is one, atomically, and returns (allowed, whole tokens remaining,
    seconds until the bucket holds one more whole token: 0.0 when it is full)."""

    def take(
        self, key: bytes, max_tokens: int, tokens_per_fill: int, fill_interval: float, now: float
    ) -> tuple[bool, int, float]: ...


@dataclass(frozen=True, slots=True)
class Bucket:
    max_tokens: int
    tokens_per_fill: int
    fill_interval_ns: int
    fill_interval: float = field(init=False)  # seconds
    fill_rate: float = field(init=False)  # tokens per second

    def __post_init__(self) -> None:
        object.__setattr__(self, "fill_interval", self.fill_interval_ns / NS_PER_SECOND)
        object.__setattr__(self, "fill_rate", self.tokens_per_fill / self.fill_interval)


def take_token(
    tokens: int, last_ns: int, max_tokens: int, tokens_per_fill: int, fill_interval_ns: int,
    now_ns: int,
) -> tuple[int, int, bool, int, float]:  # fmt: skip
    """One take on a bucket holding `tokens` token-nanoseconds, last refilled at `last_ns`.

    Returns (tokens, last_ns, allowed, remaining, seconds to the next whole token) where the
    first two are the state to store.  A new bucket is (max_tokens * fill_interval_ns, now_ns)."""
    full = max_tokens * fill_interval_ns
    if now_ns > last_ns:  # a clock going backwards refills nothing and keeps last_ns
        tokens = min(full, tokens + (now_ns - last_ns) * tokens_per_fill)
        last_ns = now_ns
    allowed = tokens >= fill_interval_ns
    if allowed:
        tokens -= fill_interval_ns
    remaining = tokens // fill_interval_ns
    if tokens >= full:
        return tokens, last_ns, allowed, remaining, 0.0
    missing = (remaining + 1) * fill_interval_ns - tokens  # token-ns to the next whole token
    return tokens, last_ns, allowed, remaining, missing / tokens_per_fill / NS_PER_SECOND


@dataclass(frozen=True, slots=True)
class RateVerdict:
    allowed: bool
    policy: str  # "<namespace>/<name>" of the reported rule; "" when no rule matched
    rule: int | None  # that rule's index in its policy
    limit: int  # maxTokens (0: no rule matched, send no x-ratelimit headers)
    remaining: int
    reset_seconds: float  # until the bucket is full again
    retry_after: float  # until one token is available (0.0 when one is)


UNLIMITED = RateVerdict(True, "", None, 0, 0, 0.0, 0.0)


@dataclass(frozen=True, slots=True)
class Strings:
    """A compiled Istio string list: exact values, `abc*` prefixes, `*abc` suffixes, `*`."""

    exact: frozenset[str]
    prefixes: tuple[str, ...]
    suffixes: tuple[str, ...]
    present: bool  # `*`: any non-empty value

    def matches(self, value: str) -> bool:
        if not value:
            return False
        return (
            self.present
            or value in self.exact
            or value.startswith(self.prefixes)
            or value.endswith(self.suffixes)
        )


@dataclass(frozen=True, slots=True)
class Rule:
    policy: str  # "<namespace>/<name>"
    index: int
    ports: frozenset[int]  # empty: every port
    methods: Strings | None  # None: not constrained
    paths: Strings | None
    principals: Strings | None
    namespaces: Strings | None
    key: KeyKind
    header: str  # lower-case header name when key == "header"
    bucket: Bucket
    scope: Scope
    key_prefix: bytes  # the rule's identity in bucket keys

    @property
    def http(self) -> bool:
        """Counts requests (needs HTTP facts) rather than connections."""
        return self.methods is not None or self.paths is not None or self.key == "header"

    def matches(self, facts: Facts, principal: str, namespace: str) -> bool:
        """Whether `facts` fall under this rule, its port aside (the index checked it);
        `principal` is the peer without `spiffe://`, `namespace` its `/ns/` segment."""
        if self.principals is not None and not self.principals.matches(principal):
            return False
        if self.namespaces is not None and not self.namespaces.matches(namespace):
            return False
        http = facts.http
        if http is None:
            return not self.http
        if self.methods is not None and not self.methods.matches(http.method):
            return False
        return self.paths is None or self.paths.matches(http.path)

    def bucket_key(self, facts: Facts) -> bytes:
        if self.key == "source.principal":
            value = facts.source_principal
        elif self.key == "source.ip":
            value = facts.source_ip
        elif self.key == "header":
            value = facts.http.headers.get(self.header, "") if facts.http is not None else ""
        else:
            value = ""
        return self.key_prefix + value.encode("utf-8", "surrogateescape")


# ------------------------------------------------------------------------------------ parsing
def parse_rules(
    spec: Mapping[str, Any], *, namespace: str, name: str,
    trust_domain: str = _DEFAULT_TRUST_DOMAIN,
) -> tuple[Rule, ...]:  # fmt: skip
    """The rules of one RateLimitPolicy's `spec` (raises `RateLimitError` naming the field path
    and the bad value).  `selector` is the compiler's business and is not read here."""
    rules = spec.get("rules", [])
    if not isinstance(rules, list):
        raise RateLimitError(f"spec.rules: expected a list, got {rules!r}")
    policy = f"{namespace}/{name}"
    return tuple(
        _parse_rule(raw, policy, i, f"spec.rules[{i}]", trust_domain) for i, raw in enumerate(rules)
    )


def _parse_rule(raw: Any, policy: str, index: int, path: str, trust_domain: str) -> Rule:
    _check_fields(raw, _RULE_FIELDS, path)
    if "bucket" not in raw:
        raise RateLimitError(f"{path}.bucket: required (maxTokens and fillInterval)")
    match = raw.get("match", {})
    _check_fields(match, _MATCH_FIELDS, f"{path}.match")
    key, header = _parse_key(raw.get("key", "none"), f"{path}.key")
    bucket = parse_bucket(raw["bucket"], f"{path}.bucket")
    scope = raw.get("scope", "node")
    if scope not in ("node", "global"):
        raise RateLimitError(f"{path}.scope: {scope!r} is not one of 'node', 'global'")
    principals = _strings(match, "principals", f"{path}.match")
    if principals is not None:
        principals = _alias_trust_domain(principals, trust_domain)
    identity = (
        f"{policy}\0{index}\0{bucket.max_tokens}/{bucket.tokens_per_fill}/"
        f"{bucket.fill_interval_ns}\0"
    )
    return Rule(
        policy=policy,
        index=index,
        ports=_ports(match.get("ports", []), f"{path}.match.ports"),
        methods=_strings(match, "methods", f"{path}.match"),
        paths=_strings(match, "paths", f"{path}.match"),
        principals=principals,
        namespaces=_strings(match, "namespaces", f"{path}.match"),
        key=key,
        header=header,
        bucket=bucket,
        scope=scope,
        key_prefix=identity.encode(),
    )


def _check_fields(raw: Any, allowed: frozenset[str], path: str) -> None:
    if not isinstance(raw, Mapping):
        raise RateLimitError(f"{path}: expected a mapping, got {raw!r}")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise RateLimitError(
            f"{path}: unknown field {unknown[0]!r} (expected: {', '.join(sorted(allowed))})"
        )


def _parse_key(raw: Any, path: str) -> tuple[KeyKind, str]:
    if raw in ("source.principal", "source.ip", "none"):
        return raw, ""  # Any, checked by the membership test
    header = _HEADER_KEY.fullmatch(raw) if isinstance(raw, str) else None
    if header is None:
        raise RateLimitError(
            f"{path}: {raw!r} is not one of source.principal, source.ip, "
            "request.headers[<name>], none"
        )
    return "header", header.group(1).lower()


def parse_bucket(raw: Any, path: str = "bucket") -> Bucket:
    """`{maxTokens, tokensPerFill (default 1), fillInterval}` -> `Bucket`."""
    _check_fields(raw, _BUCKET_FIELDS, path)
    max_tokens = _positive_int(raw.get("maxTokens"), f"{path}.maxTokens")
    per_fill = _positive_int(raw.get("tokensPerFill", 1), f"{path}.tokensPerFill")
    if "fillInterval" not in raw:
        raise RateLimitError(f"{path}.fillInterval: required (e.g. '1s', '100ms', '1m')")
    interval = parse_duration(raw["fillInterval"], f"{path}.fillInterval")
    if interval < MIN_FILL_INTERVAL_NS:
        raise RateLimitError(
            f"{path}.fillInterval: {raw['fillInterval']!r} is shorter than 50ms "
            "(raise tokensPerFill instead)"
        )
    if max_tokens * interval > MAX_TOKEN_NS:
        raise RateLimitError(
            f"{path}: maxTokens {max_tokens} x fillInterval {raw['fillInterval']!r} exceeds "
            f"{MAX_TOKEN_NS // NS_PER_SECOND} token-seconds (use a shorter fillInterval)"
        )
    return Bucket(max_tokens, per_fill, interval)


def parse_duration(raw: Any, path: str) -> int:
    """'100ms', '1s', '1.5s', '1m30s', '1h' (units ns, us, ms, s, m, h) -> whole nanoseconds."""
    if not isinstance(raw, str) or not raw:
        raise RateLimitError(f"{path}: expected a duration such as '1s' or '100ms', got {raw!r}")
    total, end = Decimal(0), 0
    for part in _DURATION_PART.finditer(raw):
        if part.start() != end:
            break
        total += Decimal(part.group(1)) * _UNIT_NS[part.group(2)]
        end = part.end()
    if end != len(raw) or total != total.to_integral_value():
        raise RateLimitError(
            f"{path}: {raw!r} is not a whole-nanosecond duration such as '1s', '100ms', '1m30s'"
        )
    return int(total)


def _positive_int(raw: Any, path: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise RateLimitError(f"{path}: expected an integer >= 1, got {raw!r}")
    return raw


def _ports(raw: Any, path: str) -> frozenset[int]:
    if not isinstance(raw, list):
        raise RateLimitError(f"{path}: expected a list of ports, got {raw!r}")
    ports = set()
    for i, value in enumerate(raw):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise RateLimitError(f"{path}[{i}]: {value!r} is not a port (1-65535)")
        ports.add(value)
    return frozenset(ports)


def _strings(match: Mapping[str, Any], name: str, path: str) -> Strings | None:
    raw = match.get(name)
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw:
        raise RateLimitError(f"{path}.{name}: expected a non-empty list of strings, got {raw!r}")
    exact, prefixes, suffixes, present = set(), [], [], False
    for i, value in enumerate(raw):
        if not isinstance(value, str) or not value:
            raise RateLimitError(f"{path}.{name}[{i}]: expected a non-empty string, got {value!r}")
        stars = value.count("*")
        if value == "*":
            present = True
        elif stars == 0:
            exact.add(value)
        elif stars == 1 and value.endswith("*"):
            prefixes.append(value[:-1])
        elif stars == 1 and value.startswith("*"):
            suffixes.append(value[1:])
        else:
            raise RateLimitError(
                f"{path}.{name}[{i}]: {value!r}: only one leading or trailing '*' is a wildcard"
            )
    return Strings(frozenset(exact), tuple(prefixes), tuple(suffixes), present)


def _alias_trust_domain(principals: Strings, trust_domain: str) -> Strings:
    """`cluster.local/...` also stands for the mesh's trust domain (Istio's alias rule)."""
    alias = _DEFAULT_TRUST_DOMAIN + "/"
    if trust_domain == _DEFAULT_TRUST_DOMAIN:
        return principals

    def expand(values: Iterable[str]) -> list[str]:
        out = list(values)
        out += [f"{trust_domain}/{v[len(alias) :]}" for v in out if v.startswith(alias)]
        return out

    return Strings(
        frozenset(expand(principals.exact)), tuple(expand(principals.prefixes)),
        principals.suffixes, principals.present,
    )  # fmt: skip


# ---------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True, slots=True)
class _Index:
    """The rules of one port (or of every port): rules whose principals are all exact are found
    by the peer's principal, else those whose namespaces are all exact by its namespace; only
    the rest are scanned.  So 1,000 per-client rules cost a dictionary lookup, not a loop."""

    by_principal: Mapping[str, tuple[Rule, ...]]
    by_namespace: Mapping[str, tuple[Rule, ...]]
    rest: tuple[Rule, ...]

    @staticmethod
    def build(rules: Iterable[Rule]) -> _Index:
        by_principal: dict[str, list[Rule]] = {}
        by_namespace: dict[str, list[Rule]] = {}
        rest: list[Rule] = []
        for rule in rules:
            if principals := _exact_only(rule.principals):
                for value in principals:
                    by_principal.setdefault(value, []).append(rule)
            elif namespaces := _exact_only(rule.namespaces):
                for value in namespaces:
                    by_namespace.setdefault(value, []).append(rule)
            else:
                rest.append(rule)
        return _Index(
            {k: tuple(v) for k, v in by_principal.items()},
            {k: tuple(v) for k, v in by_namespace.items()},
            tuple(rest),
        )

    def collect(self, facts: Facts, principal: str, namespace: str, into: list[Rule]) -> None:
        found = self.by_principal.get(principal), self.by_namespace.get(namespace), self.rest
        for group in found:
            if group:
                for rule in group:
                    if rule.matches(facts, principal, namespace):
                        into.append(rule)


def _exact_only(strings: Strings | None) -> frozenset[str]:
    """The values of a list made of exact values only; empty when it has a wildcard (or is
    absent): such a rule cannot be found by lookup."""
    if strings is None or strings.present or strings.prefixes or strings.suffixes:
        return frozenset()
    return strings.exact


class WorkloadRateLimits:
    """The rate-limit rules of every RateLimitPolicy selecting one workload; immutable."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        # Evaluation order (Envoy's): slowest fill rate first, then policy, then rule index.
        self.rules = tuple(
            sorted(rules, key=lambda r: (r.bucket.fill_rate, r.policy.split("/", 1), r.index))
        )
        self._order = {id(rule): i for i, rule in enumerate(self.rules)}
        self._http_ports = frozenset(p for r in self.rules if r.http for p in r.ports)
        self._http_any_port = any(r.http and not r.ports for r in self.rules)
        self._l4 = self._indexes([r for r in self.rules if not r.http])
        self._http = self._indexes([r for r in self.rules if r.http])

    @staticmethod
    def _indexes(rules: list[Rule]) -> tuple[Mapping[int, _Index], _Index | None]:
        """The rules by port (only ports that have rules) and those for every port (None when
        there are none), so traffic no rule can match costs one dictionary miss."""
        per_port: dict[int, list[Rule]] = {}
        for rule in rules:
            for port in rule.ports:
                per_port.setdefault(port, []).append(rule)
        every_port = [r for r in rules if not r.ports]
        by_port = {port: _Index.build(group) for port, group in per_port.items()}
        return by_port, _Index.build(every_port) if every_port else None

    @classmethod
    def from_specs(
        cls, policies: Iterable[tuple[str, str, Mapping[str, Any]]], *,
        trust_domain: str = _DEFAULT_TRUST_DOMAIN,
    ) -> WorkloadRateLimits:  # fmt: skip
        """From the (namespace, name, spec) of every RateLimitPolicy selecting the workload."""
        return cls(
            rule
            for namespace, name, spec in policies
            for rule in parse_rules(spec, namespace=namespace, name=name, trust_domain=trust_domain)
        )

    def needs_http(self, port: int) -> bool:
        """Whether a rule counts requests on `port` (so its connections need HTTP inspection)."""
        return self._http_any_port or port in self._http_ports

    def check(
        self, facts: Facts, buckets: BucketStore, now: float,
        global_buckets: BucketStore | None = None,
    ) -> RateVerdict:  # fmt: skip
        """Take a token from every matching rule's bucket (L4 rules for a new connection when
        `facts.http` is None, HTTP rules for a request otherwise); see the module docstring.
        `scope: global` rules use `global_buckets` when given, else `buckets`.  `now` is the
        monotonic clock the stores share (seconds)."""
        by_port, every_port = self._l4 if facts.http is None else self._http
        port_index = by_port.get(facts.destination_port)
        if port_index is None and every_port is None:
            return UNLIMITED
        principal, namespace = _peer(facts.source_principal)
        matched: list[Rule] = []
        for index in (port_index, every_port):
            if index is not None:
                index.collect(facts, principal, namespace, matched)
        if not matched:
            return UNLIMITED
        if len(matched) > 1:
            matched.sort(key=lambda rule: self._order[id(rule)])
        first: RateVerdict | None = None
        for rule in matched:
            store = global_buckets if rule.scope == "global" and global_buckets else buckets
            b = rule.bucket
            allowed, remaining, next_token = store.take(
                rule.bucket_key(facts), b.max_tokens, b.tokens_per_fill, b.fill_interval, now
            )
            if not allowed:
                return _verdict(rule, False, remaining, next_token)
            if first is None:
                first = _verdict(rule, True, remaining, next_token)
        assert first is not None
        return first


def _verdict(rule: Rule, allowed: bool, remaining: int, next_token: float) -> RateVerdict:
    b = rule.bucket
    if remaining >= b.max_tokens:
        reset = 0.0
    else:  # the fraction of the next token, then whole tokens at fill_interval/tokens_per_fill
        reset = next_token + (b.max_tokens - remaining - 1) / b.fill_rate
    retry = next_token if remaining == 0 else 0.0
    return RateVerdict(allowed, rule.policy, rule.index, b.max_tokens, remaining, reset, retry)


def _peer(spiffe_id: str) -> tuple[str, str]:
    """'spiffe://td/ns/n/sa/s' -> ('td/ns/n/sa/s', 'n'); plaintext '' -> ('', '')."""
    principal = spiffe_id.removeprefix("spiffe://")
    parts = principal.split("/", 3)
    namespace = parts[2] if len(parts) > 2 and parts[1] == "ns" else ""
    return principal, namespace
