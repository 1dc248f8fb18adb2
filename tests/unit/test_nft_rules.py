"""The nftables table as data: golden files, the translation, the batch, and reading listings.

Regenerate the golden files with `UPDATE_GOLDEN=1 pytest tests/unit/test_nft_rules.py` and review
the diff; tests/integration/test_nftables_backend.py checks that the rendered table is exactly
what `nft list table inet ferry` prints once the batch is applied.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.config import RedirectionConfig
from agent.redirect.nft_rules import (
    commands,
    listing_commands,
    nft_table,
    removal,
    render,
    transaction,
)
from agent.redirect.rules import (
    FERRY_OUTPUT,
    Extension,
    Option,
    RedirectionError,
    Rule,
    RuleSet,
    desired_rules,
)

GOLDEN = Path(__file__).resolve().parent.parent / "golden"

CASES: dict[str, RedirectionConfig] = {
    "default": RedirectionConfig(),
    "exclusions": RedirectionConfig(
        exclude_outbound_ports=(22, 3306),
        exclude_inbound_ports=(9090,),
        exclude_outbound_cidrs=("10.96.0.0/12", "fd00:10:96::/112"),
    ),
    "ipv4_only": RedirectionConfig(ipv6=False, exclude_outbound_cidrs=("10.96.0.0/12",)),
    "full_mask": RedirectionConfig(mark_mask=0xFFFFFFFF),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    path = GOLDEN / f"nft_{case}.golden"
    text = render(nft_table(desired_rules(CASES[case])))
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"{path} is missing; run with UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{path} differs; run with UPDATE_GOLDEN=1 and review"


def _lines(case: str, chain: str) -> list[str]:
    table = nft_table(desired_rules(CASES[case]))
    return [r.line() for r in table.rules_of(chain)]


def test_every_iptables_rule_has_its_nft_rule() -> None:
    out = _lines("exclusions", "nat_output")
    assert out == [
        "meta mark & 0x00000fff == 0x00000539 return",
        "meta l4proto tcp ct mark & 0x00000fff == 0x00000111 return",
        'oifname "lo" return',
        "tcp dport 22 return",
        "tcp dport 3306 return",
        "ip daddr 10.96.0.0/12 return",
        "ip6 daddr fd00:10:96::/112 return",
        "meta l4proto tcp redirect to :15001",
    ]
    assert _lines("exclusions", "nat_prerouting") == [
        "tcp dport 15008 return",
        "ip saddr 169.254.7.127 meta l4proto tcp return",
        "ip6 saddr fd16:9254:7127:1337:ffff:ffff:ffff:ffff meta l4proto tcp return",
        "tcp dport 9090 return",
        "ip daddr != 127.0.0.1 meta l4proto tcp meta mark & 0x00000fff != 0x00000539 "
        "redirect to :15006",
        "ip6 daddr != ::1 meta l4proto tcp meta mark & 0x00000fff != 0x00000539 redirect to :15006",
    ]


def test_chains_hook_where_the_iptables_tables_do() -> None:
    table = nft_table(desired_rules(RedirectionConfig()))
    assert [c.command() for c in table.chains] == [
        "nft add chain inet ferry mangle_prerouting "
        "{ type filter hook prerouting priority mangle; policy accept; }",
        "nft add chain inet ferry mangle_output "
        "{ type route hook output priority mangle; policy accept; }",
        "nft add chain inet ferry nat_prerouting "
        "{ type nat hook prerouting priority dstnat; policy accept; }",
        "nft add chain inet ferry nat_output "
        "{ type nat hook output priority -100; policy accept; }",
    ]


def test_without_ipv6_every_rule_matches_ipv4_only() -> None:
    table = nft_table(desired_rules(CASES["ipv4_only"]))
    for rule in table.rules:
        assert rule.line().startswith(("meta nfproto ipv4 ", "ip daddr ", "ip saddr ")), rule.line()


def test_the_set_xmark_keeps_the_bits_outside_the_mask() -> None:
    (rule,) = nft_table(desired_rules(RedirectionConfig())).rules_of("mangle_prerouting")
    assert rule.line().endswith("ct mark set ct mark & 0xfffff111 | 0x00000111")
    value = rule.statements[-1].json["mangle"]["value"]
    keep, xor = value["|"][0]["&"][1], value["|"][1]
    for before in (0, 0xABCDE123, 0xFFFFFFFF):  # iptables: (ct & ~0xfff) ^ 0x111
        assert (before & keep) | xor == (before & ~0xFFF & 0xFFFFFFFF) ^ 0x111


def test_commands_read_back_from_the_rendered_listing() -> None:
    for cfg in CASES.values():
        table = nft_table(desired_rules(cfg))
        listing = "".join(line + "\n" for line in render(table).splitlines() if "#" not in line)
        assert listing_commands(listing) == commands(table)


def test_transaction_replaces_the_table_in_one_batch() -> None:
    table = nft_table(desired_rules(RedirectionConfig()))
    batch = transaction(table)["nftables"]
    ferry = {"table": {"family": "inet", "name": "ferry"}}
    assert batch[:3] == [{"add": ferry}, {"delete": ferry}, {"add": ferry}]
    assert [b["add"]["chain"]["name"] for b in batch[3:7]] == [c.name for c in table.chains]
    assert [b["add"]["rule"]["chain"] for b in batch[7:]] == [r.chain for r in table.rules]
    assert len(batch) == 3 + len(table.chains) + len(table.rules)
    assert removal() == {"nftables": [{"add": ferry}, {"delete": ferry}]}


def test_listing_of_foreign_objects() -> None:
    listing = (
        "table inet ferry {\n"
        '\tcomment "someone\'s"\n'
        "\tset blocked {\n\t\ttype ipv4_addr\n\t\telements = { 192.0.2.1, 192.0.2.2 }\n\t}\n\n"
        "\tchain extra {\n\t\tcounter packets 0 bytes 0 accept\n\t}\n\n"
        "\tchain empty {\n\t}\n"
        "}\n"
    )
    assert listing_commands(listing) == (
        "nft add table inet ferry",
        'nft add table inet ferry { comment "someone\'s" }',
        "nft add set inet ferry blocked { type ipv4_addr; elements = { 192.0.2.1, 192.0.2.2 } }",
        "nft add chain inet ferry extra",
        "nft add rule inet ferry extra counter packets 0 bytes 0 accept",
        "nft add chain inet ferry empty",
    )


@pytest.mark.parametrize(
    ("rule", "named"),
    [
        (
            Rule(4, "nat", FERRY_OUTPUT, Extension("DNAT", (Option("to", ("1.2.3.4",)),))),
            "-j DNAT --to 1.2.3.4",
        ),
        (
            Rule(4, "nat", FERRY_OUTPUT, Extension("RETURN"), matches=(Extension("owner"),)),
            "-m owner",
        ),
        (Rule(4, "nat", "OUTPUT", Extension("ACCEPT")), "iptables -t nat -A OUTPUT -j ACCEPT"),
    ],
)
def test_rules_without_a_translation_are_named(rule: Rule, named: str) -> None:
    jump = Rule(4, "nat", "OUTPUT", Extension(FERRY_OUTPUT))
    ruleset = RuleSet(rules=(jump, rule) if rule.chain == FERRY_OUTPUT else (rule,))
    with pytest.raises(RedirectionError, match=named.replace("-", r"\-")):
        nft_table(ruleset)
