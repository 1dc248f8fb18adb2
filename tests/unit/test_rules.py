"""The desired redirection rules and routing, as data: golden files and properties.

Regenerate the golden files with `UPDATE_GOLDEN=1 pytest tests/unit/test_rules.py` and review the
diff; tests/integration/test_iptables_backend.py checks that the rendered lines are exactly what
iptables-legacy-save prints for the installed rules.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import RedirectionConfig
from agent.redirect.routing import desired_routing
from agent.redirect.rules import (
    FERRY_OUTPUT,
    FERRY_PREROUTING,
    PROBE_SOURCE,
    Family,
    Rule,
    compare,
    desired_rules,
    diff_lines,
    render,
    ruleset_commands,
)

GOLDEN = Path(__file__).resolve().parent.parent / "golden"

CASES: dict[str, RedirectionConfig] = {
    "default": RedirectionConfig(),
    "exclusions": RedirectionConfig(
        exclude_outbound_ports=(22, 3306),
        exclude_inbound_ports=(9090,),
        exclude_outbound_cidrs=("10.96.0.0/12", "fd00:10:96::/112"),
    ),
}


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str, family: Family) -> None:
    path = GOLDEN / f"{case}_v{family}.golden"
    text = render(desired_rules(CASES[case]), family)
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"{path} is missing; run with UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{path} differs; run with UPDATE_GOLDEN=1 and review"


def _lines(cfg: RedirectionConfig, family: Family, table: str, chain: str) -> list[str]:
    return [r.line() for r in desired_rules(cfg).rules_of(family, table, chain)]


def test_exclusions_appear_as_returns() -> None:
    cfg = CASES["exclusions"]
    out = _lines(cfg, 4, "nat", FERRY_OUTPUT)
    assert "-A FERRY_OUTPUT -p tcp -m tcp --dport 22 -j RETURN" in out
    assert "-A FERRY_OUTPUT -p tcp -m tcp --dport 3306 -j RETURN" in out
    assert "-A FERRY_OUTPUT -d 10.96.0.0/12 -j RETURN" in out
    assert "-A FERRY_PREROUTING -p tcp -m tcp --dport 9090 -j RETURN" in _lines(
        cfg, 4, "nat", FERRY_PREROUTING
    )


def test_cidrs_only_in_their_family() -> None:
    cfg = CASES["exclusions"]
    v4, v6 = render(desired_rules(cfg), 4), render(desired_rules(cfg), 6)
    assert "10.96.0.0/12" in v4 and "fd00:10:96::/112" not in v4
    assert "fd00:10:96::/112" in v6 and "10.96.0.0/12" not in v6


def test_v6_mirrors_v4() -> None:
    cfg = CASES["exclusions"]
    ruleset = desired_rules(cfg)

    def shape(family: Family) -> list[tuple[str, str, str]]:
        return [
            (r.table, r.chain, r.target.render())
            for r in ruleset.rules
            if r.family == family and r.destination in (None, "!127.0.0.1/32", "!::1/128")
        ]

    assert shape(4) == shape(6)
    v4 = render(ruleset, 4).replace("127.0.0.1/32", "::1/128")
    v4 = v4.replace(PROBE_SOURCE[4], PROBE_SOURCE[6])
    v6 = render(ruleset, 6)
    strip = ("10.96.0.0/12", "fd00:10:96::/112")
    assert [x for x in v4.splitlines() if not any(s in x for s in strip)] == [
        x for x in v6.splitlines() if not any(s in x for s in strip)
    ]


def test_no_v6_when_disabled() -> None:
    cfg = RedirectionConfig(ipv6=False, exclude_outbound_cidrs=("fd00::/8",))
    ruleset = desired_rules(cfg)
    assert all(r.family == 4 for r in ruleset.rules)
    assert all(c.family == 4 for c in ruleset.chains)
    assert render(ruleset, 6) == ""
    assert all(r.family == 4 for r in desired_routing(cfg).rules + desired_routing(cfg).routes)


def test_exactly_one_jump_per_builtin_chain() -> None:
    ruleset = desired_rules(RedirectionConfig())
    for family in (4, 6):
        for table in ("nat", "mangle"):
            jumps = [
                r.line()
                for r in ruleset.rules_of(family, table)
                if r.chain in ("PREROUTING", "OUTPUT")
            ]
            assert jumps == [
                "-A PREROUTING -j FERRY_PREROUTING",
                "-A OUTPUT -j FERRY_OUTPUT",
            ]


def test_every_rule_says_why() -> None:
    assert all(r.comment for r in desired_rules(CASES["exclusions"]).rules)


def test_routing() -> None:
    assert desired_routing(RedirectionConfig()).commands() == (
        "ip -4 rule add fwmark 0x111/0xfff lookup 100",
        "ip -6 rule add fwmark 0x111/0xfff lookup 100",
        "ip -4 route add local 0.0.0.0/0 dev lo table 100",
        "ip -6 route add local ::/0 dev lo table 100",
    )


def test_compare_states() -> None:
    desired = ruleset_commands(desired_rules(RedirectionConfig()))
    assert compare(desired, desired).state == "ok"
    missing = compare(desired, ())
    assert missing.state == "missing" and missing.missing == desired
    drifted = compare(desired, (*desired[:-1], "iptables -t nat -A FERRY_OUTPUT -j ACCEPT"))
    assert drifted.state == "drifted"
    assert drifted.missing == desired[-1:]
    assert drifted.unexpected == ("iptables -t nat -A FERRY_OUTPUT -j ACCEPT",)


def test_reordered_rule_is_drift() -> None:
    lines = ("a", "b", "c")
    missing, unexpected = diff_lines(lines, ("b", "a", "c"))
    assert missing and unexpected
    assert set(missing) | set(unexpected) <= {"a", "b"}


def test_comment_is_not_part_of_identity() -> None:
    rule = desired_rules(RedirectionConfig()).rules[0]
    bare = Rule(rule.family, rule.table, rule.chain, rule.target)
    assert bare == rule and bare.line() == rule.line()


ports = st.lists(st.integers(min_value=1, max_value=65535), max_size=8)
octets = st.integers(min_value=0, max_value=255)
cidrs4 = st.builds(lambda a, b, n: f"{a}.{b}.0.0/{n}", octets, octets, st.integers(8, 16))


@given(out_ports=ports, in_ports=ports, cidrs=st.lists(cidrs4, max_size=4), ipv6=st.booleans())
def test_every_exclusion_returns_before_redirect(
    out_ports: list[int], in_ports: list[int], cidrs: list[str], ipv6: bool
) -> None:
    cfg = RedirectionConfig(
        exclude_outbound_ports=tuple(out_ports),
        exclude_inbound_ports=tuple(in_ports),
        exclude_outbound_cidrs=tuple(cidrs),
        ipv6=ipv6,
    )
    ruleset = desired_rules(cfg)
    for family in (4, 6) if ipv6 else (4,):
        for chain, excluded in (
            (FERRY_OUTPUT, [f"--dport {p} -j RETURN" for p in out_ports]),
            (FERRY_PREROUTING, [f"--dport {p} -j RETURN" for p in [cfg.tunnel_port, *in_ports]]),
        ):
            lines = _lines(cfg, family, "nat", chain)
            redirect = [i for i, line in enumerate(lines) if "-j REDIRECT" in line]
            assert len(redirect) == 1 and redirect[0] == len(lines) - 1
            for needle in excluded:
                assert any(line.endswith(needle) for line in lines[: redirect[0]]), needle
    out = _lines(cfg, 4, "nat", FERRY_OUTPUT)
    for cidr in cidrs:
        line = f"-A FERRY_OUTPUT -d {ipaddress.ip_network(cidr, strict=False)} -j RETURN"
        assert line in out[:-1]
    assert render(ruleset, 4) == render(desired_rules(cfg), 4)
