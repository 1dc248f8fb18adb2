"""Authorization decisions per second: `WorkloadAuthz.decide` with no policy, one rule, 1,000 rules.

    .venv/bin/python -m bench.policy_engine [--seconds 1]

Rows (one process, each timed for `--seconds`, best of 3 rounds):
- no policy: the workload has no AuthorizationPolicy (the shared "allow" verdict);
- 1 L4 rule: ALLOW from one principal on port 8080, a connection from that principal;
- 1,000 L4 rules, each ALLOW from its own principal on port 8080 (found through the principal
  index), a connection matching the first rule, the last rule, and none (denied);
- 1,000 L4 rules by IP block: each ALLOW from its own /32 (found through the per-prefix tables);
- 1,000 principal-prefix rules (`.../ns/ns-<i>/sa/sa-<i>*`): found by the namespace they pin;
- 1,000 rules the index cannot key (principal suffixes `*/sa/sa-<i>`): scanned, for comparison;
- HTTP path+method: ALLOW GET `/api/*` from one principal, one HTTP request.

The "vs 1 rule" column is the point: with the index, 1,000 rules cost what one rule costs.  The
compile time of the 1,000-rule sets is printed below the table: the first compile, and again
for another workload selected by the same policy (compiled rules are cached).  Numbers are only
comparable within one run (shared, noisy machines).
"""

from __future__ import annotations

import argparse
import time

from agent.policy.authz import AuthorizationPolicy, Operation, Rule, Source
from agent.policy.authz_engine import WorkloadAuthz
from agent.policy.facts import Facts, HttpFacts

TD = "cluster.local"
RULES = 1000
PORT = ("8080",)


def principal(i: int) -> str:
    return f"cluster.local/ns/ns-{i}/sa/sa-{i}"


def connection(i: int | None = None, ip: str = "10.0.0.1", http: HttpFacts | None = None) -> Facts:
    peer = "" if i is None else f"spiffe://{principal(i)}"
    return Facts(peer, ip, "10.1.0.1", 8080, http)


def allow(rules: list[Rule]) -> list[AuthorizationPolicy]:
    return [AuthorizationPolicy("bench", "shop", (), "ALLOW", tuple(rules))]


def by_principal(count: int) -> list[AuthorizationPolicy]:
    return allow(
        [
            Rule((Source(principals=(principal(i),)),), (Operation(ports=PORT),))
            for i in range(count)
        ]
    )


def by_ip_block(count: int) -> list[AuthorizationPolicy]:
    return allow(
        [
            Rule((Source(ip_blocks=(f"10.2.{i >> 8}.{i & 255}/32",)),), (Operation(ports=PORT),))
            for i in range(count)
        ]
    )


def by_prefix(count: int) -> list[AuthorizationPolicy]:
    return allow(
        [
            Rule((Source(principals=(principal(i) + "*",)),), (Operation(ports=PORT),))
            for i in range(count)
        ]
    )


def by_suffix(count: int) -> list[AuthorizationPolicy]:
    return allow(
        [
            Rule((Source(principals=(f"*/sa/sa-{i}",)),), (Operation(ports=PORT),))
            for i in range(count)
        ]
    )


def http_policy() -> list[AuthorizationPolicy]:
    rule = Rule(
        (Source(principals=(principal(0),)),),
        (Operation(methods=("GET",), paths=("/api/*",)),),
    )
    return allow([rule])


def rate(engine: WorkloadAuthz, facts: Facts, seconds: float) -> float:
    """Decisions per second, best of 3 rounds."""
    decide = engine.decide
    best = 0.0
    for _ in range(3):
        count, start = 0, time.perf_counter()
        deadline = start + seconds / 3
        while (now := time.perf_counter()) < deadline:
            for _ in range(1000):
                decide(facts)
            count += 1000
        best = max(best, count / (now - start))
    return best


def compiled(policies: list[AuthorizationPolicy]) -> tuple[WorkloadAuthz, float]:
    start = time.perf_counter()
    engine = WorkloadAuthz(policies, trust_domain=TD)
    return engine, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per row")
    seconds = parser.parse_args().seconds

    none, _ = compiled([])
    one, _ = compiled(by_principal(1))
    many, many_time = compiled(by_principal(RULES))
    blocks, blocks_time = compiled(by_ip_block(RULES))
    prefixes, prefixes_time = compiled(by_prefix(RULES))
    suffixes, _ = compiled(by_suffix(RULES))
    http, _ = compiled(http_policy())
    request = HttpFacts("GET", "/api/items", "shop", {"user-agent": "bench"})
    rows = [
        ("no policy", none, connection(0), True),
        ("1 L4 rule", one, connection(0), True),
        ("1,000 L4 rules, match first", many, connection(0), True),
        ("1,000 L4 rules, match last", many, connection(RULES - 1), True),
        ("1,000 L4 rules, match none", many, connection(RULES + 1), False),
        ("1,000 IP-block rules, match last", blocks, connection(None, "10.2.3.231"), True),
        ("1,000 IP-block rules, match none", blocks, connection(None, "10.9.9.9"), False),
        ("1,000 principal-prefix rules, last", prefixes, connection(RULES - 1), True),
        ("1,000 suffix rules (scanned), last", suffixes, connection(RULES - 1), True),
        ("HTTP path+method, 1 rule", http, connection(0, http=request), True),
    ]
    print("| case | decisions/s | ns/decision | vs no policy | vs 1 rule |")
    print("| --- | ---: | ---: | ---: | ---: |")
    base: dict[str, float] = {}
    for name, engine, facts, expected in rows:
        assert engine.decide(facts).allowed is expected, name
        per_second = rate(engine, facts, seconds)
        cost = 1e9 / per_second
        base.setdefault("none", cost)
        if name == "1 L4 rule":
            base["one"] = cost
        versus_one = f"{cost / base['one']:.2f}x" if "one" in base else ""
        print(
            f"| {name} | {per_second:,.0f} | {cost:,.0f} | {cost / base['none']:.2f}x "
            f"| {versus_one} |"
        )
    print()
    again = [compiled(make(RULES))[1] for make in (by_principal, by_ip_block, by_prefix)]
    print(
        f"compile {RULES:,} rules, first / again for another workload: by principal "
        f"{many_time * 1e3:.0f} / {again[0] * 1e3:.0f} ms, by IP block {blocks_time * 1e3:.0f} / "
        f"{again[1] * 1e3:.0f} ms, by prefix {prefixes_time * 1e3:.0f} / {again[2] * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    main()
